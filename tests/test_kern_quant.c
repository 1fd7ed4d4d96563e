/* test_kern_quant.c: the quantization hot loops of kernels/cpu/quant_ref.c
 * against naive re-implementations. */
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

static void test_hessian_accum(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 11);
    const int64_t n = 53;
    const int d = 17;
    float *x = qt_make_x(&rng, n, d);
    double *h = calloc((size_t)d * d, sizeof(double));
    double *h2 = calloc((size_t)d * d, sizeof(double));
    assert_non_null(x);
    assert_non_null(h);
    assert_non_null(h2);
    kern_hessian_accum_ref(h, x, n, d);
    /* accumulation over two batches equals one pass */
    kern_hessian_accum_ref(h2, x, 20, d);
    kern_hessian_accum_ref(h2, x + 20 * d, n - 20, d);
    double maxdiff = 0.0;
    for (int a = 0; a < d; a++)
        for (int b = 0; b < d; b++) {
            double ref = 0.0;
            for (int64_t t = 0; t < n; t++) ref += (double)x[t * d + a] * (double)x[t * d + b];
            double diff = fabs(h[a * d + b] - ref);
            if (diff > maxdiff) maxdiff = diff;
            assert_true(diff <= 1e-12 * (1.0 + fabs(ref)));
            assert_true(fabs(h2[a * d + b] - ref) <= 1e-12 * (1.0 + fabs(ref)));
            assert_true(h[a * d + b] == h[b * d + a]);
        }
    printf("hessian_accum: max |diff| vs naive = %.3g\n", maxdiff);
    /* thread count does not change a bit */
    double *h3 = calloc((size_t)d * d, sizeof(double));
    assert_non_null(h3);
    int saved = omp_get_max_threads();
    omp_set_num_threads(2);
    kern_hessian_accum_ref(h3, x, n, d);
    omp_set_num_threads(saved);
    assert_memory_equal(h, h3, (size_t)d * d * sizeof(double));
    free(h3);
    free(h2);
    free(h);
    free(x);
}

static void test_kmeans_assign(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 12);
    const int64_t n = 300;
    const int g = 3, k = 17;
    float *x = malloc(n * g * sizeof(float)), *w = malloc(n * g * sizeof(float));
    float *c = malloc(k * g * sizeof(float));
    int32_t *idx = malloc(n * sizeof(int32_t));
    double *dist = malloc(n * sizeof(double));
    assert_true(x && w && c && idx && dist);
    for (int64_t t = 0; t < n * g; t++) {
        x[t] = lv_rng_normal(&rng);
        w[t] = 0.1f + lv_rng_uniform(&rng);
    }
    for (int t = 0; t < k * g; t++) c[t] = lv_rng_normal(&rng);
    memcpy(c + 5 * g, c + 2 * g, g * sizeof(float)); /* a duplicate: ties go to 2 */
    kern_kmeans_assign_ref(idx, dist, x, w, n, g, c, k);
    for (int64_t i = 0; i < n; i++) {
        double best = 1e300;
        int arg = -1;
        for (int j = 0; j < k; j++) {
            double dj = 0.0;
            for (int a = 0; a < g; a++) {
                double df = (double)x[i * g + a] - c[j * g + a];
                dj += w[i * g + a] * df * df;
            }
            if (dj < best) {
                best = dj;
                arg = j;
            }
        }
        assert_int_equal(idx[i], arg);
        assert_true(fabs(dist[i] - best) <= 1e-12 * (1.0 + best));
        assert_int_not_equal(idx[i], 5);
    }
    /* unit weights when w is NULL */
    kern_kmeans_assign_ref(idx, NULL, x, NULL, 1, g, c, k);
    double best = 1e300;
    int arg = -1;
    for (int j = 0; j < k; j++) {
        double dj = 0.0;
        for (int a = 0; a < g; a++) dj += pow((double)x[a] - c[j * g + a], 2);
        if (dj < best) best = dj, arg = j;
    }
    assert_int_equal(idx[0], arg);
    free(dist);
    free(idx);
    free(c);
    free(w);
    free(x);
}

static void test_beam_score(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 13);
    const int nb = 3, K = 16, g = 4;
    double base[3], u[12], cnorm[16], scores[48];
    float cb[64];
    for (int b = 0; b < nb; b++) base[b] = 10.0 + b;
    for (int t = 0; t < nb * g; t++) u[t] = lv_rng_normal(&rng);
    for (int t = 0; t < K * g; t++) cb[t] = lv_rng_normal(&rng);
    for (int k = 0; k < K; k++) cnorm[k] = 1.0 + lv_rng_uniform(&rng);
    const double s = 0.7;
    kern_beam_score_ref(scores, base, u, cb, cnorm, s, nb, K, g);
    for (int b = 0; b < nb; b++)
        for (int k = 0; k < K; k++) {
            double dot = 0.0;
            for (int a = 0; a < g; a++) dot += cb[k * g + a] * u[b * g + a];
            double ref = base[b] - 2.0 * s * dot + s * s * cnorm[k];
            assert_true(fabs(scores[b * K + k] - ref) <= 1e-12 * (1.0 + fabs(ref)));
        }
}

/* d_in = 10 with g = 4: the third group is cut to 2 columns. */
static void test_dequant(void **state)
{
    (void)state;
    lv_rng rng;
    lv_rng_seed(&rng, 14);
    const int64_t d_out = 5, d_in = 10, G = 3;
    const int M = 2, K = 8, g = 4;
    uint16_t codes[5 * 3 * 2];
    float cb[2 * 8 * 4], scales[5], out[50];
    for (int t = 0; t < (int)(d_out * G * M); t++) codes[t] = (uint16_t)(lv_rng_u64(&rng) % K);
    for (int t = 0; t < M * K * g; t++) cb[t] = lv_rng_normal(&rng);
    for (int r = 0; r < d_out; r++) scales[r] = 0.5f + (float)r;
    kern_aq_dequant_ref(out, codes, cb, scales, d_out, d_in, G, M, K, g);
    for (int64_t r = 0; r < d_out; r++)
        for (int64_t j = 0; j < d_in; j++) {
            int64_t i = j / g, a = j % g;
            float ref = 0.0f;
            for (int m = 0; m < M; m++) ref += cb[(m * K + codes[(r * G + i) * M + m]) * g + a];
            ref *= scales[r];
            assert_true(fabsf(out[r * d_in + j] - ref) <= 1e-6f * (1.0f + fabsf(ref)));
        }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hessian_accum),
        cmocka_unit_test(test_kmeans_assign),
        cmocka_unit_test(test_beam_score),
        cmocka_unit_test(test_dequant),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
