/* test_kern_forward.c: the batched GEMM forward and the KV-cache decoder against
 * a naive per-token double-precision forward (llama2.c run.c semantics, see
 * shared/data/README.md), batch independence, and RoPE HALF == permuted INTERLEAVED. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kern.h"
#include "kern_check.h"

/* Logits here are O(10), so 1e-4 is ~100 float ulps: enough for OpenBLAS picking
 * other kernels (summation orders) for other row counts, far below any real bug. */
#define LOGIT_ATOL 1e-4
#define LOGIT_RTOL 1e-5

#define TB 3  /* batch */
#define TT 17 /* tokens per sequence */

/* A random model whose arrays the test owns (storage = NULL; never io_model_free). */
typedef struct {
    lv_model m;
    float *arena;
} test_model;

/* Next n floats of the arena at *p, filled with normal * scale + shift. */
static float *take(lv_rng *r, float **p, int64_t n, float scale, float shift)
{
    float *a = *p;
    *p += n;
    kc_fill(r, a, n, scale, shift);
    return a;
}

static void model_build(test_model *tm, uint64_t seed)
{
    lv_model_config c = {.dim = 64, .hidden_dim = 172, .n_layers = 2, .n_heads = 8,
                         .n_kv_heads = 4, .vocab_size = 97, .seq_len = 32, .norm_eps = 1e-5f,
                         .rope_theta = 10000.0f, .rope = LV_ROPE_INTERLEAVED, .tied_cls = 1};
    int64_t dim = c.dim, kv = lv_cfg_kv_dim(&c), hid = c.hidden_dim;
    tm->arena = calloc((size_t)lv_cfg_n_params(&c), sizeof(float));
    tm->m = (lv_model){.cfg = c, .layers = calloc(c.n_layers, sizeof(lv_layer))};
    assert_non_null(tm->arena);
    assert_non_null(tm->m.layers);
    lv_rng r;
    lv_rng_seed(&r, seed);
    float *p = tm->arena;
    const float s = 1.0f / 8.0f; /* ~1/sqrt(dim) */
    tm->m.tok_emb = tm->m.wcls = take(&r, &p, c.vocab_size * dim, 1.0f, 0.0f);
    for (int l = 0; l < c.n_layers; l++) {
        lv_layer *L = &tm->m.layers[l];
        L->attn_norm = take(&r, &p, dim, 0.1f, 1.0f);
        L->wq = take(&r, &p, dim * dim, s, 0.0f);
        L->wk = take(&r, &p, kv * dim, s, 0.0f);
        L->wv = take(&r, &p, kv * dim, s, 0.0f);
        L->wo = take(&r, &p, dim * dim, s, 0.0f);
        L->ffn_norm = take(&r, &p, dim, 0.1f, 1.0f);
        L->w1 = take(&r, &p, hid * dim, s, 0.0f);
        L->w2 = take(&r, &p, dim * hid, 1.0f / 13.0f, 0.0f); /* ~1/sqrt(hidden) */
        L->w3 = take(&r, &p, hid * dim, s, 0.0f);
    }
    tm->m.final_norm = take(&r, &p, dim, 0.1f, 1.0f);
    assert_true(p - tm->arena == lv_cfg_n_params(&c));
}

static void model_free(test_model *tm)
{
    free(tm->arena);
    free(tm->m.layers);
}

/* ---- naive reference: one token at a time, double, run.c semantics ---- */

static void ref_rmsnorm(double *o, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * (inv * x[i]);
}

// o (d) = W (d, n) x (n)
static void ref_matvec(double *o, const double *x, const float *W, int n, int d)
{
    for (int i = 0; i < d; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) s += (double)W[(int64_t)i * n + j] * x[j];
        o[i] = s;
    }
}

/* run.c RoPE: adjacent pairs (i, i+1), freq = 1/theta^((i % hs)/hs), over n values. */
static void ref_rope(double *v, int n, int hs, int pos, double theta)
{
    for (int i = 0; i < n; i += 2) {
        double a = pos / pow(theta, (double)(i % hs) / hs);
        double v0 = v[i], v1 = v[i + 1];
        v[i] = v0 * cos(a) - v1 * sin(a);
        v[i + 1] = v0 * sin(a) + v1 * cos(a);
    }
}

static void ref_attention(double *out, const double *q, const double *kc, const double *vc,
                          int pos, const lv_model_config *c)
{
    int hs = lv_cfg_head_dim(c), kvd = lv_cfg_kv_dim(c), grp = c->n_heads / c->n_kv_heads;
    double att[TT];
    for (int h = 0; h < c->n_heads; h++) {
        const double *qh = q + h * hs;
        int off = (h / grp) * hs;
        double mx = -INFINITY, sum = 0;
        for (int s = 0; s <= pos; s++) {
            double d = 0;
            for (int i = 0; i < hs; i++) d += qh[i] * kc[s * kvd + off + i];
            att[s] = d / sqrt((double)hs);
            mx = att[s] > mx ? att[s] : mx;
        }
        for (int s = 0; s <= pos; s++) sum += att[s] = exp(att[s] - mx);
        for (int i = 0; i < hs; i++) {
            double o = 0;
            for (int s = 0; s <= pos; s++) o += att[s] / sum * vc[s * kvd + off + i];
            out[h * hs + i] = o;
        }
    }
}

/* logits (T, vocab) of one sequence of T <= TT tokens. */
static void ref_forward(const lv_model *m, const int32_t *tok, int T, double *logits)
{
    const lv_model_config *c = &m->cfg;
    int dim = c->dim, kvd = lv_cfg_kv_dim(c), hid = c->hidden_dim, hs = lv_cfg_head_dim(c);
    double x[64], xb[64], q[64], ao[64], tmp[64], h1[172], h3[172];
    double *kc = calloc((size_t)c->n_layers * TT * kvd, sizeof(double)); // (L, TT, kv_dim)
    double *vc = calloc((size_t)c->n_layers * TT * kvd, sizeof(double)); // (L, TT, kv_dim)
    assert_true(dim <= 64 && hid <= 172 && T <= TT);
    for (int pos = 0; pos < T; pos++) {
        for (int i = 0; i < dim; i++) x[i] = m->tok_emb[(int64_t)tok[pos] * dim + i];
        for (int l = 0; l < c->n_layers; l++) {
            const lv_layer *L = &m->layers[l];
            double *kr = kc + ((int64_t)l * TT + pos) * kvd, *vr = vc + ((int64_t)l * TT + pos) * kvd;
            ref_rmsnorm(xb, x, L->attn_norm, dim, c->norm_eps);
            ref_matvec(q, xb, L->wq, dim, dim);
            ref_matvec(kr, xb, L->wk, dim, kvd);
            ref_matvec(vr, xb, L->wv, dim, kvd);
            ref_rope(q, dim, hs, pos, c->rope_theta);
            ref_rope(kr, kvd, hs, pos, c->rope_theta);
            ref_attention(ao, q, kc + (int64_t)l * TT * kvd, vc + (int64_t)l * TT * kvd, pos, c);
            ref_matvec(tmp, ao, L->wo, dim, dim);
            for (int i = 0; i < dim; i++) x[i] += tmp[i];
            ref_rmsnorm(xb, x, L->ffn_norm, dim, c->norm_eps);
            ref_matvec(h1, xb, L->w1, dim, hid);
            ref_matvec(h3, xb, L->w3, dim, hid);
            for (int i = 0; i < hid; i++) h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
            ref_matvec(tmp, h1, L->w2, hid, dim);
            for (int i = 0; i < dim; i++) x[i] += tmp[i];
        }
        ref_rmsnorm(xb, x, m->final_norm, dim, c->norm_eps);
        ref_matvec(logits + (int64_t)pos * c->vocab_size, xb, m->wcls, dim, c->vocab_size);
    }
    free(kc);
    free(vc);
}

static void make_tokens(int32_t *tok, int64_t n, int vocab, uint64_t seed)
{
    lv_rng r;
    lv_rng_seed(&r, seed);
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)(lv_rng_u64(&r) % vocab);
}

static void test_forward_vs_naive(void **state)
{
    (void)state;
    test_model tm;
    model_build(&tm, 101);
    const int V = tm.m.cfg.vocab_size;
    int32_t tok[TB * TT];
    make_tokens(tok, TB * TT, V, 7);
    kern_fwd_ws *ws = NULL;
    const float *logits = NULL;
    assert_int_equal(kern_fwd_ws_init(&ws, &tm.m.cfg, TB, TT, 1), LV_OK);
    assert_int_equal(kern_model_forward(&tm.m, tok, TB, TT, ws, &logits), LV_OK);
    double *ref = calloc((size_t)TB * TT * V, sizeof(double));
    for (int b = 0; b < TB; b++) ref_forward(&tm.m, tok + b * TT, TT, ref + (int64_t)b * TT * V);
    assert_int_equal(kc_compare("model forward vs naive", logits, ref, (int64_t)TB * TT * V,
                                1e-4, 1e-4),
                     0);
    free(ref);
    kern_fwd_ws_free(ws);
    model_free(&tm);
}

static void test_decode_matches_forward(void **state)
{
    (void)state;
    test_model tm;
    model_build(&tm, 102);
    const int V = tm.m.cfg.vocab_size;
    int32_t tok[TB * TT];
    make_tokens(tok, TB * TT, V, 8);
    kern_fwd_ws *ws = NULL;
    kern_kv_cache *kv = NULL;
    const float *logits = NULL, *step = NULL;
    assert_int_equal(kern_fwd_ws_init(&ws, &tm.m.cfg, TB, TT, 1), LV_OK);
    assert_int_equal(kern_kv_cache_init(&kv, &tm.m.cfg, TT), LV_OK);
    assert_int_equal(kern_model_forward(&tm.m, tok, TB, TT, ws, &logits), LV_OK);
    float *dec = calloc((size_t)TB * TT * V, sizeof(float));
    double *scratch = calloc((size_t)TB * TT * V, sizeof(double));
    for (int b = 0; b < TB; b++)
        for (int t = 0; t < TT; t++) {
            assert_int_equal(kern_decode_step(&tm.m, kv, tok[b * TT + t], t, &step), LV_OK);
            memcpy(dec + ((int64_t)b * TT + t) * V, step, (size_t)V * sizeof(float));
        }
    assert_int_equal(kc_compare_f("decode vs forward", dec, logits, (int64_t)TB * TT * V, 1e-4,
                                  1e-4, scratch),
                     0);
    /* out-of-range position and token are rejected */
    assert_int_equal(kern_decode_step(&tm.m, kv, 0, TT, &step), LV_ERR_INVALID_ARG);
    assert_int_equal(kern_decode_step(&tm.m, kv, V, 0, &step), LV_ERR_INVALID_ARG);
    free(dec);
    free(scratch);
    kern_kv_cache_free(kv);
    kern_fwd_ws_free(ws);
    model_free(&tm);
}

static void test_batch_independence(void **state)
{
    (void)state;
    test_model tm;
    model_build(&tm, 103);
    const int V = tm.m.cfg.vocab_size;
    int32_t tok[TB * TT];
    make_tokens(tok, TB * TT, V, 9);
    kern_fwd_ws *ws = NULL;
    const float *logits = NULL, *one = NULL;
    assert_int_equal(kern_fwd_ws_init(&ws, &tm.m.cfg, TB, TT, 1), LV_OK);
    assert_int_equal(kern_model_forward(&tm.m, tok, TB, TT, ws, &logits), LV_OK);
    float *batched = malloc((size_t)TB * TT * V * sizeof(float));
    double *scratch = calloc((size_t)TT * V, sizeof(double));
    memcpy(batched, logits, (size_t)TB * TT * V * sizeof(float));
    for (int b = 0; b < TB; b++) {
        assert_int_equal(kern_model_forward(&tm.m, tok + b * TT, 1, TT, ws, &one), LV_OK);
        char name[64];
        snprintf(name, sizeof name, "seq %d alone vs in batch", b);
        assert_int_equal(kc_compare_f(name, one, batched + (int64_t)b * TT * V, (int64_t)TT * V,
                                      LOGIT_ATOL, LOGIT_RTOL, scratch),
                         0);
    }
    /* a batch larger than the workspace and a bad token are rejected */
    assert_int_equal(kern_model_forward(&tm.m, tok, TB + 1, TT, ws, &one), LV_ERR_INVALID_ARG);
    tok[5] = -1;
    assert_int_equal(kern_model_forward(&tm.m, tok, TB, TT, ws, &one), LV_ERR_INVALID_ARG);
    free(batched);
    free(scratch);
    kern_fwd_ws_free(ws);
    model_free(&tm);
}

/* Interleaved row h*hd + 2j + c of wq/wk becomes HALF row h*hd + c*(hd/2) + j. */
static float *permute_rows_half(const float *w, int n_heads, int hd, int d_in)
{
    float *p = malloc((size_t)n_heads * hd * d_in * sizeof(float));
    for (int h = 0; h < n_heads; h++)
        for (int j = 0; j < hd / 2; j++)
            for (int c = 0; c < 2; c++)
                memcpy(p + ((int64_t)h * hd + c * (hd / 2) + j) * d_in,
                       w + ((int64_t)h * hd + 2 * j + c) * d_in, (size_t)d_in * sizeof(float));
    return p;
}

static void test_rope_half_model(void **state)
{
    (void)state;
    test_model tm;
    model_build(&tm, 104);
    const lv_model_config *c = &tm.m.cfg;
    const int V = c->vocab_size, hd = lv_cfg_head_dim(c);
    int32_t tok[TB * TT];
    make_tokens(tok, TB * TT, V, 10);
    lv_model half = tm.m;
    half.cfg.rope = LV_ROPE_HALF;
    half.layers = calloc(c->n_layers, sizeof(lv_layer));
    float **owned = calloc(2 * c->n_layers, sizeof(float *));
    for (int l = 0; l < c->n_layers; l++) {
        half.layers[l] = tm.m.layers[l];
        half.layers[l].wq = owned[2 * l] =
            permute_rows_half(tm.m.layers[l].wq, c->n_heads, hd, c->dim);
        half.layers[l].wk = owned[2 * l + 1] =
            permute_rows_half(tm.m.layers[l].wk, c->n_kv_heads, hd, c->dim);
    }
    kern_fwd_ws *ws = NULL;
    const float *logits = NULL;
    float *inter = malloc((size_t)TB * TT * V * sizeof(float));
    double *scratch = calloc((size_t)TB * TT * V, sizeof(double));
    assert_int_equal(kern_fwd_ws_init(&ws, c, TB, TT, 1), LV_OK);
    assert_int_equal(kern_model_forward(&tm.m, tok, TB, TT, ws, &logits), LV_OK);
    memcpy(inter, logits, (size_t)TB * TT * V * sizeof(float));
    assert_int_equal(kern_model_forward(&half, tok, TB, TT, ws, &logits), LV_OK);
    assert_int_equal(kc_compare_f("rope half model vs interleaved", logits, inter,
                                  (int64_t)TB * TT * V, LOGIT_ATOL, LOGIT_RTOL, scratch),
                     0);
    for (int i = 0; i < 2 * c->n_layers; i++) free(owned[i]);
    free(owned);
    free(half.layers);
    free(inter);
    free(scratch);
    kern_fwd_ws_free(ws);
    model_free(&tm);
}

static void test_bad_config(void **state)
{
    (void)state;
    lv_model_config c = {.dim = 64, .hidden_dim = 172, .n_layers = 2, .n_heads = 8,
                         .n_kv_heads = 3, .vocab_size = 97, .seq_len = 32};
    kern_fwd_ws *ws = (kern_fwd_ws *)&c; /* must be reset to NULL on failure */
    assert_int_equal(kern_fwd_ws_init(&ws, &c, 2, 4, 0), LV_ERR_INVALID_ARG);
    assert_null(ws);
    printf("  rejected: %s\n", lv_last_error());
    c.n_kv_heads = 4;
    assert_int_equal(kern_fwd_ws_init(&ws, &c, 0, 4, 0), LV_ERR_INVALID_ARG);
    kern_fwd_ws_free(NULL);
    kern_kv_cache_free(NULL);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_vs_naive),   cmocka_unit_test(test_decode_matches_forward),
        cmocka_unit_test(test_batch_independence), cmocka_unit_test(test_rope_half_model),
        cmocka_unit_test(test_bad_config),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
