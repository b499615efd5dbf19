/* The per-token steps around W8A8's int8 matmul (npukit.quant.kernels), one pass each, parallel over rows:
 *
 *   npukit_quantize_rows: x [M, K] fp32 or bf16 (rows ldx apart) -> q [M, K] int8, scale [M]: per row
 *                         s = max|x| / 127 (at least 1e-8 / 127), q = round-half-even(x * (1 / s)), as
 *                         quantize_per_token computes (bf16 values widened exactly, as x.float() does)
 *   npukit_scale_rows:    acc [M, N] int32 -> y [M, N] fp32 or bf16 = (acc * x_scale[m]) * w_scale[n], a bf16 y
 *                         rounded once from the fp32 value (as .to(torch.bfloat16) rounds it)
 *
 * In torch these are seven and three element-wise ops, each with a temporary tensor: in a 1,800-token prefill of
 * SmolLM2 they took longer than the int8 matmuls themselves. The scale and its reciprocal are divided in double
 * and rounded once to float: the correctly rounded quotient, the same bits as torch's fp32 division. The divisor
 * 127 is read from a volatile: as a constant, -ffast-math let gcc multiply by its rounded reciprocal instead
 * (scales one bit off). The rounding is the default mode's (half to even, as torch.round). Built by
 * npukit.engine.native.
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"

static inline __attribute__((always_inline)) void quantize_row(const void *x, int8_t *q, float *scale, int64_t K,
                                                               double divisor, const int bf16) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(load_elem(x, k, bf16)));
    const float s = (float)((double)fmaxf(amax, 1e-8f) / divisor);
    const float r = (float)(1.0 / (double)s);
    *scale = s;
    for (int64_t k = 0; k < K; k++) q[k] = (int8_t)rintf(load_elem(x, k, bf16) * r);
}

void npukit_quantize_rows(const void *x, int64_t ldx, int8_t *q, float *scale, int64_t M, int64_t K, int bf16,
                          int num_threads) {
    volatile double qmax = 127.0;
    const double divisor = qmax;
    const int64_t elem = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t m = 0; m < M; m++) {
        const char *row = (const char *)x + m * ldx * elem;
        if (bf16)
            quantize_row(row, q + m * K, scale + m, K, divisor, 1);
        else
            quantize_row(row, q + m * K, scale + m, K, divisor, 0);
    }
}

#define SCALE_CHUNK 256

static inline __attribute__((always_inline)) void scale_row(const int32_t *acc, float x_scale, const float *w_scale,
                                                            void *y, int64_t N, const int bf16) {
    /* NOTE: two passes over a chunk of the row (in L1), so that the products are torch's, (acc * x_scale) *
     * w_scale: in one expression -ffast-math let gcc multiply x_scale * w_scale first, a last bit off, and in W8A8
     * such a bit flips the rounding of the next layer's activations now and then (perplexity 16.95 against 16.81). */
    float part[SCALE_CHUNK];
    for (int64_t n0 = 0; n0 < N; n0 += SCALE_CHUNK) {
        const int64_t len = N - n0 < SCALE_CHUNK ? N - n0 : SCALE_CHUNK;
        for (int64_t n = 0; n < len; n++) part[n] = (float)acc[n0 + n] * x_scale;
        for (int64_t n = 0; n < len; n++) store_elem(y, n0 + n, part[n] * w_scale[n0 + n], bf16);
    }
}

void npukit_scale_rows(const int32_t *acc, const float *x_scale, const float *w_scale, void *y, int64_t M, int64_t N,
                       int bf16, int num_threads) {
    const int64_t elem = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t m = 0; m < M; m++) {
        void *row = (char *)y + m * N * elem;
        if (bf16)
            scale_row(acc + m * N, x_scale[m], w_scale, row, N, 1);
        else
            scale_row(acc + m * N, x_scale[m], w_scale, row, N, 0);
    }
}
