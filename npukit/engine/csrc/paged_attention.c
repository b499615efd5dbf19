/* Paged decode attention on CPU: one query token per sequence, K/V read in place from the cache blocks.
 *
 * What vLLM's paged_attention kernels do, in plain C for the compiler to vectorise (npukit.engine.cpu_attention
 * builds it with the system C compiler at first use and calls it through ctypes). float32 throughout.
 *
 *   q          [b, num_heads, head_dim]                       this step's query of each sequence
 *   k_cache    [num_blocks, block_size, num_kv_heads, head_dim] (v_cache the same)
 *   tables     [b, max_blocks]  int64                           each sequence's block table (padding unread)
 *   ctx_lens   [b]              int64                           tokens in the cache, this step's included
 *   window     keys at positions >= ctx_len - window only (0: no sliding window)
 *   out        [b, num_heads, head_dim]
 *
 * npukit_paged_decode_f32 takes fp32 tensors, npukit_paged_decode_bf16 bf16 ones (a bf16 model's q and KV cache):
 * the same fp32 arithmetic on the widened numbers, each output rounded once to bf16.
 *
 * Work items are sequences (or (sequence, KV head) pairs when there are fewer sequences than threads), shared
 * out over the OpenMP threads. Each item makes three passes over its positions: scores (one dot product per
 * query head, K read where it lies), a softmax, then the probability-weighted sum of V. K and V are each read
 * once, from memory (a 64-sequence step of SmolLM2 reads ~1 GB of them): the gather-then-SDPA path copies
 * them first. Measured on a 2-core Xeon (30 layers, 64 sequences x 384 tokens): 88 ms, where gather + SDPA
 * took ~250; a one-pass online softmax (K and V of a block read together) was slower here, 119 ms.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* x . y[y0 ..] with 16 independent partial sums (one 16-wide FMA chain per 16 elements, not one long chain),
 * added up once at the end */
static inline __attribute__((always_inline)) float dot(const float *x, const void *y, int64_t y0, int64_t n,
                                                       const int bf16) {
    float part[16] = {0.f};
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        for (int e = 0; e < 16; e++) part[e] += x[d + e] * load_elem(y, y0 + d + e, bf16);
    float acc = 0.f;
    for (; d < n; d++) acc += x[d] * load_elem(y, y0 + d, bf16);
    for (int e = 0; e < 16; e++) acc += part[e];
    return acc;
}

/* Blocks lie anywhere in memory, so the hardware prefetcher, which follows addresses within a page, stalls at
 * every block boundary: each row read asks for the row of the same offset one block ahead (block_size
 * positions later). */
static inline void prefetch_row(const char *p, int64_t bytes) {
#if defined(__GNUC__)
    for (int64_t c = 0; c < bytes; c += 64) __builtin_prefetch(p + c);
#endif
}

/* One work item: the m = heads * g query heads qi of KV heads h0 .. h0 + heads - 1 of sequence i, attending over
 * positions start .. start + n - 1, into oi (fp32 both). Always inlined, so that a constant head_dim D (64, 128: see
 * the caller) unrolls its loops and a constant bf16 picks the cache's element type. */
static inline __attribute__((always_inline)) int attend(
        const float *qi, const void *k_cache, const void *v_cache, const int64_t *tables, int64_t i, int64_t h0,
        int64_t heads, int64_t start, int64_t n, int64_t g, const int64_t D, int64_t row, int64_t block_size,
        int64_t max_blocks, float scale, float *oi, const int bf16) {
    const int64_t m = heads * g, esize = bf16 ? 2 : 4;
    float *s = malloc(sizeof(float) * (size_t)(m * (n > 0 ? n : 1)));  /* s[j][t]: scores, then weights */
    int64_t *at = malloc(sizeof(int64_t) * (size_t)(n > 0 ? n : 1));    /* at[t]: position t's cache row */
    if (s == NULL || at == NULL) {
        free(s);
        free(at);
        return -1;
    }
    /* the blocks walked once for both passes: one division per block, not per position and pass */
    for (int64_t t = 0; t < n;) {
        const int64_t pos = start + t, first = tables[i * max_blocks + pos / block_size] * block_size;
        for (int64_t off = pos % block_size; off < block_size && t < n; off++, t++) at[t] = first + off;
    }
    memset(oi, 0, sizeof(float) * (size_t)(m * D));
    /* 1. scores q_j . k_t * scale; query head j = h * g + r reads KV head h0 + h */
    for (int64_t t = 0; t < n; t++) {
        const int64_t k0 = at[t] * row + h0 * D;
        if (t + block_size < n) prefetch_row((const char *)k_cache + at[t + block_size] * row * esize, row * esize);
        for (int64_t h = 0, j = 0; h < heads; h++)
            for (int64_t r = 0; r < g; r++, j++) s[j * n + t] = dot(qi + j * D, k_cache, k0 + h * D, D, bf16) * scale;
    }
    /* 2. softmax over the positions */
    for (int64_t j = 0; j < m && n > 0; j++) {
        float *sj = s + j * n, mx = -FLT_MAX, total = 0.f;
        for (int64_t t = 0; t < n; t++) mx = sj[t] > mx ? sj[t] : mx;
        #pragma omp simd reduction(+:total)
        for (int64_t t = 0; t < n; t++) {
            sj[t] = expf(sj[t] - mx);
            total += sj[t];
        }
        const float inv = 1.f / total;
        for (int64_t t = 0; t < n; t++) sj[t] *= inv;
    }
    /* 3. out_j = sum_t p_jt v_t */
    for (int64_t t = 0; t < n; t++) {
        const int64_t v0 = at[t] * row + h0 * D;
        if (t + block_size < n) prefetch_row((const char *)v_cache + at[t + block_size] * row * esize, row * esize);
        for (int64_t h = 0, j = 0; h < heads; h++)
            for (int64_t r = 0; r < g; r++, j++) {
                const float p = s[j * n + t];
                #pragma omp simd
                for (int64_t d = 0; d < D; d++) oi[j * D + d] += p * load_elem(v_cache, v0 + h * D + d, bf16);
            }
    }
    free(s);
    free(at);
    return 0;
}

/* The work items of a step (below), each through attend with a constant head_dim where it is a common one; bf16:
 * q and out in bf16 (each item's q widened into a buffer, its output rounded from one) */
static inline __attribute__((always_inline)) int paged_decode(
        const void *q, const void *k_cache, const void *v_cache, const int64_t *tables, const int64_t *ctx_lens,
        int64_t b, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
        int64_t window, float scale, void *out, int num_threads, const int bf16) {
    const int64_t g = num_heads / num_kv_heads, D = head_dim, row = num_kv_heads * head_dim;
    /* whole K/V rows per item (all KV heads: contiguous reads, ~1.8x faster than one head per item), unless
     * there are fewer sequences than threads: then one KV head per item, so that every thread has work */
    const int64_t split = b < num_threads ? num_kv_heads : 1, heads = num_kv_heads / split, m = heads * g;
    int failed = 0;
    #pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < b * split; item++) {
        const int64_t i = item / split, h0 = (item % split) * heads, L = ctx_lens[i], q0 = (i * num_heads + h0 * g) * D;
        const int64_t start = (window > 0 && L > window) ? L - window : 0, n = L - start;
        float *buf = bf16 ? malloc(sizeof(float) * (size_t)(2 * m * D)) : NULL;
        if (bf16 && buf == NULL) {
            failed = 1;
            continue;
        }
        float *qi = bf16 ? buf : (float *)q + q0, *oi = bf16 ? buf + m * D : (float *)out + q0;
        for (int64_t e = 0; bf16 && e < m * D; e++) qi[e] = bf16_to_f32(((const uint16_t *)q)[q0 + e]);
        int rc;
        if (D == 64)
            rc = attend(qi, k_cache, v_cache, tables, i, h0, heads, start, n, g, 64, row, block_size, max_blocks,
                        scale, oi, bf16);
        else if (D == 128)
            rc = attend(qi, k_cache, v_cache, tables, i, h0, heads, start, n, g, 128, row, block_size, max_blocks,
                        scale, oi, bf16);
        else
            rc = attend(qi, k_cache, v_cache, tables, i, h0, heads, start, n, g, D, row, block_size, max_blocks,
                        scale, oi, bf16);
        for (int64_t e = 0; bf16 && e < m * D; e++) ((uint16_t *)out)[q0 + e] = f32_to_bf16(oi[e]);
        free(buf);
        if (rc) failed = 1;
    }
    return failed ? -1 : 0;
}

int npukit_paged_decode_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                            const int64_t *ctx_lens, int64_t b, int64_t num_heads, int64_t num_kv_heads,
                            int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t window, float scale,
                            float *out, int num_threads) {
    return paged_decode(q, k_cache, v_cache, tables, ctx_lens, b, num_heads, num_kv_heads, head_dim, block_size,
                        max_blocks, window, scale, out, num_threads, 0);
}

int npukit_paged_decode_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                             const int64_t *tables, const int64_t *ctx_lens, int64_t b, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t max_blocks,
                             int64_t window, float scale, uint16_t *out, int num_threads) {
    return paged_decode(q, k_cache, v_cache, tables, ctx_lens, b, num_heads, num_kv_heads, head_dim, block_size,
                        max_blocks, window, scale, out, num_threads, 1);
}
