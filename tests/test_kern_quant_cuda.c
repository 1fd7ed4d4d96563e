/* test_kern_quant_cuda.c: the CUDA quantization kernels (kern_quant_cuda.h) against
 * the CPU reference (kernels/cpu/quant_ref.c) on the same seeded inputs, odd shapes
 * included (d = 172, g not dividing d_in, K = 2^16, tiles and chunks cut short).
 *
 * Tolerance: zero. The kernels perform the reference's floating-point operations in
 * the reference's order (no FMA where the reference rounds a product before a sum;
 * the Hessian's float*float products are exact in double, so its FMA is exact too),
 * so every output must carry the same bits; each check still prints its max abs/rel
 * difference. k-means indices are judged in two steps: a differing index is a "near
 * tie" when the reference distances of both centroids agree to 1e-12 relative (what
 * any correct kernel may do), else wrong; this kernel must also produce no near tie
 * at all, since it promises bit-identical distances.
 *
 * Without a usable device (or in a CPU-only build) the argument checks and the
 * no-device launch path run, then the test exits 77 (skipped) with a message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kern_check.h"
#include "kern_quant_cuda.h"
#include "quant_testlib.h"

#ifdef LLMVQ_HAVE_CUDA

static cudaStream_t g_stream;

static void *dev_alloc(size_t bytes)
{
    void *d = NULL;
    assert_int_equal(cudaMalloc(&d, bytes ? bytes : 1), cudaSuccess);
    return d;
}

static void *dev_upload(const void *h, size_t bytes)
{
    void *d = dev_alloc(bytes);
    assert_int_equal(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

/* Waits for the stream, then copies back. */
static void dev_download(void *h, const void *d, size_t bytes)
{
    assert_int_equal(cudaStreamSynchronize(g_stream), cudaSuccess);
    assert_int_equal(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

static void *xmalloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    assert_non_null(p);
    return p;
}

/* Exact comparison: NaN matches NaN, everything else must compare equal. Prints
 * the max abs/rel difference and the first mismatches. */
static void expect_same_d(const char *name, const double *got, const double *ref, int64_t n)
{
    double max_abs = 0.0, max_rel = 0.0;
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        if (got[i] == ref[i] || (got[i] != got[i] && ref[i] != ref[i])) continue;
        double d = fabs(got[i] - ref[i]), rel = d / (fabs(ref[i]) > 1e-300 ? fabs(ref[i]) : 1e-300);
        if (bad < 5)
            printf("  %s: mismatch at %lld: got %.17g want %.17g\n", name, (long long)i, got[i],
                   ref[i]);
        bad++;
        if (d > max_abs || d != d) max_abs = d;
        if (rel > max_rel) max_rel = rel;
    }
    printf("  %-40s n=%-9lld max|diff|=%.3g max rel=%.3g (exact) %s\n", name, (long long)n,
           max_abs, max_rel, bad ? "FAIL" : "ok");
    assert_int_equal(bad, 0);
}

static void expect_same_f(const char *name, const float *got, const float *ref, int64_t n)
{
    double *g = xmalloc((size_t)n * sizeof(double)), *r = xmalloc((size_t)n * sizeof(double));
    for (int64_t i = 0; i < n; i++) g[i] = got[i], r[i] = ref[i]; /* float -> double is exact */
    expect_same_d(name, g, r, n);
    free(g), free(r);
}

/* ------------------------------------------------------------------ Hessian */

static void run_hessian(int64_t n, int d, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    const size_t hb = (size_t)d * d * sizeof(double), xb = (size_t)n * d * sizeof(float);
    float *x = qt_make_x(&rng, n, d);
    assert_non_null(x);
    for (int64_t t = 0; t < n * d; t += 17) x[t] = 0.0f; /* the reference skips zero samples */
    /* A non-symmetric starting H: the kernel must add to each element as the reference does. */
    double *h0 = xmalloc(hb), *ref = xmalloc(hb), *got = xmalloc(hb), *again = xmalloc(hb);
    for (int64_t t = 0; t < (int64_t)d * d; t++) h0[t] = 10.0 * lv_rng_normal(&rng);
    memcpy(ref, h0, hb);
    kern_hessian_accum_ref(ref, x, n, d);

    float *d_x = dev_upload(x, xb);
    double *d_h = dev_upload(h0, hb);
    assert_int_equal(kern_hessian_accum_cuda(d_h, d_x, n, d, g_stream), LV_OK);
    dev_download(got, d_h, hb);
    char name[96];
    snprintf(name, sizeof name, "hessian n=%lld d=%d", (long long)n, d);
    expect_same_d(name, got, ref, (int64_t)d * d);

    /* Same bits on a second run, and in two batches of samples. */
    assert_int_equal(cudaMemcpy(d_h, h0, hb, cudaMemcpyHostToDevice), cudaSuccess);
    const int64_t n1 = n / 3;
    assert_int_equal(kern_hessian_accum_cuda(d_h, d_x, n1, d, g_stream), LV_OK);
    assert_int_equal(kern_hessian_accum_cuda(d_h, d_x + n1 * d, n - n1, d, g_stream), LV_OK);
    dev_download(again, d_h, hb);
    snprintf(name, sizeof name, "hessian n=%lld+%lld d=%d (batches)", (long long)n1,
             (long long)(n - n1), d);
    expect_same_d(name, again, ref, (int64_t)d * d);
    assert_memory_equal(again, got, hb);

    cudaFree(d_h), cudaFree(d_x);
    free(again), free(got), free(ref), free(h0), free(x);
}

static void test_hessian(void **state)
{
    (void)state;
    run_hessian(1000, 172, 101); /* d not a multiple of the 64 tile, n of the 16 stage */
    run_hessian(37, 64, 102);
    run_hessian(300, 129, 103);
    run_hessian(5, 1, 104);
}

/* ------------------------------------------------------------------ k-means */

/* The reference's distance of point i to centroid j (for judging index mismatches). */
static double km_dist(const float *x, const float *w, const float *c, int64_t i, int j, int g)
{
    double dj = 0.0;
    for (int a = 0; a < g; a++) {
        double diff = (double)x[i * g + a] - (double)c[(int64_t)j * g + a];
        dj += (w ? (double)w[i * g + a] : 1.0) * diff * diff;
    }
    return dj;
}

static void run_kmeans(int64_t n, int g, int k, int weighted, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    float *x = xmalloc((size_t)n * g * sizeof(float)), *w = xmalloc((size_t)n * g * sizeof(float));
    float *c = xmalloc((size_t)k * g * sizeof(float));
    int32_t *idx_ref = xmalloc((size_t)n * sizeof(int32_t)), *idx = xmalloc((size_t)n * sizeof(int32_t));
    double *dist_ref = xmalloc((size_t)n * sizeof(double)), *dist = xmalloc((size_t)n * sizeof(double));
    kc_fill(&rng, x, n * g, 1.0f, 0.0f);
    kc_fill(&rng, c, (int64_t)k * g, 1.0f, 0.0f);
    for (int64_t t = 0; t < n * g; t++) w[t] = 0.1f + lv_rng_uniform(&rng);
    /* Exact ties: centroid 2 duplicated at 5 and at k-1 (another shared-memory tile
     * for large k), every 7th point sitting on it. Near ties: every 11th point halfway
     * between centroids 0 and 1 (equal distances up to rounding). */
    if (k > 6) {
        memcpy(c + 5 * g, c + 2 * g, (size_t)g * sizeof(float));
        memcpy(c + (int64_t)(k - 1) * g, c + 2 * g, (size_t)g * sizeof(float));
        for (int64_t i = 0; i < n; i += 7) memcpy(x + i * g, c + 2 * g, (size_t)g * sizeof(float));
        for (int64_t i = 3; i < n; i += 11)
            for (int a = 0; a < g; a++) x[i * g + a] = 0.5f * (c[a] + c[g + a]);
    }
    const float *wh = weighted ? w : NULL;
    kern_kmeans_assign_ref(idx_ref, dist_ref, x, wh, n, g, c, k);

    float *d_x = dev_upload(x, (size_t)n * g * sizeof(float));
    float *d_w = weighted ? dev_upload(w, (size_t)n * g * sizeof(float)) : NULL;
    float *d_c = dev_upload(c, (size_t)k * g * sizeof(float));
    int32_t *d_idx = dev_alloc((size_t)n * sizeof(int32_t));
    double *d_dist = dev_alloc((size_t)n * sizeof(double));
    assert_int_equal(kern_kmeans_assign_cuda(d_idx, d_dist, d_x, d_w, n, g, d_c, k, g_stream),
                     LV_OK);
    dev_download(idx, d_idx, (size_t)n * sizeof(int32_t));
    dev_download(dist, d_dist, (size_t)n * sizeof(double));

    int64_t near_ties = 0, wrong = 0;
    for (int64_t i = 0; i < n; i++) {
        if (idx[i] == idx_ref[i]) continue;
        double a = km_dist(x, wh, c, i, idx_ref[i], g);
        double b = (idx[i] >= 0 && idx[i] < k) ? km_dist(x, wh, c, i, idx[i], g) : INFINITY;
        if (fabs(a - b) <= 1e-12 * (1.0 + fabs(a))) {
            near_ties++;
        } else {
            if (wrong < 5)
                printf("  kmeans: point %lld: idx %d (dist %.17g), reference %d (%.17g)\n",
                       (long long)i, idx[i], b, idx_ref[i], a);
            wrong++;
        }
    }
    char name[96];
    snprintf(name, sizeof name, "kmeans n=%lld g=%d k=%d %s", (long long)n, g, k,
             weighted ? "weighted" : "unit");
    printf("  %-40s idx: %lld differ (%lld near ties, %lld wrong)\n", name,
           (long long)(near_ties + wrong), (long long)near_ties, (long long)wrong);
    assert_int_equal(wrong, 0);
    assert_int_equal(near_ties, 0); /* bit-identical distances leave no room for either */
    expect_same_d(name, dist, dist_ref, n);

    /* dist is optional */
    assert_int_equal(kern_kmeans_assign_cuda(d_idx, NULL, d_x, d_w, n, g, d_c, k, g_stream),
                     LV_OK);
    dev_download(idx, d_idx, (size_t)n * sizeof(int32_t));
    assert_memory_equal(idx, idx_ref, (size_t)n * sizeof(int32_t));

    cudaFree(d_dist), cudaFree(d_idx), cudaFree(d_c), cudaFree(d_w), cudaFree(d_x);
    free(dist), free(dist_ref), free(idx), free(idx_ref), free(c), free(w), free(x);
}

static void test_kmeans(void **state)
{
    (void)state;
    run_kmeans(5000, 3, 1500, 1, 201); /* g=3: 682-centroid tiles, 3 of them */
    run_kmeans(2000, 8, 1000, 0, 202); /* unit weights */
    run_kmeans(777, 12, 517, 1, 203);  /* registers of 16, 4 unused */
    run_kmeans(300, 40, 70, 1, 204);   /* g > 32: point read through L1 */
    run_kmeans(129, 8, 5000, 1, 205);  /* many tiles, one partial block of points */
    run_kmeans(10, 2, 1, 1, 206);      /* k = 1 */
}

/* ------------------------------------------------------------------ beam scoring */

static void run_beam(int64_t rows, int nb, int K, int g, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    const int64_t n_pairs = rows * nb, n_sc = n_pairs * K;
    double *base = xmalloc((size_t)n_pairs * sizeof(double));
    double *u = xmalloc((size_t)n_pairs * g * sizeof(double));
    double *s = xmalloc((size_t)rows * sizeof(double)), *cnorm = xmalloc((size_t)K * sizeof(double));
    float *cb = xmalloc((size_t)K * g * sizeof(float));
    double *ref = xmalloc((size_t)n_sc * sizeof(double)), *got = xmalloc((size_t)n_sc * sizeof(double));
    for (int64_t t = 0; t < n_pairs; t++) base[t] = 10.0 + lv_rng_normal(&rng);
    for (int64_t t = 0; t < n_pairs * g; t++) u[t] = lv_rng_normal(&rng) * (1.0 + 1e-3 * lv_rng_normal(&rng));
    for (int64_t r = 0; r < rows; r++) s[r] = 0.5 + lv_rng_uniform(&rng);
    for (int j = 0; j < K; j++) cnorm[j] = 1.0 + lv_rng_uniform(&rng);
    kc_fill(&rng, cb, (int64_t)K * g, 0.1f, 0.0f);
    if (rows > 1 && nb > 2) /* row 1 has only 2 live beams: the others padded with NaN */
        for (int b = 2; b < nb; b++) base[nb + b] = NAN;
    for (int64_t r = 0; r < rows; r++)
        kern_beam_score_ref(ref + r * nb * K, base + r * nb, u + r * nb * g, cb, cnorm, s[r], nb,
                            K, g);

    double *d_base = dev_upload(base, (size_t)n_pairs * sizeof(double));
    double *d_u = dev_upload(u, (size_t)n_pairs * g * sizeof(double));
    double *d_s = dev_upload(s, (size_t)rows * sizeof(double));
    double *d_cn = dev_upload(cnorm, (size_t)K * sizeof(double));
    float *d_cb = dev_upload(cb, (size_t)K * g * sizeof(float));
    double *d_sc = dev_alloc((size_t)n_sc * sizeof(double));
    assert_int_equal(kern_beam_score_batch_cuda(d_sc, d_base, d_u, d_s, d_cb, d_cn, rows, nb, K, g,
                                                g_stream),
                     LV_OK);
    dev_download(got, d_sc, (size_t)n_sc * sizeof(double));
    char name[96];
    snprintf(name, sizeof name, "beam_score rows=%lld nb=%d K=%d g=%d", (long long)rows, nb, K, g);
    expect_same_d(name, got, ref, n_sc);

    cudaFree(d_sc), cudaFree(d_cb), cudaFree(d_cn), cudaFree(d_s), cudaFree(d_u), cudaFree(d_base);
    free(got), free(ref), free(cb), free(cnorm), free(s), free(u), free(base);
}

static void test_beam_score(void **state)
{
    (void)state;
    run_beam(5, 3, 65536, 8, 301);  /* K = 2^16 at the AQLM group size */
    run_beam(7, 1, 1000, 5, 302);   /* one beam, K not a multiple of 256 */
    run_beam(3, 8, 777, 12, 303);   /* g = 8 + 4: a short second chunk */
    run_beam(40, 8, 300, 8, 304);   /* 320 pairs: ten blocks of 32 */
    run_beam(2, 5, 513, 20, 305);   /* 10 pairs: one partial block; g = 8 + 8 + 4 */
}

/* ------------------------------------------------------------------ dequantization */

static void run_dequant(int64_t rows, int64_t d_in, int M, int K, int g, int scaled, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    const int64_t G = (d_in + g - 1) / g, n_codes = rows * G * M, n_w = rows * d_in;
    uint16_t *codes = xmalloc((size_t)n_codes * sizeof(uint16_t));
    float *cbs = xmalloc((size_t)M * K * g * sizeof(float)), *scales = xmalloc((size_t)rows * sizeof(float));
    float *ref = xmalloc((size_t)n_w * sizeof(float)), *got = xmalloc((size_t)n_w * sizeof(float));
    for (int64_t t = 0; t < n_codes; t++) codes[t] = (uint16_t)(lv_rng_u64(&rng) % (uint64_t)K);
    kc_fill(&rng, cbs, (int64_t)M * K * g, 0.3f, 0.0f);
    kc_fill(&rng, scales, rows, 0.2f, 1.0f);
    const float *sh = scaled ? scales : NULL;
    kern_aq_dequant_ref(ref, codes, cbs, sh, rows, d_in, G, M, K, g);

    uint16_t *d_codes = dev_upload(codes, (size_t)n_codes * sizeof(uint16_t));
    float *d_cbs = dev_upload(cbs, (size_t)M * K * g * sizeof(float));
    float *d_sc = scaled ? dev_upload(scales, (size_t)rows * sizeof(float)) : NULL;
    float *d_w = dev_alloc((size_t)n_w * sizeof(float));
    assert_int_equal(kern_aq_dequant_cuda(d_w, d_codes, d_cbs, d_sc, rows, d_in, G, M, K, g,
                                          g_stream),
                     LV_OK);
    dev_download(got, d_w, (size_t)n_w * sizeof(float));
    char name[96];
    snprintf(name, sizeof name, "dequant %lldx%lld M=%d K=%d g=%d%s", (long long)rows,
             (long long)d_in, M, K, g, scaled ? " scaled" : "");
    expect_same_f(name, got, ref, n_w);

    cudaFree(d_w), cudaFree(d_sc), cudaFree(d_cbs), cudaFree(d_codes);
    free(got), free(ref), free(scales), free(cbs), free(codes);
}

static void test_dequant(void **state)
{
    (void)state;
    run_dequant(172, 172, 2, 65536, 8, 1, 401); /* last group cut to 4 columns */
    run_dequant(9, 13, 3, 7, 5, 0, 402);        /* no scales, last group of 3 */
    run_dequant(64, 1000, 1, 256, 16, 1, 403);
}

static int setup(void **state)
{
    (void)state;
    if (cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking) != cudaSuccess) return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    cudaStreamDestroy(g_stream);
    return 0;
}

/* ------------------------------------------------------------------ host-side checks */

/* Bad shapes are refused before anything touches the device. */
static void test_invalid_args(void **state)
{
    (void)state;
    double *fake_d = (double *)(uintptr_t)0x1000; /* never dereferenced */
    float *fake_f = (float *)(uintptr_t)0x1000;
    int32_t *fake_i = (int32_t *)(uintptr_t)0x1000;
    uint16_t *fake_u = (uint16_t *)(uintptr_t)0x1000;
    assert_int_equal(kern_hessian_accum_cuda(NULL, fake_f, 4, 4, 0), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_hessian_accum_cuda(fake_d, fake_f, 4, 0, 0), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_hessian_accum_cuda(fake_d, NULL, 0, 4, 0), LV_OK); /* nothing to add */
    assert_int_equal(kern_kmeans_assign_cuda(fake_i, NULL, fake_f, NULL, 4, 0, fake_f, 3, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_kmeans_assign_cuda(fake_i, NULL, fake_f, NULL, 4, 2049, fake_f, 3, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_kmeans_assign_cuda(fake_i, NULL, fake_f, NULL, 4, 8, fake_f, 0, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_beam_score_batch_cuda(fake_d, fake_d, fake_d, fake_d, fake_f, fake_d, 2,
                                                0, 16, 8, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_beam_score_batch_cuda(fake_d, fake_d, fake_d, fake_d, fake_f, fake_d, 2,
                                                4, 65535 * 256 + 1, 8, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_beam_score_batch_cuda(fake_d, fake_d, fake_d, NULL, fake_f, fake_d, 2,
                                                4, 16, 8, 0),
                     LV_ERR_INVALID_ARG);
    /* n_groups must be ceil(d_in / g) */
    assert_int_equal(kern_aq_dequant_cuda(fake_f, fake_u, fake_f, NULL, 4, 13, 2, 1, 8, 5, 0),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_dequant_cuda(fake_f, fake_u, fake_f, NULL, 4, 13, 4, 1, 8, 5, 0),
                     LV_ERR_INVALID_ARG);
    char line[256];
    lv_last_error_line(line, sizeof line);
    printf("  invalid arguments refused; last message: %s\n", line);
}

/* Without a device a launch must come back as LV_ERR_CUDA with CUDA's reason. */
static void test_no_device_launch(void **state)
{
    (void)state;
    float *fake_f = (float *)(uintptr_t)0x1000;
    uint16_t *fake_u = (uint16_t *)(uintptr_t)0x1000;
    lv_status st = kern_aq_dequant_cuda(fake_f, fake_u, fake_f, NULL, 4, 8, 1, 1, 8, 8, 0);
    char line[256];
    lv_last_error_line(line, sizeof line);
    printf("  launch without a device -> %s: %s\n", lv_status_str(st), line);
    assert_int_equal(st, LV_ERR_CUDA);
    (void)cudaGetLastError();
}

int main(void)
{
    if (lv_cuda_device_count() == 0) {
        const struct CMUnitTest host[] = {
            cmocka_unit_test(test_invalid_args),
            cmocka_unit_test(test_no_device_launch),
        };
        if (cmocka_run_group_tests_name("host side, no device", host, NULL, NULL)) return 1;
        printf("SKIP: no usable CUDA device (lv_cuda_device_count() == 0): the kernels were "
               "not compared with the CPU reference\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invalid_args),
        cmocka_unit_test(test_hessian),
        cmocka_unit_test(test_kmeans),
        cmocka_unit_test(test_beam_score),
        cmocka_unit_test(test_dequant),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

#else /* CPU-only build */

int main(void)
{
    printf("SKIP: this llmvq was built without CUDA (lv_cuda_device_count() == %d); "
           "configure with -DLLMVQ_CUDA=ON on a machine with a GPU\n",
           lv_cuda_device_count());
    return 77;
}

#endif
