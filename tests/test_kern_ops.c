/* test_kern_ops.c: every CPU reference op of kern.h against a naive
 * double-precision loop on seeded random inputs; RoPE pairing equivalence. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <omp.h>

#include "kern.h"
#include "kern_check.h"
#include "kern_impl.h"

/* Tolerances for FP32 ops vs a double reference. */
#define TOL_F32_ATOL 1e-5
#define TOL_F32_RTOL 1e-5
#define TOL_GEMM_ATOL 1e-4 /* sums of a few hundred products */
#define TOL_ROPE_ATOL 2e-5 /* float angle at pos ~40 vs double angle */
/* Attention with scores up to ~50: their float rounding (~1e-5 absolute) goes
 * straight through exp into the weights, whichever way the scores are summed. */
#define TOL_ATTN_SHARP_ATOL 1e-4

static float *fvec(int64_t n) { return calloc((size_t)n, sizeof(float)); }
static double *dvec(int64_t n) { return calloc((size_t)n, sizeof(double)); }

static void test_matmul(void **state)
{
    (void)state;
    const int64_t n = 37;
    const int d_in = 129, d_out = 67;
    lv_rng r;
    lv_rng_seed(&r, 11);
    float *x = fvec(n * d_in), *w = fvec((int64_t)d_out * d_in), *out = fvec(n * d_out);
    double *ref = dvec(n * d_out);
    kc_fill(&r, x, n * d_in, 1.0f, 0.0f);
    kc_fill(&r, w, (int64_t)d_out * d_in, 0.1f, 0.0f);
    kern_matmul_ref(out, x, w, n, d_in, d_out);
    for (int64_t i = 0; i < n; i++)
        for (int o = 0; o < d_out; o++) {
            double s = 0;
            for (int k = 0; k < d_in; k++) s += (double)x[i * d_in + k] * w[o * d_in + k];
            ref[i * d_out + o] = s;
        }
    assert_int_equal(kc_compare("matmul", out, ref, n * d_out, TOL_GEMM_ATOL, 1e-5), 0);
    free(x), free(w), free(out), free(ref);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    const int64_t n = 13;
    const int dim = 96;
    const float eps = 1e-5f;
    lv_rng r;
    lv_rng_seed(&r, 12);
    float *x = fvec(n * dim), *w = fvec(dim), *out = fvec(n * dim);
    double *ref = dvec(n * dim);
    kc_fill(&r, x, n * dim, 2.0f, 0.3f);
    kc_fill(&r, w, dim, 0.2f, 1.0f);
    for (int64_t i = 0; i < n; i++) {
        double ss = 0;
        for (int d = 0; d < dim; d++) ss += (double)x[i * dim + d] * x[i * dim + d];
        double inv = 1.0 / sqrt(ss / dim + eps);
        for (int d = 0; d < dim; d++) ref[i * dim + d] = x[i * dim + d] * inv * w[d];
    }
    kern_rmsnorm_ref(out, x, w, n, dim, eps);
    assert_int_equal(kc_compare("rmsnorm", out, ref, n * dim, TOL_F32_ATOL, TOL_F32_RTOL), 0);
    kern_rmsnorm_ref(x, x, w, n, dim, eps); /* in place */
    assert_int_equal(kc_compare("rmsnorm in place", x, ref, n * dim, TOL_F32_ATOL, TOL_F32_RTOL),
                     0);
    free(x), free(w), free(out), free(ref);
}

/* Naive RoPE in double; pair j of a head is (lo, hi) by style. */
static void rope_naive(double *x, int B, int T, int H, int hd, int pos0, double theta,
                       lv_rope_style style)
{
    for (int64_t bt = 0; bt < (int64_t)B * T; bt++)
        for (int h = 0; h < H; h++)
            for (int j = 0; j < hd / 2; j++) {
                double a = (pos0 + bt % T) * pow(theta, -2.0 * j / hd);
                int lo = style == LV_ROPE_HALF ? j : 2 * j;
                int hi = style == LV_ROPE_HALF ? j + hd / 2 : 2 * j + 1;
                double *xh = x + (bt * H + h) * hd;
                double x0 = xh[lo], x1 = xh[hi];
                xh[lo] = x0 * cos(a) - x1 * sin(a);
                xh[hi] = x0 * sin(a) + x1 * cos(a);
            }
}

static void test_rope_vs_naive(void **state)
{
    (void)state;
    const int B = 2, T = 11, H = 3, hd = 32, pos0 = 29;
    const int64_t n = (int64_t)B * T * H * hd;
    lv_rng r;
    lv_rng_seed(&r, 13);
    float *x = fvec(n);
    double *ref = dvec(n);
    for (int s = 0; s < 2; s++) {
        lv_rope_style style = s ? LV_ROPE_HALF : LV_ROPE_INTERLEAVED;
        kc_fill(&r, x, n, 1.0f, 0.0f);
        for (int64_t i = 0; i < n; i++) ref[i] = x[i];
        rope_naive(ref, B, T, H, hd, pos0, 10000.0, style);
        kern_rope_ref(x, B, T, H, hd, pos0, 10000.0f, style);
        assert_int_equal(kc_compare(s ? "rope half" : "rope interleaved", x, ref, n,
                                    TOL_ROPE_ATOL, TOL_F32_RTOL),
                         0);
    }
    free(x), free(ref);
}

/* Interleaved index 2j+c of a head is HALF index c*hd/2 + j: permuting the
 * input, rotating HALF, and permuting back must equal rotating INTERLEAVED, exactly. */
static void test_rope_half_equiv(void **state)
{
    (void)state;
    const int B = 3, T = 7, H = 4, hd = 16, pos0 = 3;
    const int64_t n = (int64_t)B * T * H * hd;
    lv_rng r;
    lv_rng_seed(&r, 14);
    float *xi = fvec(n), *xh = fvec(n);
    kc_fill(&r, xi, n, 1.0f, 0.0f);
    for (int64_t head = 0; head < n / hd; head++)
        for (int j = 0; j < hd / 2; j++)
            for (int c = 0; c < 2; c++) xh[head * hd + c * hd / 2 + j] = xi[head * hd + 2 * j + c];
    kern_rope_ref(xi, B, T, H, hd, pos0, 10000.0f, LV_ROPE_INTERLEAVED);
    kern_rope_ref(xh, B, T, H, hd, pos0, 10000.0f, LV_ROPE_HALF);
    int64_t diff = 0;
    for (int64_t head = 0; head < n / hd; head++)
        for (int j = 0; j < hd / 2; j++)
            for (int c = 0; c < 2; c++)
                diff += xh[head * hd + c * hd / 2 + j] != xi[head * hd + 2 * j + c];
    printf("  rope half vs permuted interleaved: %lld of %lld differ (want 0, bit-exact)\n",
           (long long)diff, (long long)n);
    assert_int_equal(diff, 0);
    free(xi), free(xh);
}

static void attention_naive(double *out, const float *q, const float *k, const float *v, int B,
                            int T, int H, int KH, int hd)
{
    double *p = dvec(T);
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            int kh = h / (H / KH);
            for (int t = 0; t < T; t++) {
                const float *qt = q + ((int64_t)(b * T + t) * H + h) * hd;
                double mx = -INFINITY, sum = 0;
                for (int s = 0; s <= t; s++) {
                    const float *ks = k + ((int64_t)(b * T + s) * KH + kh) * hd;
                    double dot = 0;
                    for (int d = 0; d < hd; d++) dot += (double)qt[d] * ks[d];
                    p[s] = dot / sqrt((double)hd);
                    mx = p[s] > mx ? p[s] : mx;
                }
                for (int s = 0; s <= t; s++) sum += p[s] = exp(p[s] - mx);
                double *ot = out + ((int64_t)(b * T + t) * H + h) * hd;
                for (int d = 0; d < hd; d++) {
                    double acc = 0;
                    for (int s = 0; s <= t; s++)
                        acc += p[s] / sum * v[((int64_t)(b * T + s) * KH + kh) * hd + d];
                    ot[d] = acc;
                }
            }
        }
    free(p);
}

static void test_attention_gqa(void **state)
{
    (void)state;
    const int B = 2, T = 19, H = 8, KH = 2, hd = 16;
    const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KH * hd;
    lv_rng r;
    lv_rng_seed(&r, 15);
    float *q = fvec(nq), *k = fvec(nk), *v = fvec(nk), *out = fvec(nq);
    float *att = fvec((int64_t)kern_attention_scratch(T, H, omp_get_max_threads()));
    double *ref = dvec(nq);
    kc_fill(&r, q, nq, 1.0f, 0.0f);
    kc_fill(&r, k, nk, 1.0f, 0.0f);
    kc_fill(&r, v, nk, 1.0f, 0.0f);
    kern_attention_ref(out, q, k, v, B, T, H, KH, hd, att);
    attention_naive(ref, q, k, v, B, T, H, KH, hd);
    assert_int_equal(kc_compare("attention gqa 8/2", out, ref, nq, TOL_F32_ATOL, 1e-4), 0);
    /* MHA (KH = H) goes through the same code with group 1 */
    kern_attention_ref(out, q, q, q, B, T, H, H, hd, att);
    attention_naive(ref, q, q, q, B, T, H, H, hd);
    assert_int_equal(kc_compare("attention mha q=k=v", out, ref, nq, TOL_F32_ATOL, 1e-4), 0);
    free(q), free(k), free(v), free(out), free(att), free(ref);
}

/* The GEMM-tiled kern_attention_ref against its row-at-a-time twin and the double
 * loop: several tiles (T = 300 = 4 x 64 + 44), one and several key chunks per
 * sgemm (hd 8 and 64), every GQA ratio of 8 heads. Sharp scores (q scaled by 16,
 * score spread ~100) reach the softmax's clamp 87 below the row max. */
static void test_attention_tiled(void **state)
{
    (void)state;
    const int B = 3, T = 300, H = 8, hds[] = {8, 64}, khs[] = {8, 4, 2, 1};
    const int64_t nmax = (int64_t)B * T * H * 64;
    lv_rng r;
    lv_rng_seed(&r, 20);
    float *q = fvec(nmax), *k = fvec(nmax), *v = fvec(nmax), *out = fvec(nmax),
          *row = fvec(nmax);
    float *att = fvec((int64_t)kern_attention_scratch(T, H, omp_get_max_threads()));
    double *ref = dvec(nmax);
    for (int ih = 0; ih < 2; ih++)
        for (int ik = 0; ik < 4; ik++) {
            const int hd = hds[ih], KH = khs[ik];
            const int64_t nq = (int64_t)B * T * H * hd, nk = (int64_t)B * T * KH * hd;
            const float qscale = ik == 3 ? 16.0f : 1.0f;
            const double atol = ik == 3 ? TOL_ATTN_SHARP_ATOL : TOL_F32_ATOL;
            char name[64];
            kc_fill(&r, q, nq, qscale, 0.0f);
            kc_fill(&r, k, nk, 1.0f, 0.0f);
            kc_fill(&r, v, nk, 1.0f, 0.0f);
            kern_attention_ref(out, q, k, v, B, T, H, KH, hd, att);
            kern_attention_rowwise_ref(row, q, k, v, B, T, H, KH, hd, att);
            snprintf(name, sizeof name, "attn tiled/rowwise hd%d %d/%d", hd, H, KH);
            assert_int_equal(kc_compare_f(name, out, row, nq, atol, 1e-4, ref), 0);
            attention_naive(ref, q, k, v, B, T, H, KH, hd);
            snprintf(name, sizeof name, "attn tiled/naive hd%d %d/%d", hd, H, KH);
            assert_int_equal(kc_compare(name, out, ref, nq, atol, 1e-4), 0);
        }
    free(q), free(k), free(v), free(out), free(row), free(att), free(ref);
}

static void test_swiglu(void **state)
{
    (void)state;
    const int64_t n = 1001;
    lv_rng r;
    lv_rng_seed(&r, 16);
    float *g = fvec(n), *u = fvec(n), *out = fvec(n);
    double *ref = dvec(n);
    kc_fill(&r, g, n, 3.0f, 0.0f);
    kc_fill(&r, u, n, 1.0f, 0.0f);
    for (int64_t i = 0; i < n; i++) ref[i] = g[i] / (1.0 + exp(-(double)g[i])) * u[i];
    kern_swiglu_ref(out, g, u, n);
    assert_int_equal(kc_compare("swiglu", out, ref, n, TOL_F32_ATOL, TOL_F32_RTOL), 0);
    kern_swiglu_ref(g, g, u, n); /* out == gate */
    assert_int_equal(kc_compare("swiglu in place", g, ref, n, TOL_F32_ATOL, TOL_F32_RTOL), 0);
    free(g), free(u), free(out), free(ref);
}

static void test_softmax(void **state)
{
    (void)state;
    const int64_t n = 9;
    const int d = 301;
    lv_rng r;
    lv_rng_seed(&r, 17);
    float *x = fvec(n * d);
    double *ref = dvec(n * d), worst = 0;
    kc_fill(&r, x, n * d, 4.0f, 50.0f); /* large offset: needs the max shift */
    for (int64_t i = 0; i < n; i++) {
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < d; j++) mx = x[i * d + j] > mx ? x[i * d + j] : mx;
        for (int j = 0; j < d; j++) s += exp(x[i * d + j] - mx);
        for (int j = 0; j < d; j++) ref[i * d + j] = exp(x[i * d + j] - mx) / s;
    }
    kern_softmax_ref(x, n, d);
    assert_int_equal(kc_compare("softmax", x, ref, n * d, 1e-7, 1e-5), 0);
    for (int64_t i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < d; j++) s += x[i * d + j];
        worst = fabs(s - 1) > worst ? fabs(s - 1) : worst;
    }
    printf("  softmax max |row sum - 1| = %.3g\n", worst);
    assert_true(worst < 1e-5);
    free(x), free(ref);
}

static void test_xent(void **state)
{
    (void)state;
    const int64_t n = 23;
    const int vocab = 97;
    lv_rng r;
    lv_rng_seed(&r, 18);
    float *logits = fvec(n * vocab);
    int32_t *tg = calloc(n, sizeof *tg);
    kc_fill(&r, logits, n * vocab, 5.0f, -20.0f);
    double ref = 0;
    for (int64_t i = 0; i < n; i++) {
        tg[i] = i % 5 == 3 ? -1 : (int32_t)(lv_rng_u64(&r) % vocab);
        if (tg[i] < 0) continue;
        double mx = -INFINITY, s = 0;
        for (int j = 0; j < vocab; j++) mx = logits[i * vocab + j] > mx ? logits[i * vocab + j] : mx;
        for (int j = 0; j < vocab; j++) s += exp((double)logits[i * vocab + j] - mx);
        ref += mx + log(s) - logits[i * vocab + tg[i]];
    }
    double got = kern_xent_sum_ref(logits, tg, n, vocab);
    printf("  xent sum: got %.12g want %.12g diff %.3g\n", got, ref, fabs(got - ref));
    assert_true(fabs(got - ref) <= 1e-9 * fabs(ref));
    free(logits), free(tg);
}

static void test_embed(void **state)
{
    (void)state;
    const int vocab = 50, dim = 24;
    const int64_t n = 17;
    lv_rng r;
    lv_rng_seed(&r, 19);
    float *emb = fvec((int64_t)vocab * dim), *out = fvec(n * dim);
    int32_t tok[17];
    kc_fill(&r, emb, (int64_t)vocab * dim, 1.0f, 0.0f);
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(lv_rng_u64(&r) % vocab);
    kern_embed_ref(out, emb, tok, n, dim);
    for (int64_t i = 0; i < n; i++)
        assert_memory_equal(out + i * dim, emb + (int64_t)tok[i] * dim, dim * sizeof(float));
    free(emb), free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul),        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_rope_vs_naive), cmocka_unit_test(test_rope_half_equiv),
        cmocka_unit_test(test_attention_gqa), cmocka_unit_test(test_attention_tiled),
        cmocka_unit_test(test_swiglu),        cmocka_unit_test(test_softmax),
        cmocka_unit_test(test_xent),          cmocka_unit_test(test_embed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
