/* The element-wise work of a decoder layer, fp32 or bf16 rows, one pass each (npukit.engine.cpu_ops):
 *
 *   npukit_add_rms_norm: x [M, N] (+ delta [M, N] when given, the sum written to sum)
 *                        -> out = w * (x * rsqrt(mean(x^2) + eps))
 *   npukit_rope:         q [M, Hq, D] and k [M, Hk, D] in place: x * cos + rotate_half(x) * sin
 *   ..._bf16:            the same on bf16 tensors, in fp32, each result rounded to bf16 where torch's bf16 ops
 *                        round theirs (so RoPE and the residual add have torch's bits)
 *
 * In torch these are eight and twelve ops, each a dispatch and a temporary tensor: at one decode row their
 * overhead is all their cost. Rows are independent (a row's result never depends on the others in the batch)
 * and parallel with OpenMP only where there are enough of them.
 * Built by npukit.engine.native (-O3 -ffast-math -march=native).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

#define PARALLEL_ELEMS (1 << 16) /* below this many elements one thread does it: waking others costs more */

/* Each pass is written once, for both element types: element i of fp32 or bf16 data as a float (load), a float
 * stored as one (store), v as a torch op of that dtype leaves it (as_stored). The per-row functions are inlined
 * with a constant bf16, so no branch is left in their loops. NOTE: the OpenMP loops are in the exported functions,
 * not in a shared inlined one: a parallel region is outlined before inlining, and bf16 would be a run-time value
 * there (not vectorised: 5x slower RoPE). */
static inline __attribute__((always_inline)) float load(const void *p, int64_t i, const int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline __attribute__((always_inline)) void store(void *p, int64_t i, float v, const int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}
static inline __attribute__((always_inline)) float as_stored(float v, const int bf16) {
    return bf16 ? round_bf16(v) : v;
}

/* Row m of HF's LlamaRMSNorm: the sum of squares in fp32, x * r (rounded to the dtype), times the weight (HF's
 * order: normalise, then scale); the residual add first when delta is given (the sum written to sum, rounded as
 * torch's add rounds it) */
static inline __attribute__((always_inline)) void add_rms_norm_row(
        const void *x, int64_t ldx, const void *delta, int64_t ldd, void *sum, const void *w, float eps, void *out,
        int64_t m, int64_t N, const int bf16) {
    const void *row = x;
    int64_t r0 = m * ldx;
    if (delta) {
        for (int64_t n = 0; n < N; n++)
            store(sum, m * N + n, load(x, r0 + n, bf16) + load(delta, m * ldd + n, bf16), bf16);
        row = sum;
        r0 = m * N;
    }
    float ss = 0.f;
    for (int64_t n = 0; n < N; n++) ss += load(row, r0 + n, bf16) * load(row, r0 + n, bf16);
    /* NOTE: in double: under -ffast-math gcc computes 1.0f / sqrtf(v) with an approximate rsqrt */
    const float r = (float)(1.0 / sqrt((double)(ss / (float)N + eps)));
    for (int64_t n = 0; n < N; n++)
        store(out, m * N + n, load(w, n, bf16) * as_stored(load(row, r0 + n, bf16) * r, bf16), bf16);
}

void npukit_add_rms_norm(const float *x, int64_t ldx, const float *delta, int64_t ldd, float *sum,
                         const float *w, float eps, float *out, int64_t M, int64_t N, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * N >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) add_rms_norm_row(x, ldx, delta, ldd, sum, w, eps, out, m, N, 0);
}

void npukit_add_rms_norm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *delta, int64_t ldd, uint16_t *sum,
                              const uint16_t *w, float eps, uint16_t *out, int64_t M, int64_t N, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * N >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) add_rms_norm_row(x, ldx, delta, ldd, sum, w, eps, out, m, N, 1);
}

/* NOTE: no fused multiply-add in RoPE, so the result has torch's bits: (x * cos) + (rotate_half(x) * sin), each
 * product rounded (in a bf16 model to bf16 too: exact in fp32 before that, two 8-bit significands), as the three
 * torch ops round them. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
/* RoPE on the heads of one row, in place; cos and sin: that row's */
static inline __attribute__((always_inline)) void rope_heads(void *x, int64_t x0, int64_t heads, int64_t D,
                                                              const void *cos, const void *sin, int64_t c0,
                                                              const int bf16) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++)
        for (int64_t i = 0; i < half; i++) {
            const int64_t lo = x0 + h * D + i, hi = lo + half;
            const float a = load(x, lo, bf16), b = load(x, hi, bf16);
            store(x, lo, as_stored(a * load(cos, c0 + i, bf16), bf16) + as_stored(-b * load(sin, c0 + i, bf16), bf16),
                  bf16);
            store(x, hi, as_stored(b * load(cos, c0 + i + half, bf16), bf16) +
                         as_stored(a * load(sin, c0 + i + half, bf16), bf16), bf16);
        }
}

void npukit_rope(float *q, int64_t ldq, int64_t Hq, float *k, int64_t ldk, int64_t Hk, const float *cos,
                 const float *sin, int64_t M, int64_t D, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * (Hq + Hk) * D >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        rope_heads(q, m * ldq, Hq, D, cos, sin, m * D, 0);
        rope_heads(k, m * ldk, Hk, D, cos, sin, m * D, 0);
    }
}

void npukit_rope_bf16(uint16_t *q, int64_t ldq, int64_t Hq, uint16_t *k, int64_t ldk, int64_t Hk, const uint16_t *cos,
                      const uint16_t *sin, int64_t M, int64_t D, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * (Hq + Hk) * D >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        rope_heads(q, m * ldq, Hq, D, cos, sin, m * D, 1);
        rope_heads(k, m * ldk, Hk, D, cos, sin, m * D, 1);
    }
}
#pragma GCC pop_options
