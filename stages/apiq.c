/* apiq.c: LoRA adapters initialised jointly with quantization (ApiQ,
 * arXiv 2402.05147; the alternation is LoftQ's, arXiv 2310.08659), in the
 * layer-output metric of our Hessians: min tr((W - What - B A) H (...)^T).
 *
 * stage_lora_fit is the closed form for the adapter given What (Eckart-Young in
 * the H-metric); stage_apiq_layer alternates it with AQLM. The SVD is taken
 * through the Gram matrix of the smaller side in double precision: only the
 * top r singular pairs are needed, and those are accurate to ~1e-16 of the
 * largest, far below the float32 data. LAPACK (dpotrf, dsyevr) is the one
 * shipped inside OpenBLAS, as in aqlm.c. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "stage.h"

extern void dpotrf_(const char *uplo, const int *n, double *a, const int *lda, int *info);
extern void dsyevr_(const char *jobz, const char *range, const char *uplo, const int *n, double *a,
                    const int *lda, const double *vl, const double *vu, const int *il,
                    const int *iu, const double *abstol, int *m, double *w, double *z,
                    const int *ldz, int *isuppz, double *work, const int *lwork, int *iwork,
                    const int *liwork, int *info);

/* Largest damping tried before giving up on a Cholesky factorisation. */
#define LORA_DAMP_MAX 1e-2
/* Singular directions with sigma^2 below this fraction of the largest are zero. */
#define LORA_EIG_FLOOR 1e-20

/* ---------------------------------------------------------------- helpers */

/* Hd (n, n) = H + lambda I in double, lambda = damp * mean(diag H). */
static lv_status damped_hessian(const float *H, int64_t n, double damp, double *Hd,
                                double *lambda)
{
    lv_status st = LV_OK;
    double tr = 0.0;
    for (int64_t i = 0; i < n; i++) tr += H[i * n + i];
    if (!(tr > 0.0) || !isfinite(tr))
        LV_FAIL(LV_ERR_NUMERIC, "lora: tr(H) = %g: H must be PSD with a positive diagonal", tr);
    *lambda = damp * tr / (double)n;
    for (int64_t i = 0; i < n * n; i++) Hd[i] = H[i];
    for (int64_t i = 0; i < n; i++) Hd[i * n + i] += *lambda;
done:
    return st;
}

/* The r largest eigenpairs of the symmetric G (n, n) (destroyed): w[i]
 * descending, eigenvector i in Z[i*n .. i*n+n) with its largest-|.| entry
 * positive (first such entry on ties). */
static lv_status top_eig(double *G, int n, int r, double *w, double *Z)
{
    lv_status st = LV_OK;
    double *work = NULL, *wall = NULL, *zall = NULL, wq = 0.0;
    int *iwork = NULL, *isuppz = NULL, iwq = 0, m = 0, info = 0;
    const int il = n - r + 1, iu = n, lq = -1;
    const double vl = 0.0, vu = 0.0, abstol = 0.0;
    LV_ALLOC(wall, (size_t)n);
    LV_ALLOC(zall, (size_t)n * (size_t)r);
    LV_ALLOC(isuppz, 2 * (size_t)r);
    dsyevr_("V", "I", "L", &n, G, &n, &vl, &vu, &il, &iu, &abstol, &m, wall, zall, &n, isuppz,
            &wq, &lq, &iwq, &lq, &info);
    if (info != 0) LV_FAIL(LV_ERR_NUMERIC, "lora: dsyevr workspace query failed (info %d)", info);
    int lwork = (int)wq + 1, liwork = iwq;
    LV_ALLOC(work, (size_t)lwork);
    LV_ALLOC(iwork, (size_t)liwork);
    dsyevr_("V", "I", "L", &n, G, &n, &vl, &vu, &il, &iu, &abstol, &m, wall, zall, &n, isuppz,
            work, &lwork, iwork, &liwork, &info);
    if (info != 0 || m != r)
        LV_FAIL(LV_ERR_NUMERIC, "lora: eigen-decomposition failed (info %d, %d of %d found)", info,
                m, r);
    /* dsyevr returns them ascending; column j of zall is eigenvector j */
    for (int i = 0; i < r; i++) {
        const double *src = zall + (size_t)(r - 1 - i) * (size_t)n;
        double *dst = Z + (size_t)i * (size_t)n;
        int arg = 0;
        for (int j = 1; j < n; j++)
            if (fabs(src[j]) > fabs(src[arg])) arg = j;
        const double sgn = src[arg] < 0.0 ? -1.0 : 1.0;
        for (int j = 0; j < n; j++) dst[j] = sgn * src[j];
        w[i] = wall[r - 1 - i];
    }
done:
    free(iwork);
    free(work);
    free(isuppz);
    free(zall);
    free(wall);
    return st;
}

/* out (d_out, d_in) = base + sign * B A; each element summed over t in order,
 * in float, independent of the number of threads. */
static void lora_product(const float *A, const float *B, int64_t d_out, int64_t d_in, int64_t r,
                         const float *base, float sign, float *out)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < d_out; i++)
        for (int64_t j = 0; j < d_in; j++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < r; t++) acc += B[i * r + t] * A[t * d_in + j];
            out[i * d_in + j] = base[i * d_in + j] + sign * acc;
        }
}

/* sum over (d_out, d_in) of X .* (X Hd), X double, Hd (d_in, d_in); XH scratch. */
static double h_norm2(const double *X, const double *Hd, int64_t d_out, int64_t d_in, double *XH)
{
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, (int)d_in, 1.0,
                X, (int)d_in, Hd, (int)d_in, 0.0, XH, (int)d_in);
    double s = 0.0;
    for (int64_t i = 0; i < d_out * d_in; i++) s += X[i] * XH[i];
    return s;
}

/* ---------------------------------------------------------------- LoRA fit */

/* d_out <= d_in: G = E Hd E^T (d_out, d_out) = F F^T, F = E L. With F's left
 * singular vectors U: B = U S^1/2, A = S^-1/2 U^T E (= S^1/2 V^T L^-1), so no
 * factor of Hd is needed. Ed (d_out, d_in); T scratch (d_out, d_in). */
static lv_status fit_out_side(const double *Ed, const double *Hd, int64_t d_out, int64_t d_in,
                              int r, double *T, float *A, float *B)
{
    lv_status st = LV_OK;
    double *G = NULL, *U = NULL, *w = NULL, *P = NULL;
    const int n = (int)d_out, k = (int)d_in;
    LV_ALLOC(G, (size_t)n * (size_t)n);
    LV_ALLOC(U, (size_t)r * (size_t)n);
    LV_ALLOC(w, (size_t)r);
    LV_ALLOC(P, (size_t)r * (size_t)k);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, k, k, 1.0, Ed, k, Hd, k, 0.0, T, k);
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, n, k, 1.0, T, k, Ed, k, 0.0, G, n);
    for (int i = 0; i < n; i++) /* exact symmetry for LAPACK */
        for (int j = 0; j < i; j++) G[(size_t)j * n + i] = G[(size_t)i * n + j];
    LV_TRY(top_eig(G, n, r, w, U));
    /* P (r, d_in) = U^T E, U stored as rows */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r, k, n, 1.0, U, n, Ed, k, 0.0, P, k);
    for (int i = 0; i < r; i++) {
        const int keep = w[i] > LORA_EIG_FLOOR * w[0] && w[0] > 0.0;
        const double s4 = keep ? sqrt(sqrt(w[i])) : 0.0; /* sigma^1/2 */
        for (int j = 0; j < n; j++) B[(size_t)j * r + i] = (float)(U[(size_t)i * n + j] * s4);
        for (int j = 0; j < k; j++)
            A[(size_t)i * k + j] = keep ? (float)(P[(size_t)i * k + j] / s4) : 0.0f;
    }
done:
    free(P);
    free(w);
    free(U);
    free(G);
    return st;
}

/* d_out > d_in: Hd = L L^T (Cholesky; damping raised tenfold while it fails),
 * F = E L (d_out, d_in), G = F^T F (d_in, d_in) with eigenvectors V:
 * B = F V S^-1/2 (= U S^1/2), A = S^1/2 V^T L^-1. Ed (d_out, d_in); F scratch
 * (d_out, d_in); Hd is left as the damped Hessian actually used. */
static lv_status fit_in_side(const double *Ed, const float *H, double *Hd, double *lambda,
                             int64_t d_out, int64_t d_in, int r, double *F, float *A, float *B)
{
    lv_status st = LV_OK;
    double *L = NULL, *G = NULL, *V = NULL, *w = NULL, *FV = NULL;
    const int n = (int)d_in, m = (int)d_out;
    int info = 1;
    LV_ALLOC(L, (size_t)n * (size_t)n);
    LV_ALLOC(G, (size_t)n * (size_t)n);
    LV_ALLOC(V, (size_t)r * (size_t)n);
    LV_ALLOC(w, (size_t)r);
    LV_ALLOC(FV, (size_t)m * (size_t)r);
    for (double damp = STAGE_LORA_DAMP; info != 0; damp *= 10.0) {
        if (damp > LORA_DAMP_MAX * 1.0001)
            LV_FAIL(LV_ERR_NUMERIC, "lora: H + %g mean(diag H) I is not positive definite "
                    "(H not PSD?)", LORA_DAMP_MAX);
        LV_TRY(damped_hessian(H, d_in, damp, Hd, lambda));
        memcpy(L, Hd, sizeof(double) * (size_t)n * (size_t)n);
        /* column-major upper U with Hd = U^T U is row-major lower L = U^T */
        dpotrf_("U", &n, L, &n, &info);
        if (info < 0) LV_FAIL(LV_ERR_NUMERIC, "lora: dpotrf argument %d invalid", -info);
    }
    memcpy(F, Ed, sizeof(double) * (size_t)m * (size_t)n);
    cblas_dtrmm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, m, n, 1.0, L,
                n, F, n);
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, n, n, m, 1.0, F, n, F, n, 0.0, G, n);
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++) G[(size_t)j * n + i] = G[(size_t)i * n + j];
    LV_TRY(top_eig(G, n, r, w, V));
    /* FV (d_out, r) = F V; then V's rows <- V^T L^-1 (solve X L = V) */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, r, n, 1.0, F, n, V, n, 0.0, FV, r);
    cblas_dtrsm(CblasRowMajor, CblasRight, CblasLower, CblasNoTrans, CblasNonUnit, r, n, 1.0, L,
                n, V, n);
    for (int i = 0; i < r; i++) {
        const int keep = w[i] > LORA_EIG_FLOOR * w[0] && w[0] > 0.0;
        const double s4 = keep ? sqrt(sqrt(w[i])) : 0.0;
        for (int j = 0; j < m; j++)
            B[(size_t)j * r + i] = keep ? (float)(FV[(size_t)j * r + i] / s4) : 0.0f;
        for (int j = 0; j < n; j++) A[(size_t)i * n + j] = (float)(V[(size_t)i * n + j] * s4);
    }
done:
    free(FV);
    free(w);
    free(V);
    free(G);
    free(L);
    return st;
}

lv_status stage_lora_fit(const float *E, const float *H, int64_t d_out, int64_t d_in, int r,
                         float *A, float *B, double *rel)
{
    lv_status st = LV_OK;
    double *Ed = NULL, *T = NULL, *Hd = NULL, lambda = 0.0;
    if (!E || !H || !A || !B || d_out <= 0 || d_in <= 0 || d_out > INT32_MAX / 2 ||
        d_in > INT32_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "lora: bad arguments (%lld x %lld)", (long long)d_out,
                (long long)d_in);
    if (r < 1 || r > d_out || r > d_in)
        LV_FAIL(LV_ERR_INVALID_ARG, "lora: rank %d outside [1, min(%lld, %lld)]", r,
                (long long)d_out, (long long)d_in);
    const int64_t n = d_out * d_in;
    LV_ALLOC(Ed, (size_t)n);
    LV_ALLOC(T, (size_t)n);
    LV_ALLOC(Hd, (size_t)(d_in * d_in));
    for (int64_t i = 0; i < n; i++) Ed[i] = E[i];
    if (d_out <= d_in) {
        LV_TRY(damped_hessian(H, d_in, STAGE_LORA_DAMP, Hd, &lambda));
        LV_TRY(fit_out_side(Ed, Hd, d_out, d_in, r, T, A, B));
    } else {
        LV_TRY(fit_in_side(Ed, H, Hd, &lambda, d_out, d_in, r, T, A, B));
    }
    if (rel) {
        /* tr(X H X^T) = tr(X Hd X^T) - lambda ||X||_F^2 with the undamped H */
        double ref = h_norm2(Ed, Hd, d_out, d_in, T), fro = 0.0;
        for (int64_t i = 0; i < n; i++) fro += Ed[i] * Ed[i];
        ref -= lambda * fro;
        for (int64_t i = 0; i < d_out; i++)
            for (int64_t j = 0; j < d_in; j++) {
                double acc = 0.0;
                for (int t = 0; t < r; t++) acc += (double)B[i * r + t] * A[t * d_in + j];
                Ed[i * d_in + j] -= acc;
            }
        double err = h_norm2(Ed, Hd, d_out, d_in, T);
        fro = 0.0;
        for (int64_t i = 0; i < n; i++) fro += Ed[i] * Ed[i];
        err -= lambda * fro;
        *rel = ref > 0.0 ? (err > 0.0 ? err : 0.0) / ref : 0.0;
    }
done:
    free(Hd);
    free(T);
    free(Ed);
    return st;
}

/* ---------------------------------------------------------------- ApiQ alternation */

lv_status stage_apiq_layer(const float *W, const float *H, int64_t d_out, int64_t d_in, int r,
                           int iters, const stage_aqlm_config *acfg, lv_aq_layer *q, float *A,
                           float *B, stage_apiq_stats *stats)
{
    lv_status st = LV_OK;
    float *target = NULL, *What = NULL, *E = NULL, *Ac = NULL, *Bc = NULL;
    lv_aq_layer cur;
    stage_apiq_stats s;
    const double t_all = lv_now();
    memset(&cur, 0, sizeof cur);
    memset(&s, 0, sizeof s);
    if (!W || !H || !acfg || !q || !A || !B || d_out <= 0 || d_in <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "apiq: NULL argument or empty layer");
    if (iters < 1 || iters > STAGE_APIQ_MAX_ITERS)
        LV_FAIL(LV_ERR_INVALID_ARG, "apiq: iters %d outside [1, %d]", iters, STAGE_APIQ_MAX_ITERS);
    if (r < 1 || r > d_out || r > d_in)
        LV_FAIL(LV_ERR_INVALID_ARG, "apiq: rank %d outside [1, min(%lld, %lld)]", r,
                (long long)d_out, (long long)d_in);
    const int64_t n = d_out * d_in;
    LV_ALLOC(target, (size_t)n);
    LV_ALLOC(What, (size_t)n);
    LV_ALLOC(E, (size_t)n);
    LV_ALLOC(Ac, (size_t)r * (size_t)d_in);
    LV_ALLOC(Bc, (size_t)d_out * (size_t)r);
    memcpy(target, W, sizeof(float) * (size_t)n); /* B A = 0 */
    for (int t = 0; t < iters; t++) {
        double t0 = lv_now();
        LV_TRY(stage_aqlm_run(target, H, d_out, d_in, acfg, &cur, NULL));
        LV_TRY(stage_aqlm_dequant(&cur, What));
        s.aqlm_s += lv_now() - t0;
        for (int64_t i = 0; i < n; i++) E[i] = W[i] - What[i];
        t0 = lv_now();
        LV_TRY(stage_lora_fit(E, H, d_out, d_in, r, Ac, Bc, NULL));
        s.lora_s += lv_now() - t0;
        LV_TRY(stage_aqlm_layer_error(W, What, H, d_out, d_in, &s.rel_err_q[t]));
        lora_product(Ac, Bc, d_out, d_in, r, What, 1.0f, E); /* E <- What + B A */
        LV_TRY(stage_aqlm_layer_error(W, E, H, d_out, d_in, &s.rel_err_qlora[t]));
        s.iters = t + 1;
        if (t == 0 || s.rel_err_qlora[t] < s.rel_err_best) {
            lv_aq_layer_free(q);
            *q = cur;
            memset(&cur, 0, sizeof cur);
            memcpy(A, Ac, sizeof(float) * (size_t)r * (size_t)d_in);
            memcpy(B, Bc, sizeof(float) * (size_t)d_out * (size_t)r);
            s.best_iter = t;
            s.rel_err_best = s.rel_err_qlora[t];
        } else {
            lv_aq_layer_free(&cur);
        }
        if (t + 1 < iters) lora_product(Ac, Bc, d_out, d_in, r, W, -1.0f, target);
    }
    s.rel_err_aqlm = s.rel_err_q[0];
done:
    s.wall_s = lv_now() - t_all;
    if (stats) *stats = s;
    lv_aq_layer_free(&cur);
    free(Bc);
    free(Ac);
    free(E);
    free(What);
    free(target);
    return st;
}
