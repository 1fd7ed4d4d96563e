/* test_kern_cuda.c: every op of the CUDA backend against the CPU backend on the
 * same seeded inputs, |gpu - cpu| <= atol + rtol*|cpu|, printing max diffs.
 * Exits 77 (skipped) when there is no usable CUDA device or no CUDA build. */
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

static lv_backend *g_be[2]; /* [0] cpu (reference), [1] cuda */

/* Backend buffer holding a copy of host data (bytes). */
static void *upload(lv_backend *be, const void *h, size_t bytes)
{
    void *d = NULL;
    assert_int_equal(be->ops->alloc(be, &d, bytes), LV_OK);
    assert_int_equal(be->ops->h2d(be, d, h, bytes), LV_OK);
    return d;
}

static void download(lv_backend *be, void *h, const void *d, size_t bytes)
{
    assert_int_equal(be->ops->sync(be), LV_OK);
    assert_int_equal(be->ops->d2h(be, h, d, bytes), LV_OK);
}

/* Compare the CUDA result res[1] with the CPU result res[0] (n floats). */
static void expect_close(const char *name, float *const res[2], int64_t n, double atol,
                         double rtol)
{
    double *ref = calloc((size_t)n, sizeof(double));
    assert_non_null(ref);
    int64_t bad = kc_compare_f(name, res[1], res[0], n, atol, rtol, ref);
    free(ref);
    assert_int_equal(bad, 0);
}

static float *rand_vec(lv_rng *r, int64_t n, float scale, float shift)
{
    float *x = malloc((size_t)n * sizeof(float));
    assert_non_null(x);
    kc_fill(r, x, n, scale, shift);
    return x;
}

static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 300;
    const int d_in = 257, d_out = 129;
    lv_rng r;
    lv_rng_seed(&r, 21);
    float *x = rand_vec(&r, n * d_in, 1.0f, 0.0f), *w = rand_vec(&r, (int64_t)d_out * d_in, 0.1f, 0.0f);
    float *res[2];
    for (int i = 0; i < 2; i++) {
        lv_backend *be = g_be[i];
        float *dx = upload(be, x, n * d_in * sizeof(float));
        float *dw = upload(be, w, (size_t)d_out * d_in * sizeof(float));
        float *dout = NULL;
        assert_int_equal(be->ops->alloc(be, (void **)&dout, n * d_out * sizeof(float)), LV_OK);
        assert_int_equal(be->ops->matmul(be, dout, dx, dw, n, d_in, d_out), LV_OK);
        res[i] = malloc(n * d_out * sizeof(float));
        download(be, res[i], dout, n * d_out * sizeof(float));
        be->ops->free(be, dx), be->ops->free(be, dw), be->ops->free(be, dout);
    }
    expect_close("matmul", res, n * d_out, 1e-4, 1e-4);
    free(x), free(w), free(res[0]), free(res[1]);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    const int64_t n = 70;
    const int dim = 300;
    lv_rng r;
    lv_rng_seed(&r, 22);
    float *x = rand_vec(&r, n * dim, 2.0f, 0.5f), *w = rand_vec(&r, dim, 0.2f, 1.0f);
    float *res[2];
    for (int i = 0; i < 2; i++) {
        lv_backend *be = g_be[i];
        float *dx = upload(be, x, n * dim * sizeof(float)), *dw = upload(be, w, dim * sizeof(float));
        assert_int_equal(be->ops->rmsnorm(be, dx, dx, dw, n, dim, 1e-5f), LV_OK); /* in place */
        res[i] = malloc(n * dim * sizeof(float));
        download(be, res[i], dx, n * dim * sizeof(float));
        be->ops->free(be, dx), be->ops->free(be, dw);
    }
    expect_close("rmsnorm", res, n * dim, 1e-5, 1e-5);
    free(x), free(w), free(res[0]), free(res[1]);
}

static void test_rope(void **state)
{
    (void)state;
    const int B = 2, T = 40, H = 8, hd = 64, pos0 = 100;
    const int64_t n = (int64_t)B * T * H * hd;
    lv_rng r;
    lv_rng_seed(&r, 23);
    float *x = rand_vec(&r, n, 1.0f, 0.0f);
    for (int s = 0; s < 2; s++) {
        lv_rope_style style = s ? LV_ROPE_HALF : LV_ROPE_INTERLEAVED;
        float *res[2];
        for (int i = 0; i < 2; i++) {
            lv_backend *be = g_be[i];
            float *dx = upload(be, x, n * sizeof(float));
            assert_int_equal(be->ops->rope(be, dx, B, T, H, hd, pos0, 10000.0f, style), LV_OK);
            res[i] = malloc(n * sizeof(float));
            download(be, res[i], dx, n * sizeof(float));
            be->ops->free(be, dx);
        }
        expect_close(s ? "rope half" : "rope interleaved", res, n, 5e-5, 1e-5);
        free(res[0]), free(res[1]);
    }
    free(x);
}

static void run_attention(int B, int T, int H, int KH, int hd, uint64_t seed)
{
    const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KH * hd;
    lv_rng r;
    lv_rng_seed(&r, seed);
    float *q = rand_vec(&r, nq, 1.0f, 0.0f), *k = rand_vec(&r, nk, 1.0f, 0.0f);
    float *v = rand_vec(&r, nk, 1.0f, 0.0f);
    float *res[2];
    for (int i = 0; i < 2; i++) {
        lv_backend *be = g_be[i];
        float *dq = upload(be, q, nq * sizeof(float)), *dk = upload(be, k, nk * sizeof(float));
        float *dv = upload(be, v, nk * sizeof(float)), *dout = NULL;
        assert_int_equal(be->ops->alloc(be, (void **)&dout, nq * sizeof(float)), LV_OK);
        assert_int_equal(be->ops->attention(be, dout, dq, dk, dv, B, T, H, KH, hd), LV_OK);
        res[i] = malloc(nq * sizeof(float));
        download(be, res[i], dout, nq * sizeof(float));
        be->ops->free(be, dq), be->ops->free(be, dk), be->ops->free(be, dv), be->ops->free(be, dout);
    }
    char name[80];
    snprintf(name, sizeof name, "attention B%d T%d H%d/%d hd%d", B, T, H, KH, hd);
    expect_close(name, res, nq, 1e-5, 1e-4);
    free(q), free(k), free(v), free(res[0]), free(res[1]);
}

static void test_attention(void **state)
{
    (void)state;
    run_attention(2, 67, 8, 2, 64, 24);  /* GQA */
    run_attention(1, 300, 4, 4, 32, 25); /* MHA, T over the block size */
    run_attention(1, 12500, 1, 1, 32, 26); /* scores over 48 KiB: opt-in shared memory */
}

static void test_swiglu_softmax(void **state)
{
    (void)state;
    const int64_t n = 10007, rows = 33;
    const int d = 1001;
    lv_rng r;
    lv_rng_seed(&r, 27);
    float *g = rand_vec(&r, n, 3.0f, 0.0f), *u = rand_vec(&r, n, 1.0f, 0.0f);
    float *x = rand_vec(&r, rows * d, 4.0f, 30.0f);
    float *sw[2], *sm[2];
    for (int i = 0; i < 2; i++) {
        lv_backend *be = g_be[i];
        float *dg = upload(be, g, n * sizeof(float)), *du = upload(be, u, n * sizeof(float));
        float *dx = upload(be, x, rows * d * sizeof(float));
        assert_int_equal(be->ops->swiglu(be, dg, dg, du, n), LV_OK);
        assert_int_equal(be->ops->softmax(be, dx, rows, d), LV_OK);
        sw[i] = malloc(n * sizeof(float));
        sm[i] = malloc(rows * d * sizeof(float));
        download(be, sw[i], dg, n * sizeof(float));
        download(be, sm[i], dx, rows * d * sizeof(float));
        be->ops->free(be, dg), be->ops->free(be, du), be->ops->free(be, dx);
    }
    expect_close("swiglu", sw, n, 1e-6, 1e-5);
    expect_close("softmax", sm, rows * d, 1e-7, 1e-5);
    free(g), free(u), free(x), free(sw[0]), free(sw[1]), free(sm[0]), free(sm[1]);
}

static void test_embed(void **state)
{
    (void)state;
    const int vocab = 97, dim = 72;
    const int64_t n = 51;
    lv_rng r;
    lv_rng_seed(&r, 28);
    float *emb = rand_vec(&r, (int64_t)vocab * dim, 1.0f, 0.0f);
    int32_t tok[51];
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(lv_rng_u64(&r) % vocab);
    float *res[2];
    for (int i = 0; i < 2; i++) {
        lv_backend *be = g_be[i];
        float *de = upload(be, emb, (size_t)vocab * dim * sizeof(float)), *dout = NULL;
        int32_t *dt = upload(be, tok, sizeof tok);
        assert_int_equal(be->ops->alloc(be, (void **)&dout, n * dim * sizeof(float)), LV_OK);
        assert_int_equal(be->ops->embed(be, dout, de, dt, n, dim), LV_OK);
        res[i] = malloc(n * dim * sizeof(float));
        download(be, res[i], dout, n * dim * sizeof(float));
        be->ops->free(be, de), be->ops->free(be, dt), be->ops->free(be, dout);
    }
    expect_close("embed", res, n * dim, 0.0, 0.0);
    free(emb), free(res[0]), free(res[1]);
}

static int setup(void **state)
{
    (void)state;
    if (lv_backend_cpu_init(&g_be[0]) != LV_OK) return -1;
    if (lv_backend_cuda_init(&g_be[1], 0) != LV_OK) {
        printf("cuda backend init failed: %s\n", lv_last_error());
        return -1;
    }
    printf("comparing backend '%s' against '%s'\n", g_be[1]->ops->name, g_be[0]->ops->name);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    lv_backend_free(g_be[1]);
    lv_backend_free(g_be[0]);
    return 0;
}

int main(void)
{
    int n_dev = lv_cuda_device_count();
    if (n_dev == 0) {
        /* The no-device path must fail cleanly, with a message, not crash. */
        lv_backend *be = (lv_backend *)&n_dev;
        lv_status st = lv_backend_cuda_init(&be, 0);
        char line[256];
        lv_last_error_line(line, sizeof line);
        printf("SKIP: no usable CUDA device; lv_backend_cuda_init -> %s: %s\n",
               lv_status_str(st), line);
        if (st != LV_ERR_UNSUPPORTED || be != NULL) {
            printf("FAIL: expected LV_ERR_UNSUPPORTED and a NULL backend\n");
            return 1;
        }
        return 77;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),    cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope),      cmocka_unit_test(test_attention),
        cmocka_unit_test(test_swiglu_softmax), cmocka_unit_test(test_embed),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
