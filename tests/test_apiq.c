/* test_apiq.c: ApiQ LoRA initialisation (stages/apiq.c) and LoRA adapters in
 * quantized models: the closed-form fit against an independent eigen-solver
 * (Jacobi) and against perturbations, the ApiQ alternation, HDF5 round trips
 * and checksums with and without adapters, dequantized views with and without
 * them, and the PEFT export read back with our own safetensors parser. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <hdf5.h>

#include "io.h"
#include "io_impl.h"
#include "stage.h"

static char g_dir[64];

static const char *tpath(const char *name)
{
    static char p[16][256];
    static int k = 0;
    LV_ASSERT(k < 16);
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k++];
}

/* ---------------------------------------------------------------- references */

/* All eigenvalues of the symmetric S (n, n) (destroyed) by cyclic Jacobi,
 * descending into w; eigenvectors as rows of V (n, n) when V != NULL. */
static void jacobi_eig(double *S, int n, double *w, double *V)
{
    double *Q = calloc((size_t)n * n, sizeof *Q);
    for (int i = 0; i < n; i++) Q[i * n + i] = 1.0;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, tot = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                tot += S[i * n + j] * S[i * n + j];
                if (i != j) off += S[i * n + j] * S[i * n + j];
            }
        if (off <= 1e-30 * tot) break;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = S[p * n + q];
                if (fabs(apq) < 1e-300) continue;
                double theta = (S[q * n + q] - S[p * n + p]) / (2 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
                double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    double a = S[k * n + p], b = S[k * n + q];
                    S[k * n + p] = c * a - s * b;
                    S[k * n + q] = s * a + c * b;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    double a = S[p * n + k], b = S[q * n + k];
                    S[p * n + k] = c * a - s * b;
                    S[q * n + k] = s * a + c * b;
                }
                for (int k = 0; k < n; k++) {
                    double a = Q[k * n + p], b = Q[k * n + q];
                    Q[k * n + p] = c * a - s * b;
                    Q[k * n + q] = s * a + c * b;
                }
            }
    }
    /* selection sort by eigenvalue, descending; column j of Q is vector j */
    int *idx = malloc(sizeof(int) * (size_t)n);
    for (int i = 0; i < n; i++) idx[i] = i;
    for (int i = 0; i < n; i++)
        for (int j = i + 1; j < n; j++)
            if (S[idx[j] * n + idx[j]] > S[idx[i] * n + idx[i]]) {
                int t = idx[i];
                idx[i] = idx[j];
                idx[j] = t;
            }
    for (int i = 0; i < n; i++) {
        w[i] = S[idx[i] * n + idx[i]];
        if (V)
            for (int k = 0; k < n; k++) V[i * n + k] = Q[k * n + idx[i]];
    }
    free(idx);
    free(Q);
}

/* H (n, n) = X^T X / rows for rows random normal rows (rank min(rows, n)). */
static float *random_hessian(int n, int rows, uint64_t seed)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    double *X = malloc(sizeof(double) * (size_t)rows * n);
    for (int i = 0; i < rows * n; i++) X[i] = lv_rng_normal(&r) * (1.0 + 0.1 * (i % n));
    float *H = malloc(sizeof(float) * (size_t)n * n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int t = 0; t < rows; t++) s += X[t * n + i] * X[t * n + j];
            H[i * n + j] = (float)(s / rows);
        }
    free(X);
    return H;
}

static float *random_matrix(int64_t rows, int64_t cols, uint64_t seed, float scale)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    float *x = malloc(sizeof(float) * (size_t)(rows * cols));
    for (int64_t i = 0; i < rows * cols; i++) x[i] = scale * lv_rng_normal(&r);
    return x;
}

/* tr((E - B A) Hd (E - B A)^T) in double, Hd = H + lambda I; B, A in double. */
static double objective(const float *E, const double *B, const double *A, const float *H,
                        double lambda, int d_out, int d_in, int r)
{
    double *R = malloc(sizeof(double) * (size_t)d_out * d_in), f = 0;
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) {
            double s = 0;
            for (int t = 0; t < r; t++) s += B[i * r + t] * A[t * d_in + j];
            R[i * d_in + j] = E[i * d_in + j] - s;
        }
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) {
            double s = 0;
            for (int k = 0; k < d_in; k++) s += R[i * d_in + k] * (H[k * d_in + j] + (k == j ? lambda : 0));
            f += R[i * d_in + j] * s;
        }
    free(R);
    return f;
}

static double damp_lambda(const float *H, int n)
{
    double tr = 0;
    for (int i = 0; i < n; i++) tr += H[i * n + i];
    return STAGE_LORA_DAMP * tr / n;
}

/* The squared singular values of E L (Hd = L L^T), descending: the nonzero
 * eigenvalues of E Hd E^T (d_out, d_out), by Jacobi. */
static void ref_sigma2(const float *E, const float *H, double lambda, int d_out, int d_in,
                       double *s2)
{
    double *G = calloc((size_t)d_out * d_out, sizeof *G);
    for (int a = 0; a < d_out; a++)
        for (int b = 0; b < d_out; b++) {
            double s = 0;
            for (int i = 0; i < d_in; i++)
                for (int j = 0; j < d_in; j++)
                    s += E[a * d_in + i] * (H[i * d_in + j] + (i == j ? lambda : 0)) * E[b * d_in + j];
            G[a * d_out + b] = s;
        }
    jacobi_eig(G, d_out, s2, NULL);
    free(G);
}

/* ---------------------------------------------------------------- stage_lora_fit */

/* Identity H: B A is the plain truncated SVD of E (from Jacobi on E E^T), and
 * the singular values are split evenly: |B col i|^2 = |A row i|^2 = sigma_i. */
static void check_identity(int d_out, int d_in, int r)
{
    float *E = random_matrix(d_out, d_in, 11 + (uint64_t)d_out, 1.0f);
    float *H = calloc((size_t)d_in * d_in, sizeof *H);
    for (int i = 0; i < d_in; i++) H[i * d_in + i] = 1.0f;
    float *A = malloc(sizeof(float) * (size_t)r * d_in), *B = malloc(sizeof(float) * (size_t)d_out * r);
    double rel = -1;
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, r, A, B, &rel), LV_OK);
    /* reference: U from Jacobi on E E^T, E_r = U_r U_r^T E */
    double *G = calloc((size_t)d_out * d_out, sizeof *G), *w = malloc(sizeof(double) * d_out),
           *U = malloc(sizeof(double) * (size_t)d_out * d_out);
    for (int a = 0; a < d_out; a++)
        for (int b = 0; b < d_out; b++)
            for (int j = 0; j < d_in; j++) G[a * d_out + b] += (double)E[a * d_in + j] * E[b * d_in + j];
    jacobi_eig(G, d_out, w, U);
    double maxdiff = 0, maxref = 0, tot = 0, kept = 0;
    for (int i = 0; i < d_out; i++) tot += w[i];
    for (int i = 0; i < r; i++) kept += w[i];
    for (int a = 0; a < d_out; a++)
        for (int j = 0; j < d_in; j++) {
            double ref = 0, got = 0;
            for (int t = 0; t < r; t++) {
                double ue = 0;
                for (int b = 0; b < d_out; b++) ue += U[t * d_out + b] * E[b * d_in + j];
                ref += U[t * d_out + a] * ue;
                got += (double)B[a * r + t] * A[t * d_in + j];
            }
            maxdiff = fmax(maxdiff, fabs(ref - got));
            maxref = fmax(maxref, fabs(ref));
        }
    printf("  identity H %dx%d r %d: max |BA - E_r| = %.2e (max |E_r| %.2f), rel %.6f vs %.6f\n",
           d_out, d_in, r, maxdiff, maxref, rel, (tot - kept) / tot);
    assert_true(maxdiff <= 1e-5 * maxref);
    assert_true(fabs(rel - (tot - kept) / tot) <= 1e-6);
    for (int t = 0; t < r; t++) {
        double nb = 0, na = 0;
        for (int a = 0; a < d_out; a++) nb += (double)B[a * r + t] * B[a * r + t];
        for (int j = 0; j < d_in; j++) na += (double)A[t * d_in + j] * A[t * d_in + j];
        assert_true(fabs(nb - sqrt(w[t])) <= 1e-5 * sqrt(w[0]));
        assert_true(fabs(na - sqrt(w[t])) <= 1e-5 * sqrt(w[0]));
    }
    free(U);
    free(w);
    free(G);
    free(B);
    free(A);
    free(H);
    free(E);
}

static void test_lora_identity(void **state)
{
    (void)state;
    check_identity(12, 20, 3); /* d_out <= d_in: output-side Gram */
    check_identity(20, 12, 3); /* d_out > d_in: Cholesky + input-side Gram */
    check_identity(9, 9, 9);   /* full rank: exact */
}

/* A PD Hessian: the objective equals the sum of the discarded squared singular
 * values of E L, and no perturbation of (B, A) does better. */
static void check_optimal(int d_out, int d_in, int r, int rows)
{
    float *E = random_matrix(d_out, d_in, 21 + (uint64_t)(d_out * 7 + r), 0.3f);
    float *H = random_hessian(d_in, rows, 5 + (uint64_t)d_in);
    float *A = malloc(sizeof(float) * (size_t)r * d_in), *B = malloc(sizeof(float) * (size_t)d_out * r);
    double rel = -1;
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, r, A, B, &rel), LV_OK);
    const double lambda = damp_lambda(H, d_in);
    double *s2 = malloc(sizeof(double) * d_out), tot = 0, tail = 0;
    ref_sigma2(E, H, lambda, d_out, d_in, s2);
    for (int i = 0; i < d_out; i++) tot += s2[i];
    for (int i = r; i < d_out; i++) tail += s2[i];
    double *Ad = malloc(sizeof(double) * (size_t)r * d_in), *Bd = malloc(sizeof(double) * (size_t)d_out * r);
    for (int i = 0; i < r * d_in; i++) Ad[i] = A[i];
    for (int i = 0; i < d_out * r; i++) Bd[i] = B[i];
    const double f = objective(E, Bd, Ad, H, lambda, d_out, d_in, r);
    const double f_h = objective(E, Bd, Ad, H, 0.0, d_out, d_in, r);
    const double ref_h = objective(E, Bd, Ad, H, 0.0, d_out, d_in, 0);
    printf("  H-metric %dx%d r %d: objective %.9g, discarded sigma^2 %.9g (total %.6g); rel %.8f "
           "vs %.8f\n", d_out, d_in, r, f, tail, tot, rel, f_h / ref_h);
    assert_true(fabs(f - tail) <= 1e-6 * tot);
    assert_true(fabs(rel - f_h / ref_h) <= 1e-6);
    /* random perturbations of the optimum are never better */
    lv_rng g;
    lv_rng_seed(&g, 77);
    double *Ap = malloc(sizeof(double) * (size_t)r * d_in), *Bp = malloc(sizeof(double) * (size_t)d_out * r);
    for (int trial = 0; trial < 20; trial++) {
        const double eps = trial < 10 ? 1e-3 : 3e-2;
        for (int i = 0; i < r * d_in; i++) Ap[i] = Ad[i] + eps * lv_rng_normal(&g);
        for (int i = 0; i < d_out * r; i++) Bp[i] = Bd[i] + eps * lv_rng_normal(&g);
        const double fp = objective(E, Bp, Ap, H, lambda, d_out, d_in, r);
        assert_true(fp >= f - 1e-9 * tot);
    }
    free(Bp);
    free(Ap);
    free(Bd);
    free(Ad);
    free(s2);
    free(B);
    free(A);
    free(H);
    free(E);
}

static void test_lora_optimal(void **state)
{
    (void)state;
    check_optimal(12, 20, 1, 60);
    check_optimal(12, 20, 4, 60);
    check_optimal(30, 16, 3, 60);
    check_optimal(30, 16, 16, 60); /* r = d_in: the residual vanishes */
}

/* Singular H (fewer calibration rows than inputs) on the Cholesky path, zero
 * E, argument checks, determinism. */
static void test_lora_edge_cases(void **state)
{
    (void)state;
    const int d_out = 24, d_in = 16, r = 4;
    float *E = random_matrix(d_out, d_in, 3, 1.0f), *H = random_hessian(d_in, 5, 9);
    float *A = malloc(sizeof(float) * r * d_in), *B = malloc(sizeof(float) * d_out * r);
    float *A2 = malloc(sizeof(float) * r * d_in), *B2 = malloc(sizeof(float) * d_out * r);
    double rel = -1, rel2 = -1;
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, r, A, B, &rel), LV_OK);
    printf("  rank-5 H, r 4: rel %.3e\n", rel);
    assert_true(rel >= 0 && rel <= 0.2 + 1e-6); /* 4 of the 5 directions H sees are fitted */
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, r, A2, B2, &rel2), LV_OK);
    assert_memory_equal(A, A2, sizeof(float) * r * d_in);
    assert_memory_equal(B, B2, sizeof(float) * d_out * r);
    assert_true(rel == rel2);
    float *Z = calloc((size_t)d_out * d_in, sizeof *Z);
    assert_int_equal(stage_lora_fit(Z, H, d_out, d_in, r, A, B, &rel), LV_OK);
    assert_true(rel == 0.0);
    for (int i = 0; i < r * d_in; i++) assert_true(A[i] == 0.0f);
    for (int i = 0; i < d_out * r; i++) assert_true(B[i] == 0.0f);
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, 0, A, B, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_lora_fit(E, H, d_out, d_in, d_in + 1, A, B, NULL), LV_ERR_INVALID_ARG);
    float *Hz = calloc((size_t)d_in * d_in, sizeof *Hz);
    assert_int_equal(stage_lora_fit(E, Hz, d_out, d_in, r, A, B, NULL), LV_ERR_NUMERIC);
    free(Hz);
    free(Z);
    free(B2);
    free(A2);
    free(B);
    free(A);
    free(H);
    free(E);
}

/* ---------------------------------------------------------------- stage_apiq_layer */

static const stage_aqlm_config k_acfg = {.n_codebooks = 1, .nbits = 6, .group_size = 4,
                                         .beam_size = 8, .max_iters = 4, .seed = 1};

static void test_apiq_layer(void **state)
{
    (void)state;
    const int d_out = 48, d_in = 40, r = 4, iters = 3;
    float *W = random_matrix(d_out, d_in, 31, 0.05f), *H = random_hessian(d_in, 200, 33);
    /* a low-rank component on top, which LoRA should take */
    float *U = random_matrix(d_out, 2, 35, 0.2f), *V = random_matrix(2, d_in, 36, 0.2f);
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) W[i * d_in + j] += U[i * 2] * V[j] + U[i * 2 + 1] * V[d_in + j];
    float *A = malloc(sizeof(float) * r * d_in), *B = malloc(sizeof(float) * d_out * r);
    float *A2 = malloc(sizeof(float) * r * d_in), *B2 = malloc(sizeof(float) * d_out * r);
    lv_aq_layer q = {0}, q2 = {0};
    stage_apiq_stats s, s2;
    assert_int_equal(stage_apiq_layer(W, H, d_out, d_in, r, iters, &k_acfg, &q, A, B, &s), LV_OK);
    assert_int_equal(s.iters, iters);
    for (int t = 0; t < iters; t++)
        printf("  iter %d: What %.5f  What+BA %.5f\n", t, s.rel_err_q[t], s.rel_err_qlora[t]);
    printf("  kept iter %d: %.5f (AQLM alone %.5f)\n", s.best_iter, s.rel_err_best, s.rel_err_aqlm);
    /* iteration 0 is plain AQLM: the same codes as stage_aqlm_run on W */
    lv_aq_layer plain = {0};
    assert_int_equal(stage_aqlm_run(W, H, d_out, d_in, &k_acfg, &plain, NULL), LV_OK);
    float *What = malloc(sizeof(float) * d_out * d_in), *Wl = malloc(sizeof(float) * d_out * d_in);
    double e_plain = 0;
    assert_int_equal(stage_aqlm_dequant(&plain, What), LV_OK);
    assert_int_equal(stage_aqlm_layer_error(W, What, H, d_out, d_in, &e_plain), LV_OK);
    assert_true(e_plain == s.rel_err_aqlm);
    /* adapters strictly help; the kept iterate is the best one seen */
    assert_true(s.rel_err_qlora[0] < s.rel_err_q[0]);
    assert_true(s.rel_err_best < s.rel_err_aqlm);
    for (int t = 0; t < iters; t++) assert_true(s.rel_err_best <= s.rel_err_qlora[t]);
    assert_true(s.rel_err_best == s.rel_err_qlora[s.best_iter]);
    /* the returned q + B A has exactly the reported error */
    assert_int_equal(stage_aqlm_dequant(&q, What), LV_OK);
    for (int i = 0; i < d_out; i++)
        for (int j = 0; j < d_in; j++) {
            float acc = 0;
            for (int t = 0; t < r; t++) acc += B[i * r + t] * A[t * d_in + j];
            Wl[i * d_in + j] = What[i * d_in + j] + acc;
        }
    double e = 0;
    assert_int_equal(stage_aqlm_layer_error(W, Wl, H, d_out, d_in, &e), LV_OK);
    assert_true(e == s.rel_err_best);
    /* deterministic */
    assert_int_equal(stage_apiq_layer(W, H, d_out, d_in, r, iters, &k_acfg, &q2, A2, B2, &s2), LV_OK);
    assert_memory_equal(q.codes, q2.codes, sizeof(uint16_t) * (size_t)(q.d_out * q.n_groups * q.M));
    assert_memory_equal(q.codebooks, q2.codebooks, sizeof(float) * (size_t)((q.M << q.nbits) * q.g));
    assert_memory_equal(q.scales, q2.scales, sizeof(float) * (size_t)q.d_out);
    assert_memory_equal(A, A2, sizeof(float) * r * d_in);
    assert_memory_equal(B, B2, sizeof(float) * d_out * r);
    assert_memory_equal(s.rel_err_qlora, s2.rel_err_qlora, sizeof s.rel_err_qlora);
    lv_aq_layer_free(&q2);
    assert_int_equal(stage_apiq_layer(W, H, d_out, d_in, r, 0, &k_acfg, &q2, A2, B2, NULL),
                     LV_ERR_INVALID_ARG);
    lv_aq_layer_free(&q2);
    lv_aq_layer_free(&plain);
    lv_aq_layer_free(&q);
    free(Wl);
    free(What);
    free(B2);
    free(A2);
    free(B);
    free(A);
    free(V);
    free(U);
    free(H);
    free(W);
}

/* ---------------------------------------------------------------- storage */

/* A small random quantized model (stories260K shapes), adapters of rank r on
 * every linear of every block when r > 0. */
static lv_qmodel *make_qmodel(int r, uint64_t seed)
{
    lv_model_config cfg;
    assert_int_equal(io_config_preset(&cfg, "stories260K"), LV_OK);
    lv_model *fp = NULL;
    assert_int_equal(io_model_synth(&fp, &cfg, seed), LV_OK);
    lv_qmodel *q = NULL;
    assert_int_equal(lv_qmodel_init(&q, fp, 1, 6, 4), LV_OK);
    io_model_free(fp);
    lv_rng g;
    lv_rng_seed(&g, seed);
    for (int l = 0; l < cfg.n_layers; l++) {
        lv_qblock *b = &q->blocks[l];
        b->block_mse = 0.01 * (l + 1);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &b->lin[k];
            for (int64_t i = 0; i < L->d_out * L->n_groups * L->M; i++)
                L->codes[i] = (uint16_t)(lv_rng_u64(&g) % 64);
            for (int64_t i = 0; i < ((int64_t)L->M << L->nbits) * L->g; i++)
                L->codebooks[i] = lv_rng_normal(&g) * 0.05f;
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = 0.5f + lv_rng_uniform(&g);
            b->rel_err[k] = 0.1 + k;
        }
        if (r > 0) {
            assert_int_equal(lv_qblock_lora_init(b, r), LV_OK);
            for (int k = 0; k < LV_LIN_COUNT; k++) {
                const lv_aq_layer *L = &b->lin[k];
                for (int64_t i = 0; i < r * L->d_in; i++) b->lora_A[k][i] = 0.1f * lv_rng_normal(&g);
                for (int64_t i = 0; i < L->d_out * r; i++) b->lora_B[k][i] = 0.1f * lv_rng_normal(&g);
            }
        }
    }
    q->job_hash = 0x1234;
    q->model_hash = 0xabcd;
    return q;
}

static void assert_lora_equal(const lv_qblock *a, const lv_qblock *b)
{
    assert_int_equal(a->lora_rank, b->lora_rank);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &a->lin[k];
        assert_true(!a->lora_A[k] == !b->lora_A[k] && !a->lora_B[k] == !b->lora_B[k]);
        if (!a->lora_A[k]) continue;
        assert_memory_equal(a->lora_A[k], b->lora_A[k], sizeof(float) * (size_t)(a->lora_rank * L->d_in));
        assert_memory_equal(a->lora_B[k], b->lora_B[k], sizeof(float) * (size_t)(L->d_out * a->lora_rank));
    }
}

/* io_qblock_checksum as it was before adapters existed (FNV-1a, file order). */
static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
    const unsigned char *c = p;
    for (size_t i = 0; i < n; i++) h = (h ^ c[i]) * 0x100000001b3ULL;
    return h;
}
static uint64_t old_checksum(const lv_qblock *b)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    size_t dim = (size_t)b->lin[LV_LIN_WQ].d_in;
    h = fnv(h, b->attn_norm, dim * sizeof(float));
    h = fnv(h, b->ffn_norm, dim * sizeof(float));
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        h = fnv(h, L->codes, (size_t)(L->d_out * L->n_groups * L->M) * sizeof(uint16_t));
        h = fnv(h, L->codebooks, ((size_t)L->M << L->nbits) * (size_t)L->g * sizeof(float));
        h = fnv(h, L->scales, (size_t)L->d_out * sizeof(float));
        h = fnv(h, &b->rel_err[k], sizeof(double));
    }
    return fnv(h, &b->block_mse, sizeof(double));
}

static void test_checksums(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(0, 41);
    lv_qblock *b = &q->blocks[2];
    const uint64_t before = io_qblock_checksum(b);
    assert_true(before == old_checksum(b)); /* no adapters: the old checksum */
    assert_int_equal(lv_qblock_lora_init(b, 3), LV_OK);
    const uint64_t zero_lora = io_qblock_checksum(b);
    assert_true(zero_lora != before); /* adapters count, even all-zero ones */
    b->lora_A[LV_LIN_W2][5] = 1.0f;
    assert_true(io_qblock_checksum(b) != zero_lora);
    lv_qblock_lora_free(b);
    assert_true(io_qblock_checksum(b) == before);
    /* an old-style checkpoint written now reads back with its old checksum */
    const char *p = tpath("old.h5");
    assert_int_equal(io_qblock_write(p, b, 2, &q->cfg, 1, 2), LV_OK);
    io_qblock_info info;
    assert_int_equal(io_qblock_inspect(p, &info), LV_OK);
    assert_true(info.checksum == before);
    assert_int_equal(lv_qblock_lora_init(b, 0), LV_ERR_INVALID_ARG);
    assert_int_equal(lv_qblock_lora_init(b, 33), LV_ERR_INVALID_ARG); /* wk is 32 x 64 */
    lv_qmodel_free(q);
}

static void test_h5_roundtrip(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(4, 42), *r = NULL;
    /* one linear without an adapter */
    lv_qblock *b1 = &q->blocks[1];
    free(b1->lora_A[LV_LIN_WO]);
    free(b1->lora_B[LV_LIN_WO]);
    b1->lora_A[LV_LIN_WO] = b1->lora_B[LV_LIN_WO] = NULL;
    const char *p = tpath("lora_model.h5");
    assert_int_equal(io_qmodel_write(q, p), LV_OK);
    assert_int_equal(io_qmodel_read(&r, p), LV_OK);
    for (int l = 0; l < q->cfg.n_layers; l++) {
        assert_lora_equal(&q->blocks[l], &r->blocks[l]);
        assert_true(io_qblock_checksum(&q->blocks[l]) == io_qblock_checksum(&r->blocks[l]));
    }
    assert_null(r->blocks[1].lora_A[LV_LIN_WO]);
    lv_qmodel_free(r);
    r = NULL;
    /* shared codebooks: the codebook tensor moves to the root, adapters stay per linear */
    const lv_aq_layer *L0 = &q->blocks[0].lin[0];
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            memcpy(q->blocks[l].lin[k].codebooks, L0->codebooks,
                   sizeof(float) * (size_t)((L0->M << L0->nbits) * L0->g));
    q->shared_codebooks = 1;
    const char *ps = tpath("lora_shared.h5");
    assert_int_equal(io_qmodel_write(q, ps), LV_OK);
    assert_int_equal(io_qmodel_read(&r, ps), LV_OK);
    assert_int_equal(r->shared_codebooks, 1);
    for (int l = 0; l < q->cfg.n_layers; l++) {
        assert_lora_equal(&q->blocks[l], &r->blocks[l]);
        assert_true(io_qblock_checksum(&q->blocks[l]) == io_qblock_checksum(&r->blocks[l]));
    }
    lv_qmodel_free(r);
    r = NULL;
    /* block checkpoint */
    const char *c = tpath("lora_block.h5");
    lv_qblock rb;
    int layer = -1;
    assert_int_equal(io_qblock_write(c, &q->blocks[3], 3, &q->cfg, 7, 8), LV_OK);
    assert_int_equal(io_qblock_read(c, &q->cfg, 7, 8, &rb, &layer), LV_OK);
    assert_int_equal(layer, 3);
    assert_lora_equal(&q->blocks[3], &rb);
    assert_true(io_qblock_checksum(&rb) == io_qblock_checksum(&q->blocks[3]));
    lv_qblock_free(&rb);

    /* damage: a changed adapter value fails the checksum; a wrong shape or a
     * lone factor is refused by name */
    hid_t f = H5Fopen(c, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t d = H5Dopen2(f, "block/w1/lora_A", H5P_DEFAULT);
    float v = 123.0f;
    hsize_t one = 1, at = 7;
    hid_t ms = H5Screate_simple(1, &one, NULL), fs = H5Dget_space(d);
    hsize_t coord[2] = {0, at};
    H5Sselect_elements(fs, H5S_SELECT_SET, 1, coord);
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, ms, fs, H5P_DEFAULT, &v) >= 0);
    H5Sclose(fs);
    H5Sclose(ms);
    H5Dclose(d);
    H5Fclose(f);
    assert_int_equal(io_qblock_read(c, &q->cfg, 7, 8, &rb, &layer), LV_ERR_FORMAT);
    assert_non_null(strstr(lv_last_error(), "checksum"));

    assert_int_equal(io_qblock_write(c, &q->blocks[3], 3, &q->cfg, 7, 8), LV_OK);
    f = H5Fopen(c, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(H5Ldelete(f, "block/w2/lora_B", H5P_DEFAULT) >= 0);
    H5Fclose(f);
    assert_int_equal(io_qblock_read(c, &q->cfg, 7, 8, &rb, &layer), LV_ERR_FORMAT);
    printf("  -> %s\n", lv_last_error());
    assert_non_null(strstr(lv_last_error(), "lora_B"));

    assert_int_equal(io_qblock_write(c, &q->blocks[3], 3, &q->cfg, 7, 8), LV_OK);
    f = H5Fopen(c, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(H5Ldelete(f, "block/wv/lora_B", H5P_DEFAULT) >= 0);
    hsize_t bad[2] = {32, 5};
    float *zeros = calloc(32 * 5, sizeof(float));
    hid_t sp = H5Screate_simple(2, bad, NULL), g = H5Gopen2(f, "block/wv", H5P_DEFAULT);
    d = H5Dcreate2(g, "lora_B", H5T_IEEE_F32LE, sp, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    assert_true(H5Dwrite(d, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros) >= 0);
    H5Dclose(d);
    H5Gclose(g);
    H5Sclose(sp);
    H5Fclose(f);
    free(zeros);
    assert_int_equal(io_qblock_read(c, &q->cfg, 7, 8, &rb, &layer), LV_ERR_FORMAT);
    printf("  -> %s\n", lv_last_error());
    assert_non_null(strstr(lv_last_error(), "wv/lora_B"));
    lv_qmodel_free(q);
}

/* to_fp applies the adapters (What + B A), to_fp_opts(0) leaves them out, and
 * the block view used during quantization applies them too. */
static void test_fp_views(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(3, 43);
    lv_model *with = NULL, *without = NULL, *dflt = NULL;
    assert_int_equal(io_qmodel_to_fp_opts(q, 1, &with), LV_OK);
    assert_int_equal(io_qmodel_to_fp_opts(q, 0, &without), LV_OK);
    assert_int_equal(io_qmodel_to_fp(q, &dflt), LV_OK);
    const lv_model_config *c = &q->cfg;
    float *view_w = NULL;
    int64_t total = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) total += q->blocks[0].lin[k].d_out * q->blocks[0].lin[k].d_in;
    view_w = malloc(sizeof(float) * (size_t)total);
    lv_layer *layers = malloc(sizeof(lv_layer) * (size_t)c->n_layers);
    lv_model view;
    assert_int_equal(io_qblock_fp_view(without, 2, &q->blocks[2], view_w, layers, &view), LV_OK);
    double maxd = 0;
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_qblock *b = &q->blocks[l];
            const lv_aq_layer *L = &b->lin[k];
            float *Wq = malloc(sizeof(float) * (size_t)(L->d_out * L->d_in));
            assert_int_equal(io_qmodel_dequant_linear(L, Wq), LV_OK);
            const float *w0 = lv_layer_weight(&without->layers[l], (lv_lin)k);
            const float *w1 = lv_layer_weight(&with->layers[l], (lv_lin)k);
            assert_memory_equal(w0, Wq, sizeof(float) * (size_t)(L->d_out * L->d_in));
            assert_memory_equal(w1, lv_layer_weight(&dflt->layers[l], (lv_lin)k),
                                sizeof(float) * (size_t)(L->d_out * L->d_in));
            if (l == 2)
                assert_memory_equal(lv_layer_weight(&view.layers[l], (lv_lin)k), w1,
                                    sizeof(float) * (size_t)(L->d_out * L->d_in));
            for (int64_t i = 0; i < L->d_out; i++)
                for (int64_t j = 0; j < L->d_in; j++) {
                    double ba = 0;
                    for (int t = 0; t < b->lora_rank; t++)
                        ba += (double)b->lora_B[k][i * b->lora_rank + t] * b->lora_A[k][t * L->d_in + j];
                    maxd = fmax(maxd, fabs(w1[i * L->d_in + j] - (Wq[i * L->d_in + j] + ba)));
                }
            free(Wq);
        }
    printf("  max |W(with) - (What + BA)| = %.2e\n", maxd);
    assert_true(maxd < 1e-6);
    free(layers);
    free(view_w);
    io_model_free(dflt);
    io_model_free(without);
    io_model_free(with);
    lv_qmodel_free(q);
}

/* ---------------------------------------------------------------- PEFT export */

static void check_peft(const char *dir, const lv_qmodel *q, int fp16)
{
    char path[300];
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    char *text = NULL;
    size_t n = 0;
    assert_int_equal(io_read_file(path, &text, &n), LV_OK);
    cJSON *o = cJSON_Parse(text);
    assert_non_null(o);
    const int r = q->blocks[0].lora_rank;
    assert_string_equal(cJSON_GetObjectItem(o, "peft_type")->valuestring, "LORA");
    assert_string_equal(cJSON_GetObjectItem(o, "task_type")->valuestring, "CAUSAL_LM");
    assert_string_equal(cJSON_GetObjectItem(o, "bias")->valuestring, "none");
    assert_int_equal(cJSON_GetObjectItem(o, "r")->valueint, r);
    assert_int_equal(cJSON_GetObjectItem(o, "lora_alpha")->valueint, r);
    cJSON *tm = cJSON_GetObjectItem(o, "target_modules");
    assert_int_equal(cJSON_GetArraySize(tm), LV_LIN_COUNT);
    assert_string_equal(cJSON_GetArrayItem(tm, 0)->valuestring, "q_proj");
    assert_string_equal(cJSON_GetArrayItem(tm, 4)->valuestring, "gate_proj");
    assert_string_equal(cJSON_GetArrayItem(tm, 5)->valuestring, "down_proj");
    assert_true(cJSON_HasObjectItem(o, "base_model_name_or_path"));
    cJSON_Delete(o);
    free(text);

    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    io_map m;
    io_st_header h;
    assert_int_equal(io_map_open(&m, path), LV_OK);
    assert_int_equal(io_st_parse(&h, m.data, m.size, path), LV_OK);
    assert_int_equal(h.n, q->cfg.n_layers * LV_LIN_COUNT * 2);
    const int hd = lv_cfg_head_dim(&q->cfg);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_qblock *b = &q->blocks[l];
            const lv_aq_layer *L = &b->lin[k];
            char mod[96], name[160];
            io_hf_aqlm_module(mod, sizeof mod, l, (lv_lin)k);
            for (int f = 0; f < 2; f++) {
                snprintf(name, sizeof name, "base_model.model.%s.lora_%c.weight", mod, f ? 'B' : 'A');
                const io_st_tensor *t = io_st_find(&h, name);
                assert_non_null(t);
                assert_string_equal(t->dtype_name, fp16 ? "F16" : "F32");
                assert_int_equal(t->ndim, 2);
                assert_int_equal(t->shape[0], f ? L->d_out : r);
                assert_int_equal(t->shape[1], f ? r : L->d_in);
                float *x = malloc(sizeof(float) * (size_t)t->numel);
                assert_int_equal(io_st_to_f32(t, m.data, x, path), LV_OK);
                const float *src = f ? b->lora_B[k] : b->lora_A[k];
                const int perm = f && (k == LV_LIN_WQ || k == LV_LIN_WK);
                for (int64_t row = 0; row < t->shape[0]; row++) {
                    const int64_t sr = perm ? io_rope_src_row(row, hd, 1) : row;
                    for (int64_t j = 0; j < t->shape[1]; j++) {
                        float want = src[sr * t->shape[1] + j];
                        if (fp16) want = io_f16_to_f32(io_f32_to_f16(want));
                        assert_true(x[row * t->shape[1] + j] == want);
                    }
                }
                free(x);
            }
        }
    io_st_header_free(&h);
    io_map_close(&m);
}

/* Tensor `name` of DIR/FILE as float32 (malloc'd); *numel its size. */
static float *st_tensor(const char *dir, const char *file, const char *name, int64_t *numel)
{
    char path[300];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    io_map m;
    io_st_header h;
    assert_int_equal(io_map_open(&m, path), LV_OK);
    assert_int_equal(io_st_parse(&h, m.data, m.size, path), LV_OK);
    const io_st_tensor *t = io_st_find(&h, name);
    assert_non_null(t);
    float *x = malloc(sizeof(float) * (size_t)t->numel);
    assert_int_equal(io_st_to_f32(t, m.data, x, path), LV_OK);
    *numel = t->numel;
    io_st_header_free(&h);
    io_map_close(&m);
    return x;
}

/* The adapter as PEFT applies it on top of the HF export of What equals the HF
 * export of What + B A: the lora_B row permutation matches the weights'. */
static void check_peft_on_hf(const lv_qmodel *q, const char *peft_dir)
{
    lv_model *base = NULL, *merged = NULL;
    const char *db = tpath("hf-base"), *dm = tpath("hf-merged");
    assert_int_equal(io_qmodel_to_fp_opts(q, 0, &base), LV_OK);
    assert_int_equal(io_qmodel_to_fp_opts(q, 1, &merged), LV_OK);
    assert_int_equal(io_model_write_hf(base, db), LV_OK);
    assert_int_equal(io_model_write_hf(merged, dm), LV_OK);
    double maxd = 0;
    const int r = q->blocks[0].lora_rank;
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            char mod[96], name[160];
            int64_t n0, n1, na, nb;
            io_hf_aqlm_module(mod, sizeof mod, l, (lv_lin)k);
            snprintf(name, sizeof name, "%s.weight", mod);
            float *w0 = st_tensor(db, "model.safetensors", name, &n0);
            float *w1 = st_tensor(dm, "model.safetensors", name, &n1);
            snprintf(name, sizeof name, "base_model.model.%s.lora_A.weight", mod);
            float *A = st_tensor(peft_dir, "adapter_model.safetensors", name, &na);
            snprintf(name, sizeof name, "base_model.model.%s.lora_B.weight", mod);
            float *B = st_tensor(peft_dir, "adapter_model.safetensors", name, &nb);
            const int64_t d_in = na / r, d_out = nb / r;
            assert_int_equal(n0, d_out * d_in);
            for (int64_t i = 0; i < d_out; i++)
                for (int64_t j = 0; j < d_in; j++) {
                    double ba = 0;
                    for (int t = 0; t < r; t++) ba += (double)B[i * r + t] * A[t * d_in + j];
                    maxd = fmax(maxd, fabs(w1[i * d_in + j] - (w0[i * d_in + j] + ba)));
                }
            free(B);
            free(A);
            free(w1);
            free(w0);
        }
    printf("  HF(What) + PEFT B A vs HF(What + B A): max diff %.2e\n", maxd);
    assert_true(maxd < 1e-6);
    io_model_free(merged);
    io_model_free(base);
}

static void test_peft_export(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(4, 44);
    const char *d32 = tpath("peft32"), *d16 = tpath("peft16");
    assert_int_equal(io_qmodel_write_peft_lora(q, d32), LV_OK);
    check_peft(d32, q, 0);
    assert_int_equal(q->cfg.rope, LV_ROPE_INTERLEAVED); /* so the q/k permutation is exercised */
    check_peft_on_hf(q, d32);
    io_peft_lora_opts o = {.fp16 = 1, .base_model = "out/hf-aqlm"};
    assert_int_equal(io_qmodel_write_peft_lora_opts(q, d16, &o), LV_OK);
    check_peft(d16, q, 1);
    int64_t np = 0;
    double bpw = io_qmodel_lora_bits_per_weight(q, &np);
    /* stories260K: per block 4 (64+64) x2 (wq, wo) + 4 (32+64) x2 + 4 (172+64) x3 */
    assert_int_equal(np, 5 * 4 * (2 * 128 + 2 * 96 + 3 * 236));
    assert_true(bpw > 0);
    /* refusals: no adapters; blocks that differ */
    lv_qmodel *z = make_qmodel(0, 45);
    assert_int_equal(io_qmodel_write_peft_lora(z, tpath("none")), LV_ERR_INVALID_ARG);
    assert_int_equal(lv_qblock_lora_init(&z->blocks[0], 2), LV_OK);
    assert_int_equal(io_qmodel_write_peft_lora(z, tpath("mixed")), LV_ERR_UNSUPPORTED);
    q->blocks[1].lora_A[LV_LIN_W1][0] = 1e6f;
    assert_int_equal(io_qmodel_write_peft_lora_opts(q, tpath("big16"), &o), LV_ERR_NUMERIC);
    lv_qmodel_free(z);
    lv_qmodel_free(q);
}

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/llmvq-apiq.XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lora_identity),  cmocka_unit_test(test_lora_optimal),
        cmocka_unit_test(test_lora_edge_cases), cmocka_unit_test(test_apiq_layer),
        cmocka_unit_test(test_checksums),      cmocka_unit_test(test_h5_roundtrip),
        cmocka_unit_test(test_fp_views),       cmocka_unit_test(test_peft_export),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
