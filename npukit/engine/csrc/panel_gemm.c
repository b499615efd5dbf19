/* y = x @ W^T (+ bias) for the row counts of decode steps, on a copy of W packed in panels of 32 columns.
 *
 *   x       [M, K]          row-major, rows ldx apart
 *   panels  [N/32, K, 32]   W [N, K] packed by npukit.engine.cpu_gemm.pack_panels (last panel zero-padded)
 *   bias    [N] or NULL
 *   y       [M, N]          row-major
 *
 * Per panel and block of rows of x (12 on AVX512: 24 running 16-wide sums in its 32 registers), the sums stay
 * in registers: for each k, a row of the panel is loaded and multiplied by each row's x[m, k], broadcast. A
 * panel is read from memory once, sequentially (prefetched 4 KiB ahead), and from cache for the further blocks
 * of rows.
 * BLAS reads W at a fraction of the memory bandwidth at these row counts, or computes at a fraction of the
 * peak: SmolLM2's 210 layer linears on a 2-core Xeon, 16 rows: 32 ms with this kernel, 44 in MKL's swapped
 * order, 46 in oneDNN's packed layout, 110 F.linear (npukit.engine.cpu_gemm's probe times them all here and
 * keeps the fastest per row count). Plain C with GCC / clang vector extensions sized to the target's registers,
 * parallel over panels with OpenMP; built by npukit.engine.native.
 */
#include <stdint.h>

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
static inline vec load(const float *p) { return *(const vecu *)p; }

/* acc[m * PW + c] = x[m] . panel column c, for MT rows of x */
#define DEFINE_TILE(MT)                                                                                      \
    static void tile_##MT(const float *restrict x, int64_t ldx, const float *restrict panel, int64_t K,      \
                          float *restrict acc) {                                                             \
        vec a[MT][NV];                                                                                       \
        for (int m = 0; m < MT; m++)                                                                         \
            for (int v = 0; v < NV; v++) a[m][v] = (vec){0.f};                                               \
        for (int64_t k = 0; k < K; k++) {                                                                    \
            vec u[NV];                                                                                       \
            for (int v = 0; v < NV; v++) u[v] = load(panel + k * PW + v * VL);                               \
            __builtin_prefetch(panel + k * PW + 1024);                                                       \
            for (int m = 0; m < MT; m++) {                                                                   \
                const vec xb = (vec){0.f} + x[m * ldx + k];                                                  \
                for (int v = 0; v < NV; v++) a[m][v] += xb * u[v];                                           \
            }                                                                                                \
        }                                                                                                    \
        for (int m = 0; m < MT; m++)                                                                         \
            for (int v = 0; v < NV; v++) *(vecu *)(acc + m * PW + v * VL) = a[m][v];                         \
    }

DEFINE_TILE(1)
DEFINE_TILE(2)
DEFINE_TILE(3)
DEFINE_TILE(4)
DEFINE_TILE(5)
DEFINE_TILE(6)
DEFINE_TILE(7)
DEFINE_TILE(8)
DEFINE_TILE(9)
DEFINE_TILE(10)
DEFINE_TILE(11)
DEFINE_TILE(12)

typedef void (*tile_fn)(const float *, int64_t, const float *, int64_t, float *);
static const tile_fn TILES[] = {0,      tile_1, tile_2, tile_3, tile_4,  tile_5, tile_6,
                                tile_7, tile_8, tile_9, tile_10, tile_11, tile_12}; /* MB of them used */

void npukit_panel_gemm_f32(const float *x, int64_t ldx, const float *panels, const float *bias, float *y,
                           int64_t M, int64_t N, int64_t K, int num_threads) {
    const int64_t num_panels = (N + PW - 1) / PW;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t p = 0; p < num_panels; p++) {
        const int64_t n0 = p * PW, cols = N - n0 < PW ? N - n0 : PW;
        float acc[MB * PW];
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
            const int64_t mt = M - m0 < MB ? M - m0 : MB;
            TILES[mt](x + m0 * ldx, ldx, panels + p * K * PW, K, acc);
            for (int64_t m = 0; m < mt; m++)
                for (int64_t c = 0; c < cols; c++)
                    y[(m0 + m) * N + n0 + c] = acc[m * PW + c] + (bias ? bias[n0 + c] : 0.f);
        }
    }
}
