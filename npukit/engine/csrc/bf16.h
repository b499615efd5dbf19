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
#endif
