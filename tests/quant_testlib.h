/* quant_testlib.h: seeded layer-wise quantization problems shared by
 * test_kern_quant.c, test_stage_vq.c, test_stage_aqlm.c and bench/quant_layer.c. */
#ifndef QUANT_TESTLIB_H
#define QUANT_TESTLIB_H

#include <math.h>
#include <stdlib.h>

#include "kern.h"
#include "lv.h"

/* X (n, d) with correlated neighbouring columns (AR(1), rho 0.8) and column
 * scales spread over 10x, so H = X^T X is far from diagonal and diag(H) varies.
 * Caller frees. */
static inline float *qt_make_x(lv_rng *rng, int64_t n, int d)
{
    float *x = malloc((size_t)(n * d) * sizeof(float));
    if (!x) return NULL;
    for (int64_t t = 0; t < n; t++) {
        float prev = 0.0f;
        for (int j = 0; j < d; j++) {
            float v = 0.8f * prev + 0.6f * lv_rng_normal(rng);
            prev = v;
            x[t * d + j] = v * (0.3f + 2.7f * (float)((j * 7) % d) / (float)d);
        }
    }
    return x;
}

/* H (d, d) float = X^T X / n via kern_hessian_accum_ref (double accumulation). */
static inline float *qt_make_h(lv_rng *rng, int64_t n, int d)
{
    float *x = qt_make_x(rng, n, d);
    double *hd = calloc((size_t)d * d, sizeof(double));
    float *h = malloc((size_t)d * d * sizeof(float));
    if (!x || !hd || !h) {
        free(x);
        free(hd);
        free(h);
        return NULL;
    }
    kern_hessian_accum_ref(hd, x, n, d);
    for (int64_t t = 0; t < (int64_t)d * d; t++) h[t] = (float)(hd[t] / (double)n);
    free(hd);
    free(x);
    return h;
}

/* W (d_out, d_in) ~ N(0, 1) with a few heavier rows. Caller frees. */
static inline float *qt_make_w(lv_rng *rng, int64_t d_out, int64_t d_in)
{
    float *w = malloc((size_t)(d_out * d_in) * sizeof(float));
    if (!w) return NULL;
    for (int64_t r = 0; r < d_out; r++) {
        float rs = (r % 7 == 3) ? 3.0f : 1.0f;
        for (int64_t j = 0; j < d_in; j++) w[r * d_in + j] = rs * lv_rng_normal(rng);
    }
    return w;
}

/* Row objective (w - q) H (w - q)^T in double, naive. */
static inline double qt_row_obj(const float *w, const float *q, const float *H, int64_t d)
{
    double acc = 0.0;
    for (int64_t a = 0; a < d; a++)
        for (int64_t b = 0; b < d; b++)
            acc += ((double)w[a] - q[a]) * (double)H[a * d + b] * ((double)w[b] - q[b]);
    return acc;
}

#endif
