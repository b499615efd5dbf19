/* bfloat16 <-> float for npukit's C kernels: a bf16 number is the top half of a float's bits. */
#ifndef NPUKIT_BF16_H
#define NPUKIT_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) { /* exact */
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* rounded to nearest, ties to even, as torch rounds a float to bf16; a NaN stays a (quiet) NaN */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to bf16, as a float: what a torch op on bf16 tensors stores */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }
/* Element i of fp32 or bf16 data as a float (load_elem), a float stored as one (store_elem), v as a torch op of that
 * dtype leaves it (as_stored). Kernels written once for both element types call these with a constant bf16
 * flag, so that where they are inlined no branch is left in the loops. */
static inline __attribute__((always_inline)) float load_elem(const void *p, int64_t i, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline __attribute__((always_inline)) void store_elem(void *p, int64_t i, float v, const int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}
static inline __attribute__((always_inline)) float as_stored(float v, const int bf16) {
    return bf16 ? round_bf16(v) : v;
}
#endif
