/* y = x @ W^T (+ bias) for the row counts of decode steps, on a copy of W packed in panels of 32 columns.
 *
 *   x       [M, K]          fp32, row-major, rows ldx apart; or bfloat16 (rows16), widened to fp32 first (exact)
 *   panels  [N/32, K, 32]   W [N, K] packed by npukit.engine.cpu_gemm.pack_panels (last panel zero-padded):
 *                           fp32 (npukit_panel_gemm_f32), bfloat16 (npukit_panel_gemm_bf16: a 16-bit lm_head),
 *                           or int8 with one fp32 scale per output column (npukit_panel_gemm_i8: W8A16,
 *                           npukit.quant.kernels)
 *   bias    [N] or NULL
 *   y       [M, N]          fp32, row-major; or bfloat16 (rows16), each output rounded once from its fp32 value
 *                           (the bits of an fp32 call on the widened rows, then .to(torch.bfloat16))
 *
 * Per panel and block of rows of x (12 on AVX512: 24 running 16-wide sums in its 32 registers), the sums stay
 * in registers: for each k, a row of the panel is loaded (int8 weights widened to fp32 on the way) and
 * multiplied by each row's x[m, k], broadcast. A panel is read from memory once, sequentially (prefetched 4 KiB
 * ahead), and from cache for the further blocks of rows; int8 scales are applied once, to the sums.
 * BLAS reads W at a fraction of the memory bandwidth at these row counts, or computes at a fraction of the
 * peak: SmolLM2's 210 layer linears on a 2-core Xeon, 16 rows: 32 ms with this kernel, 44 in MKL's swapped
 * order, 46 in oneDNN's packed layout, 110 F.linear (npukit.engine.cpu_gemm's probe times them all here and
 * keeps the fastest per row count). In int8 at one row, the same 210 linears: ~6 ms (~18 GB/s, near this VM's
 * ~22 GB/s), torch's _weight_int8pack_mm 68 ms. Plain C with GCC / clang vector extensions sized to the
 * target's registers, parallel over panels with OpenMP; built by npukit.engine.native.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define PW 32  /* columns per panel (npukit.engine.cpu_gemm.PANEL) */

/* The vector width and rows per block follow the target's registers: AVX512 has 32 x 16 floats (12 rows x 2
 * vectors of running sums), AVX / AVX2 16 x 8 (6 rows x 4 vectors, some kept in L1: measured faster than 2-4
 * rows at 8-64 rows of x), else 4-float vectors (NEON, SSE; not measured). A 16-float type in an AVX2 build was
 * split through memory by the compiler: 3 GFLOP/s. */
#if defined(__AVX512F__)
#define VL 16
#define MB 12
#elif defined(__AVX__)
#define VL 8
#define MB 6
#else
#define VL 4
#define MB 2
#endif
#define NV (PW / VL)  /* vectors per panel row */

typedef float vec __attribute__((vector_size(VL * 4)));
typedef float vecu __attribute__((vector_size(VL * 4), aligned(4), may_alias));
static inline vec load_f32(const float *p) { return *(const vecu *)p; }
/* VL int8 weights widened to floats, and VL bfloat16 weights (the top half of a float's bits: shifted into place,
 * exact). gcc 12 widened __builtin_convertvector's int8 vectors one number at a time,
 * so x86 takes the sign-extending instructions (vpmovsxbd) by name. */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline vec load_i8(const int8_t *p) {
    return (vec)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline vec load_bf16(const uint16_t *p) {
    return (vec)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
}
#elif defined(__AVX2__)
#include <immintrin.h>
static inline vec load_i8(const int8_t *p) {
    return (vec)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vec load_bf16(const uint16_t *p) {
    return (vec)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
}
#else
typedef int32_t ivec __attribute__((vector_size(VL * 4)));
typedef int8_t i8vecu __attribute__((vector_size(VL), aligned(1), may_alias));
static inline vec load_i8(const int8_t *p) {
    return __builtin_convertvector(__builtin_convertvector(*(const i8vecu *)p, ivec), vec);
}
typedef uint32_t uvec __attribute__((vector_size(VL * 4)));
typedef uint16_t u16vecu __attribute__((vector_size(VL * 2), aligned(2), may_alias));
static inline vec load_bf16(const uint16_t *p) {
    return (vec)(__builtin_convertvector(*(const u16vecu *)p, uvec) << 16);
}
#endif

/* acc[m * PW + c] = x[m] . panel column c, for MT rows of x; T is the weight's type, LOAD widens VL of them */
#define DEFINE_TILE(T, LOAD, MT)                                                                             \
    static void tile_##T##_##MT(const float *restrict x, int64_t ldx, const T *restrict panel, int64_t K,   \
                                float *restrict acc) {                                                       \
        vec a[MT][NV];                                                                                       \
        for (int m = 0; m < MT; m++)                                                                         \
            for (int v = 0; v < NV; v++) a[m][v] = (vec){0.f};                                               \
        for (int64_t k = 0; k < K; k++) {                                                                    \
            vec u[NV];                                                                                       \
            for (int v = 0; v < NV; v++) u[v] = LOAD(panel + k * PW + v * VL);                               \
            __builtin_prefetch((const char *)(panel + k * PW) + 4096);                                       \
            for (int m = 0; m < MT; m++) {                                                                   \
                const vec xb = (vec){0.f} + x[m * ldx + k];                                                  \
                for (int v = 0; v < NV; v++) a[m][v] += xb * u[v];                                           \
            }                                                                                                \
        }                                                                                                    \
        for (int m = 0; m < MT; m++)                                                                         \
            for (int v = 0; v < NV; v++) *(vecu *)(acc + m * PW + v * VL) = a[m][v];                         \
    }
#define DEFINE_TILES(T, LOAD)                                                                                \
    DEFINE_TILE(T, LOAD, 1) DEFINE_TILE(T, LOAD, 2) DEFINE_TILE(T, LOAD, 3) DEFINE_TILE(T, LOAD, 4)          \
    DEFINE_TILE(T, LOAD, 5) DEFINE_TILE(T, LOAD, 6) DEFINE_TILE(T, LOAD, 7) DEFINE_TILE(T, LOAD, 8)          \
    DEFINE_TILE(T, LOAD, 9) DEFINE_TILE(T, LOAD, 10) DEFINE_TILE(T, LOAD, 11) DEFINE_TILE(T, LOAD, 12)       \
    static void (*const TILES_##T[])(const float *, int64_t, const T *, int64_t, float *) = {               \
        0, tile_##T##_1, tile_##T##_2, tile_##T##_3, tile_##T##_4, tile_##T##_5, tile_##T##_6,               \
        tile_##T##_7, tile_##T##_8, tile_##T##_9, tile_##T##_10, tile_##T##_11, tile_##T##_12}; /* MB used */

DEFINE_TILES(float, load_f32)
DEFINE_TILES(int8_t, load_i8)
DEFINE_TILES(uint16_t, load_bf16)

/* y = [x @ W_0^T * scale_0 + bias_0 | x @ W_1^T ... ], the parts' columns side by side in y [M, N_0 + N_1 ..]:
 * q, k and v (or gate and up) read the same x, so one call, one parallel region over all their panels,
 * computes them (vLLM's QKVParallelLinear / MergedColumnParallelLinear, without concatenating the weights).
 * A column's sum is the same as in a call of its part alone. scales / biases: NULL, or a pointer per part (each
 * may be NULL). SmolLM2, W8A16, one row, 2 threads: a decode step 0.85-0.89x as long with q/k/v and gate/up
 * fused. */
#define MAX_PARTS 8 /* npukit.engine.cpu_gemm.MAX_PARTS */
#define PANEL_GEMM(T, NAME)                                                                                     \
    static int panel_gemm_##T(const void *x_in, int64_t ldx_in, int64_t parts, const T *const *panels,          \
                              const float *const *scales, const float *const *biases, const int64_t *N,         \
                              void *y, int64_t M, int64_t K, int rows16, int num_threads) {                     \
        int64_t first[MAX_PARTS + 1] = {0}, col0[MAX_PARTS], ldy = 0; /* a part's first panel and column */     \
        for (int64_t j = 0; j < parts; j++) {                                                                   \
            first[j + 1] = first[j] + (N[j] + PW - 1) / PW;                                                     \
            col0[j] = ldy;                                                                                      \
            ldy += N[j];                                                                                        \
        }                                                                                                       \
        float *wide = rows16 ? malloc((size_t)(M * K + 1) * sizeof(float)) : 0;                                 \
        if (rows16 && !wide) return -1; /* out of memory: the caller raises */                                  \
        const float *x = rows16 ? wide : x_in;                                                                  \
        const int64_t ldx = rows16 ? K : ldx_in;                                                                \
        _Pragma("omp parallel num_threads(num_threads)") {                                                      \
            if (rows16) {                                                                                       \
                _Pragma("omp for schedule(static)")                                                             \
                for (int64_t m = 0; m < M; m++)                                                                 \
                    for (int64_t k = 0; k < K; k++)                                                             \
                        wide[m * K + k] = load_elem(x_in, m * ldx_in + k, 1);                                   \
            }                                                                                                   \
            _Pragma("omp for schedule(static)") for (int64_t p = 0; p < first[parts]; p++) {                    \
                int64_t j = 0;                                                                                  \
                while (p >= first[j + 1]) j++;                                                                  \
                const int64_t n0 = (p - first[j]) * PW, cols = N[j] - n0 < PW ? N[j] - n0 : PW;                 \
                const float *scale = scales ? scales[j] : 0, *bias = biases ? biases[j] : 0;                    \
                float acc[MB * PW];                                                                             \
                for (int64_t m0 = 0; m0 < M; m0 += MB) {                                                        \
                    const int64_t mt = M - m0 < MB ? M - m0 : MB;                                               \
                    TILES_##T[mt](x + m0 * ldx, ldx, panels[j] + (p - first[j]) * K * PW, K, acc);              \
                    for (int64_t m = 0; m < mt; m++)                                                            \
                        for (int64_t c = 0; c < cols; c++) {                                                    \
                            const float v = acc[m * PW + c] * (scale ? scale[n0 + c] : 1.f) +                   \
                                            (bias ? bias[n0 + c] : 0.f);                                        \
                            store_elem(y, (m0 + m) * ldy + col0[j] + n0 + c, v, rows16);                        \
                        }                                                                                       \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        free(wide);                                                                                             \
        return 0;                                                                                               \
    }                                                                                                           \
    int npukit_panel_gemm_parts_##NAME(const void *x, int64_t ldx, int64_t parts, const T *const *panels,       \
                                       const float *const *scales, const float *const *biases,                  \
                                       const int64_t *N, void *y, int64_t M, int64_t K, int rows16,             \
                                       int num_threads) {                                                       \
        if (parts < 1 || parts > MAX_PARTS) return -2;                                                          \
        return panel_gemm_##T(x, ldx, parts, panels, scales, biases, N, y, M, K, rows16, num_threads);          \
    }
PANEL_GEMM(float, f32)
PANEL_GEMM(int8_t, i8)
PANEL_GEMM(uint16_t, bf16)

/* fp32 weights */
int npukit_panel_gemm_f32(const void *x, int64_t ldx, const float *panels, const float *bias, void *y, int64_t M,
                          int64_t N, int64_t K, int rows16, int num_threads) {
    return panel_gemm_float(x, ldx, 1, &panels, 0, &bias, &N, y, M, K, rows16, num_threads);
}

/* int8 weights with one scale per output column (W8A16): the sums of x times the integers, then scaled */
int npukit_panel_gemm_i8(const void *x, int64_t ldx, const int8_t *panels, const float *scale, const float *bias,
                         void *y, int64_t M, int64_t N, int64_t K, int rows16, int num_threads) {
    return panel_gemm_int8_t(x, ldx, 1, &panels, &scale, &bias, &N, y, M, K, rows16, num_threads);
}

/* bfloat16 weights, fp32 sums: half the bytes of fp32 read, each weight exactly the float it stands for */
int npukit_panel_gemm_bf16(const void *x, int64_t ldx, const uint16_t *panels, const float *bias, void *y, int64_t M,
                           int64_t N, int64_t K, int rows16, int num_threads) {
    return panel_gemm_uint16_t(x, ldx, 1, &panels, 0, &bias, &N, y, M, K, rows16, num_threads);
}
