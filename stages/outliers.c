/* outliers.c: outlier columns of a quantized linear (quant.outlier_cols; VPTQ,
 * arXiv 2409.17066, keeps a few input channels at higher precision). After the
 * codes are chosen, n input columns O get a dense 16-bit correction R
 * (d_out, n): W' = What + R P_O^T. With E = W - What the layer objective
 *   f(R) = tr((E - R P_O^T) H (E - R P_O^T)^T)
 * is minimal at R = E H[:, O] H[O, O]^{-1}, where it equals tr(E S E^T) with
 * S = H - H[:, O] H[O, O]^{-1} H[O, :], the Schur complement of H[O, O].
 * Columns are chosen greedily: with the current S and G = E S, adding column j
 * lowers f by |G[:, j]|^2 / S[j, j]; S and G take the rank-one update of that
 * choice. Everything in double, serial loops in a fixed order (deterministic
 * for any thread count). Cost: d_out d_in^2 for E H, then n (d_in^2 + d_out d_in). */
#include <cblas.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "stage_impl.h"

extern void dposv_(const char *uplo, const int *n, const int *nrhs, double *a, const int *lda,
                   double *b, const int *ldb, int *info);

static int cmp_i32(const void *a, const void *b)
{
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

lv_status stage_outliers_fit(const float *W, const float *H, int64_t d_out, int64_t d_in,
                             lv_aq_layer *L, int n, int *n_chosen)
{
    lv_status st = LV_OK;
    double *E = NULL, *Hd = NULL, *G = NULL, *S = NULL, *sj = NULL, *A = NULL, *B = NULL;
    double *Bc = NULL;
    float *What = NULL;
    int32_t *O = NULL;
    unsigned char *used = NULL;
    int got = 0;
    if (n_chosen) *n_chosen = 0;
    if (!W || !H || !L || d_out <= 0 || d_in <= 0 || L->d_out != d_out || L->d_in != d_in ||
        n < 0 || n > d_in || d_in > 65536 || d_out > INT32_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "outliers: bad arguments (%lld x %lld layer, n %d)",
                (long long)d_out, (long long)d_in, n);
    LV_TRY(lv_aq_outliers_alloc(L, 0));
    if (n == 0) goto done;
    const int64_t no = d_out * d_in, ni = d_in * d_in;
    LV_ALLOC(What, no);
    LV_ALLOC(E, no);
    LV_ALLOC(Hd, ni);
    LV_ALLOC(G, no);
    LV_ALLOC(S, ni);
    LV_ALLOC(sj, d_in);
    LV_ALLOC(O, n);
    LV_ALLOC(used, d_in);
    LV_TRY(stage_aqlm_dequant(L, What));
    for (int64_t t = 0; t < no; t++) E[t] = (double)W[t] - (double)What[t];
    double dmax = 0.0;
    for (int64_t t = 0; t < ni; t++) Hd[t] = H[t];
    for (int64_t j = 0; j < d_in; j++) dmax = Hd[j * d_in + j] > dmax ? Hd[j * d_in + j] : dmax;
    memcpy(S, Hd, sizeof(double) * (size_t)ni);
    /* G = E H (H symmetric) */
    cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, (int)d_in, 1.0,
                E, (int)d_in, Hd, (int)d_in, 0.0, G, (int)d_in);
    const double dfloor = 1e-12 * dmax;
    for (got = 0; got < n; got++) {
        int64_t best = -1;
        double best_gain = 0.0;
        for (int64_t j = 0; j < d_in; j++) {
            const double sjj = S[j * d_in + j];
            if (used[j] || !(sjj > dfloor)) continue;
            double g2 = 0.0;
            for (int64_t r = 0; r < d_out; r++) g2 += G[r * d_in + j] * G[r * d_in + j];
            const double gain = g2 / sjj;
            if (gain > best_gain) best_gain = gain, best = j;
        }
        if (best < 0) break; /* nothing left that lowers the objective */
        used[best] = 1;
        O[got] = (int32_t)best;
        const double inv = 1.0 / S[best * d_in + best];
        for (int64_t i = 0; i < d_in; i++) sj[i] = S[i * d_in + best];
        for (int64_t r = 0; r < d_out; r++) {
            const double c = G[r * d_in + best] * inv;
            double *gr = G + r * d_in;
            for (int64_t i = 0; i < d_in; i++) gr[i] -= c * sj[i];
        }
        for (int64_t a = 0; a < d_in; a++) {
            const double c = sj[a] * inv;
            double *sa = S + a * d_in;
            for (int64_t i = 0; i < d_in; i++) sa[i] -= c * sj[i];
        }
    }
    if (got == 0) goto done;
    qsort(O, (size_t)got, sizeof *O, cmp_i32);
    /* R^T (got, d_out) = H[O, O]^{-1} (E H[:, O])^T, from G = E H recomputed per column */
    LV_ALLOC(A, (int64_t)got * got);
    LV_ALLOC(B, (int64_t)got * d_out);
    for (int a = 0; a < got; a++)
        for (int b = 0; b < got; b++) A[a * got + b] = Hd[(int64_t)O[a] * d_in + O[b]];
    for (int a = 0; a < got; a++)
        for (int64_t r = 0; r < d_out; r++) {
            const double *er = E + r * d_in, *hc = Hd + (int64_t)O[a] * d_in; /* H row = column */
            double acc = 0.0;
            for (int64_t i = 0; i < d_in; i++) acc += er[i] * hc[i];
            B[(int64_t)a * d_out + r] = acc;
        }
    /* LAPACK is column-major: A is symmetric; Bc holds the d_out right-hand sides as columns */
    LV_ALLOC(Bc, (int64_t)got * d_out);
    for (int a = 0; a < got; a++)
        for (int64_t r = 0; r < d_out; r++) Bc[r * got + a] = B[(int64_t)a * d_out + r];
    int nn = got, nrhs = (int)d_out, info = 0;
    dposv_("L", &nn, &nrhs, A, &nn, Bc, &nn, &info);
    if (info != 0)
        LV_FAIL(LV_ERR_NUMERIC, "outliers: H[O, O] of %d columns is not positive definite "
                "(dposv info %d)", got, info);
    LV_TRY(lv_aq_outliers_alloc(L, got));
    memcpy(L->outl_idx, O, sizeof(int32_t) * (size_t)got);
    for (int64_t r = 0; r < d_out; r++)
        for (int a = 0; a < got; a++) L->outl_w[r * got + a] = (float)Bc[r * got + a];
    for (int64_t t = 0; t < d_out * got; t++)
        if (!isfinite(L->outl_w[t]))
            LV_FAIL(LV_ERR_NUMERIC, "outliers: correction %lld is not finite", (long long)t);
    if (n_chosen) *n_chosen = got;
done:
    if (st != LV_OK && L) lv_aq_outliers_alloc(L, 0);
    free(What);
    free(E);
    free(Hd);
    free(G);
    free(S);
    free(sj);
    free(A);
    free(B);
    free(Bc);
    free(O);
    free(used);
    return st;
}
