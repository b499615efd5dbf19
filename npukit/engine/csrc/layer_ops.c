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

void npukit_add_rms_norm(const float *x, int64_t ldx, const float *delta, int64_t ldd, float *sum,
                         const float *w, float eps, float *out, int64_t M, int64_t N, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * N >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * ldx;
        if (delta) { /* the residual add: sum = x + delta, the same bits as torch's add */
            float *s = sum + m * N;
            for (int64_t n = 0; n < N; n++) s[n] = row[n] + delta[m * ldd + n];
            row = s;
        }
        float ss = 0.f;
        for (int64_t n = 0; n < N; n++) ss += row[n] * row[n];
        /* NOTE: in double: under -ffast-math gcc computes 1.0f / sqrtf(v) with an approximate rsqrt */
        const float r = (float)(1.0 / sqrt((double)(ss / (float)N + eps)));
        float *o = out + m * N;
        for (int64_t n = 0; n < N; n++) o[n] = w[n] * (row[n] * r); /* HF's order: normalise, then scale */
    }
}

/* NOTE: no fused multiply-add here, so the result has torch's bits: (x * cos) + (rotate_half(x) * sin), each
 * product rounded, as the three torch ops round them. */
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
static void rope_heads(float *x, int64_t heads, int64_t D, const float *cos, const float *sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            const float lo = a * cos[i] + (-b) * sin[i];
            const float hi = b * cos[i + half] + a * sin[i + half];
            v[i] = lo;
            v[i + half] = hi;
        }
    }
}
#pragma GCC pop_options

void npukit_rope(float *q, int64_t ldq, int64_t Hq, float *k, int64_t ldk, int64_t Hk, const float *cos,
                 const float *sin, int64_t M, int64_t D, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * (Hq + Hk) * D >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        rope_heads(q + m * ldq, Hq, D, cos + m * D, sin + m * D);
        rope_heads(k + m * ldk, Hk, D, cos + m * D, sin + m * D);
    }
}

/* bf16: HF's LlamaRMSNorm on bf16 rows: the sum of squares in fp32, x * r rounded to bf16, then times the bf16
 * weight, rounded again; the residual add rounded to bf16 as torch's add */
void npukit_add_rms_norm_bf16(const uint16_t *x, int64_t ldx, const uint16_t *delta, int64_t ldd, uint16_t *sum,
                              const uint16_t *w, float eps, uint16_t *out, int64_t M, int64_t N, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * N >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * ldx;
        if (delta) {
            uint16_t *s = sum + m * N;
            for (int64_t n = 0; n < N; n++) s[n] = f32_to_bf16(bf16_to_f32(row[n]) + bf16_to_f32(delta[m * ldd + n]));
            row = s;
        }
        float ss = 0.f;
        for (int64_t n = 0; n < N; n++) ss += bf16_to_f32(row[n]) * bf16_to_f32(row[n]);
        const float r = (float)(1.0 / sqrt((double)(ss / (float)N + eps)));
        uint16_t *o = out + m * N;
        for (int64_t n = 0; n < N; n++) o[n] = f32_to_bf16(bf16_to_f32(w[n]) * round_bf16(bf16_to_f32(row[n]) * r));
    }
}

/* bf16: each product rounded to bf16 (exact in fp32 before that: two 8-bit significands), then their sum */
static void rope_heads_bf16(uint16_t *x, int64_t heads, int64_t D, const uint16_t *cos, const uint16_t *sin) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; h++) {
        uint16_t *v = x + h * D;
        for (int64_t i = 0; i < half; i++) {
            const float a = bf16_to_f32(v[i]), b = bf16_to_f32(v[i + half]);
            v[i] = f32_to_bf16(round_bf16(a * bf16_to_f32(cos[i])) + round_bf16(-b * bf16_to_f32(sin[i])));
            v[i + half] = f32_to_bf16(round_bf16(b * bf16_to_f32(cos[i + half])) +
                                      round_bf16(a * bf16_to_f32(sin[i + half])));
        }
    }
}

void npukit_rope_bf16(uint16_t *q, int64_t ldq, int64_t Hq, uint16_t *k, int64_t ldk, int64_t Hk, const uint16_t *cos,
                      const uint16_t *sin, int64_t M, int64_t D, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * (Hq + Hk) * D >= PARALLEL_ELEMS)
    for (int64_t m = 0; m < M; m++) {
        rope_heads_bf16(q + m * ldq, Hq, D, cos + m * D, sin + m * D);
        rope_heads_bf16(k + m * ldk, Hk, D, cos + m * D, sin + m * D);
    }
}
