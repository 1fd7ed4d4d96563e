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
#include "stage_impl.h"

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

/* Points on the corners of the unit cube, some moved by a few 2^-20 (far below
 * the float32 prefilter's error bound on their distances), weights powers of
 * two: many exactly equal and nearly equal distances. */
static void fill_near_ties(lv_rng *rng, float *x, float *w, int64_t n, int g)
{
    for (int64_t i = 0; i < n; i++)
        for (int a = 0; a < g; a++) {
            float v = (float)(lv_rng_u64(rng) & 1);
            if (lv_rng_uniform(rng) < 0.3f) v += 0x1p-20f * (float)((int)(lv_rng_u64(rng) % 5) - 2);
            x[i * g + a] = v;
            w[i * g + a] = (float)(1 << (lv_rng_u64(rng) % 4)) * 0.5f;
        }
}

/* k-means++ written out plainly (wdist per point, no prefilter): the seeding
 * stage_vq_kmeans must reproduce bit for bit (n > k). */
static void kmeanspp_ref(const float *x, const float *w, int64_t n, int g, int k, uint64_t seed,
                         float *c)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    double *mind = malloc((size_t)n * sizeof(double));
    assert_non_null(mind);
    int64_t pick = (int64_t)((double)(lv_rng_u64(&rng) >> 11) / 9007199254740992.0 * (double)n);
    for (int j = 0; j < k; j++) {
        memcpy(c + (int64_t)j * g, x + pick * g, (size_t)g * sizeof(float));
        double total = 0.0;
        for (int64_t i = 0; i < n; i++) {
            double d = 0.0;
            for (int a = 0; a < g; a++) {
                double diff = (double)x[i * g + a] - (double)c[(int64_t)j * g + a];
                d += (w ? (double)w[i * g + a] : 1.0) * diff * diff;
            }
            if (j == 0 || d < mind[i]) mind[i] = d;
            total += mind[i];
        }
        const double u = (double)(lv_rng_u64(&rng) >> 11) / 9007199254740992.0;
        if (j + 1 == k) break;
        if (total > 0.0) {
            double target = u * total, acc = 0.0;
            pick = n - 1;
            for (int64_t i = 0; i < n; i++) {
                acc += mind[i];
                if (acc > target && mind[i] > 0.0) {
                    pick = i;
                    break;
                }
            }
        } else {
            pick = (int64_t)(u * (double)n);
        }
    }
    free(mind);
}

/* stage_vq_kmeans skips most of Lloyd's distance computations (Hamerly bounds,
 * centroids transposed and vectorised, float32 prefilters of the scans and of
 * the k-means++ updates): its seeding must be kmeanspp_ref's, and its
 * objective history, centroids and final assignment those of plain Lloyd
 * steps with the reference assignment (kern_kmeans_assign_ref), bit for bit.
 * data 0: blobs; 1: near ties (fill_near_ties); 2: blobs with weights up to
 * 2^33, beyond the prefilter's range (the exact scans of every centroid). */
static void test_kmeans_exact_lloyd(void **state)
{
    (void)state;
    const struct { int64_t n; int g, k, weighted, iters, data; } cases[] = {
        {5000, 8, 256, 1, 12, 0}, {4000, 4, 64, 0, 25, 0}, {3001, 1, 16, 1, 30, 0},
        {2500, 3, 37, 1, 20, 0},  {300, 2, 256, 1, 5, 0},  {1200, 8, 7, 0, 40, 0},
        {6000, 8, 256, 1, 10, 1}, {6000, 4, 256, 1, 10, 1}, {3000, 8, 256, 0, 8, 1},
        {2000, 5, 40, 1, 10, 1},  {4000, 8, 64, 1, 15, 2},
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
        if (cases[t].data == 1) {
            fill_near_ties(&rng, x, w, n, g);
        } else {
            fill_points(&rng, x, w, n, g);
            if (cases[t].data == 2)
                for (int64_t q = 0; q < n * g; q++) w[q] *= 0x1p32f;
        }
        const float *wp = cases[t].weighted ? w : NULL;
        stage_vq_kmeans_config kc = {.k = k, .max_iters = iters, .tol = 0.0, .seed = 7 + t};
        int nh = 0;
        assert_int_equal(stage_vq_kmeans(x, wp, n, g, &kc, c, idx, hist, &nh), LV_OK);
        /* the reference: the same seeding, written out plainly, then plain Lloyd */
        kc.max_iters = 0;
        assert_int_equal(stage_vq_kmeans(x, wp, n, g, &kc, cr, idr, NULL, NULL), LV_OK);
        float *cs = malloc((size_t)k * g * sizeof(float));
        assert_non_null(cs);
        kmeanspp_ref(x, wp, n, g, k, kc.seed, cs);
        assert_memory_equal(cr, cs, sizeof(float) * (size_t)k * g);
        free(cs);
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
        printf("kmeans n %lld g %d k %d weighted %d data %d: seeding and %d iterations "
               "identical to plain Lloyd (objective %.6g -> %.6g)\n", (long long)n, g, k,
               cases[t].weighted, cases[t].data, iters, hist[0], hist[nh - 1]);
        free(den); free(num); free(dist); free(idr); free(idx); free(cr); free(c); free(w); free(x);
    }
}

/* Centroids at +-R e_a (a < g), each repeated with moves of a few units in
 * the 22nd bit or none (exact duplicates); points near the origin with
 * noise ~2^-24 and one weight per point (all coordinates alike) or none: a
 * point's distances to most centroids agree to ~2^-21, within the float32
 * prefilter's error bound, with exact ties among duplicates. Some points sit
 * on a centroid (distance 0). */
static void make_near_ties(lv_rng *rng, float *x, float *w, int64_t n, int g, float *c, int k)
{
    for (int j = 0; j < k; j++) {
        const int dir = j % (2 * g);
        for (int a = 0; a < g; a++) c[j * g + a] = 0.0f;
        c[j * g + dir / 2] = dir % 2 ? -1.5f : 1.5f;
        if (j >= 2 * g && lv_rng_uniform(rng) < 0.7f)
            c[j * g + lv_rng_u64(rng) % g] += 0x1p-22f * (float)((int)(lv_rng_u64(rng) % 7) - 3);
    }
    for (int64_t i = 0; i < n; i++) {
        const float wi = 0.5f + lv_rng_uniform(rng);
        const int on = i % 17 == 0;
        for (int a = 0; a < g; a++) {
            x[i * g + a] = on ? c[(i % k) * g + a] : 0x1p-24f * lv_rng_normal(rng);
            w[i * g + a] = wi;
        }
    }
}

/* The scan with the float32 prefilter picks what the plain scan picks (ties
 * to the lowest index) and finds the same second distance, on near ties. */
static void test_kmeans_scan_near_ties(void **state)
{
    (void)state;
    const struct { int64_t n; int g, k, weighted; } cases[] = {
        {3000, 8, 256, 1}, {3000, 8, 256, 0}, {3000, 4, 256, 1}, {2000, 3, 37, 1}, {500, 8, 7, 1},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        const int64_t n = cases[t].n;
        const int g = cases[t].g, k = cases[t].k;
        lv_rng rng;
        lv_rng_seed(&rng, 300 + t);
        float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
        float *c = malloc((size_t)k * g * sizeof(float));
        int32_t *idx = malloc(n * sizeof(int32_t));
        double *dist = malloc(n * sizeof(double)), *second = malloc(n * sizeof(double));
        assert_true(x && w && c && idx && dist && second);
        make_near_ties(&rng, x, w, n, g, c, k);
        const float *wp = cases[t].weighted ? w : NULL;
        assert_int_equal(stage_vq_kmeans_scan(x, wp, n, g, c, k, idx, dist, second), LV_OK);
        int64_t close = 0;
        for (int64_t i = 0; i < n; i++) {
            double b = 1e300, s2 = 1e300;
            int32_t arg = 0;
            for (int j = 0; j < k; j++) {
                double d = 0.0;
                for (int a = 0; a < g; a++) {
                    double diff = (double)x[i * g + a] - (double)c[j * g + a];
                    d += (wp ? (double)wp[i * g + a] : 1.0) * diff * diff;
                }
                if (d < b) {
                    s2 = b;
                    b = d;
                    arg = j;
                } else if (d < s2) {
                    s2 = d;
                }
            }
            assert_int_equal(idx[i], arg);
            assert_memory_equal(&dist[i], &b, sizeof b);
            assert_memory_equal(&second[i], &s2, sizeof s2);
            close += s2 - b <= 1e-5 * b;
        }
        printf("kmeans scan n %lld g %d k %d weighted %d: identical to the plain scan "
               "(%lld points with the second within 1e-5 of the best)\n", (long long)n, g, k,
               cases[t].weighted, (long long)close);
        free(second); free(dist); free(idx); free(c); free(w); free(x);
    }
}

/* k-means++'s update of the distance to the nearest centroid, prefiltered,
 * is the plain one on near ties. */
static void test_kmeans_min_update_near_ties(void **state)
{
    (void)state;
    const struct { int64_t n; int g, k, weighted; } cases[] = {
        {3001, 8, 256, 1}, {3001, 8, 64, 0}, {3001, 4, 256, 1}, {2003, 3, 37, 1},
    };
    for (size_t t = 0; t < sizeof cases / sizeof cases[0]; t++) {
        const int64_t n = cases[t].n;
        const int g = cases[t].g, k = cases[t].k;
        lv_rng rng;
        lv_rng_seed(&rng, 400 + t);
        float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
        float *c = malloc((size_t)k * g * sizeof(float));
        double *mind = malloc(n * sizeof(double)), *mref = malloc(n * sizeof(double));
        assert_true(x && w && c && mind && mref);
        make_near_ties(&rng, x, w, n, g, c, k);
        const float *wp = cases[t].weighted ? w : NULL;
        int64_t updates = 0;
        for (int64_t i = 0; i < n; i++) mind[i] = mref[i] = i % 3 ? 1e300 : 0.0;
        for (int j = 0; j < k; j++)
            for (int64_t i = 0; i < n; i++) {
                double d = 0.0;
                for (int a = 0; a < g; a++) {
                    double diff = (double)x[i * g + a] - (double)c[j * g + a];
                    d += (wp ? (double)wp[i * g + a] : 1.0) * diff * diff;
                }
                if (d < mref[i]) mref[i] = d, updates++;
            }
        assert_int_equal(stage_vq_kmeans_min_update(x, wp, n, g, c, k, mind), LV_OK);
        assert_memory_equal(mind, mref, sizeof(double) * (size_t)n);
        printf("kmeans++ update n %lld g %d k %d weighted %d: identical to the plain update "
               "(%lld updates)\n", (long long)n, g, k, cases[t].weighted, (long long)updates);
        free(mref); free(mind); free(c); free(w); free(x);
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
        cmocka_unit_test(test_kmeans_scan_near_ties),
        cmocka_unit_test(test_kmeans_min_update_near_ties),
        cmocka_unit_test(test_kmeans_seeding_deterministic),
        cmocka_unit_test(test_vq_layer),
        cmocka_unit_test(test_vq_padding),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
