/* test_kern_qmm_cuda.c: the CUDA products straight from AQLM codes (kern_qmm.h,
 * kernels/cuda/qmm.cu) against the CPU on the same seeded layers and inputs: the LUT
 * kernel on every config with nbits <= 8 (2x8g8, 1x8g8, 2x8g4, 1x6g4, 1x4g1, 3x5g3), the
 * gather kernel on all of them and 1x16g8, batches 1, 3, 8, shapes that are multiples of
 * nothing (37x172, 129x257, 300x1000 for several split-K slices and row blocks), scales,
 * codes at 2^nbits - 1.
 *
 * Tolerance (qmm_testlib.h): |gpu - ref| <= TOL_QMM_REL * sum_j |x_j * What_rj| against
 * kern_aq_gemm_ref (the kernels use fmaf and their own summation order); the max relative
 * difference is printed per case. Determinism: a second launch gives the same bits.
 *
 * Without a usable device (or in a CPU-only build) the argument checks run, then the test
 * exits 77 (skipped) with a message. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kern.h"
#include "kern_check.h"
#include "kern_qmm.h"
#include "qmm_testlib.h"

#ifdef LLMVQ_HAVE_CUDA

static cudaStream_t g_stream;

static void *dev_upload(const void *h, size_t bytes)
{
    void *d = NULL;
    assert_int_equal(cudaMalloc(&d, bytes ? bytes : 1), cudaSuccess);
    assert_int_equal(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    return d;
}

static void dev_download(void *h, const void *d, size_t bytes)
{
    assert_int_equal(cudaStreamSynchronize(g_stream), cudaSuccess);
    assert_int_equal(cudaMemcpy(h, d, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}

/* One kernel (lut = 1: LUT, else gather) on one layer and batch, twice. */
static void run_case(int64_t d_out, int64_t d_in, int M, int nbits, int g, int64_t n, int lut,
                     uint64_t seed)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    lv_aq_layer L = {0};
    assert_int_equal(qm_make_layer(&L, &r, d_out, d_in, M, nbits, g), LV_OK);
    const int64_t K = (int64_t)1 << nbits, ny = n * d_out;
    float *x = malloc(sizeof(float) * (size_t)(n * d_in)), *w = malloc(sizeof(float) * (size_t)(d_out * d_in));
    float *ref = malloc(sizeof(float) * (size_t)ny), *got = malloc(sizeof(float) * (size_t)ny);
    float *again = malloc(sizeof(float) * (size_t)ny);
    double *refd = malloc(sizeof(double) * (size_t)ny);
    assert_true(x && w && ref && got && again && refd);
    kc_fill(&r, x, n * d_in, 1.0f, 0.1f);
    kern_aq_dequant_ref(w, L.codes, L.codebooks, L.scales, d_out, d_in, L.n_groups, M, (int)K, g);
    assert_int_equal(kern_aq_gemm_ref(ref, x, &L, n), LV_OK);
    for (int64_t t = 0; t < ny; t++) refd[t] = ref[t];

    kern_aq_dev_layer D = {.d_out = d_out, .d_in = d_in, .n_groups = L.n_groups, .M = M,
                           .nbits = nbits, .g = g};
    D.d_codes = dev_upload(L.codes, sizeof(uint16_t) * (size_t)(d_out * L.n_groups * M));
    D.d_codebooks = dev_upload(L.codebooks, sizeof(float) * (size_t)(M * K * g));
    D.d_scales = dev_upload(L.scales, sizeof(float) * (size_t)d_out);
    float *d_x = dev_upload(x, sizeof(float) * (size_t)(n * d_in)), *d_y = NULL, *d_ws = NULL;
    assert_int_equal(cudaMalloc((void **)&d_y, sizeof(float) * (size_t)ny), cudaSuccess);
    const size_t ws_bytes = kern_aq_gemm_lut_cuda_ws_bytes(&D, n);
    assert_int_equal(cudaMalloc((void **)&d_ws, ws_bytes ? ws_bytes : 1), cudaSuccess);
    for (int k = 0; k < 2; k++) {
        assert_int_equal(cudaMemset(d_y, 0xff, sizeof(float) * (size_t)ny), cudaSuccess);
        lv_status st = lut ? kern_aq_gemm_lut_cuda(d_y, d_x, &D, n, d_ws, ws_bytes, g_stream)
                           : kern_aq_gemm_gather_cuda(d_y, d_x, &D, n, g_stream);
        assert_int_equal(st, LV_OK);
        dev_download(k ? again : got, d_y, sizeof(float) * (size_t)ny);
    }
    int64_t bad = 0;
    double e = qm_max_rel_diff(got, refd, x, w, n, d_out, d_in, &bad);
    printf("  %-6s %4lldx%-4lld %dx%dg%d n=%lld: max rel diff %.2g (tol %.0e), rerun %s\n",
           lut ? "lut" : "gather", (long long)d_out, (long long)d_in, M, nbits, g, (long long)n,
           e, TOL_QMM_REL, memcmp(got, again, sizeof(float) * (size_t)ny) ? "DIFFERS" : "identical");
    assert_int_equal(bad, 0);
    assert_memory_equal(got, again, sizeof(float) * (size_t)ny);

    cudaFree(d_ws), cudaFree(d_y), cudaFree(d_x);
    cudaFree((void *)D.d_scales), cudaFree((void *)D.d_codebooks), cudaFree((void *)D.d_codes);
    free(refd), free(again), free(got), free(ref), free(w), free(x);
    lv_aq_layer_free(&L);
}

static void run_config(int M, int nbits, int g, uint64_t seed)
{
    const int64_t batches[] = {1, 3, 8};
    for (size_t b = 0; b < 3; b++)
        for (int lut = nbits <= 8 ? 1 : 0; lut >= 0; lut--) {
            run_case(37, 172, M, nbits, g, batches[b], lut, seed + 10 * b);
            run_case(129, 257, M, nbits, g, batches[b], lut, seed + 10 * b + 1);
            run_case(300, 1000, M, nbits, g, batches[b], lut, seed + 10 * b + 2);
        }
}

static void test_1x16g8(void **state) { (void)state; run_config(1, 16, 8, 100); }
static void test_2x8g8(void **state) { (void)state; run_config(2, 8, 8, 200); }
static void test_1x8g8(void **state) { (void)state; run_config(1, 8, 8, 300); }
static void test_2x8g4(void **state) { (void)state; run_config(2, 8, 4, 400); }
static void test_1x6g4(void **state) { (void)state; run_config(1, 6, 4, 500); }
static void test_1x4g1(void **state) { (void)state; run_config(1, 4, 1, 600); }
static void test_3x5g3(void **state) { (void)state; run_config(3, 5, 3, 700); }

static int setup(void **state)
{
    (void)state;
    return cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking) == cudaSuccess ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    cudaStreamDestroy(g_stream);
    return 0;
}

/* Bad shapes and unsupported sizes are refused before anything touches the device. */
static void test_invalid_args(void **state)
{
    (void)state;
    float *fake_f = (float *)(uintptr_t)0x1000; /* never dereferenced */
    const uint16_t *fake_u = (const uint16_t *)(uintptr_t)0x1000;
    kern_aq_dev_layer D = {.d_out = 4, .d_in = 13, .n_groups = 3, .M = 1, .nbits = 4, .g = 5,
                           .d_codes = fake_u, .d_codebooks = fake_f};
    const size_t ws = kern_aq_gemm_lut_cuda_ws_bytes(&D, 1);
    assert_int_equal(ws, sizeof(float) * 4);
    assert_int_equal(kern_aq_gemm_lut_cuda(fake_f, fake_f, NULL, 1, fake_f, ws, 0), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm_lut_cuda(fake_f, fake_f, &D, 1, fake_f, ws - 1, 0), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_aq_gemm_lut_cuda(fake_f, fake_f, &D, 9, fake_f, ws, 0), LV_ERR_UNSUPPORTED);
    assert_int_equal(kern_aq_gemm_gather_cuda(fake_f, fake_f, &D, 9, 0), LV_ERR_UNSUPPORTED);
    assert_int_equal(kern_aq_gemm_gather_cuda(fake_f, fake_f, &D, 0, 0), LV_OK); /* empty */
    kern_aq_dev_layer bad = D;
    bad.n_groups = 2; /* must be ceil(13 / 5) = 3 */
    assert_int_equal(kern_aq_gemm_gather_cuda(fake_f, fake_f, &bad, 1, 0), LV_ERR_INVALID_ARG);
    bad = D;
    bad.nbits = 16;
    assert_int_equal(kern_aq_gemm_lut_cuda(fake_f, fake_f, &bad, 1, fake_f, ws, 0), LV_ERR_UNSUPPORTED);
    bad = D;
    bad.nbits = 8, bad.M = 16; /* 16 KiB per input row: 8 rows do not fit shared memory */
    assert_int_equal(kern_aq_gemm_lut_cuda(fake_f, fake_f, &bad, 8, fake_f, 1 << 20, 0),
                     LV_ERR_UNSUPPORTED);
    bad = D;
    bad.d_codes = NULL;
    assert_int_equal(kern_aq_gemm_gather_cuda(fake_f, fake_f, &bad, 1, 0), LV_ERR_INVALID_ARG);
    char line[256];
    lv_last_error_line(line, sizeof line);
    printf("  invalid arguments refused; last message: %s\n", line);
}

int main(void)
{
    if (lv_cuda_device_count() == 0) {
        const struct CMUnitTest host[] = {cmocka_unit_test(test_invalid_args)};
        if (cmocka_run_group_tests_name("host side, no device", host, NULL, NULL)) return 1;
        printf("SKIP: no usable CUDA device (lv_cuda_device_count() == 0): the qmm kernels "
               "were not compared with the CPU\n");
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_invalid_args), cmocka_unit_test(test_1x16g8),
        cmocka_unit_test(test_2x8g8),        cmocka_unit_test(test_1x8g8),
        cmocka_unit_test(test_2x8g4),        cmocka_unit_test(test_1x6g4),
        cmocka_unit_test(test_1x4g1),        cmocka_unit_test(test_3x5g3),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}

#else /* CPU-only build */

int main(void)
{
    printf("SKIP: built without CUDA (LLMVQ_CUDA=OFF or no toolkit): nothing to compare\n");
    return 77;
}

#endif
