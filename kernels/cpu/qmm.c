/* qmm.c: products with additive-codebook (AQLM) matrices straight from the codes
 * (kern_qmm.h): the LUT, GATHER and TILE algorithms and the dequantize-then-sgemm
 * reference. The reference path of each hot loop is plain C + OpenMP, written with fixed
 * lane counts and independent accumulators, inlined with constant M and g for the common
 * configs (always_inline, `#pragma GCC unroll`, both understood by GCC and Clang), so that
 * it vectorizes / pipelines at -O2 without reassociating anything. Beside it, x86-64 twins
 * compiled per function for AVX2 (+F16C) or AVX-512 F+BW (target attributes) and picked at
 * run time (kern_aq_isa_set / __builtin_cpu_supports): same operations in the same order
 * per output, no FMA contraction, so every ISA gives the portable path's bits (tested in
 * test_kern_qmm.c). */
#include <cblas.h>
#include <limits.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "kern_qmm.h"

#define QMM_ROW_TILE 256          /* LUT: output rows per OpenMP work item */
#define QMM_LUT_CHUNK_BYTES 16384 /* LUT: tables of one group chunk, to stay in L1 */
#define QMM_LANES 16              /* GATHER: lanes of the dot products */
#define QMM_TILE_BYTES (4u << 20) /* TILE: dequantized rows per sgemm */
#define QMM_TILE_MIN_ROWS 64
#define QMM_AUTO_TILE_BATCH 8     /* kern_aq_algo_auto: TILE from this batch on (docs/kernels-qmm.md) */
#define QMM_AUTO_LUT_BATCH_AVX512 16 /* ... but LUT up to this batch with the AVX-512 permutes */
#define QMM_AUTO_GATHER_BATCH_AVX2 8 /* ... and GATHER up to this batch with AVX2 (2xBg8, 1xBg8) */

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

static int qmm_isa_level(kern_aq_isa isa);

kern_aq_algo kern_aq_algo_auto(const lv_aq_layer *L, int64_t n)
{
    /* A table entry replaces g multiply-adds and is read d_out / 2^nbits times on average:
     * below g = 8 or a few reads per entry, building the tables costs more than it saves. */
    const int lut_ok = L && L->nbits <= 8 && L->g >= 8 && L->d_out >= ((int64_t)4 << L->nbits);
    /* The AVX-512 LUT transposes the codes once for the whole batch and beats TILE up to
     * n = 16 (docs/kernels-qmm.md); the others from QMM_AUTO_TILE_BATCH on. */
    const int isa = qmm_isa_level(kern_aq_isa_get());
    if (lut_ok && n <= QMM_AUTO_LUT_BATCH_AVX512 && isa >= 2) return KERN_AQ_LUT;
    /* AVX2 without AVX-512: GATHER's row-blocked loop (g = 8, M <= 2) beats LUT (scalar
     * lookups) at every batch up to 8 and TILE below 8; at 8 only while the codebooks are
     * L1-sized (nbits <= 8: the second block of 4 input rows re-reads them from L1). */
    if (isa == 1 && L && L->g == 8 && L->M <= 2 &&
        (n < QMM_AUTO_TILE_BATCH || (n <= QMM_AUTO_GATHER_BATCH_AVX2 && L->nbits <= 8)))
        return KERN_AQ_GATHER;
    if (n >= QMM_AUTO_TILE_BATCH) return KERN_AQ_TILE;
    return lut_ok ? KERN_AQ_LUT : KERN_AQ_GATHER;
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
    if (L->n_outl < 0 || L->n_outl > L->d_in || (L->n_outl > 0 && (!L->outl_idx || !L->outl_w)))
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: %d outlier columns without their arrays", fn, L->n_outl);
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
    lv_aq_outliers_add_y(L, x, n, y);
done:
    free(w);
    return st;
}

/* ------------------------------------------------------------------ ISA dispatch */

/* Inlined into callers that pass constants (M, lane counts), so that the loops over
 * them unroll and their accumulators stay in registers. */
#define QMM_INLINE static inline __attribute__((always_inline))

/* The AVX2 twins of the hot loops below are compiled with target("avx2") only (no FMA:
 * the ISO C build contracts nothing, and neither may they) and do the same operations in
 * the same order per lane as the portable loops: both paths give the same bits (tested). */
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define QMM_HAVE_AVX2 1
#include <immintrin.h>
#define QMM_AVX2 __attribute__((target("avx2")))
#else
#define QMM_HAVE_AVX2 0
#endif

static kern_aq_isa qmm_isa_chosen = KERN_AQ_ISA_AUTO; /* kern_aq_isa_set */

/* 2: AVX-512 F + BW (and AVX2), 1: AVX2 + F16C, 0: neither (or a build without them). */
static int qmm_cpu_level(void)
{
#if QMM_HAVE_AVX2
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
#else
    return 0;
#endif
}

static int qmm_isa_level(kern_aq_isa isa)
{
    return isa == KERN_AQ_ISA_AVX512 ? 2 : isa == KERN_AQ_ISA_AVX2 ? 1 : 0;
}

const char *kern_aq_isa_name(kern_aq_isa isa)
{
    switch (isa) {
    case KERN_AQ_ISA_AUTO: return "auto";
    case KERN_AQ_ISA_PORTABLE: return "portable";
    case KERN_AQ_ISA_AVX2: return "avx2";
    case KERN_AQ_ISA_AVX512: return "avx512";
    }
    return "?";
}

lv_status kern_aq_isa_set(kern_aq_isa isa)
{
    lv_status st = LV_OK;
    if (isa != KERN_AQ_ISA_AUTO && isa != KERN_AQ_ISA_PORTABLE && isa != KERN_AQ_ISA_AVX2 &&
        isa != KERN_AQ_ISA_AVX512)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_aq_isa_set: unknown ISA %d", (int)isa);
    if (qmm_isa_level(isa) > qmm_cpu_level())
        LV_FAIL(LV_ERR_UNSUPPORTED, "kern_aq_isa_set: this CPU (or build) has no %s",
                kern_aq_isa_name(isa));
    qmm_isa_chosen = isa;
done:
    return st;
}

kern_aq_isa kern_aq_isa_get(void)
{
    if (qmm_isa_chosen != KERN_AQ_ISA_AUTO) return qmm_isa_chosen;
    const int lv = qmm_cpu_level();
    return lv == 2 ? KERN_AQ_ISA_AVX512 : lv == 1 ? KERN_AQ_ISA_AVX2 : KERN_AQ_ISA_PORTABLE;
}

/* ------------------------------------------------------------------ LUT */

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

#if QMM_HAVE_AVX2
/* lut_group for K a multiple of 16: 16 entries held in two registers across a. */
QMM_AVX2 static void lut_group_avx2(float *t, const float *xi, const float *c, int len, int K)
{
    for (int k0 = 0; k0 < K; k0 += 16) {
        __m256 x0 = _mm256_set1_ps(xi[0]);
        __m256 a0 = _mm256_mul_ps(x0, _mm256_loadu_ps(c + k0));
        __m256 a1 = _mm256_mul_ps(x0, _mm256_loadu_ps(c + k0 + 8));
        for (int a = 1; a < len; a++) {
            const float *ca = c + (int64_t)a * K + k0;
            __m256 xa = _mm256_set1_ps(xi[a]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(xa, _mm256_loadu_ps(ca)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(xa, _mm256_loadu_ps(ca + 8)));
        }
        _mm256_storeu_ps(t + k0, a0);
        _mm256_storeu_ps(t + k0 + 8, a1);
    }
}
#endif

/* lut (n, n_groups, M, K): LUT[b, i, m, k] = sum_a x[b, i*g + a] * codebooks[m, k, a] over
 * the group's columns, in order of a. cbt (M, g, K) is the codebooks transposed so that
 * the loop over k is contiguous (vectorized; each k still sums over a in order). */
static void lut_build(float *lut, float *cbt, const float *x, const lv_aq_layer *L, int64_t n,
                      int avx2)
{
    const int M = L->M, K = 1 << L->nbits, g = L->g;
    const int64_t G = L->n_groups, d_in = L->d_in;
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++)
            for (int a = 0; a < g; a++)
                cbt[((int64_t)m * g + a) * K + k] = L->codebooks[((int64_t)m * K + k) * g + a];
    (void)avx2;
#pragma omp parallel for schedule(static)
    for (int64_t bi = 0; bi < n * G; bi++) {
        const int64_t b = bi / G, i = bi % G;
        const int len = (int)(d_in - i * g < g ? d_in - i * g : g); /* last group may be cut */
        for (int m = 0; m < M; m++) {
            float *t = lut + (bi * M + m) * K;
            const float *xi = x + b * d_in + i * g, *c = cbt + (int64_t)m * g * K;
#if QMM_HAVE_AVX2
            if (avx2 && K % 16 == 0) {
                lut_group_avx2(t, xi, c, len, K);
                continue;
            }
#endif
            lut_group(t, xi, c, len, K);
        }
    }
}

/* The sum of one row: with e = i*M + m running over the row's n_groups*M codes c (flat),
 * y[r] = s_r * (((LUT[0, c[0]] + LUT[1, c[1]]) + LUT[2, c[2]]) + ...): one sum per row, in
 * order of e, from 0. Rows go several at a time (independent sums in flight) inside chunks
 * of e whose tables stay in L1, their sums waiting in acc between chunks. */

/* acc[0..nr) += the entries e0..e1 of rows whose codes start at c (row stride cs) from
 * the tables tab (E, K). */
static void lut_rows(float *acc, const uint16_t *c, int64_t cs, int64_t nr, const float *tab,
                     int64_t e0, int64_t e1, int K)
{
    int64_t r = 0;
    /* Eight rows through named pointers and sums (arrays of them were kept in memory) */
    for (; r + 8 <= nr; r += 8) {
        const uint16_t *c0 = c + r * cs, *c1 = c0 + cs, *c2 = c1 + cs, *c3 = c2 + cs;
        const uint16_t *c4 = c3 + cs, *c5 = c4 + cs, *c6 = c5 + cs, *c7 = c6 + cs;
        float a0 = acc[r], a1 = acc[r + 1], a2 = acc[r + 2], a3 = acc[r + 3];
        float a4 = acc[r + 4], a5 = acc[r + 5], a6 = acc[r + 6], a7 = acc[r + 7];
        const float *T = tab + e0 * K;
        for (int64_t e = e0; e < e1; e++, T += K) {
            a0 += T[c0[e]], a1 += T[c1[e]], a2 += T[c2[e]], a3 += T[c3[e]];
            a4 += T[c4[e]], a5 += T[c5[e]], a6 += T[c6[e]], a7 += T[c7[e]];
        }
        acc[r] = a0, acc[r + 1] = a1, acc[r + 2] = a2, acc[r + 3] = a3;
        acc[r + 4] = a4, acc[r + 5] = a5, acc[r + 6] = a6, acc[r + 7] = a7;
    }
    for (; r < nr; r++) {
        float a = acc[r];
        for (int64_t e = e0; e < e1; e++) a += tab[e * K + c[r * cs + e]];
        acc[r] = a;
    }
}

#if QMM_HAVE_AVX2
/* AVX-512 (F + BW) LUT: 32 rows per register, their 16-bit codes as the index of word
 * permutes (vpermi2w: 64 entries of two registers) over the element's table held in 16
 * registers: the fp32 entries split into their high and low 16 bits (planes (E, 2, 256)
 * u16: the table padded to 256 entries), four permutes and three blends per plane select
 * the words, two unpacks rebuild the exact fp32 entries. 32 lookups in about 20
 * instructions, no gather. The codes are transposed on the fly, 32 elements of QMM_ROW_TILE
 * rows at a time, into ct (32, QMM_ROW_TILE) u16 by 8x8 word transposes. The adds are those
 * of lut_rows (one sum per row, in order of e): the same bits. */
#define QMM_AVX512 __attribute__((target("avx2,avx512f,avx512bw")))
#define QMM_PERM_EC 32 /* elements per transposed chunk */
#define QMM_PERM_SC 64 /* elements per transposed superchunk (ct: 32 KiB) */
#define QMM_PERM_PFD 1 /* superchunks ahead whose codes are prefetched */

/* ct (e1 - e0, QMM_ROW_TILE) = the codes e0..e1 (multiples of QMM_PERM_EC apart) of nv (a
 * multiple of 32) rows. Rows 32 at a time, each read along e (a few streams for the
 * hardware prefetchers), so that each line of ct is written whole while in L1. */
QMM_AVX512 static void lut_transpose_avx512(uint16_t *ct, const uint16_t *c, int64_t cs,
                                            int64_t nv, int64_t e0, int64_t e1)
{
    /* The same rows' codes QMM_PERM_PFD superchunks on are asked for now (into L1, 32 KiB;
     * into L2 or two superchunks on was slower): they arrive from memory in time. */
    const int64_t pf = QMM_PERM_PFD * QMM_PERM_SC, pf_end = cs - pf;
    for (int64_t r32 = 0; r32 < nv; r32 += 32)
        for (int64_t e = e0; e < e1; e += QMM_PERM_EC)
            for (int64_t r = r32; r < r32 + 32; r += 8) {
                __m512i a[8], t[8], u[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) a[k] = _mm512_loadu_si512(c + (r + k) * cs + e);
                if (e + QMM_PERM_EC <= pf_end)
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++)
                        _mm_prefetch((const char *)(c + (r + k) * cs + e + pf), _MM_HINT_T0);
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    t[2 * k] = _mm512_unpacklo_epi16(a[2 * k], a[2 * k + 1]);
                    t[2 * k + 1] = _mm512_unpackhi_epi16(a[2 * k], a[2 * k + 1]);
                }
                /* u[j] (j < 4): elements 2j, 2j+1 of rows 0-3; u[4 + j]: the same of rows 4-7 */
#pragma GCC unroll 2
                for (int h = 0; h < 2; h++) {
                    u[4 * h + 0] = _mm512_unpacklo_epi32(t[4 * h + 0], t[4 * h + 2]);
                    u[4 * h + 1] = _mm512_unpackhi_epi32(t[4 * h + 0], t[4 * h + 2]);
                    u[4 * h + 2] = _mm512_unpacklo_epi32(t[4 * h + 1], t[4 * h + 3]);
                    u[4 * h + 3] = _mm512_unpackhi_epi32(t[4 * h + 1], t[4 * h + 3]);
                }
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    /* element 2j (+1) of rows 0-7; 128-bit lane L: element 8L + 2j (+1) */
                    const __m512i v0 = _mm512_unpacklo_epi64(u[j], u[4 + j]);
                    const __m512i v1 = _mm512_unpackhi_epi64(u[j], u[4 + j]);
                    uint16_t *d0 = ct + (e - e0 + 2 * j) * QMM_ROW_TILE + r, *d1 = d0 + QMM_ROW_TILE;
                    const int64_t s8 = 8 * QMM_ROW_TILE;
                    _mm_storeu_si128((__m128i *)d0, _mm512_castsi512_si128(v0));
                    _mm_storeu_si128((__m128i *)(d0 + s8), _mm512_extracti32x4_epi32(v0, 1));
                    _mm_storeu_si128((__m128i *)(d0 + 2 * s8), _mm512_extracti32x4_epi32(v0, 2));
                    _mm_storeu_si128((__m128i *)(d0 + 3 * s8), _mm512_extracti32x4_epi32(v0, 3));
                    _mm_storeu_si128((__m128i *)d1, _mm512_castsi512_si128(v1));
                    _mm_storeu_si128((__m128i *)(d1 + s8), _mm512_extracti32x4_epi32(v1, 1));
                    _mm_storeu_si128((__m128i *)(d1 + 2 * s8), _mm512_extracti32x4_epi32(v1, 2));
                    _mm_storeu_si128((__m128i *)(d1 + 3 * s8), _mm512_extracti32x4_epi32(v1, 3));
                }
            }
}

/* acc[0..nv) += the entries of the ne elements whose planes start at tp, for the
 * transposed codes ct; nv a multiple of 32. The sums come out in the unpacks' order (rows
 * 0-3, 8-11, 16-19, 24-27, then 4-7, ...); accp keeps them so, lut_perm_row maps back. */
QMM_AVX512 static void lut_perm_avx512(float *accp, const uint16_t *ct, int64_t nv,
                                       const uint16_t *tp, int64_t ne)
{
    const __m512i b6 = _mm512_set1_epi16(64), b7 = _mm512_set1_epi16(128);
    for (int64_t e = 0; e < ne; e++) {
        const uint16_t *t = tp + (int64_t)e * 512; // (2, 256): high words, low words
        __m512i h[8], l[8];
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) h[k] = _mm512_loadu_si512(t + 32 * k);
#pragma GCC unroll 8
        for (int k = 0; k < 8; k++) l[k] = _mm512_loadu_si512(t + 256 + 32 * k);
        const uint16_t *ce = ct + (int64_t)e * QMM_ROW_TILE;
        for (int64_t r = 0; r < nv; r += 32) {
            const __m512i idx = _mm512_loadu_si512(ce + r);
            const __mmask32 m6 = _mm512_test_epi16_mask(idx, b6), m7 = _mm512_test_epi16_mask(idx, b7);
            const __m512i hh = _mm512_mask_blend_epi16(
                m7,
                _mm512_mask_blend_epi16(m6, _mm512_permutex2var_epi16(h[0], idx, h[1]),
                                        _mm512_permutex2var_epi16(h[2], idx, h[3])),
                _mm512_mask_blend_epi16(m6, _mm512_permutex2var_epi16(h[4], idx, h[5]),
                                        _mm512_permutex2var_epi16(h[6], idx, h[7])));
            const __m512i ll = _mm512_mask_blend_epi16(
                m7,
                _mm512_mask_blend_epi16(m6, _mm512_permutex2var_epi16(l[0], idx, l[1]),
                                        _mm512_permutex2var_epi16(l[2], idx, l[3])),
                _mm512_mask_blend_epi16(m6, _mm512_permutex2var_epi16(l[4], idx, l[5]),
                                        _mm512_permutex2var_epi16(l[6], idx, l[7])));
            float *a = accp + r;
            _mm512_storeu_ps(a, _mm512_add_ps(_mm512_loadu_ps(a),
                                              _mm512_castsi512_ps(_mm512_unpacklo_epi16(ll, hh))));
            _mm512_storeu_ps(a + 16, _mm512_add_ps(_mm512_loadu_ps(a + 16),
                                                   _mm512_castsi512_ps(_mm512_unpackhi_epi16(ll, hh))));
        }
    }
}

/* planes (E, 2, 256) u16 from the tables lut (E, K): high and low 16 bits of each entry,
 * entries K..255 zero. */
QMM_AVX512 static void lut_planes_avx512(uint16_t *tp, const float *lut, int64_t e0, int64_t e1,
                                         int K)
{
    for (int64_t e = e0; e < e1; e++) {
        uint16_t *t = tp + e * 512;
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m512i v = _mm512_loadu_si512(lut + e * K + k);
            _mm256_storeu_si256((__m256i *)(t + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(v, 16)));
            _mm256_storeu_si256((__m256i *)(t + 256 + k), _mm512_cvtepi32_epi16(v));
        }
        for (; k < K; k++) {
            uint32_t u;
            memcpy(&u, lut + e * K + k, sizeof u);
            t[k] = (uint16_t)(u >> 16);
            t[256 + k] = (uint16_t)u;
        }
        for (; k < 256; k++) t[k] = t[256 + k] = 0;
    }
}

static void lut_planes(uint16_t *tp, const float *lut, int64_t E, int K)
{
    const int64_t blk = 64;
#pragma omp parallel for schedule(static)
    for (int64_t e0 = 0; e0 < E; e0 += blk)
        lut_planes_avx512(tp, lut, e0, e0 + blk < E ? e0 + blk : E, K);
}

/* Row p of a block of 32 in accp holds the sum of row lut_perm_row(p). */
static inline int lut_perm_row(int p)
{
    /* unpacklo: 128-bit lane L holds rows 8L..8L+3; unpackhi: rows 8L+4..8L+7 */
    return p < 16 ? (p / 4) * 8 + p % 4 : ((p - 16) / 4) * 8 + 4 + p % 4;
}
#endif

/* y[b, r0..r1) for the n input rows from their tables lut (n, E, K) (and planes tp (n, E,
 * 2, 256) when isa >= 2); scratch acc of n * 2 * QMM_ROW_TILE floats, ct of QMM_PERM_SC *
 * QMM_ROW_TILE u16. The codes of a superchunk are transposed once for all n rows. */
static void lut_tile(float *y, const float *lut, const uint16_t *tp, const lv_aq_layer *L,
                     int64_t n, int64_t r0, int64_t r1, float *acc, uint16_t *ct, int isa)
{
    const int K = 1 << L->nbits;
    const int64_t E = L->n_groups * L->M, nr = r1 - r0, d_out = L->d_out;
    const uint16_t *c = L->codes + r0 * E;
    int64_t chunk = QMM_LUT_CHUNK_BYTES / ((int64_t)K * (int64_t)sizeof(float));
    if (chunk < 1) chunk = 1;
    memset(acc, 0, sizeof(float) * (size_t)(n * 2 * QMM_ROW_TILE));
    int64_t nv = 0; /* rows done by the AVX-512 permutes: all elements of rows [0, nv) */
    (void)tp, (void)ct, (void)isa;
#if QMM_HAVE_AVX2
    if (isa >= 2 && E >= QMM_PERM_EC) {
        nv = nr / 32 * 32;
        const int64_t full = E / QMM_PERM_EC * QMM_PERM_EC;
        for (int64_t e0 = 0; e0 < full; e0 += QMM_PERM_SC) {
            const int64_t e1 = e0 + QMM_PERM_SC < full ? e0 + QMM_PERM_SC : full;
            lut_transpose_avx512(ct, c, E, nv, e0, e1);
            for (int64_t b = 0; b < n; b++)
                lut_perm_avx512(acc + (2 * b + 1) * QMM_ROW_TILE, ct, nv, tp + (b * E + e0) * 512,
                                e1 - e0);
        }
        for (int64_t b = 0; b < n; b++) {
            float *ab = acc + 2 * b * QMM_ROW_TILE, *accp = ab + QMM_ROW_TILE;
            for (int64_t p = 0; p < nv; p++) ab[p / 32 * 32 + lut_perm_row((int)(p % 32))] = accp[p];
            lut_rows(ab, c, E, nv, lut + b * E * K, full, E, K); /* the last E % 32 elements */
        }
    }
#endif
    for (int64_t b = 0; b < n; b++) {
        float *ab = acc + 2 * b * QMM_ROW_TILE;
        for (int64_t e0 = 0; e0 < E; e0 += chunk) {
            const int64_t e1 = e0 + chunk < E ? e0 + chunk : E;
            lut_rows(ab + nv, c + nv * E, E, nr - nv, lut + b * E * K, e0, e1, K);
        }
        for (int64_t r = 0; r < nr; r++)
            y[b * d_out + r0 + r] = (L->scales ? L->scales[r0 + r] : 1.0f) * ab[r];
    }
}

static lv_status gemm_lut(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                          kern_aq_ws *ws, int isa)
{
    lv_status st = LV_OK;
    const int M = L->M, K = 1 << L->nbits, g = L->g;
    const int64_t G = L->n_groups, d_out = L->d_out, E = G * M;
    const int perm = isa >= 2 && E >= QMM_PERM_EC;
    const size_t n_cbt = ((size_t)M * g * K + 15) & ~(size_t)15;
    const size_t n_lut = ((size_t)n * E * K + 15) & ~(size_t)15;
    const size_t n_tp = perm ? (size_t)n * E * 256 : 0; /* floats: (n, E, 2, 256) u16 */
    /* per thread: acc (n, 2, QMM_ROW_TILE) floats, ct (QMM_PERM_SC, QMM_ROW_TILE) u16 */
    const size_t n_thr = (size_t)n * 2 * QMM_ROW_TILE + QMM_ROW_TILE * QMM_PERM_SC / 2;
    float *buf = NULL;
    LV_TRY(ws_reserve(ws, n_lut + n_cbt + n_tp + (size_t)omp_get_max_threads() * n_thr, &buf));
    float *lut = buf, *cbt = buf + n_lut, *thr = cbt + n_cbt + n_tp;
    uint16_t *tp = (uint16_t *)(cbt + n_cbt);
    lut_build(lut, cbt, x, L, n, isa >= 1);
#if QMM_HAVE_AVX2
    if (perm) lut_planes(tp, lut, n * E, K);
#endif
    const int64_t n_tiles = (d_out + QMM_ROW_TILE - 1) / QMM_ROW_TILE;
#pragma omp parallel
    {
        float *acc = thr + (size_t)omp_get_thread_num() * n_thr;
        uint16_t *ct = (uint16_t *)(acc + n * 2 * QMM_ROW_TILE);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < n_tiles; t++) {
            const int64_t r0 = t * QMM_ROW_TILE;
            const int64_t r1 = r0 + QMM_ROW_TILE < d_out ? r0 + QMM_ROW_TILE : d_out;
            lut_tile(y, lut, tp, L, n, r0, r1, acc, ct, isa);
        }
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
 * j % QMM_GLANES in order of j, in one pass instead of two; the lanes are then folded
 * pairwise. Only with constant M and g, g | QMM_GLANES: the loops then unroll and the lanes
 * stay in registers (staging lane blocks through a small buffer instead was 2-3x slower:
 * store forwarding). */
#define QMM_GLANES 16

/* The tail of dot_row_gather from column j0 = i0*g (fewer than QMM_GLANES columns, the cut
 * group too), then the fold: shared by both ISAs. */
static float gather_tail(float *acc, const float *x, const uint16_t *c, const lv_aq_layer *L,
                         int64_t i0)
{
    const int M = L->M, K = 1 << L->nbits, g = L->g;
    const float *cb = L->codebooks;
    for (int64_t j = i0 * g; j < L->d_in; j++) {
        const uint16_t *cq = c + (j / g) * M;
        float w = cb[(int64_t)cq[0] * g + j % g];
        for (int m = 1; m < M; m++) w += cb[((int64_t)m * K + cq[m]) * g + j % g];
        acc[j - i0 * g] += x[j] * w;
    }
    for (int h = QMM_GLANES / 2; h > 0; h /= 2)
        for (int l = 0; l < h; l++) acc[l] += acc[l + h];
    return acc[0];
}

QMM_INLINE float dot_row_gather(const float *x, const uint16_t *c, const lv_aq_layer *L,
                                const int M, const int g)
{
    const int K = 1 << L->nbits, per = QMM_GLANES / g; /* groups per lane block */
    const int64_t full = L->d_in / QMM_GLANES * per;
    const float *cb = L->codebooks; // (M, K, g)
    float acc[QMM_GLANES] = {0};
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
    return gather_tail(acc, x, c, L, i);
}

/* The codebooks (M * 2^nbits * g floats: 2 MiB for 1x16g8) asked for line by line before
 * the rows start: read at streaming speed instead of one random miss to memory at a time
 * (cold, as in a forward pass where each layer has its own codebooks). Prefetches only:
 * no effect on the results. */
static void prefetch_codebooks(const lv_aq_layer *L)
{
    const char *p = (const char *)L->codebooks;
    const size_t bytes = sizeof(float) * (size_t)L->M * ((size_t)1 << L->nbits) * (size_t)L->g;
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 2);
}

#if QMM_HAVE_AVX2
/* AVX2 GATHER for g = 8, M = 1 or 2, any batch n: the lanes of dot_row_gather (and of
 * decode_row + dot_lanes, which sum the same products in the same order) with lane block q
 * (of two) in one register: group i goes to register i % 2 of its (row, input row) pair.
 * Blocks of R output rows x NB input rows run together (R x NB = 4 x 1 for n = 1, 2 x 2
 * for n = 2, else 1 x 4 and a rest; 2 * R * NB <= 8 sums in registers): each codebook
 * vector is read once for the NB input rows, each x vector once for the R rows, and up to
 * 8 independent add chains hide the FP-add latency. Per output, the same adds in the same
 * order as the portable loops: the same bits. cbh: fp16 copy of the codebook (M = 1; its
 * values are the fp32 ones) or NULL.
 * Tried and dropped (no faster here, docs/kernels-qmm.md): one 32- or 64-bit load for the
 * codes of one or two groups (shifted to byte offsets at once, BEXTR), prefetching the
 * codes of the rows in flight, loading the
 * next step's codes one step ahead (slower), and (1x16g8) prefetching the codebook vectors
 * of the codes 16 or 64 groups ahead (slower). */
#define QMM_F16C __attribute__((target("avx2,f16c")))
#define QMM_F16_MIN_NBITS 12 /* smaller codebooks (<= 128 KiB) stay in L2 as they are */
#define QMM_GB_CB_COPY (64u << 10) /* floats: GATHER aligns codebooks up to this size */

/* The codebook vector of codes cq (M of them) for group-sum w: cb (M, K, 8) fp32 (cb1: its
 * second codebook), or cbh (K, 8) fp16 (M = 1 only). */
QMM_INLINE QMM_F16C __m256 gather_w(const uint16_t *cq, const float *cb, const float *cb1,
                                     const uint16_t *cbh, const int M)
{
    if (M == 1 && cbh)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(cbh + (int64_t)cq[0] * 8)));
    if (M == 1) return _mm256_loadu_ps(cb + (int64_t)cq[0] * 8);
    return _mm256_add_ps(_mm256_loadu_ps(cb + (int64_t)cq[0] * 8),
                         _mm256_loadu_ps(cb1 + (int64_t)cq[1] * 8));
}

/* y[b, r..r+R) for b in [b0, b0+NB): rows r.. of the layer, input rows b0.. */
QMM_INLINE QMM_F16C void gather_block_avx2(float *y, const float *x, const lv_aq_layer *L,
                                           const uint16_t *cbh, int64_t r, int64_t b0,
                                           const int M, const int R, const int NB)
{
    const int64_t K = (int64_t)1 << L->nbits, full = L->d_in / QMM_GLANES * 2;
    const int64_t cs = L->n_groups * M, d_in = L->d_in, d_out = L->d_out;
    const float *cb = L->codebooks, *cb1 = cb + K * 8; // (M, K, 8)
    const uint16_t *c = L->codes + r * cs;
    const float *xb = x + b0 * d_in;
    /* fixed sizes (R * NB <= 4): arrays sized by the const parameters would be VLAs,
     * kept in memory; these are scalarized into registers once the loops unroll */
    __m256 acc[8];
#pragma GCC unroll 8
    for (int k = 0; k < 2 * R * NB; k++) acc[k] = _mm256_setzero_ps();
    /* The next block's codes (R * cs u16 after this block's) are prefetched evenly over
     * this block's steps: the hardware prefetchers alone keep R streams too short ahead. */
    const char *pf = (const char *)(c + R * cs);
    const int64_t steps = full / 2 > 0 ? full / 2 : 1;
    const int64_t pf_step = (R * cs * 2 + steps - 1) / steps; /* bytes */
    for (int64_t i = 0; i < full; i += 2, pf += pf_step) {
        if (r + 2 * R <= d_out) _mm_prefetch(pf, _MM_HINT_T0);
        __m256 xv[8];
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            xv[2 * b] = _mm256_loadu_ps(xb + b * d_in + i * 8);
            xv[2 * b + 1] = _mm256_loadu_ps(xb + b * d_in + i * 8 + 8);
        }
#pragma GCC unroll 4
        for (int k = 0; k < R; k++) {
            const __m256 w0 = gather_w(c + k * cs + i * M, cb, cb1, cbh, M);
            const __m256 w1 = gather_w(c + k * cs + (i + 1) * M, cb, cb1, cbh, M);
#pragma GCC unroll 4
            for (int b = 0; b < NB; b++) {
                __m256 *ak = acc + 2 * (k * NB + b);
                ak[0] = _mm256_add_ps(ak[0], _mm256_mul_ps(xv[2 * b], w0));
                ak[1] = _mm256_add_ps(ak[1], _mm256_mul_ps(xv[2 * b + 1], w1));
            }
        }
    }
#pragma GCC unroll 4
    for (int k = 0; k < R; k++)
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            float a[QMM_GLANES];
            _mm256_storeu_ps(a, acc[2 * (k * NB + b)]);
            _mm256_storeu_ps(a + 8, acc[2 * (k * NB + b) + 1]);
            const float dot = gather_tail(a, xb + b * d_in, c + k * cs, L, full);
            y[(b0 + b) * d_out + r + k] = (L->scales ? L->scales[r + k] : 1.0f) * dot;
        }
}

/* Rows [r0, r1) of y (n, d_out), all input rows: R = 4 rows of one input row, or one row
 * of up to 4 input rows at a time (then the row's codebook vectors, fetched by the first
 * block of input rows, come from L1 for the next). */
QMM_INLINE QMM_F16C void gather_rows_k(float *y, const float *x, const lv_aq_layer *L,
                                       const uint16_t *cbh, int64_t n, int64_t r0, int64_t r1,
                                       const int M)
{
    int64_t r = r0;
    if (n == 1) {
        for (; r + 4 <= r1; r += 4) gather_block_avx2(y, x, L, cbh, r, 0, M, 4, 1);
        for (; r < r1; r++) gather_block_avx2(y, x, L, cbh, r, 0, M, 1, 1);
        return;
    }
    if (n == 2) {
        for (; r + 2 <= r1; r += 2) gather_block_avx2(y, x, L, cbh, r, 0, M, 2, 2);
        for (; r < r1; r++) gather_block_avx2(y, x, L, cbh, r, 0, M, 1, 2);
        return;
    }
    for (; r < r1; r++) {
        int64_t b = 0;
        for (; b + 4 <= n; b += 4) gather_block_avx2(y, x, L, cbh, r, b, M, 1, 4);
        if (n - b == 3) gather_block_avx2(y, x, L, cbh, r, b, M, 1, 3);
        else if (n - b == 2) gather_block_avx2(y, x, L, cbh, r, b, M, 1, 2);
        else if (n - b == 1) gather_block_avx2(y, x, L, cbh, r, b, M, 1, 1);
    }
}

QMM_F16C static void gather_rows_avx2_m1(float *y, const float *x, const lv_aq_layer *L,
                                         const uint16_t *cbh, int64_t n, int64_t r0, int64_t r1)
{
    gather_rows_k(y, x, L, cbh, n, r0, r1, 1);
}

QMM_F16C static void gather_rows_avx2_m2(float *y, const float *x, const lv_aq_layer *L,
                                         int64_t n, int64_t r0, int64_t r1)
{
    gather_rows_k(y, x, L, NULL, n, r0, r1, 2);
}

/* fp16 copy of 1xBg8 codebooks for GATHER: half the bytes of the random codebook reads
 * (2 MiB -> 1 MiB for 1x16g8: about an L2). Used only when every codebook value is exactly
 * an fp16 (as in AQLM checkpoints, which store fp16 codebooks): the products are then those
 * of the fp32 codebooks, bit for bit. Made per call (a read of the codebooks; the check
 * stops at the first value that is not an fp16). */

/* h (count) = cb in fp16 and 1 when every value is exact; else 0 (h partly written).
 * count a multiple of 8. */
QMM_F16C static int codebooks_to_fp16(uint16_t *h, const float *cb, int64_t count)
{
    for (int64_t i = 0; i < count; i += 8) {
        const __m256 v = _mm256_loadu_ps(cb + i);
        const __m128i hv = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i same = _mm256_cmpeq_epi32(_mm256_castps_si256(_mm256_cvtph_ps(hv)),
                                                _mm256_castps_si256(v));
        if (_mm256_movemask_ps(_mm256_castsi256_ps(same)) != 0xFF) return 0;
        _mm_storeu_si128((__m128i *)(h + i), hv);
    }
    return 1;
}

/* y (n, d_out) for g = 8, M <= 2; cbh: the fp16 codebook (M = 1) or NULL. OpenMP over
 * blocks of QMM_GB_ROWS rows (a multiple of 4: the row blocks, and so the bits, do not
 * depend on the thread count either way). */
#define QMM_GB_ROWS 64
static void gather_avx2(float *y, const float *x, const lv_aq_layer *L, const uint16_t *cbh,
                        int64_t n)
{
    const int64_t nblk = (L->d_out + QMM_GB_ROWS - 1) / QMM_GB_ROWS;
#pragma omp parallel
    {
        if (!cbh) prefetch_codebooks(L);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < nblk; t++) {
            const int64_t r0 = t * QMM_GB_ROWS;
            const int64_t r1 = r0 + QMM_GB_ROWS < L->d_out ? r0 + QMM_GB_ROWS : L->d_out;
            if (L->M == 1) gather_rows_avx2_m1(y, x, L, cbh, n, r0, r1);
            else gather_rows_avx2_m2(y, x, L, n, r0, r1);
        }
    }
}
#endif

static lv_status gemm_gather(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                             kern_aq_ws *ws, int avx2)
{
    lv_status st = LV_OK;
    const int M = L->M, g = L->g;
    const int64_t d_in = L->d_in, d_out = L->d_out, cs = L->n_groups * M;
    const int64_t stride = (d_in + 15) & ~(int64_t)15;
    const int fused = n == 1 && ((g == 8 && M <= 2) || (g == 4 && M == 1));
    (void)avx2;
#if QMM_HAVE_AVX2
    if (avx2 && g == 8 && M <= 2) { /* any batch: the same sums as both portable loops */
        const uint16_t *cbh = NULL;
        if (M == 1 && L->nbits >= QMM_F16_MIN_NBITS) {
            const int64_t count = ((int64_t)8 << L->nbits);
            float *h = NULL;
            LV_TRY(ws_reserve(ws, (size_t)count / 2, &h));
            if (codebooks_to_fp16((uint16_t *)h, L->codebooks, count)) cbh = (const uint16_t *)h;
        }
        /* A 32-byte codebook vector off a 32-byte boundary straddles two cache lines every
         * other read (calloc aligns to 16): codebooks up to QMM_GB_CB_COPY floats (2x8g8:
         * 16 KiB) are then copied to an aligned buffer (same values: same bits). */
        lv_aq_layer La = *L;
        const size_t n_cb = (size_t)M << (L->nbits + 3);
        if (!cbh && ((uintptr_t)L->codebooks & 31) && n_cb <= QMM_GB_CB_COPY) {
            float *cb = NULL;
            LV_TRY(ws_reserve(ws, n_cb, &cb));
            memcpy(cb, L->codebooks, sizeof(float) * n_cb);
            La.codebooks = cb;
        }
        gather_avx2(y, x, &La, cbh, n);
        goto done;
    }
#endif
    if (fused) { /* 1xBg8, 2xBg8, 1xBg4 (any B): one pass per row, nothing stored */
#pragma omp parallel
        {
            prefetch_codebooks(L);
#pragma omp for schedule(static)
            for (int64_t r = 0; r < d_out; r++) {
                const uint16_t *c = L->codes + r * cs;
                float dot = M == 1 && g == 8   ? dot_row_gather(x, c, L, 1, 8)
                            : M == 2 && g == 8 ? dot_row_gather(x, c, L, 2, 8)
                                               : dot_row_gather(x, c, L, 1, 4);
                y[r] = (L->scales ? L->scales[r] : 1.0f) * dot;
            }
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
    const int isa = qmm_isa_level(kern_aq_isa_get());
    if (!ws) {
        LV_TRY(kern_aq_ws_init(&own));
        ws = own;
    }
    switch (algo) {
    case KERN_AQ_LUT: LV_TRY(gemm_lut(y, x, L, n, ws, isa)); break;
    case KERN_AQ_GATHER: LV_TRY(gemm_gather(y, x, L, n, ws, isa >= 1)); break;
    default: LV_TRY(gemm_tile(y, x, L, n, ws)); break;
    }
    lv_aq_outliers_add_y(L, x, n, y); /* outlier columns (none: nothing) */
done:
    kern_aq_ws_free(own);
    return st;
}

lv_status kern_aq_gemm(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                       kern_aq_ws *ws)
{
    return kern_aq_gemm_algo(y, x, L, n, KERN_AQ_AUTO, ws);
}
