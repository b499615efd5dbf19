/* Paged attention on CPU, K/V read in place from the cache blocks: decode (one query token per sequence) and
 * prefill (a chunk of new tokens per sequence, causal over the sequence's earlier tokens and its own).
 *
 * What vLLM's paged_attention kernels do, in plain C for the compiler to vectorise (npukit.engine.cpu_attention
 * builds it with the system C compiler at first use and calls it through ctypes). float32 arithmetic throughout.
 *
 * Decode:
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
 * (An AVX512 rewrite with bf16 dot products was 0.55-0.75x as long on one layer's cache, held in L3, but
 * 1.04-1.14x over 30 layers' caches in DRAM at 8-64 sequences: this loop reads K/V at the memory's rate.)
 * That holds for SmolLM2's 3 query heads per KV head of 64 dims; with more query heads per KV head, or 128 dims,
 * this loop computes more per byte than it reads, and bf16 caches take the prefill kernel's tiles instead on
 * CPUs with AVX512-BF16 (npukit_paged_decode_bf16, at the end of the file).
 *
 * Prefill: see the second half of the file.
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

/* ------------------------------------------------------------------------------------------------- prefill
 * Sequence i's new tokens are rows starts[i] .. starts[i] + lens[i] - 1 of q (row stride ldq elements, heads
 * contiguous within a row, as a q/k/v projection's column view gives them) and of out ([T, num_heads, head_dim]),
 * at positions computed[i] ..; their K/V are already in the cache (the runner writes before it attends), so a
 * first chunk and a later chunk over a cached prefix are one path. Query position p attends to the keys at
 * positions <= p (and > p - window with a sliding window).
 *
 * Flash attention's loop: a work item is QT query positions of one sequence and the g query heads of one KV head
 * (rows rho = u * g + r), over keys in tiles of KT that are copied out of the blocks once per item (K transposed),
 * with a running max and sum per row (online softmax), so scores never leave a small buffer. Rows are computed RB
 * at a time: RB x KT scores and two rows' outputs stay in registers. Items run latest query positions first (they
 * have the most keys), dynamically shared out over the threads; all prefills of a step are one call. A one-token
 * chunk (bf16 decode rows take this path too, see the end of the file) is one item for all KV heads of its sequence
 * when there are at least two such items per thread.
 *
 * Where the compiler targets AVX512-BF16 (Zen 4, Sapphire Rapids) a bf16 cache takes bf16 dot products
 * (vdpbf16ps: products of bf16 pairs summed in fp32): q and K tiles as bf16 pairs, V tiles with two positions'
 * values interleaved, and the softmax weights rounded to bf16 before they multiply V, as torch's CPU flash
 * attention does for bf16. Elsewhere (and for fp32) the numbers are widened to fp32 and multiplied with FMAs.
 * SmolLM2's shapes (9 heads, 3 KV heads, head_dim 64) on a 2-core AMD EPYC, 500-2048 new tokens a step: bf16
 * 100-117 GFLOP/s (0.53-0.62x the time of torch's SDPA on the gathered K/V, which ran at 61-63), fp32 60-83
 * (0.72-0.83x); one 548-token chunk after 1500 cached tokens, where SDPA reaches ~112: bf16 0.84x, fp32 1.10x.
 * head_dim 128 (8 heads, 2 KV heads): bf16 0.44-0.51x, fp32 0.61-0.84x (1.14x for that chunk). (bf16 before the
 * vectorised tile copies below, which took it to ~0.8x that.)
 */
#if defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_DPBF16 1
#else
#define HAVE_DPBF16 0
#endif

#define QT 16 /* query positions per work item */
#define KT 16 /* key positions per tile (32 spilled registers) */
#define RB 8  /* score rows computed together */

typedef uint32_t bf16_pair __attribute__((may_alias, aligned(2))); /* two bf16 numbers read as one word */
#if defined(__AVX512F__) /* a tile row of scores or keys, at any float's address (a typedef may lower the alignment) */
typedef float v16f __attribute__((vector_size(KT * sizeof(float)), aligned(sizeof(float))));
#endif

struct prefill { /* what every work item of a call reads */
    const void *q, *k_cache, *v_cache;
    const int64_t *tables, *starts, *lens, *computed;
    int64_t num_heads, num_kv_heads, block_size, max_blocks, ldq, window;
    float scale;
    void *out;
};

/* query positions first .. first + QT - 1 of sequence seq's chunk, for KV heads kv_head .. kv_head + num_kv - 1 */
struct prefill_item { int64_t seq, first, kv_head, num_kv; };

/* how many query positions item w has (QT, or fewer at its chunk's end) */
static inline int64_t item_positions(const struct prefill *a, struct prefill_item w) {
    const int64_t left = a->lens[w.seq] - w.first;
    return left < QT ? left : QT;
}

#if HAVE_DPBF16
/* r[0..15]: 16 rows of 16 32-bit words, transposed in place (r[j] word t = r[t] word j before) */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int j = 0; j < 4; j++) {
            t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
            t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
        r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
    }
}

/* load_tile's bf16 pairs, with AVX512 shuffles: K rows transposed 16 x 16 words at a time, V rows t and t + 1
 * interleaved (D a multiple of 32); the next tile's rows prefetched. With the weights' conversion in tile_values
 * vectorised too, the bf16 prefill kernel took 0.78-0.82x the time of its element-by-element copies (SmolLM2's
 * layout), 0.84-0.90x (qwen2-1024x8's), the same bits. */
static inline __attribute__((always_inline)) void load_tile_dp(
        const struct prefill *a, const int64_t *table, int64_t h, int64_t k0, int64_t hi, const int64_t D,
        uint32_t *kt2, uint32_t *vt2) {
    const int64_t row = a->num_kv_heads * D, bs = a->block_size;
    const uint16_t *kr[KT], *vr[KT];
    for (int t = 0; t < KT; t++) {
        const int64_t pos = k0 + t;
        kr[t] = vr[t] = NULL;
        if (pos < hi) {
            const int64_t at = (table[pos / bs] * bs + pos % bs) * row + h * D;
            kr[t] = (const uint16_t *)a->k_cache + at;
            vr[t] = (const uint16_t *)a->v_cache + at;
        }
        if (pos + KT < hi) { /* the next tile's rows, in another block: the hardware prefetcher cannot guess it */
            const int64_t next = (table[(pos + KT) / bs] * bs + (pos + KT) % bs) * row + h * D;
            prefetch_row((const char *)((const uint16_t *)a->k_cache + next), 2 * D);
            prefetch_row((const char *)((const uint16_t *)a->v_cache + next), 2 * D);
        }
    }
    for (int64_t c = 0; c < D / 32; c++) {
        __m512i r[16];
        for (int t = 0; t < KT; t++) r[t] = kr[t] ? _mm512_loadu_si512(kr[t] + 32 * c) : _mm512_setzero_si512();
        transpose16(r);
        for (int j = 0; j < 16; j++) _mm512_storeu_si512(kt2 + (16 * c + j) * KT, r[j]);
    }
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0); /* x[0], y[0], x[1], y[1], .. */
    const __m512i hi16 = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int t = 0; t < KT; t += 2)
        for (int64_t c = 0; c < D / 32; c++) {
            const __m512i x = vr[t] ? _mm512_loadu_si512(vr[t] + 32 * c) : _mm512_setzero_si512();
            const __m512i y = vr[t + 1] ? _mm512_loadu_si512(vr[t + 1] + 32 * c) : _mm512_setzero_si512();
            _mm512_storeu_si512(vt2 + (t / 2) * D + 32 * c, _mm512_permutex2var_epi16(x, lo, y));
            _mm512_storeu_si512(vt2 + (t / 2) * D + 32 * c + 16, _mm512_permutex2var_epi16(x, hi16, y));
        }
}
#endif

/* Copy keys k0 .. k0 + KT - 1 (those below hi; the rest zero) of KV head h into the tile buffers: fp32 kt[d][t] and
 * vt[t][d], or (dp) bf16 pairs kt2[d / 2][t] (K row t's words) and vt2[t / 2][d] (V[t][d] and V[t + 1][d]). */
static inline __attribute__((always_inline)) void load_tile(
        const struct prefill *a, const int64_t *table, int64_t h, int64_t k0, int64_t hi, const int64_t D, float *kt,
        float *vt, const int bf16, const int dp) {
#if HAVE_DPBF16
    if (dp) {
        load_tile_dp(a, table, h, k0, hi, D, (uint32_t *)kt, (uint32_t *)vt);
        return;
    }
#endif
    (void)dp;
    const int64_t row = a->num_kv_heads * D, bs = a->block_size;
    for (int64_t t = 0; t < KT; t++) {
        const int64_t pos = k0 + t;
        if (pos >= hi) { /* past the chunk's last position: zeros */
            for (int64_t d = 0; d < D; d++) kt[d * KT + t] = vt[t * D + d] = 0.f;
            continue;
        }
        const int64_t at = (table[pos / bs] * bs + pos % bs) * row + h * D;
        for (int64_t d = 0; d < D; d++) {
            kt[d * KT + t] = load_elem(a->k_cache, at + d, bf16);
            vt[t * D + d] = load_elem(a->v_cache, at + d, bf16);
        }
    }
}

/* s[b][t] = q_rho . k_t for rows rho0 .. rho0 + RB - 1 of the item and the tile's keys */
static inline __attribute__((always_inline)) void tile_scores(const float *qf, const float *kt, int64_t rho0,
                                                              const int64_t D, float s[RB][KT], const int dp,
                                                              const int rb) {
#if HAVE_DPBF16
    if (dp) {
        const uint32_t *qp = (const uint32_t *)qf, *kt2 = (const uint32_t *)kt;
        __m512 x[RB];
        for (int b = 0; b < rb; b++) x[b] = _mm512_setzero_ps();
        for (int64_t i = 0; i < D / 2; i++) {
            const __m512bh k = (__m512bh)_mm512_loadu_si512(kt2 + i * KT);
            for (int b = 0; b < rb; b++)
                x[b] = _mm512_dpbf16_ps(x[b], (__m512bh)_mm512_set1_epi32((int)qp[(rho0 + b) * (D / 2) + i]), k);
        }
        for (int b = 0; b < rb; b++) _mm512_storeu_ps(s[b], x[b]);
        return;
    }
#endif
    (void)dp;
#if defined(__AVX512F__)
    /* RB sums of KT lanes in RB registers, written with GCC / Clang vector types: as the float[RB][KT] array below,
     * GCC kept one of them on the stack, a load-FMA-store chain that took a quarter of the kernel's time (the
     * AVX512 EPYC: 0.79-0.86x the time with these types) */
    v16f x[RB];
    for (int b = 0; b < rb; b++) x[b] = (v16f){0.f};
    for (int64_t d = 0; d < D; d++) {
        const v16f k = *(const v16f *)(kt + d * KT);
        for (int b = 0; b < rb; b++) x[b] += qf[(rho0 + b) * D + d] * k;
    }
#else
    /* narrower vectors (AVX2, SSE, NEON): the compiler's own blocking of the array; the vector types above took
     * 2x as long in an AVX2 build (16 of its 16 registers for the sums: spilled) */
    float x[RB][KT] = {{0.f}};
    for (int64_t d = 0; d < D; d++)
        for (int b = 0; b < rb; b++) {
            const float qd = qf[(rho0 + b) * D + d];
            for (int t = 0; t < KT; t++) x[b][t] += qd * kt[d * KT + t];
        }
#endif
    memcpy(s, x, sizeof x[0] * rb);
}

/* acc_rho += sum_t s[b][t] v_t for the RB rows from rho0, two rows at a time (their sums kept in registers) */
static inline __attribute__((always_inline)) void tile_values(float *acc, const float *vt, int64_t rho0,
                                                              const int64_t D, float s[RB][KT], const int dp,
                                                              const int rb) {
#if HAVE_DPBF16
    if (dp) {
        const uint32_t *vt2 = (const uint32_t *)vt;
        for (int b = 0; b < rb; b += 2) {
            float *a0 = acc + (rho0 + b) * D, *a1 = a0 + D;
            __m512 y0[D / 16], y1[D / 16];
            for (int64_t e = 0; e < D / 16; e++) {
                y0[e] = _mm512_loadu_ps(a0 + 16 * e);
                y1[e] = _mm512_loadu_ps(a1 + 16 * e);
            }
            /* the two rows' weights as bf16 pairs (t, t + 1), rounded to nearest even (vcvtneps2bf16: as f32_to_bf16,
             * but weights below 2^-126 become 0) */
            uint32_t w[2][KT / 2];
            _mm256_storeu_si256((__m256i *)w[0], (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s[b])));
            _mm256_storeu_si256((__m256i *)w[1], (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(s[b + 1])));
            for (int j = 0; j < KT / 2; j++) {
                const __m512bh p0 = (__m512bh)_mm512_set1_epi32((int)w[0][j]);
                const __m512bh p1 = (__m512bh)_mm512_set1_epi32((int)w[1][j]);
                for (int64_t e = 0; e < D / 16; e++) {
                    const __m512bh v = (__m512bh)_mm512_loadu_si512(vt2 + j * D + 16 * e);
                    y0[e] = _mm512_dpbf16_ps(y0[e], p0, v);
                    y1[e] = _mm512_dpbf16_ps(y1[e], p1, v);
                }
            }
            for (int64_t e = 0; e < D / 16; e++) {
                _mm512_storeu_ps(a0 + 16 * e, y0[e]);
                _mm512_storeu_ps(a1 + 16 * e, y1[e]);
            }
        }
        return;
    }
#endif
    (void)dp;
    for (int b = 0; b < rb; b += 2) {
        float *a0 = acc + (rho0 + b) * D, *a1 = a0 + D, x0[D], x1[D];
        for (int64_t d = 0; d < D; d++) {
            x0[d] = a0[d];
            x1[d] = a1[d];
        }
        for (int t = 0; t < KT; t++)
            for (int64_t d = 0; d < D; d++) {
                x0[d] += s[b][t] * vt[t * D + d];
                x1[d] += s[b + 1][t] * vt[t * D + d];
            }
        for (int64_t d = 0; d < D; d++) {
            a0[d] = x0[d];
            a1[d] = x1[d];
        }
    }
}

/* The online softmax of one row over a tile: scale the scores, mask them where the tile has keys at positions
 * k0 + t that query position p may not see (weight 0; masked == 0: it sees them all, a loop the compiler
 * vectorises), raise the row's max, rescale its running sum and output by the change */
static inline __attribute__((always_inline)) void tile_softmax(float *srow, float *mx, float *l, float *acc_row,
                                                               int64_t k0, int64_t p, int64_t window, float scale,
                                                               int masked, const int64_t D) {
    float m = *mx;
    if (masked)
        for (int t = 0; t < KT; t++) {
            const int64_t pos = k0 + t;
            srow[t] = pos <= p && (window <= 0 || pos > p - window) ? srow[t] * scale : -FLT_MAX;
        }
    else
        for (int t = 0; t < KT; t++) srow[t] *= scale;
    for (int t = 0; t < KT; t++) m = srow[t] > m ? srow[t] : m;
    const float corr = expf(*mx - m);
    float sum = 0.f;
    #pragma omp simd reduction(+:sum)
    for (int t = 0; t < KT; t++) {
        srow[t] = srow[t] == -FLT_MAX ? 0.f : expf(srow[t] - m);
        sum += srow[t];
    }
    *mx = m;
    *l = *l * corr + sum;
    for (int64_t d = 0; d < D; d++) acc_row[d] *= corr;
}

/* One work item (see above) with head_dim D; dp: bf16 dot products (a bf16 cache, D 64 or 128); rb: rows computed
 * together (RB, or 4 for items of at most 4 rows). An item of several KV heads walks the tiles once, each tile for
 * every head in turn, so each K/V row is read whole while it is in the cache. */
static inline __attribute__((always_inline)) int prefill_one(const struct prefill *a, struct prefill_item w,
                                                             const int64_t D, const int bf16, const int dp,
                                                             const int rb) {
    const int64_t g = a->num_heads / a->num_kv_heads, window = a->window, i = w.seq, nh = w.num_kv;
    const int64_t nq = item_positions(a, w);
    const int64_t p0 = a->computed[i] + w.first, r0 = a->starts[i] + w.first; /* position and q row of the first */
    const int64_t R = nq * g, RP = (R + rb - 1) / rb * rb, hi = p0 + nq;
    const int64_t lo = (window > 0 && p0 + 1 > window) ? p0 + 1 - window : 0;
    const int64_t *table = a->tables + i * a->max_blocks;
    /* per KV head: acc [RP][D], mx [RP], l [RP], q [RP][D] (fp32; dp: bf16 pairs); then K and V tiles (the same) */
    const int64_t per = 2 * RP * D + 2 * RP;
    float *buf = malloc(sizeof(float) * (size_t)(nh * per + 2 * KT * D));
    if (buf == NULL) return -1;
    float *kt = buf + nh * per, *vt = kt + KT * D;
    for (int64_t hh = 0; hh < nh; hh++) {
        float *acc = buf + hh * per, *mx = acc + RP * D, *l = mx + RP, *qf = l + RP;
        for (int64_t rho = 0; rho < RP; rho++) {
            const int64_t u = rho / g, src = (r0 + u) * a->ldq + ((w.kv_head + hh) * g + rho % g) * D;
            mx[rho] = -FLT_MAX;
            l[rho] = 0.f;
            for (int64_t d = 0; d < D; d++) acc[rho * D + d] = 0.f;
            if (dp) {
                uint32_t *qp = (uint32_t *)qf + rho * (D / 2);
                const bf16_pair *qr = (const bf16_pair *)((const uint16_t *)a->q + src);
                for (int64_t d = 0; d < D / 2; d++) qp[d] = u < nq ? qr[d] : 0u;
            } else {
                for (int64_t d = 0; d < D; d++) qf[rho * D + d] = u < nq ? load_elem(a->q, src + d, bf16) : 0.f;
            }
        }
    }
    for (int64_t k0 = lo - lo % KT; k0 < hi; k0 += KT)
        for (int64_t hh = 0; hh < nh; hh++) {
            float *acc = buf + hh * per, *mx = acc + RP * D, *l = mx + RP, *qf = l + RP;
            load_tile(a, table, w.kv_head + hh, k0, hi, D, kt, vt, bf16, dp);
            for (int64_t rho0 = 0; rho0 < RP; rho0 += rb) {
                const int64_t p_first = p0 + rho0 / g, p_last = p0 + (rho0 + rb - 1) / g;
                if (k0 > p_last || (window > 0 && k0 + KT - 1 <= p_first - window)) continue; /* no key seen */
                /* every key seen by every row: before the first row's position, inside the last row's window */
                const int masked = k0 + KT - 1 > p_first || (window > 0 && k0 <= p_last - window);
                float s[RB][KT];
                tile_scores(qf, kt, rho0, D, s, dp, rb);
                for (int b = 0; b < rb; b++)
                    tile_softmax(s[b], mx + rho0 + b, l + rho0 + b, acc + (rho0 + b) * D, k0, p0 + (rho0 + b) / g,
                                 window, a->scale, masked, D);
                tile_values(acc, vt, rho0, D, s, dp, rb);
            }
        }
    for (int64_t hh = 0; hh < nh; hh++) {
        const float *acc = buf + hh * per, *l = acc + RP * D + RP;
        for (int64_t rho = 0; rho < R; rho++) {
            const int64_t dst = ((r0 + rho / g) * a->num_heads + (w.kv_head + hh) * g + rho % g) * D;
            const float inv = 1.f / l[rho];
            for (int64_t d = 0; d < D; d++) store_elem(a->out, dst + d, acc[rho * D + d] * inv, bf16);
        }
    }
    free(buf);
    return 0;
}

/* The step's work items, latest query positions of each sequence first; NULL when malloc fails. A one-token chunk
 * (a decode row) is one item for all KV heads when there are enough of them to keep the threads busy: its K/V rows
 * are then read whole, once. */
static struct prefill_item *prefill_items(const struct prefill *a, int64_t num_seqs, int num_threads,
                                          int64_t *count) {
    int64_t n = 0, ones = 0;
    for (int64_t i = 0; i < num_seqs; i++) ones += a->lens[i] == 1;
    const int whole = ones >= 2 * num_threads;
    for (int64_t i = 0; i < num_seqs; i++)
        n += (a->lens[i] + QT - 1) / QT * (whole && a->lens[i] == 1 ? 1 : a->num_kv_heads);
    struct prefill_item *items = malloc(sizeof *items * (size_t)(n > 0 ? n : 1));
    *count = n;
    for (int64_t i = 0, k = 0; items != NULL && i < num_seqs; i++) {
        if (a->lens[i] <= 0) continue; /* no rows: no items (counted as none above) */
        if (whole && a->lens[i] == 1) {
            items[k++] = (struct prefill_item){i, 0, 0, a->num_kv_heads};
            continue;
        }
        for (int64_t first = (a->lens[i] - 1) / QT * QT; first >= 0; first -= QT)
            for (int64_t h = 0; h < a->num_kv_heads; h++) items[k++] = (struct prefill_item){i, first, h, 1};
    }
    return items;
}

/* one item, with a constant head_dim where it is a common one; bf16 dot products where they apply; rows computed
 * 4 at a time where an item has at most 4 (a decode row of 4 query heads per KV head, or fewer) */
static inline __attribute__((always_inline)) int prefill_dispatch(const struct prefill *a, struct prefill_item w,
                                                                  int64_t D, const int bf16) {
    const int dp = HAVE_DPBF16 && bf16;
    const int64_t nq = item_positions(a, w);
    const int few = nq * (a->num_heads / a->num_kv_heads) <= 4;
    if (D == 64) return few ? prefill_one(a, w, 64, bf16, dp, 4) : prefill_one(a, w, 64, bf16, dp, RB);
    if (D == 128) return few ? prefill_one(a, w, 128, bf16, dp, 4) : prefill_one(a, w, 128, bf16, dp, RB);
    return prefill_one(a, w, D, bf16, 0, RB);
}

/* The exported functions' loop over the work items of num_seqs chunks (struct prefill a), its result in RC (0, or -1
 * when malloc failed). NOTE: a macro, so that the OpenMP loop sits in each exported function with bf16 a constant:
 * GCC outlines a parallel region before it inlines, so a region inside a shared inline function would see bf16 as a
 * run-time value (the layer_ops.c lesson: unvectorised loops). */
#define PREFILL_LOOP(RC, BF16)                                                                                        \
    do {                                                                                                              \
        int64_t count;                                                                                                \
        struct prefill_item *items = prefill_items(&a, num_seqs, num_threads, &count);                                \
        int failed = items == NULL;                                                                                   \
        _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads)")                                    \
        for (int64_t k = 0; k < (items == NULL ? 0 : count); k++)                                                     \
            if (prefill_dispatch(&a, items[k], head_dim, BF16)) failed = 1;                                           \
        free(items);                                                                                                  \
        RC = failed ? -1 : 0;                                                                                         \
    } while (0)

int npukit_paged_prefill_f32(const float *q, const float *k_cache, const float *v_cache, const int64_t *tables,
                             const int64_t *starts, const int64_t *lens, const int64_t *computed, int64_t num_seqs,
                             int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                             int64_t max_blocks, int64_t ldq, int64_t window, float scale, float *out,
                             int num_threads) {
    const struct prefill a = {q, k_cache, v_cache, tables, starts, lens, computed, num_heads, num_kv_heads,
                              block_size, max_blocks, ldq, window, scale, out};
    int rc;
    PREFILL_LOOP(rc, 0);
    return rc;
}

int npukit_paged_prefill_bf16(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                              const int64_t *tables, const int64_t *starts, const int64_t *lens,
                              const int64_t *computed, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, int64_t max_blocks, int64_t ldq, int64_t window,
                              float scale, uint16_t *out, int num_threads) {
    const struct prefill a = {q, k_cache, v_cache, tables, starts, lens, computed, num_heads, num_kv_heads,
                              block_size, max_blocks, ldq, window, scale, out};
    int rc;
    PREFILL_LOOP(rc, 1);
    return rc;
}

/* ------------------------------------------------------------------------------------------------- decode, exported
 * (after the prefill code: bf16 decode rows may take its tiles).
 *
 * The decode loop above computes q . k one position at a time: its cost grows with the query heads per KV head (g)
 * times head_dim, while the prefill kernel's tiles pay a fixed cost per tile (copying K and V into bf16 pairs) and
 * then multiply bf16 pairs (vdpbf16ps) for all g heads of a KV head at once. So a bf16 cache takes the tiles, each
 * decode row a one-token chunk (one work item per sequence for all its KV heads when there are enough sequences),
 * where g * head_dim >= DECODE_TILES and the CPU has AVX512-BF16. Measured on a 2-core AMD EPYC (Zen 4), 8-30
 * layers' caches, 16 or 64 sequences of 300-500 tokens, the tiles' time / the decode loop's: head_dim 128: g 2
 * 0.95-0.98x (left on the loop), g 4 0.63-0.67x, g 6 0.58-0.59x, g 8 0.44-0.45x; head_dim 64: g 3 (SmolLM2) 1.30x,
 * g 4 1.03-1.07x, g 5 1.11-1.16x, g 6 1.0x (all left on the loop), g 7 0.84-0.87x, g 8 (qwen2-1024x8) 0.77-0.80x;
 * one sequence 0.31-0.51x where the tiles are taken. fp32 always takes the decode loop. */
#define DECODE_TILES 448

/* 1 where npukit_paged_decode_bf16 runs a layout on the prefill kernel's tiles, else 0 */
int npukit_paged_decode_tiled(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim) {
    return HAVE_DPBF16 && num_kv_heads > 0 && (head_dim == 64 || head_dim == 128) &&
           num_heads / num_kv_heads * head_dim >= DECODE_TILES;
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
    if (npukit_paged_decode_tiled(num_heads, num_kv_heads, head_dim)) { /* decode rows as one-token chunks */
        int64_t *chunks = malloc(sizeof(int64_t) * (size_t)(3 * (b > 0 ? b : 1)));
        if (chunks == NULL) return -1;
        int64_t *starts = chunks, *lens = chunks + b, *computed = chunks + 2 * b;
        for (int64_t i = 0; i < b; i++) {
            starts[i] = i;
            lens[i] = ctx_lens[i] > 0;
            computed[i] = ctx_lens[i] - 1;
        }
        const int64_t num_seqs = b;
        const struct prefill a = {q, k_cache, v_cache, tables, starts, lens, computed, num_heads, num_kv_heads,
                                  block_size, max_blocks, num_heads * head_dim, window, scale, out};
        int rc;
        PREFILL_LOOP(rc, 1);
        free(chunks);
        return rc;
    }
    return paged_decode(q, k_cache, v_cache, tables, ctx_lens, b, num_heads, num_kv_heads, head_dim, block_size,
                        max_blocks, window, scale, out, num_threads, 1);
}
