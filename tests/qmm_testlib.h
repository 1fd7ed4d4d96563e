/* qmm_testlib.h: seeded quantized layers and the tolerance check shared by
 * test_kern_qmm.c (CPU fast path vs reference) and test_kern_qmm_cuda.c (CUDA vs CPU). */
#ifndef QMM_TESTLIB_H
#define QMM_TESTLIB_H

#include <math.h>
#include <stdio.h>

#include "kern_check.h"
#include "lv_quant.h"

/* The algorithms sum in other orders than sgemm: they agree to fp32 rounding of the sum.
 * Each output is judged against the size of what it sums, S = sum_j |x_j * What_rj|
 * (double): |got - ref| <= TOL_QMM_REL * S (fp32 epsilon 6e-8 times a few hundred terms,
 * worst case). */
#define TOL_QMM_REL 1e-5

/* A layer with random codebooks (N(0, 0.3)), scales N(1, 0.2) and codes uniform in
 * [0, 2^nbits), with code 2^nbits - 1 at every 3rd position so every row has it. */
static inline lv_status qm_make_layer(lv_aq_layer *L, lv_rng *r, int64_t d_out, int64_t d_in,
                                      int M, int nbits, int g)
{
    lv_status st = lv_aq_layer_init(L, d_out, d_in, M, nbits, g);
    if (st != LV_OK) return st;
    const int64_t K = (int64_t)1 << nbits, n_codes = d_out * L->n_groups * M;
    for (int64_t t = 0; t < n_codes; t++)
        L->codes[t] = (uint16_t)(t % 3 == 1 ? K - 1 : (int64_t)(lv_rng_u64(r) % (uint64_t)K));
    kc_fill(r, L->codebooks, M * K * g, 0.3f, 0.0f);
    kc_fill(r, L->scales, d_out, 0.2f, 1.0f);
    return LV_OK;
}

/* got vs ref (n, d_out) with S from the dequantized w (d_out, d_in) and x (n, d_in):
 * returns the max |got - ref| / S; failures (> TOL_QMM_REL, NaN) are counted in *bad and
 * the first few printed. */
static inline double qm_max_rel_diff(const float *got, const double *ref, const float *x,
                                     const float *w, int64_t n, int64_t d_out, int64_t d_in,
                                     int64_t *bad)
{
    double worst = 0.0;
    for (int64_t b = 0; b < n; b++)
        for (int64_t r = 0; r < d_out; r++) {
            double s = 0.0;
            for (int64_t j = 0; j < d_in; j++) s += fabs((double)x[b * d_in + j] * w[r * d_in + j]);
            double d = fabs((double)got[b * d_out + r] - ref[b * d_out + r]) / (s > 0 ? s : 1e-30);
            if (!(d <= TOL_QMM_REL)) {
                if (*bad < 5)
                    printf("    mismatch at (%lld, %lld): got %.9g want %.9g (S %.3g)\n",
                           (long long)b, (long long)r, (double)got[b * d_out + r],
                           ref[b * d_out + r], s);
                (*bad)++;
            }
            if (d > worst || d != d) worst = d;
        }
    return worst;
}

#endif
