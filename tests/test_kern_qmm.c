/* test_kern_qmm.c: products straight from AQLM codes (kern_qmm.h) against the
 * dequantize-then-sgemm reference kern_aq_gemm_ref, for every algorithm (LUT, GATHER,
 * TILE, and what AUTO picks) on seeded layers of the configs 1x16g8, 2x8g8, 1x8g8, 2x8g4,
 * 1x6g4, 1x4g1, 3x5g3, batches 1, 3, 8 and 20, shapes that are multiples of nothing
 * (37x172, 129x257, 5x3 with d_in < g), per-row scales, and codes at the top of the
 * range (2^nbits - 1) in every row.
 *
 * Tolerance (qmm_testlib.h): the algorithms sum in other orders than sgemm, so they agree
 * to fp32 rounding of the sum, not bit for bit. Each output is judged against the size of
 * what it sums, S = sum_j |x_j * What_rj| (double): |fast - ref| <= TOL_QMM_REL * S, with
 * TOL_QMM_REL = 1e-5. Both are also held against the exact (double) product. The max
 * relative difference (|fast - ref| / S) is printed per case.
 * Determinism: each algorithm gives the same bits with 1 and 2 OpenMP threads (TILE's
 * sgemm runs on OpenBLAS's own threads, whose count can change its bits, as for any
 * sgemm; the test keeps OPENBLAS_NUM_THREADS as ctest sets it, 1).
 * ISAs (test_isa_paths): LUT and GATHER with the portable loops are held to TOL_QMM_REL
 * against the reference, and the AVX2 and AVX-512 twins (where the CPU has them) must give
 * the portable bits, for every config, batches 1..8, shapes cut against the 256-row tiles,
 * the 32-row registers and the 32/64-element transposes, GATHER's 4-row / 4-input-row
 * blocks (odd row counts, batches 5-7), fp16-exact 1x16g8 / 1x12g8 codebooks (GATHER's
 * fp16 copy, batches 1-8) with and without one inexact value, and codebooks on and off a
 * 32-byte boundary. No reduced-precision
 * path: the tolerance is the fp32 one, TOL_QMM_REL = 1e-5. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <math.h>
#include <omp.h>

#include "kern.h"
#include "kern_check.h"
#include "kern_qmm.h"
#include "qmm_testlib.h"

static void make_layer(lv_aq_layer *L, lv_rng *r, int64_t d_out, int64_t d_in, int M,
                       int nbits, int g)
{
    assert_int_equal(qm_make_layer(L, r, d_out, d_in, M, nbits, g), LV_OK);
}

/* Every algorithm on one layer config and batch. */
static void run_case(int64_t d_out, int64_t d_in, int M, int nbits, int g, int64_t n, uint64_t seed)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    lv_aq_layer L = {0};
    make_layer(&L, &r, d_out, d_in, M, nbits, g);
    const int64_t ny = n * d_out;
    float *x = malloc(sizeof(float) * (size_t)(n * d_in));
    float *w = malloc(sizeof(float) * (size_t)(d_out * d_in));
    float *ref = malloc(sizeof(float) * (size_t)ny), *got = malloc(sizeof(float) * (size_t)ny);
    float *again = malloc(sizeof(float) * (size_t)ny);
    double *exact = calloc((size_t)ny, sizeof(double)), *refd = calloc((size_t)ny, sizeof(double));
    assert_true(x && w && ref && got && again && exact && refd);
    kc_fill(&r, x, n * d_in, 1.0f, 0.1f);
    kern_aq_dequant_ref(w, L.codes, L.codebooks, L.scales, d_out, d_in, L.n_groups, M, 1 << nbits, g);
    for (int64_t b = 0; b < n; b++)
        for (int64_t o = 0; o < d_out; o++)
            for (int64_t j = 0; j < d_in; j++)
                exact[b * d_out + o] += (double)x[b * d_in + j] * w[o * d_in + j];

    assert_int_equal(kern_aq_gemm_ref(ref, x, &L, n), LV_OK);
    for (int64_t t = 0; t < ny; t++) refd[t] = ref[t];
    int64_t bad = 0;
    double e_ref = qm_max_rel_diff(ref, exact, x, w, n, d_out, d_in, &bad);
    printf("  %lldx%lld %dx%dg%d n=%lld: ref vs exact max rel %.2g\n", (long long)d_out,
           (long long)d_in, M, nbits, g, (long long)n, e_ref);
    assert_int_equal(bad, 0);

    kern_aq_ws *ws = NULL;
    assert_int_equal(kern_aq_ws_init(&ws), LV_OK);
    const kern_aq_algo algos[] = {KERN_AQ_AUTO, KERN_AQ_LUT, KERN_AQ_GATHER, KERN_AQ_TILE};
    for (size_t a = 0; a < sizeof algos / sizeof algos[0]; a++) {
        if (algos[a] == KERN_AQ_LUT && nbits > 8) {
            assert_int_equal(kern_aq_gemm_algo(got, x, &L, n, KERN_AQ_LUT, ws), LV_ERR_UNSUPPORTED);
            continue;
        }
        omp_set_num_threads(1);
        memset(got, 0xff, sizeof(float) * (size_t)ny); /* NaN: every output must be written */
        assert_int_equal(kern_aq_gemm_algo(got, x, &L, n, algos[a], ws), LV_OK);
        omp_set_num_threads(2);
        assert_int_equal(kern_aq_gemm_algo(again, x, &L, n, algos[a], NULL), LV_OK);
        omp_set_num_threads(1);
        int64_t bad_ref = 0, bad_exact = 0;
        double e = qm_max_rel_diff(got, refd, x, w, n, d_out, d_in, &bad_ref);
        double ex = qm_max_rel_diff(got, exact, x, w, n, d_out, d_in, &bad_exact);
        const char *name = algos[a] == KERN_AQ_AUTO
                               ? kern_aq_algo_name(kern_aq_algo_auto(&L, n))
                               : kern_aq_algo_name(algos[a]);
        printf("    %-4s %-6s max rel diff vs ref %.2g, vs exact %.2g (tol %.0e); 1 vs 2 "
               "threads %s\n",
               algos[a] == KERN_AQ_AUTO ? "auto" : "", name, e, ex, TOL_QMM_REL,
               memcmp(got, again, sizeof(float) * (size_t)ny) ? "DIFFER" : "identical");
        assert_int_equal(bad_ref, 0);
        assert_int_equal(bad_exact, 0);
        assert_memory_equal(got, again, sizeof(float) * (size_t)ny);
    }
    kern_aq_ws_free(ws);
    free(refd), free(exact), free(again), free(got), free(ref), free(w), free(x);
    lv_aq_layer_free(&L);
}

static void run_config(int M, int nbits, int g, uint64_t seed)
{
    const int64_t batches[] = {1, 3, 8, 20};
    for (size_t b = 0; b < sizeof batches / sizeof batches[0]; b++) {
        run_case(37, 172, M, nbits, g, batches[b], seed + 10 * b);
        run_case(129, 257, M, nbits, g, batches[b], seed + 10 * b + 1);
    }
    run_case(5, 3, M, nbits, g, 2, seed + 99); /* d_in below g for g > 3: one cut group */
}

static void test_1x16g8(void **state) { (void)state; run_config(1, 16, 8, 100); }
static void test_2x8g8(void **state) { (void)state; run_config(2, 8, 8, 200); }
static void test_1x8g8(void **state) { (void)state; run_config(1, 8, 8, 300); }
static void test_2x8g4(void **state) { (void)state; run_config(2, 8, 4, 400); }
static void test_1x6g4(void **state) { (void)state; run_config(1, 6, 4, 500); }
static void test_1x4g1(void **state) { (void)state; run_config(1, 4, 1, 600); }
static void test_3x5g3(void **state) { (void)state; run_config(3, 5, 3, 700); }

/* Codes all at 2^nbits - 1 (the last codebook entry of every codebook). */
static void test_top_codes(void **state)
{
    (void)state;
    const int cfg[][3] = {{1, 16, 8}, {2, 8, 8}, {3, 5, 3}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        lv_rng r;
        lv_rng_seed(&r, 800 + c);
        lv_aq_layer L = {0};
        make_layer(&L, &r, 33, 100, cfg[c][0], cfg[c][1], cfg[c][2]);
        for (int64_t t = 0; t < L.d_out * L.n_groups * L.M; t++)
            L.codes[t] = (uint16_t)((1 << L.nbits) - 1);
        float x[2 * 100], ref[2 * 33], got[2 * 33];
        kc_fill(&r, x, 200, 1.0f, 0.0f);
        assert_int_equal(kern_aq_gemm_ref(ref, x, &L, 2), LV_OK);
        const kern_aq_algo algos[] = {KERN_AQ_LUT, KERN_AQ_GATHER, KERN_AQ_TILE};
        for (size_t a = 0; a < 3; a++) {
            if (algos[a] == KERN_AQ_LUT && L.nbits > 8) continue;
            assert_int_equal(kern_aq_gemm_algo(got, x, &L, 2, algos[a], NULL), LV_OK);
            double scratch[66];
            char name[64];
            snprintf(name, sizeof name, "top codes %dx%dg%d %s", L.M, L.nbits, L.g,
                     kern_aq_algo_name(algos[a]));
            /* All rows equal up to their scale: outputs are O(10), none near zero. */
            assert_int_equal(kc_compare_f(name, got, ref, 66, 1e-4, TOL_QMM_REL, scratch), 0);
        }
        lv_aq_layer_free(&L);
    }
}

/* One workspace through layers of growing and shrinking size gives the results of a
 * fresh one. */
static void test_ws_reuse(void **state)
{
    (void)state;
    lv_rng r;
    lv_rng_seed(&r, 900);
    lv_aq_layer A = {0}, B = {0};
    make_layer(&A, &r, 40, 64, 2, 8, 8);
    make_layer(&B, &r, 300, 520, 1, 8, 8);
    float x[3 * 520], y1[3 * 300], y2[3 * 300];
    kc_fill(&r, x, 3 * 520, 1.0f, 0.0f);
    kern_aq_ws *ws = NULL;
    assert_int_equal(kern_aq_ws_init(&ws), LV_OK);
    const lv_aq_layer *seq[] = {&A, &B, &A, &B};
    for (int k = 0; k < 4; k++) {
        assert_int_equal(kern_aq_gemm_algo(y1, x, seq[k], 3, KERN_AQ_LUT, ws), LV_OK);
        assert_int_equal(kern_aq_gemm_algo(y2, x, seq[k], 3, KERN_AQ_LUT, NULL), LV_OK);
        assert_memory_equal(y1, y2, sizeof(float) * 3 * (size_t)seq[k]->d_out);
    }
    printf("  workspace after 4 calls: %zu bytes\n", kern_aq_ws_bytes(ws));
    assert_true(kern_aq_ws_bytes(ws) > 0);
    kern_aq_ws_free(ws);
    kern_aq_ws_free(NULL);
    lv_aq_layer_free(&A);
    lv_aq_layer_free(&B);
}

/* The ISA paths of LUT and GATHER (kern_aq_isa_set: portable C, AVX2 gathers/loads,
 * AVX-512 word permutes) on every config, batches 1..8 and shapes that are multiples of
 * neither the row tiles (256, 32-row registers) nor the element chunks (32, 64): each
 * available ISA must give the bits of the portable path, and the portable path must be
 * within TOL_QMM_REL of the reference. An ISA this CPU lacks is refused
 * (LV_ERR_UNSUPPORTED) and skipped. */
/* fp16: 0 as made; 1 every codebook value rounded to fp16 (the fp16 codebook copy of
 * GATHER for 1xBg8, B >= 12); 2 the same but for the last value (not an fp16: the fp32
 * codebook is used). */
/* cb_off: the codebooks moved to cb_off floats past a 64-byte boundary (GATHER's AVX2 path
 * copies misaligned small codebooks to an aligned buffer first). */
static void isa_case(int64_t d_out, int64_t d_in, int M, int nbits, int g, int64_t n,
                     uint64_t seed, int fp16, int cb_off)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    lv_aq_layer L = {0};
    make_layer(&L, &r, d_out, d_in, M, nbits, g);
    const int64_t n_cb = (int64_t)M * ((int64_t)1 << nbits) * g;
    for (int64_t t = 0; fp16 && t < n_cb; t++) L.codebooks[t] = lv_round_f16(L.codebooks[t]);
    if (fp16 == 2) L.codebooks[n_cb - 1] = 0.1f; /* not an fp16 */
    float *own_cb = L.codebooks, *moved = NULL;
    if (cb_off >= 0) {
        moved = aligned_alloc(64, (sizeof(float) * (size_t)(n_cb + 16) + 63) & ~(size_t)63);
        assert_non_null(moved);
        memcpy(moved + cb_off, own_cb, sizeof(float) * (size_t)n_cb);
        L.codebooks = moved + cb_off;
    }
    const int64_t ny = n * d_out;
    float *x = malloc(sizeof(float) * (size_t)(n * d_in));
    float *w = malloc(sizeof(float) * (size_t)(d_out * d_in));
    float *ref = malloc(sizeof(float) * (size_t)ny), *base = malloc(sizeof(float) * (size_t)ny);
    float *got = malloc(sizeof(float) * (size_t)ny);
    double *refd = malloc(sizeof(double) * (size_t)ny);
    assert_true(x && w && ref && base && got && refd);
    kc_fill(&r, x, n * d_in, 1.0f, 0.1f);
    kern_aq_dequant_ref(w, L.codes, L.codebooks, L.scales, d_out, d_in, L.n_groups, M, 1 << nbits, g);
    assert_int_equal(kern_aq_gemm_ref(ref, x, &L, n), LV_OK);
    for (int64_t t = 0; t < ny; t++) refd[t] = ref[t];
    const kern_aq_algo algos[] = {KERN_AQ_LUT, KERN_AQ_GATHER};
    const kern_aq_isa isas[] = {KERN_AQ_ISA_AVX2, KERN_AQ_ISA_AVX512};
    for (size_t a = 0; a < 2; a++) {
        if (algos[a] == KERN_AQ_LUT && nbits > 8) continue;
        assert_int_equal(kern_aq_isa_set(KERN_AQ_ISA_PORTABLE), LV_OK);
        memset(base, 0xff, sizeof(float) * (size_t)ny);
        assert_int_equal(kern_aq_gemm_algo(base, x, &L, n, algos[a], NULL), LV_OK);
        int64_t bad = 0;
        double e = qm_max_rel_diff(base, refd, x, w, n, d_out, d_in, &bad);
        assert_int_equal(bad, 0);
        printf("  %lldx%lld %dx%dg%d%s n=%lld %-6s portable vs ref %.2g;", (long long)d_out,
               (long long)d_in, M, nbits, g, fp16 == 1 ? " fp16 cb" : fp16 == 2 ? " fp16 cb but 1" : "",
               (long long)n, kern_aq_algo_name(algos[a]), e);
        for (size_t i = 0; i < 2; i++) {
            lv_status st = kern_aq_isa_set(isas[i]);
            if (st == LV_ERR_UNSUPPORTED) {
                printf(" %s: not on this CPU;", kern_aq_isa_name(isas[i]));
                continue;
            }
            assert_int_equal(st, LV_OK);
            for (int thr = 1; thr <= 2; thr++) {
                omp_set_num_threads(thr);
                memset(got, 0xff, sizeof(float) * (size_t)ny);
                assert_int_equal(kern_aq_gemm_algo(got, x, &L, n, algos[a], NULL), LV_OK);
                assert_memory_equal(got, base, sizeof(float) * (size_t)ny);
            }
            omp_set_num_threads(1);
            printf(" %s identical;", kern_aq_isa_name(isas[i]));
        }
        printf("\n");
    }
    assert_int_equal(kern_aq_isa_set(KERN_AQ_ISA_AUTO), LV_OK);
    free(refd), free(got), free(base), free(ref), free(w), free(x);
    L.codebooks = own_cb;
    free(moved);
    lv_aq_layer_free(&L);
}

static void test_isa_paths(void **state)
{
    (void)state;
    const int cfg[][3] = {{2, 8, 8}, {1, 8, 8}, {1, 16, 8}, {2, 8, 4}, {1, 6, 4}, {3, 5, 3}, {1, 4, 1}};
    /* 300 rows: one full 256-row tile and a cut one, 32-row blocks and a tail of 12;
     * d_in 1100 with g 8: 138 groups (a cut one), 276 elements for M = 2: four 64-element
     * superchunks and a tail of 20; 40x9: fewer elements than one 32-wide chunk. */
    /* 37x1100: odd rows against GATHER's blocks (4 rows for n = 1, 2 for n = 2, 64-row
     * OpenMP blocks) and input-row blocks of 4 with 1-3 left (n = 5..7) */
    const int64_t shapes[][2] = {{300, 1100}, {40, 9}, {33, 520}, {37, 1100}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int64_t n = 1; n <= 8; n += (s == 0 ? 3 : 1))
                isa_case(shapes[s][0], shapes[s][1], cfg[c][0], cfg[c][1], cfg[c][2], n,
                         1100 + 100 * c + 10 * s + (uint64_t)n, 0, -1);
    /* GATHER's fp16 codebook copy (1xBg8, B >= 12, any batch), and its fallback */
    const int64_t fshapes[][2] = {{70, 1100}, {40, 9}, {33, 520}, {5, 3}};
    const int64_t fbatch[] = {1, 2, 5, 8};
    for (size_t s = 0; s < sizeof fshapes / sizeof fshapes[0]; s++)
        for (int f = 1; f <= 2; f++) {
            const int64_t n = fbatch[s];
            isa_case(fshapes[s][0], fshapes[s][1], 1, 16, 8, n, 2000 + 10 * s + (uint64_t)f, f, -1);
            isa_case(fshapes[s][0], fshapes[s][1], 1, 12, 8, n, 2100 + 10 * s + (uint64_t)f, f, -1);
        }
    /* codebooks aligned and off a 32-byte boundary (GATHER's aligned copy) */
    const int offs[] = {0, 1, 4};
    for (size_t o = 0; o < sizeof offs / sizeof offs[0]; o++)
        for (int64_t n = 1; n <= 3; n++) {
            isa_case(37, 1100, 2, 8, 8, n, 2200 + 10 * o + (uint64_t)n, 0, offs[o]);
            isa_case(37, 1100, 1, 8, 8, n, 2300 + 10 * o + (uint64_t)n, 0, offs[o]);
        }
    assert_int_equal(kern_aq_isa_set((kern_aq_isa)42), LV_ERR_INVALID_ARG);
    assert_string_equal(kern_aq_isa_name(KERN_AQ_ISA_AVX512), "avx512");
    printf("  auto runs %s\n", kern_aq_isa_name(kern_aq_isa_get()));
}

static void test_invalid_args(void **state)
{
    (void)state;
    lv_rng r;
    lv_rng_seed(&r, 1000);
    lv_aq_layer L = {0};
    make_layer(&L, &r, 4, 13, 1, 4, 5);
    float x[13], y[4];
    kc_fill(&r, x, 13, 1.0f, 0.0f);
    assert_int_equal(kern_aq_gemm(y, x, NULL, 1, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm(NULL, x, &L, 1, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm_ref(y, NULL, &L, 1), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm(y, x, &L, -1, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm(NULL, NULL, &L, 0, NULL), LV_OK); /* empty batch */
    assert_int_equal(kern_aq_gemm_algo(y, x, &L, 1, (kern_aq_algo)42, NULL), LV_ERR_INVALID_ARG);
    lv_aq_layer bad = L;
    bad.n_groups = 2; /* must be ceil(13 / 5) = 3 */
    assert_int_equal(kern_aq_gemm(y, x, &bad, 1, NULL), LV_ERR_INVALID_ARG);
    bad = L;
    bad.nbits = 17;
    assert_int_equal(kern_aq_gemm_ref(y, x, &bad, 1), LV_ERR_INVALID_ARG);
    bad = L;
    bad.codes = NULL;
    assert_int_equal(kern_aq_gemm(y, x, &bad, 1, NULL), LV_ERR_INVALID_ARG);
    char line[256];
    lv_last_error_line(line, sizeof line);
    printf("  invalid arguments refused; last message: %s\n", line);
    lv_aq_layer_free(&L);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_1x16g8),    cmocka_unit_test(test_2x8g8),
        cmocka_unit_test(test_1x8g8),     cmocka_unit_test(test_2x8g4),
        cmocka_unit_test(test_1x6g4),     cmocka_unit_test(test_1x4g1),
        cmocka_unit_test(test_3x5g3),     cmocka_unit_test(test_top_codes),
        cmocka_unit_test(test_ws_reuse),  cmocka_unit_test(test_invalid_args),
        cmocka_unit_test(test_isa_paths),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
