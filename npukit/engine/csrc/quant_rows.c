/* The per-token steps around W8A8's int8 matmul (npukit.quant.kernels), one pass each, parallel over rows:
 *
 *   npukit_quantize_rows: x [M, K] fp32 (rows ldx apart) -> q [M, K] int8, scale [M]: per row s = max|x| / 127
 *                         (at least 1e-8 / 127), q = round-half-even(x * (1 / s)), as quantize_per_token computes
 *   npukit_scale_rows:    acc [M, N] int32 -> y [M, N] fp32 = (acc * x_scale[m]) * w_scale[n]
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

void npukit_quantize_rows(const float *x, int64_t ldx, int8_t *q, float *scale, int64_t M, int64_t K,
                          int num_threads) {
    volatile double qmax = 127.0;
    const double divisor = qmax;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        float amax = 0.f;
        for (int64_t k = 0; k < K; k++) amax = fmaxf(amax, fabsf(row[k]));
        const float s = (float)((double)fmaxf(amax, 1e-8f) / divisor);
        const float r = (float)(1.0 / (double)s);
        scale[m] = s;
        for (int64_t k = 0; k < K; k++) q[m * K + k] = (int8_t)rintf(row[k] * r);
    }
}

void npukit_scale_rows(const int32_t *acc, const float *x_scale, const float *w_scale, float *y, int64_t M,
                       int64_t N, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t m = 0; m < M; m++) {
        /* NOTE: two passes over the row (in L1), so that the products are torch's, (acc * x_scale) * w_scale: in
         * one expression -ffast-math let gcc multiply x_scale * w_scale first, a last bit off, and in W8A8 such a
         * bit flips the rounding of the next layer's activations now and then (perplexity 16.95 against 16.81). */
        float *row = y + m * N;
        for (int64_t n = 0; n < N; n++) row[n] = (float)acc[m * N + n] * x_scale[m];
        for (int64_t n = 0; n < N; n++) row[n] *= w_scale[n];
    }
}
