/* test_stage_aqlm.c: AQLM layer-wise quantization (stages/aqlm.c): beam search
 * optimality, codebook updates, the full alternation, padding rule, storage
 * cost and determinism. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <omp.h>

#include "quant_testlib.h"
#include "stage.h"
#include "stage_impl.h"

/* A layer with random codebooks, random codes and scales ~ row RMS. */
static void random_layer(lv_rng *rng, stage_aqlm_layer *L, int64_t d_out, int64_t d_in, int M,
                         int nbits, int g)
{
    assert_int_equal(lv_aq_layer_init(L, d_out, d_in, M, nbits, g), LV_OK);
    const int64_t K = (int64_t)1 << nbits;
    for (int64_t t = 0; t < M * K * g; t++) L->codebooks[t] = lv_rng_normal(rng) / (float)M;
    for (int64_t t = 0; t < d_out * L->n_groups * M; t++)
        L->codes[t] = (uint16_t)(lv_rng_u64(rng) % (uint64_t)K);
    for (int64_t r = 0; r < d_out; r++) L->scales[r] = 0.5f + lv_rng_uniform(rng);
}

static double objective(const float *W, const float *H, const stage_aqlm_layer *L)
{
    double obj = -1.0;
    assert_int_equal(stage_aqlm_objective(W, H, L, &obj), LV_OK);
    return obj;
}

/* d_in = 4, g = 2, M = 2 codebooks of 8: 8^4 = 4096 code combinations per row,
 * enumerated; a beam of 512 covers all of them in the last step. */
static void test_beam_exhaustive(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 31);
    const int64_t d_out = 6, d_in = 4;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 64, (int)d_in);
    assert_true(W && H);
    stage_aqlm_layer L = {0}, L0 = {0};
    random_layer(&rng, &L, d_out, d_in, 2, 3, 2);
    random_layer(&rng, &L0, d_out, d_in, 2, 3, 2);
    memcpy(L0.codebooks, L.codebooks, 2 * 8 * 2 * sizeof(float));
    memcpy(L0.scales, L.scales, d_out * sizeof(float));
    const size_t ncodes = (size_t)(d_out * 2 * 2);
    memcpy(L0.codes, L.codes, ncodes * sizeof(uint16_t));
    /* small beams never increase the objective */
    double start = objective(W, H, &L);
    for (int beam = 1; beam <= 4; beam *= 2) {
        assert_int_equal(stage_aqlm_beam_search(W, H, &L, beam, 7, NULL), LV_OK);
        double now = objective(W, H, &L);
        assert_true(now <= start);
        start = now;
    }
    /* beam 512 finds the exhaustive optimum of every row */
    memcpy(L.codes, L0.codes, ncodes * sizeof(uint16_t));
    int64_t ncand = 0;
    assert_int_equal(stage_aqlm_beam_search(W, H, &L, 512, 7, &ncand), LV_OK);
    assert_true(ncand == d_out * 8 * (1 + 8 + 64 + 512));
    float q[4];
    for (int64_t r = 0; r < d_out; r++) {
        double best = 1e300;
        for (int combo = 0; combo < 4096; combo++) {
            int c[4] = {combo & 7, (combo >> 3) & 7, (combo >> 6) & 7, (combo >> 9) & 7};
            for (int j = 0; j < 4; j++) {
                int i = j / 2, a = j % 2;
                q[j] = L.scales[r] * (L.codebooks[(0 * 8 + c[i * 2 + 0]) * 2 + a] +
                                      L.codebooks[(1 * 8 + c[i * 2 + 1]) * 2 + a]);
            }
            double o = qt_row_obj(W + r * d_in, q, H, d_in);
            if (o < best) best = o;
        }
        for (int j = 0; j < 4; j++) {
            const uint16_t *cr = L.codes + r * 4;
            int i = j / 2, a = j % 2;
            q[j] = L.scales[r] *
                   (L.codebooks[(0 * 8 + cr[i * 2]) * 2 + a] + L.codebooks[(8 + cr[i * 2 + 1]) * 2 + a]);
        }
        double got = qt_row_obj(W + r * d_in, q, H, d_in);
        assert_true(got <= best * (1.0 + 1e-9) + 1e-12);
    }
    lv_aq_layer_free(&L0);
    lv_aq_layer_free(&L);
    free(H);
    free(W);
}

/* Solve A x = b (n x n, double) by Gaussian elimination with partial pivoting. */
static void gauss_solve(double *A, double *b, int n)
{
    for (int c = 0; c < n; c++) {
        int piv = c;
        for (int r = c + 1; r < n; r++)
            if (fabs(A[r * n + c]) > fabs(A[piv * n + c])) piv = r;
        for (int t = 0; t < n; t++) {
            double tmp = A[c * n + t];
            A[c * n + t] = A[piv * n + t];
            A[piv * n + t] = tmp;
        }
        double tb = b[c];
        b[c] = b[piv];
        b[piv] = tb;
        for (int r = c + 1; r < n; r++) {
            double f = A[r * n + c] / A[c * n + c];
            for (int t = c; t < n; t++) A[r * n + t] -= f * A[c * n + t];
            b[r] -= f * b[c];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        for (int t = c + 1; t < n; t++) b[c] -= A[c * n + t] * b[t];
        b[c] /= A[c * n + c];
    }
}

/* LS with codes and scales fixed is the solution of the normal equations,
 * built here independently from the basis matrices dWhat/dparam. With M = 1
 * and every code used the solution is unique: compare codebooks. With M = 2 it
 * is not (a shift between codebooks cancels): compare objectives. */
static void lstsq_case(int M, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    const int64_t d_out = 8, d_in = 4;
    const int K = 4, g = 2, N = M * K * g;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 64, (int)d_in);
    stage_aqlm_layer L = {0}, Ln = {0};
    random_layer(&rng, &L, d_out, d_in, M, 2, g);
    for (int64_t t = 0; t < d_out * 2 * M; t++) L.codes[t] = (uint16_t)((t / M + t % M) % K);
    /* basis: B_p (d_out, d_in) = dWhat / d codebook[p] */
    float *B = calloc((size_t)N * d_out * d_in, sizeof(float));
    double *A = calloc((size_t)N * N, sizeof(double)), *b = calloc(N, sizeof(double));
    assert_true(W && H && B && A && b);
    for (int64_t r = 0; r < d_out; r++)
        for (int i = 0; i < 2; i++)
            for (int m = 0; m < M; m++)
                for (int a = 0; a < g; a++) {
                    int p = (m * K + L.codes[(r * 2 + i) * M + m]) * g + a;
                    B[(p * d_out + r) * d_in + i * g + a] += L.scales[r];
                }
    for (int p = 0; p < N; p++) {
        const float *Bp = B + p * d_out * d_in;
        for (int64_t r = 0; r < d_out; r++)
            for (int a = 0; a < d_in; a++)
                for (int c = 0; c < d_in; c++) {
                    double hac = H[a * d_in + c];
                    b[p] += (double)Bp[r * d_in + a] * hac * W[r * d_in + c];
                    for (int q = 0; q < N; q++)
                        A[p * N + q] += (double)Bp[r * d_in + a] * hac * B[(q * d_out + r) * d_in + c];
                }
    }
    /* the shift ambiguity of M = 2: pin codebook 1 entry 0 to its LS value via a tiny ridge */
    for (int p = 0; p < N; p++) A[p * N + p] += 1e-9 * A[p * N + p] + 1e-12;
    gauss_solve(A, b, N);
    double before = objective(W, H, &L);
    stage_aqlm_config cfg = {.codebook_update = STAGE_AQLM_LSTSQ, .no_scale_update = 1};
    assert_int_equal(lv_aq_layer_init(&Ln, d_out, d_in, M, 2, g), LV_OK);
    memcpy(Ln.codes, L.codes, d_out * 2 * M * sizeof(uint16_t));
    memcpy(Ln.scales, L.scales, d_out * sizeof(float));
    for (int p = 0; p < N; p++) Ln.codebooks[p] = (float)b[p];
    assert_int_equal(stage_aqlm_update_codebooks(W, H, &L, &cfg), LV_OK);
    double after = objective(W, H, &L), normal = objective(W, H, &Ln);
    assert_true(after <= before);
    assert_true(fabs(after - normal) <= 1e-5 * normal);
    double maxdiff = 0.0;
    for (int p = 0; p < N; p++) {
        double diff = fabs(L.codebooks[p] - b[p]);
        if (diff > maxdiff) maxdiff = diff;
        if (M == 1) assert_true(diff <= 1e-4 * (1.0 + fabs(b[p])));
    }
    printf("lstsq M=%d: objective %.6g -> %.6g (normal equations %.6g), max |dC| %.3g\n", M,
           before, after, normal, maxdiff);
    free(b);
    free(A);
    free(B);
    lv_aq_layer_free(&Ln);
    lv_aq_layer_free(&L);
    free(H);
    free(W);
}

static void test_lstsq_exact(void **state)
{
    (void)state;
    lstsq_case(1, 32);
    lstsq_case(2, 320);
}

/* Adam and LS (with and without the scale refit) never raise the objective. */
static void test_codebook_updates_lower(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 33);
    const int64_t d_out = 32, d_in = 32;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 256, (int)d_in);
    assert_true(W && H);
    stage_aqlm_config cfgs[3] = {
        {.codebook_update = STAGE_AQLM_ADAM, .adam_lr = 1e-2f, .adam_steps = 30},
        {.codebook_update = STAGE_AQLM_LSTSQ, .no_scale_update = 1},
        {.codebook_update = STAGE_AQLM_LSTSQ},
    };
    for (int c = 0; c < 3; c++) {
        stage_aqlm_layer L = {0};
        lv_rng_seed(&rng, 330 + c);
        random_layer(&rng, &L, d_out, d_in, 2, 4, 4);
        double before = objective(W, H, &L);
        assert_int_equal(stage_aqlm_update_codebooks(W, H, &L, &cfgs[c]), LV_OK);
        double after = objective(W, H, &L);
        printf("codebook update %d: %.6g -> %.6g\n", c, before, after);
        assert_true(after < before);
        /* a second update from the optimum does not go back up */
        assert_int_equal(stage_aqlm_update_codebooks(W, H, &L, &cfgs[c]), LV_OK);
        assert_true(objective(W, H, &L) <= after);
        lv_aq_layer_free(&L);
    }
    /* LS on codebooks too large for the dense normal equations is refused */
    stage_aqlm_layer L = {0};
    random_layer(&rng, &L, d_out, d_in, 2, 10, 8);
    assert_int_equal(stage_aqlm_update_codebooks(W, H, &L, &cfgs[1]), LV_ERR_UNSUPPORTED);
    lv_aq_layer_free(&L);
    free(H);
    free(W);
}

static double run_rel(const float *W, const float *H, int64_t d_out, int64_t d_in,
                      const stage_aqlm_config *cfg, stage_aqlm_stats *sx)
{
    stage_aqlm_layer L = {0};
    float *What = malloc((size_t)(d_out * d_in) * sizeof(float));
    double rel = -1.0;
    assert_non_null(What);
    assert_int_equal(stage_aqlm_run(W, H, d_out, d_in, cfg, &L, sx), LV_OK);
    assert_int_equal(stage_aqlm_dequant(&L, What), LV_OK);
    assert_int_equal(stage_aqlm_layer_error(W, What, H, d_out, d_in, &rel), LV_OK);
    lv_aq_layer_free(&L);
    free(What);
    return rel;
}

static void test_aqlm_run(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 34);
    const int64_t d = 64;
    float *W = qt_make_w(&rng, d, d), *H = qt_make_h(&rng, 512, (int)d);
    assert_true(W && H);
    const stage_aqlm_config cfgs[3] = {
        {.n_codebooks = 2, .nbits = 8, .group_size = 8, .beam_size = 4, .max_iters = 4,
         .codebook_update = STAGE_AQLM_ADAM, .adam_lr = 1e-3f, .adam_steps = 40, .seed = 1},
        {.n_codebooks = 2, .nbits = 4, .group_size = 4, .beam_size = 4, .max_iters = 4,
         .codebook_update = STAGE_AQLM_LSTSQ, .seed = 2},
        {.n_codebooks = 1, .nbits = 8, .group_size = 4, .beam_size = 8, .max_iters = 4,
         .codebook_update = STAGE_AQLM_ADAM, .adam_lr = 1e-3f, .adam_steps = 40, .seed = 3},
    };
    double rels[3];
    for (int c = 0; c < 3; c++) {
        stage_aqlm_stats sx;
        rels[c] = run_rel(W, H, d, d, &cfgs[c], &sx);
        printf("aqlm 64x64 %dx%dg%d: init %.4f ->", cfgs[c].n_codebooks, cfgs[c].nbits,
               cfgs[c].group_size, sx.rel_err_init);
        for (int it = 0; it < sx.iters; it++) printf(" %.4f", sx.rel_err[it]);
        printf(" (%.2f s)\n", sx.wall_s);
        assert_true(sx.iters >= 1);
        assert_true(sx.rel_err[0] <= sx.rel_err_init);
        for (int it = 1; it < sx.iters; it++) assert_true(sx.rel_err[it] <= sx.rel_err[it - 1]);
        assert_true(sx.rel_err[sx.iters - 1] < 0.95 * sx.rel_err_init);
        assert_true(fabs(rels[c] - sx.rel_err[sx.iters - 1]) <= 1e-4 * rels[c]);
    }
    /* 1x8g4 = 2 bits of codes + codebooks: a bound measured with margin */
    assert_true(rels[2] < 0.02); /* measured 0.0071 */
    free(H);
    free(W);
}

/* The padding rule: d_in = 172, g = 8 is exactly the problem padded to 176
 * with zero weight columns and zero Hessian rows/columns. */
static void test_padding_rule(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 35);
    const int64_t d_out = 16, d_in = 172, dp = 176;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 400, (int)d_in);
    float *Wp = calloc(d_out * dp, sizeof(float)), *Hp = calloc(dp * dp, sizeof(float));
    assert_true(W && H && Wp && Hp);
    for (int64_t r = 0; r < d_out; r++) memcpy(Wp + r * dp, W + r * d_in, d_in * sizeof(float));
    for (int64_t r = 0; r < d_in; r++) memcpy(Hp + r * dp, H + r * d_in, d_in * sizeof(float));
    const stage_aqlm_config cfg = {.n_codebooks = 1, .nbits = 6, .group_size = 8,
                                   .beam_size = 2, .max_iters = 2, .adam_steps = 10, .seed = 4};
    stage_aqlm_layer L = {0}, Lp = {0};
    assert_int_equal(stage_aqlm_run(W, H, d_out, d_in, &cfg, &L, NULL), LV_OK);
    assert_int_equal(stage_aqlm_run(Wp, Hp, d_out, dp, &cfg, &Lp, NULL), LV_OK);
    assert_int_equal(L.n_groups, 22);
    assert_memory_equal(L.codes, Lp.codes, d_out * 22 * sizeof(uint16_t));
    /* padded inputs cost nothing: the padded objective equals the true one */
    double o = objective(W, H, &L), op = objective(Wp, Hp, &Lp);
    assert_true(fabs(o - op) <= 1e-5 * op);
    float *What = malloc(d_out * d_in * sizeof(float));
    assert_non_null(What);
    assert_int_equal(stage_aqlm_dequant(&L, What), LV_OK);
    double rel = 0.0;
    assert_int_equal(stage_aqlm_layer_error(W, What, H, d_out, d_in, &rel), LV_OK);
    assert_true(rel > 0.0 && rel < 1.0);
    /* bits per weight counts n_groups = 22 code slots per row against 172 weights */
    double bpw = (16.0 * 22 * 1 * 6 + 1 * 64 * 8 * 16 + 16 * 16) / (16.0 * 172);
    assert_true(fabs(stage_aqlm_bits_per_weight(&L) - bpw) < 1e-12);
    free(What);
    lv_aq_layer_free(&Lp);
    lv_aq_layer_free(&L);
    free(Hp);
    free(Wp);
    free(H);
    free(W);
}

static void test_bits_per_weight(void **state)
{
    (void)state;
    stage_aqlm_layer L = {0};
    assert_int_equal(lv_aq_layer_init(&L, 64, 64, 1, 8, 4), LV_OK);
    /* codes 64*16*8 = 8192, codebooks 256*4*16 = 16384, scales 64*16 = 1024 bits */
    assert_true(stage_aqlm_bits_per_weight(&L) == 25600.0 / 4096.0);
    lv_aq_layer_free(&L);
    assert_int_equal(lv_aq_layer_init(&L, 4096, 4096, 2, 8, 8), LV_OK);
    /* 2x8g8 on 4096^2: 2 + 2*256*8*16/4096^2 + 16/4096 */
    double want = 2.0 + 65536.0 / (4096.0 * 4096.0) + 16.0 / 4096.0;
    assert_true(fabs(stage_aqlm_bits_per_weight(&L) - want) < 1e-12);
    lv_aq_layer_free(&L);
    assert_int_equal(lv_aq_layer_init(&L, 4, 4, 1, 17, 4), LV_ERR_INVALID_ARG);
    lv_aq_layer_free(NULL);
}

static void run_codes(const float *W, const float *H, int64_t d, const stage_aqlm_config *cfg,
                      stage_aqlm_layer *L)
{
    assert_int_equal(stage_aqlm_run(W, H, d, d, cfg, L, NULL), LV_OK);
}

static void test_determinism(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 36);
    const int64_t d = 48;
    float *W = qt_make_w(&rng, d, d), *H = qt_make_h(&rng, 256, (int)d);
    assert_true(W && H);
    const stage_aqlm_config cfg = {.n_codebooks = 2, .nbits = 5, .group_size = 4,
                                   .beam_size = 4, .max_iters = 2, .adam_steps = 20,
                                   .seed = 77};
    stage_aqlm_layer a = {0}, b = {0}, c = {0};
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    run_codes(W, H, d, &cfg, &a);
    run_codes(W, H, d, &cfg, &b);
    omp_set_num_threads(2);
    run_codes(W, H, d, &cfg, &c);
    omp_set_num_threads(saved);
    const size_t nc = (size_t)(d * a.n_groups * 2) * sizeof(uint16_t);
    const size_t nb = (size_t)(2 * 32 * 4) * sizeof(float);
    assert_memory_equal(a.codes, b.codes, nc);
    assert_memory_equal(a.codes, c.codes, nc);
    assert_memory_equal(a.codebooks, c.codebooks, nb);
    assert_memory_equal(a.scales, c.scales, d * sizeof(float));
    lv_aq_layer_free(&a);
    lv_aq_layer_free(&b);
    lv_aq_layer_free(&c);
    /* bad configs are refused with a message */
    stage_aqlm_config bad = cfg;
    bad.nbits = 0;
    assert_int_equal(stage_aqlm_run(W, H, d, d, &bad, &a, NULL), LV_ERR_INVALID_ARG);
    lv_aq_layer_free(&a);
    free(H);
    free(W);
}

/* The beam search's vectorised scorer (stages/aqlm.c, transposed codebook)
 * against kern_beam_score_ref: bit-identical for every group size 1..16 (the
 * g = 4, 8 one-pass paths and the general one), codebook sizes that are not
 * multiples of a vector, 1..8 beams, NaN/inf-free random data. */
static void test_beam_score_fast(void **state)
{
    (void)state;
    lv_rng r;
    lv_rng_seed(&r, 99);
    const int Ks[] = {1, 3, 16, 37, 256, 1000};
    int64_t n_cmp = 0;
    for (int g = 1; g <= 16; g++)
        for (size_t ki = 0; ki < sizeof Ks / sizeof Ks[0]; ki++)
            for (int nb = 1; nb <= 8; nb += 3) {
                const int K = Ks[ki];
                float *cb = malloc(sizeof(float) * (size_t)(K * g));
                float *cbT = malloc(sizeof(float) * (size_t)(K * g));
                double *u = malloc(sizeof(double) * (size_t)(nb * g));
                double *cn = malloc(sizeof(double) * (size_t)K), base[8];
                double *s1 = malloc(sizeof(double) * (size_t)(nb * K));
                double *s2 = malloc(sizeof(double) * (size_t)(nb * K));
                assert_true(cb && cbT && u && cn && s1 && s2);
                for (int k = 0; k < K; k++)
                    for (int a = 0; a < g; a++) {
                        cb[k * g + a] = lv_rng_normal(&r);
                        cbT[a * K + k] = cb[k * g + a];
                    }
                for (int i = 0; i < nb * g; i++) u[i] = 3.0 * lv_rng_normal(&r);
                for (int k = 0; k < K; k++) cn[k] = fabs(lv_rng_normal(&r)) * 10.0;
                for (int b = 0; b < nb; b++) base[b] = 100.0 + lv_rng_normal(&r);
                const double sc = 0.37 + 0.01 * g;
                kern_beam_score_ref(s1, base, u, cb, cn, sc, nb, K, g);
                stage_aq_beam_score(s2, base, u, cbT, cn, sc, nb, K, g);
                assert_memory_equal(s1, s2, sizeof(double) * (size_t)(nb * K));
                n_cmp += nb * K;
                free(cb), free(cbT), free(u), free(cn), free(s1), free(s2);
            }
    printf("  %lld scores bit-identical to kern_beam_score_ref (g 1..16)\n", (long long)n_cmp);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_beam_exhaustive),     cmocka_unit_test(test_beam_score_fast),     cmocka_unit_test(test_lstsq_exact),
        cmocka_unit_test(test_codebook_updates_lower), cmocka_unit_test(test_aqlm_run),
        cmocka_unit_test(test_padding_rule),        cmocka_unit_test(test_bits_per_weight),
        cmocka_unit_test(test_determinism),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
