/* test_kern_qmm_forward.c: a quantized model run straight from its codes
 * (io_qmodel_view + the forward's kern_aq_gemm path) against the same model dequantized
 * to float weights (io_qmodel_to_fp + sgemm), on stories260K (jobs/demo).
 *
 * The quantized models are made here in a second, not by AQLM: per linear, plain
 * k-means on the weight groups (kern_kmeans_assign_ref, a few Lloyd steps), the second
 * codebook of 2x6g8 on the residual. Cruder than AQLM, but real quantized models for the
 * comparison, which is all that matters here. 2x6g8 cuts the last group of the 172-wide input of w2 (172 = 21*8 + 4).
 *
 * Checks, for 1x8g4 (the demo job's config) and 2x6g8:
 *  - eval perplexity with full windows (batched forward, the TILE algorithm) and with
 *    4-token windows one at a time (GATHER): |ppl_codes - ppl_fp| <= 1e-4 * ppl_fp;
 *  - KV-cache decoding (GATHER, one token at a time): every step's logits within
 *    1e-4 * max|logit| of the dequantized model's;
 *  - a view of a model whose linear has the wrong shape is refused. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <math.h>

#include "io.h"
#include "kern.h"
#include "stage.h"

#define TOL_PPL_REL 1e-4
#define TOL_LOGIT_REL 1e-4

static struct {
    lv_model *fp;
    io_tokenizer *tok;
    int32_t *tokens;
    int64_t n;
} g;

/* Codebook m of linear L: k-means (6 Lloyd steps) over the groups of the target
 * (weights, or residuals for m > 0), started from K groups spread over the matrix;
 * codes: the nearest vector. target (d_out * n_groups, g) is updated to the residual. */
static void fit_codebook(lv_aq_layer *L, int m, float *target)
{
    const int K = 1 << L->nbits, gs = L->g;
    const int64_t n = L->d_out * L->n_groups;
    float *cb = L->codebooks + (int64_t)m * K * gs; // (K, g)
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)n);
    double *sum = malloc(sizeof(double) * (size_t)K * gs);
    int64_t *cnt = malloc(sizeof(int64_t) * (size_t)K);
    assert_true(idx && sum && cnt);
    for (int k = 0; k < K; k++)
        memcpy(cb + (int64_t)k * gs, target + ((int64_t)k * 7919 % n) * gs, sizeof(float) * (size_t)gs);
    for (int it = 0; it < 6; it++) {
        kern_kmeans_assign_ref(idx, NULL, target, NULL, n, gs, cb, K);
        memset(sum, 0, sizeof(double) * (size_t)K * gs);
        memset(cnt, 0, sizeof(int64_t) * (size_t)K);
        for (int64_t t = 0; t < n; t++) {
            cnt[idx[t]]++;
            for (int a = 0; a < gs; a++) sum[(int64_t)idx[t] * gs + a] += target[t * gs + a];
        }
        for (int k = 0; k < K; k++) /* an empty cluster keeps its vector */
            for (int a = 0; cnt[k] && a < gs; a++)
                cb[(int64_t)k * gs + a] = (float)(sum[(int64_t)k * gs + a] / (double)cnt[k]);
    }
    kern_kmeans_assign_ref(idx, NULL, target, NULL, n, gs, cb, K);
    for (int64_t t = 0; t < n; t++) {
        L->codes[t * L->M + m] = (uint16_t)idx[t];
        for (int a = 0; a < gs; a++) target[t * gs + a] -= cb[(int64_t)idx[t] * gs + a];
    }
    free(cnt), free(sum), free(idx);
}

static lv_qmodel *make_qmodel(const lv_model *fp, int M, int nbits, int gs)
{
    lv_qmodel *q = NULL;
    assert_int_equal(lv_qmodel_init(&q, fp, M, nbits, gs), LV_OK);
    for (int l = 0; l < fp->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &q->blocks[l].lin[k];
            const float *w = lv_layer_weight(&fp->layers[l], (lv_lin)k); // (d_out, d_in)
            /* (d_out, n_groups, g): a cut last group (172 = 21*8 + 4) padded with zeros */
            float *target = calloc((size_t)(L->d_out * L->n_groups * gs), sizeof(float));
            assert_non_null(target);
            for (int64_t r = 0; r < L->d_out; r++)
                memcpy(target + r * L->n_groups * gs, w + r * L->d_in, sizeof(float) * (size_t)L->d_in);
            for (int m = 0; m < M; m++) fit_codebook(L, m, target);
            free(target);
        }
    return q;
}

static double eval_ppl(const lv_model *m, int ctx, int batch, int64_t max_tokens)
{
    stage_eval_opts o = {.ctx = ctx, .max_tokens = max_tokens, .batch = batch};
    stage_eval_result r = {0};
    assert_int_equal(stage_eval_ppl(m, g.tokens, g.n, &o, &r), LV_OK);
    return r.ppl;
}

static void expect_same_ppl(const char *what, const lv_model *codes, const lv_model *deq,
                            int ctx, int batch, int64_t max_tokens)
{
    double pc = eval_ppl(codes, ctx, batch, max_tokens), pd = eval_ppl(deq, ctx, batch, max_tokens);
    double rel = fabs(pc - pd) / pd;
    printf("  %-34s ppl from codes %.6f, dequantized %.6f: rel diff %.2g (tol %.0e)\n", what,
           pc, pd, rel, TOL_PPL_REL);
    assert_true(rel <= TOL_PPL_REL);
}

/* Greedy decoding of `steps` tokens with both models, fed the same tokens (the
 * dequantized model's choices); the logits of every step compared. */
static void expect_same_decode(const char *what, const lv_model *codes, const lv_model *deq,
                               int steps)
{
    kern_kv_cache *kc = NULL, *kd = NULL;
    assert_int_equal(kern_kv_cache_init(&kc, &codes->cfg, steps), LV_OK);
    assert_int_equal(kern_kv_cache_init(&kd, &deq->cfg, steps), LV_OK);
    const int V = deq->cfg.vocab_size;
    int32_t tok = 1; /* BOS */
    double worst = 0.0;
    for (int pos = 0; pos < steps; pos++) {
        const float *lc = NULL, *ld = NULL;
        assert_int_equal(kern_decode_step(codes, kc, tok, pos, &lc), LV_OK);
        assert_int_equal(kern_decode_step(deq, kd, tok, pos, &ld), LV_OK);
        double mx = 0.0, d = 0.0;
        int32_t best = 0;
        for (int v = 0; v < V; v++) {
            mx = fabs(ld[v]) > mx ? fabs(ld[v]) : mx;
            d = fabs((double)lc[v] - ld[v]) > d ? fabs((double)lc[v] - ld[v]) : d;
            if (ld[v] > ld[best]) best = v;
        }
        worst = d / mx > worst ? d / mx : worst;
        tok = best;
    }
    printf("  %-34s %d decode steps: max |logit diff| / max|logit| %.2g (tol %.0e)\n", what,
           steps, worst, TOL_LOGIT_REL);
    assert_true(worst <= TOL_LOGIT_REL);
    kern_kv_cache_free(kd);
    kern_kv_cache_free(kc);
}

static void run_config(int M, int nbits, int gs)
{
    char name[64];
    lv_qmodel *q = make_qmodel(g.fp, M, nbits, gs);
    lv_model *codes = NULL, *deq = NULL;
    assert_int_equal(io_qmodel_view(q, &codes), LV_OK);
    assert_int_equal(io_qmodel_to_fp(q, &deq), LV_OK);
    assert_null(codes->layers[0].wq);
    assert_ptr_equal(codes->layers[0].aq[LV_LIN_W2], &q->blocks[0].lin[LV_LIN_W2]);
    snprintf(name, sizeof name, "%dx%dg%d full windows", M, nbits, gs);
    expect_same_ppl(name, codes, deq, 0, 0, 0);
    snprintf(name, sizeof name, "%dx%dg%d 4-token windows", M, nbits, gs);
    expect_same_ppl(name, codes, deq, 4, 1, 2048);
    snprintf(name, sizeof name, "%dx%dg%d", M, nbits, gs);
    expect_same_decode(name, codes, deq, 128);
    io_model_free(deq);
    io_model_free(codes);
    lv_qmodel_free(q);
}

static void test_1x8g4(void **state) { (void)state; run_config(1, 8, 4); }
static void test_2x6g8(void **state) { (void)state; run_config(2, 6, 8); }

static void test_view_checks(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(g.fp, 1, 4, 4);
    lv_model *m = NULL;
    assert_int_equal(io_qmodel_view(NULL, &m), LV_ERR_INVALID_ARG);
    q->blocks[1].lin[LV_LIN_WK].d_out -= 1;
    assert_int_equal(io_qmodel_view(q, &m), LV_ERR_INVALID_ARG);
    assert_null(m);
    char line[256];
    lv_last_error_line(line, sizeof line);
    printf("  wrong shape refused: %s\n", line);
    q->blocks[1].lin[LV_LIN_WK].d_out += 1;
    lv_qmodel_free(q);
}

static int setup(void **state)
{
    (void)state;
    const char *demo = getenv("LLMVQ_DEMO_DIR");
    char mp[1024], tp[1024], dp[1024];
    if (!demo) return -1;
    snprintf(mp, sizeof mp, "%s/stories260K.bin", demo);
    snprintf(tp, sizeof tp, "%s/tok512.bin", demo);
    snprintf(dp, sizeof dp, "%s/tinystories_val_subset.txt", demo);
    if (io_model_open(&g.fp, mp, IO_MODEL_AUTO) != LV_OK ||
        io_tokenizer_open(&g.tok, tp, g.fp->cfg.vocab_size) != LV_OK ||
        io_data_tokens(dp, g.tok, g.fp->cfg.vocab_size, &g.tokens, &g.n) != LV_OK) {
        fprintf(stderr, "setup: %s\n", lv_last_error());
        return -1;
    }
    if (g.n > 32768) g.n = 32768; /* 64 windows of 512: enough, and quick */
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    free(g.tokens);
    io_tokenizer_free(g.tok);
    io_model_free(g.fp);
    return 0;
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_1x8g4),
        cmocka_unit_test(test_2x6g8),
        cmocka_unit_test(test_view_checks),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
