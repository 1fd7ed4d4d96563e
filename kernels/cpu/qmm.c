/* qmm.c: products with additive-codebook (AQLM) matrices straight from the codes
 * (kern_qmm.h): the LUT, GATHER and TILE algorithms and the dequantize-then-sgemm
 * reference. Plain C loops + OpenMP, no intrinsics: the hot loops are written with
 * fixed lane counts and independent accumulators, inlined with constant M and g for the
 * common configs (always_inline, `#pragma GCC unroll`, both understood by GCC and Clang),
 * so that they vectorize / pipeline at -O2 without reassociating anything: the results
 * do not depend on the ISA the compiler targets. */
#include <cblas.h>
#include <limits.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "kern_qmm.h"

#define QMM_ROW_TILE 256          /* LUT: output rows per OpenMP work item */
#define QMM_LUT_CHUNK_BYTES 16384 /* LUT: tables of one group chunk, to stay in L1 */
#define QMM_LUT_BATCH 8           /* LUT: input rows per OpenMP work item */
#define QMM_LANES 16              /* GATHER: lanes of the dot products */
#define QMM_TILE_BYTES (4u << 20) /* TILE: dequantized rows per sgemm */
#define QMM_TILE_MIN_ROWS 64
#define QMM_AUTO_TILE_BATCH 8     /* kern_aq_algo_auto: TILE from this batch on (docs/kernels-qmm.md) */

struct kern_aq_ws {
    float *buf; /* 64-byte aligned */
    size_t cap; /* floats */
};

const char *kern_aq_algo_name(kern_aq_algo a)
{
    switch (a) {
    case KERN_AQ_AUTO: return "auto";
    case KERN_AQ_LUT: return "lut";
    case KERN_AQ_GATHER: return "gather";
    case KERN_AQ_TILE: return "tile";
    }
    return "?";
}

kern_aq_algo kern_aq_algo_auto(const lv_aq_layer *L, int64_t n)
{
    if (n >= QMM_AUTO_TILE_BATCH) return KERN_AQ_TILE;
    /* A table entry replaces g multiply-adds and is read d_out / 2^nbits times on average:
     * below g = 8 or a few reads per entry, building the tables costs more than it saves. */
    if (L && L->nbits <= 8 && L->g >= 8 && L->d_out >= ((int64_t)4 << L->nbits))
        return KERN_AQ_LUT;
    return KERN_AQ_GATHER;
}

lv_status kern_aq_ws_init(kern_aq_ws **ws)
{
    lv_status st = LV_OK;
    if (!ws) LV_FAIL(LV_ERR_INVALID_ARG, "kern_aq_ws_init: ws is NULL");
    *ws = NULL;
    LV_ALLOC(*ws, 1);
done:
    return st;
}

void kern_aq_ws_free(kern_aq_ws *ws)
{
    if (!ws) return;
    free(ws->buf);
    free(ws);
}

size_t kern_aq_ws_bytes(const kern_aq_ws *ws) { return ws ? ws->cap * sizeof(float) : 0; }

/* *p = at least `floats` floats of ws (contents undefined). */
static lv_status ws_reserve(kern_aq_ws *ws, size_t floats, float **p)
{
    lv_status st = LV_OK;
    if (floats > ws->cap) {
        size_t bytes = (floats * sizeof(float) + 63) & ~(size_t)63;
        float *b = aligned_alloc(64, bytes);
        if (!b) LV_FAIL(LV_ERR_NOMEM, "aq gemm: out of memory allocating %zu bytes of scratch",
                        bytes);
        free(ws->buf);
        ws->buf = b;
        ws->cap = bytes / sizeof(float);
    }
    *p = ws->buf;
done:
    return st;
}

static lv_status check_args(const float *y, const float *x, const lv_aq_layer *L, int64_t n,
                            const char *fn)
{
    lv_status st = LV_OK;
    if (!L) LV_FAIL(LV_ERR_INVALID_ARG, "%s: layer is NULL", fn);
    if (L->d_out < 0 || L->d_out > INT_MAX || L->d_in <= 0 || L->d_in > INT_MAX || L->M < 1 ||
        L->nbits < 1 || L->nbits > 16 || L->g < 1 ||
        L->n_groups != (L->d_in + L->g - 1) / L->g)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "%s: bad layer shape d_out %lld d_in %lld n_groups %lld M %d nbits %d g %d", fn,
                (long long)L->d_out, (long long)L->d_in, (long long)L->n_groups, L->M, L->nbits,
                L->g);
    if (L->d_out > 0 && (!L->codes || !L->codebooks))
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: layer codes or codebooks are NULL", fn);
    if (n < 0 || (n > 0 && (!y || !x)))
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: batch %lld, y %p, x %p", fn, (long long)n,
                (const void *)y, (const void *)x);
done:
    return st;
}

lv_status kern_aq_gemm_ref(float *y, const float *x, const lv_aq_layer *L, int64_t n)
{
    lv_status st = LV_OK;
    float *w = NULL; // (d_out, d_in)
    LV_TRY(check_args(y, x, L, n, "kern_aq_gemm_ref"));
    if (n == 0 || L->d_out == 0) {
        if (n > 0) memset(y, 0, sizeof(float) * (size_t)n * (size_t)L->d_out);
        goto done;
    }
    LV_ALLOC(w, (size_t)L->d_out * (size_t)L->d_in);
    kern_aq_dequant_ref(w, L->codes, L->codebooks, L->scales, L->d_out, L->d_in, L->n_groups,
                        L->M, 1 << L->nbits, L->g);
    kern_matmul_ref(y, x, w, n, (int)L->d_in, (int)L->d_out);
done:
    free(w);
    return st;
}

/* ------------------------------------------------------------------ LUT */

/* Inlined into callers that pass constants (M, lane counts), so that the loops over
 * them unroll and their accumulators stay in registers. */
#define QMM_INLINE static inline __attribute__((always_inline))

/* t (K) = sum_a xi[a] * c[a, :] over a < len, in order of a; c (len, K) row stride K.
 * Blocks of 16 entries kept in registers across a (K >= 16 is a multiple of 16). */
static void lut_group(float *t, const float *xi, const float *c, int len, int K)
{
    if (K < 16) {
        for (int k = 0; k < K; k++) t[k] = xi[0] * c[k];
        for (int a = 1; a < len; a++)
            for (int k = 0; k < K; k++) t[k] += xi[a] * c[(int64_t)a * K + k];
        return;
    }
    for (int k0 = 0; k0 < K; k0 += 16) {
        float acc[16];
        for (int l = 0; l < 16; l++) acc[l] = xi[0] * c[k0 + l];
        for (int a = 1; a < len; a++)
            for (int l = 0; l < 16; l++) acc[l] += xi[a] * c[(int64_t)a * K + k0 + l];
        for (int l = 0; l < 16; l++) t[k0 + l] = acc[l];
    }
}

/* lut (n, n_groups, M, K): LUT[b, i, m, k] = sum_a x[b, i*g + a] * codebooks[m, k, a] over
 * the group's columns, in order of a. cbt (M, g, K) is the codebooks transposed so that
 * the loop over k is contiguous (vectorized; each k still sums over a in order). */
static void lut_build(float *lut, float *cbt, const float *x, const lv_aq_layer *L, int64_t n)
{
    const int M = L->M, K = 1 << L->nbits, g = L->g;
    const int64_t G = L->n_groups, d_in = L->d_in;
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++)
            for (int a = 0; a < g; a++)
                cbt[((int64_t)m * g + a) * K + k] = L->codebooks[((int64_t)m * K + k) * g + a];
#pragma omp parallel for schedule(static)
    for (int64_t bi = 0; bi < n * G; bi++) {
        const int64_t b = bi / G, i = bi % G;
        const int len = (int)(d_in - i * g < g ? d_in - i * g : g); /* last group may be cut */
        for (int m = 0; m < M; m++)
            lut_group(lut + (bi * M + m) * K, x + b * d_in + i * g, cbt + (int64_t)m * g * K,
                      len, K);
    }
}

/* a + sum over n groups of one row of sum_m T[m, c[m]]: groups in order, each one's
 * codebooks in order of m. T (n, M, K), c (n, M). */
QMM_INLINE float lut_groups(float a, const float *T, const uint16_t *c, int64_t n, const int M,
                            const int K)
{
    for (int64_t q = 0; q < n; q++) {
        float t = T[q * M * K + c[q * M]];
#pragma GCC unroll 4
        for (int m = 1; m < M; m++) t += T[(q * M + m) * K + c[q * M + m]];
        a += t;
    }
    return a;
}

/* acc[0..4) += the groups i0..i1 of four rows whose codes start at c (row stride cs),
 * the arithmetic of lut_groups: four independent chains in flight. (Reading the codes
 * of several groups with one wide load was tried: no faster, the loop is bound by the
 * table reads, about one per cycle.) */
QMM_INLINE void lut_rows4(float *acc, const uint16_t *c, int64_t cs, const float *tab,
                          int64_t i0, int64_t i1, const int M, const int K)
{
    const uint16_t *c0 = c, *c1 = c + cs, *c2 = c + 2 * cs, *c3 = c + 3 * cs;
    float a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    for (int64_t i = i0; i < i1; i++) {
        const float *T = tab + i * M * K; // (M, K)
        const int64_t o = i * M;
        a0 = lut_groups(a0, T, c0 + o, 1, M, K);
        a1 = lut_groups(a1, T, c1 + o, 1, M, K);
        a2 = lut_groups(a2, T, c2 + o, 1, M, K);
        a3 = lut_groups(a3, T, c3 + o, 1, M, K);
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

/* y[b0 + b, r0..r1) for nb <= QMM_LUT_BATCH input rows from their tables lut (n, n_groups,
 * M, K), y (n, d_out). */
QMM_INLINE void lut_tile(float *y, const float *lut, const lv_aq_layer *L, int64_t b0, int nb,
                         int64_t r0, int64_t r1, const int M)
{
    const int K = 1 << L->nbits;
    const int64_t G = L->n_groups, cs = G * M, d_out = L->d_out; /* cs: codes per row */
    int64_t chunk = QMM_LUT_CHUNK_BYTES / ((int64_t)M * K * (int64_t)sizeof(float));
    if (chunk < 1) chunk = 1;
    float acc[QMM_LUT_BATCH][QMM_ROW_TILE] = {{0}};
    /* Group chunks outside, batch rows then output rows inside: a chunk's tables stay in
     * L1 while all rows of the tile read them, the tile's codes stay in L2 across the
     * batch; each output still sums its groups in order. */
    for (int64_t i0 = 0; i0 < G; i0 += chunk) {
        const int64_t i1 = i0 + chunk < G ? i0 + chunk : G;
        for (int b = 0; b < nb; b++) {
            const float *tab = lut + (b0 + b) * G * M * K; // (n_groups, M, K)
            float *ab = acc[b];
            int64_t r = r0;
            for (; r + 4 <= r1; r += 4)
                lut_rows4(ab + (r - r0), L->codes + r * cs, cs, tab, i0, i1, M, K);
            for (; r < r1; r++)
                ab[r - r0] = lut_groups(ab[r - r0], tab + i0 * M * K, L->codes + r * cs + i0 * M,
                                        i1 - i0, M, K);
        }
    }
    for (int b = 0; b < nb; b++)
        for (int64_t r = r0; r < r1; r++)
            y[(b0 + b) * d_out + r] = (L->scales ? L->scales[r] : 1.0f) * acc[b][r - r0];
}

static lv_status gemm_lut(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                          kern_aq_ws *ws)
{
    lv_status st = LV_OK;
    const int M = L->M, K = 1 << L->nbits, g = L->g;
    const int64_t G = L->n_groups, d_out = L->d_out;
    const size_t n_cbt = (size_t)M * g * K, n_lut = (size_t)n * G * M * K;
    float *buf = NULL;
    LV_TRY(ws_reserve(ws, n_cbt + ((n_lut + 15) & ~(size_t)15), &buf));
    float *lut = buf, *cbt = buf + ((n_lut + 15) & ~(size_t)15);
    lut_build(lut, cbt, x, L, n);
    const int64_t n_tiles = (d_out + QMM_ROW_TILE - 1) / QMM_ROW_TILE;
    const int64_t n_bblk = (n + QMM_LUT_BATCH - 1) / QMM_LUT_BATCH;
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < n_bblk * n_tiles; bt++) {
        const int64_t b0 = bt / n_tiles * QMM_LUT_BATCH, r0 = (bt % n_tiles) * QMM_ROW_TILE;
        const int64_t r1 = r0 + QMM_ROW_TILE < d_out ? r0 + QMM_ROW_TILE : d_out;
        const int nb = (int)(n - b0 < QMM_LUT_BATCH ? n - b0 : QMM_LUT_BATCH);
        /* Constant M for the common configs so the inner loop over m unrolls. */
        if (M == 1)
            lut_tile(y, lut, L, b0, nb, r0, r1, 1);
        else if (M == 2)
            lut_tile(y, lut, L, b0, nb, r0, r1, 2);
        else
            lut_tile(y, lut, L, b0, nb, r0, r1, M);
    }
done:
    return st;
}

/* ------------------------------------------------------------------ GATHER */

/* w (len) = s * sum_m codebooks[m, c[m], 0..len) for one group, summed over m in order
 * then one multiply: kern_aq_dequant_ref's values (and bits, but for the sign of a zero
 * sum, which the reference's 0.0f start makes +0). */
QMM_INLINE void decode_group(float *w, const uint16_t *c, const float *cb, float s, int len,
                             const int M, const int K, const int g)
{
    const float *p = cb + (int64_t)c[0] * g;
#pragma GCC unroll 16
    for (int a = 0; a < len; a++) {
        float acc = p[a];
#pragma GCC unroll 4
        for (int m = 1; m < M; m++) acc += cb[((int64_t)m * K + c[m]) * g + a];
        w[a] = s * acc;
    }
}

/* w (d_in) = row r of What with scale s (1 for none) from the row's codes c (n_groups,
 * M); the cut last group, if any, separately so that the others run with len = g. */
QMM_INLINE void decode_row_k(float *w, const uint16_t *c, const lv_aq_layer *L, float s,
                             const int M, const int g)
{
    const int K = 1 << L->nbits;
    const int64_t full = L->d_in / g;
    for (int64_t i = 0; i < full; i++) decode_group(w + i * g, c + i * M, L->codebooks, s, g, M, K, g);
    if (full < L->n_groups)
        decode_group(w + full * g, c + full * M, L->codebooks, s, (int)(L->d_in - full * g), M, K, g);
}

/* decode_row_k with constant M and g for the common configs (2x8g8, 1x16g8 and 1x8g8,
 * 1x8g4 of the demo job). */
static void decode_row(float *w, const uint16_t *c, const lv_aq_layer *L, float s)
{
    if (L->M == 1 && L->g == 8)
        decode_row_k(w, c, L, s, 1, 8);
    else if (L->M == 2 && L->g == 8)
        decode_row_k(w, c, L, s, 2, 8);
    else if (L->M == 1 && L->g == 4)
        decode_row_k(w, c, L, s, 1, 4);
    else
        decode_row_k(w, c, L, s, L->M, L->g);
}

/* acc[0] = the lanes folded pairwise, 16 -> 8 -> 4 -> 2 -> 1. */
static inline float fold_lanes(float *acc)
{
    for (int h = QMM_LANES / 2; h > 0; h /= 2)
        for (int l = 0; l < h; l++) acc[l] += acc[l + h];
    return acc[0];
}

/* <x, w> over n floats: QMM_LANES partial sums (lane l takes j = l mod QMM_LANES, in
 * order of j, held in registers), then fold_lanes. */
static float dot_lanes(const float *x, const float *w, int64_t n)
{
    float acc[QMM_LANES] = {0};
    int64_t j = 0;
    for (; j + QMM_LANES <= n; j += QMM_LANES)
#pragma GCC unroll 16
        for (int l = 0; l < QMM_LANES; l++) acc[l] += x[j + l] * w[j + l];
    for (int l = 0; j + l < n; l++) acc[l] += x[j + l] * w[j + l];
    return fold_lanes(acc);
}

/* dot_lanes(x, w) for w = decode_row(..., 1) of codes c (n_groups, M), with w never
 * stored: each element is formed (sum over m in order) and multiplied straight into lane
 * j % QMM_LANES in order of j, as dot_lanes does, in one pass instead of two. Only with
 * constant M and g, g | QMM_LANES: the loops then unroll and the lanes stay in registers
 * (staging lane blocks through a small buffer instead was 2-3x slower: store forwarding). */
QMM_INLINE float dot_row_gather(const float *x, const uint16_t *c, const lv_aq_layer *L,
                                const int M, const int g)
{
    const int K = 1 << L->nbits, per = QMM_LANES / g; /* groups per lane block */
    const int64_t d_in = L->d_in, full = d_in / QMM_LANES * per;
    const float *cb = L->codebooks; // (M, K, g)
    float acc[QMM_LANES] = {0};
    int64_t i = 0;
    for (; i < full; i += per)
#pragma GCC unroll 16
        for (int q = 0; q < per; q++) {
            const uint16_t *cq = c + (i + q) * M;
            const float *xq = x + (i + q) * g, *p = cb + (int64_t)cq[0] * g;
#pragma GCC unroll 16
            for (int a = 0; a < g; a++) {
                float w = p[a];
#pragma GCC unroll 4
                for (int m = 1; m < M; m++) w += cb[((int64_t)m * K + cq[m]) * g + a];
                acc[q * g + a] += xq[a] * w;
            }
        }
    for (int64_t j = i * g; j < d_in; j++) { /* under QMM_LANES columns, the cut group too */
        const uint16_t *cq = c + (j / g) * M;
        float w = cb[(int64_t)cq[0] * g + j % g];
        for (int m = 1; m < M; m++) w += cb[((int64_t)m * K + cq[m]) * g + j % g];
        acc[j - i * g] += x[j] * w;
    }
    return fold_lanes(acc);
}

static lv_status gemm_gather(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                             kern_aq_ws *ws)
{
    lv_status st = LV_OK;
    const int M = L->M, g = L->g;
    const int64_t d_in = L->d_in, d_out = L->d_out, cs = L->n_groups * M;
    const int64_t stride = (d_in + 15) & ~(int64_t)15;
    const int fused = n == 1 && ((g == 8 && M <= 2) || (g == 4 && M == 1));
    if (fused) { /* 1xBg8, 2xBg8, 1xBg4 (any B): one pass per row, nothing stored */
#pragma omp parallel for schedule(static)
        for (int64_t r = 0; r < d_out; r++) {
            const uint16_t *c = L->codes + r * cs;
            float dot = M == 1 && g == 8   ? dot_row_gather(x, c, L, 1, 8)
                        : M == 2 && g == 8 ? dot_row_gather(x, c, L, 2, 8)
                                           : dot_row_gather(x, c, L, 1, 4);
            y[r] = (L->scales ? L->scales[r] : 1.0f) * dot;
        }
        goto done;
    }
    float *buf = NULL;
    LV_TRY(ws_reserve(ws, (size_t)omp_get_max_threads() * (size_t)stride, &buf));
#pragma omp parallel
    {
        float *w = buf + (size_t)omp_get_thread_num() * (size_t)stride; // (d_in) this row
#pragma omp for schedule(static)
        for (int64_t r = 0; r < d_out; r++) {
            decode_row(w, L->codes + r * cs, L, 1.0f);
            const float s = L->scales ? L->scales[r] : 1.0f;
            for (int64_t b = 0; b < n; b++) y[b * d_out + r] = s * dot_lanes(x + b * d_in, w, d_in);
        }
    }
done:
    return st;
}

/* ------------------------------------------------------------------ TILE */

static lv_status gemm_tile(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                           kern_aq_ws *ws)
{
    lv_status st = LV_OK;
    const int64_t d_in = L->d_in, d_out = L->d_out, cs = L->n_groups * L->M;
    int64_t rows = (int64_t)(QMM_TILE_BYTES / sizeof(float)) / d_in;
    rows = rows < QMM_TILE_MIN_ROWS ? QMM_TILE_MIN_ROWS : rows & ~(int64_t)15;
    if (rows > d_out) rows = d_out;
    float *w = NULL; // (rows, d_in) dequantized tile of What
    LV_TRY(ws_reserve(ws, (size_t)rows * (size_t)d_in, &w));
    const int64_t max_n = INT_MAX / 2; /* cblas takes int row counts */
    for (int64_t r0 = 0; r0 < d_out; r0 += rows) {
        const int64_t nr = d_out - r0 < rows ? d_out - r0 : rows;
#pragma omp parallel for schedule(static)
        for (int64_t r = r0; r < r0 + nr; r++)
            decode_row(w + (r - r0) * d_in, L->codes + r * cs, L, L->scales ? L->scales[r] : 1.0f);
        for (int64_t b0 = 0; b0 < n; b0 += max_n) {
            const int64_t nb = n - b0 < max_n ? n - b0 : max_n;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nb, (int)nr, (int)d_in,
                        1.0f, x + b0 * d_in, (int)d_in, w, (int)d_in, 0.0f, y + b0 * d_out + r0,
                        (int)d_out);
        }
    }
done:
    return st;
}

/* ------------------------------------------------------------------ dispatch */

lv_status kern_aq_gemm_algo(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                            kern_aq_algo algo, kern_aq_ws *ws)
{
    lv_status st = LV_OK;
    kern_aq_ws *own = NULL;
    LV_TRY(check_args(y, x, L, n, "kern_aq_gemm"));
    if (algo == KERN_AQ_AUTO) algo = kern_aq_algo_auto(L, n);
    if (algo == KERN_AQ_LUT && L->nbits > 8)
        LV_FAIL(LV_ERR_UNSUPPORTED, "kern_aq_gemm: the LUT algorithm needs nbits <= 8, not %d",
                L->nbits);
    if (algo != KERN_AQ_LUT && algo != KERN_AQ_GATHER && algo != KERN_AQ_TILE)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_aq_gemm: unknown algorithm %d", (int)algo);
    if (n == 0 || L->d_out == 0) goto done;
    if (!ws) {
        LV_TRY(kern_aq_ws_init(&own));
        ws = own;
    }
    switch (algo) {
    case KERN_AQ_LUT: LV_TRY(gemm_lut(y, x, L, n, ws)); break;
    case KERN_AQ_GATHER: LV_TRY(gemm_gather(y, x, L, n, ws)); break;
    default: LV_TRY(gemm_tile(y, x, L, n, ws)); break;
    }
done:
    kern_aq_ws_free(own);
    return st;
}

lv_status kern_aq_gemm(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                       kern_aq_ws *ws)
{
    return kern_aq_gemm_algo(y, x, L, n, KERN_AQ_AUTO, ws);
}
