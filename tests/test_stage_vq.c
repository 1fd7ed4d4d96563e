/* test_stage_vq.c: Hessian-weighted k-means (k-means++ seeding, Lloyd) and the
 * VQ init of a layer (stages/vq.c). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kern.h"
#include "quant_testlib.h"
#include "stage.h"

static void fill_points(lv_rng *rng, float *x, float *w, int64_t n, int g)
{
    for (int64_t i = 0; i < n; i++)
        for (int a = 0; a < g; a++) {
            /* a few blobs plus noise */
            x[i * g + a] = (float)((i * 7 + a) % 5) + 0.5f * lv_rng_normal(rng);
            if (w) w[i * g + a] = 0.05f + 2.0f * lv_rng_uniform(rng);
        }
}

static void test_kmeans_monotone(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 21);
    const int64_t n = 3000;
    const int g = 4, k = 32, iters = 15;
    float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
    float *c = malloc(k * g * sizeof(float));
    int32_t *idx = malloc(n * sizeof(int32_t));
    double hist[16];
    assert_true(x && w && c && idx);
    fill_points(&rng, x, w, n, g);
    for (int weighted = 0; weighted < 2; weighted++) {
        stage_vq_kmeans_config kc = {.k = k, .max_iters = iters, .tol = 0.0, .seed = 5};
        int nh = 0;
        assert_int_equal(stage_vq_kmeans(x, weighted ? w : NULL, n, g, &kc, c, idx, hist, &nh),
                         LV_OK);
        assert_int_equal(nh, iters + 1);
        for (int t = 1; t < nh; t++) assert_true(hist[t] <= hist[t - 1]);
        assert_true(hist[nh - 1] < 0.9 * hist[0]); /* Lloyd did something */
        printf("kmeans weighted=%d: objective %.4g after seeding -> %.4g\n", weighted, hist[0],
               hist[nh - 1]);
        /* the final assignment is the nearest centroid under the weighted distance */
        for (int64_t i = 0; i < n; i += 97) {
            double dbest = 1e300;
            int arg = -1;
            for (int j = 0; j < k; j++) {
                double dj = 0.0;
                for (int a = 0; a < g; a++) {
                    double df = (double)x[i * g + a] - c[j * g + a];
                    dj += (weighted ? w[i * g + a] : 1.0) * df * df;
                }
                if (dj < dbest) dbest = dj, arg = j;
            }
            assert_int_equal(idx[i], arg);
        }
    }
    free(idx);
    free(c);
    free(w);
    free(x);
}

/* stage_vq_kmeans skips most of Lloyd's distance computations (Hamerly bounds,
 * centroids transposed and vectorised): its objective history, centroids and
 * final assignment must be those of plain Lloyd steps with the reference
 * assignment (kern_kmeans_assign_ref), bit for bit, from the same seeding. */
static void test_kmeans_exact_lloyd(void **state)
{
    (void)state;
    const struct { int64_t n; int g, k, weighted, iters; } cases[] = {
        {5000, 8, 256, 1, 12}, {4000, 4, 64, 0, 25}, {3001, 1, 16, 1, 30},
        {2500, 3, 37, 1, 20},  {300, 2, 256, 1, 5},  {1200, 8, 7, 0, 40},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        const int64_t n = cases[t].n;
        const int g = cases[t].g, k = cases[t].k, iters = cases[t].iters;
        lv_rng rng;
        lv_rng_seed(&rng, 100 + t);
        float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
        float *c = malloc((size_t)k * g * sizeof(float)), *cr = malloc((size_t)k * g * sizeof(float));
        int32_t *idx = malloc(n * sizeof(int32_t)), *idr = malloc(n * sizeof(int32_t));
        double *dist = malloc(n * sizeof(double)), *num = malloc((size_t)k * g * sizeof(double));
        double *den = malloc((size_t)k * g * sizeof(double)), hist[64], href[64];
        assert_true(x && w && c && cr && idx && idr && dist && num && den);
        fill_points(&rng, x, w, n, g);
        const float *wp = cases[t].weighted ? w : NULL;
        stage_vq_kmeans_config kc = {.k = k, .max_iters = iters, .tol = 0.0, .seed = 7 + t};
        int nh = 0;
        assert_int_equal(stage_vq_kmeans(x, wp, n, g, &kc, c, idx, hist, &nh), LV_OK);
        /* the reference: the same seeding (0 iterations), then plain Lloyd */
        kc.max_iters = 0;
        assert_int_equal(stage_vq_kmeans(x, wp, n, g, &kc, cr, idr, NULL, NULL), LV_OK);
        int nr = 0;
        for (int it = 0;; it++) {
            kern_kmeans_assign_ref(idr, dist, x, wp, n, g, cr, k);
            double obj = 0.0;
            for (int64_t i = 0; i < n; i++) obj += dist[i];
            href[nr++] = obj;
            if (it == iters) break;
            memset(num, 0, (size_t)k * g * sizeof(double));
            memset(den, 0, (size_t)k * g * sizeof(double));
            for (int64_t i = 0; i < n; i++)
                for (int a = 0; a < g; a++) {
                    double wa = wp ? (double)wp[i * g + a] : 1.0;
                    num[(int64_t)idr[i] * g + a] += wa * (double)x[i * g + a];
                    den[(int64_t)idr[i] * g + a] += wa;
                }
            for (int64_t q = 0; q < (int64_t)k * g; q++)
                if (den[q] > 0.0) cr[q] = (float)(num[q] / den[q]);
        }
        assert_int_equal(nh, nr);
        assert_memory_equal(hist, href, sizeof(double) * (size_t)nh);
        assert_memory_equal(c, cr, sizeof(float) * (size_t)k * g);
        assert_memory_equal(idx, idr, sizeof(int32_t) * (size_t)n);
        printf("kmeans n %lld g %d k %d weighted %d: %d iterations identical to plain Lloyd "
               "(objective %.6g -> %.6g)\n", (long long)n, g, k, cases[t].weighted, iters,
               hist[0], hist[nh - 1]);
        free(den); free(num); free(dist); free(idr); free(idx); free(cr); free(c); free(w); free(x);
    }
}

static void test_kmeans_seeding_deterministic(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 22);
    const int64_t n = 1000;
    const int g = 3, k = 24;
    float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
    float *c1 = malloc(k * g * sizeof(float)), *c2 = malloc(64 * g * sizeof(float));
    int32_t *idx = malloc(n * sizeof(int32_t));
    assert_true(x && w && c1 && c2 && idx);
    fill_points(&rng, x, w, n, g);
    stage_vq_kmeans_config kc = {.k = k, .max_iters = 0, .seed = 99};
    assert_int_equal(stage_vq_kmeans(x, w, n, g, &kc, c1, idx, NULL, NULL), LV_OK);
    assert_int_equal(stage_vq_kmeans(x, w, n, g, &kc, c2, idx, NULL, NULL), LV_OK);
    assert_memory_equal(c1, c2, k * g * sizeof(float));
    /* seeds are data points */
    for (int j = 0; j < k; j++) {
        int found = 0;
        for (int64_t i = 0; i < n && !found; i++)
            found = !memcmp(c1 + j * g, x + i * g, g * sizeof(float));
        assert_true(found);
    }
    kc.seed = 100;
    assert_int_equal(stage_vq_kmeans(x, w, n, g, &kc, c2, idx, NULL, NULL), LV_OK);
    assert_memory_not_equal(c1, c2, k * g * sizeof(float));
    /* fewer points than clusters: every point is a centroid, zero objective */
    double hist[3];
    int nh = 0;
    kc = (stage_vq_kmeans_config){.k = 64, .max_iters = 2, .seed = 1};
    assert_int_equal(stage_vq_kmeans(x, w, 40, g, &kc, c2, idx, hist, &nh), LV_OK);
    assert_true(hist[nh - 1] == 0.0);
    free(idx);
    free(c2);
    free(c1);
    free(w);
    free(x);
}

static double vq_rel_err(const float *W, const float *H, int64_t d_out, int64_t d_in,
                         const stage_vq_config *cfg)
{
    stage_aqlm_layer L = {0};
    float *What = malloc((size_t)(d_out * d_in) * sizeof(float));
    double rel = -1.0;
    assert_non_null(What);
    assert_int_equal(stage_vq_run(W, H, d_out, d_in, cfg, &L), LV_OK);
    assert_int_equal(stage_aqlm_dequant(&L, What), LV_OK);
    assert_int_equal(stage_aqlm_layer_error(W, What, H, d_out, d_in, &rel), LV_OK);
    lv_aq_layer_free(&L);
    free(What);
    return rel;
}

static void test_vq_layer(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 23);
    const int64_t d_out = 64, d_in = 64;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 512, (int)d_in);
    assert_true(W && H);
    stage_vq_config c1 = {.n_codebooks = 1, .nbits = 6, .group_size = 4, .use_hessian = 1,
                          .seed = 1};
    stage_vq_config c1u = c1, c2 = c1;
    c1u.use_hessian = 0;
    c2.n_codebooks = 2;
    double e1 = vq_rel_err(W, H, d_out, d_in, &c1);
    double e1u = vq_rel_err(W, H, d_out, d_in, &c1u);
    double e2 = vq_rel_err(W, H, d_out, d_in, &c2);
    printf("vq 64x64: 1x6g4 rel err %.4f (unweighted %.4f), residual 2x6g4 %.4f\n", e1, e1u, e2);
    assert_true(e1 > 0.0 && e1 < 0.5);
    assert_true(e2 < 0.8 * e1);       /* the residual codebook helps */
    assert_true(e1 <= e1u * 1.02);    /* importance weighting does not hurt the H objective */
    /* same seed -> same result */
    assert_true(vq_rel_err(W, H, d_out, d_in, &c1) == e1);
    free(H);
    free(W);
}

/* d_in = 20 with g = 8: padded to 24; padded columns have zero weight. */
static void test_vq_padding(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 24);
    const int64_t d_out = 48, d_in = 20;
    float *W = qt_make_w(&rng, d_out, d_in), *H = qt_make_h(&rng, 256, (int)d_in);
    assert_true(W && H);
    stage_vq_config c = {.n_codebooks = 1, .nbits = 5, .group_size = 8, .use_hessian = 1,
                         .seed = 3};
    stage_aqlm_layer L = {0};
    assert_int_equal(stage_vq_run(W, H, d_out, d_in, &c, &L), LV_OK);
    assert_int_equal(L.n_groups, 3);
    double rel = vq_rel_err(W, H, d_out, d_in, &c);
    assert_true(rel > 0.0 && rel < 1.0);
    lv_aq_layer_free(&L);
    lv_aq_layer_free(&L); /* second free is a no-op */
    /* bad arguments are rejected, not crashed on */
    c.group_size = 0;
    assert_int_equal(stage_vq_run(W, H, d_out, d_in, &c, &L), LV_ERR_INVALID_ARG);
    lv_aq_layer_free(&L);
    free(H);
    free(W);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kmeans_monotone),
        cmocka_unit_test(test_kmeans_exact_lloyd),
        cmocka_unit_test(test_kmeans_seeding_deterministic),
        cmocka_unit_test(test_vq_layer),
        cmocka_unit_test(test_vq_padding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
