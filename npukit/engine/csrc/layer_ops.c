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

/* Each pass is written once, for both element types (load_elem, store_elem, as_stored: bf16.h). NOTE: the OpenMP
 * loops are in the exported functions, not in a shared inlined one: a parallel region is outlined before inlining,
 * and bf16 would be a run-time value there (not vectorised: 5x slower RoPE). */
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
            store_elem(sum, m * N + n, load_elem(x, r0 + n, bf16) + load_elem(delta, m * ldd + n, bf16), bf16);
        row = sum;
        r0 = m * N;
    }
    float ss = 0.f;
    for (int64_t n = 0; n < N; n++) ss += load_elem(row, r0 + n, bf16) * load_elem(row, r0 + n, bf16);
    /* NOTE: in double: under -ffast-math gcc computes 1.0f / sqrtf(v) with an approximate rsqrt */
    const float r = (float)(1.0 / sqrt((double)(ss / (float)N + eps)));
    for (int64_t n = 0; n < N; n++)
        store_elem(out, m * N + n, load_elem(w, n, bf16) * as_stored(load_elem(row, r0 + n, bf16) * r, bf16), bf16);
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
            const float a = load_elem(x, lo, bf16), b = load_elem(x, hi, bf16);
            const float lo_v = as_stored(a * load_elem(cos, c0 + i, bf16), bf16) +
                               as_stored(-b * load_elem(sin, c0 + i, bf16), bf16);
            const float hi_v = as_stored(b * load_elem(cos, c0 + i + half, bf16), bf16) +
                               as_stored(a * load_elem(sin, c0 + i + half, bf16), bf16);
            store_elem(x, lo, lo_v, bf16);
            store_elem(x, hi, hi_v, bf16);
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
