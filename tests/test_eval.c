/* test_eval.c: perplexity and generation on the real stories260K model.
 * Golden values from ../shared/data/README.md: ppl 4.742 on the TinyStories
 * text (ctx 512) and llama2.c's greedy sample. Also the windowing convention
 * against a window-by-window recomputation, eval invariants and bad inputs. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include "io.h"
#include "kern.h"
#include "lv.h"
#include "stage.h"

#define REF_PPL 4.742

typedef struct {
    lv_model *m;
    io_tokenizer *tok;
    int32_t *tokens; /* the whole TinyStories text, BOS first */
    int64_t n;
    char text_path[1024];
    char dir[256];
} fixture;

static fixture g;

static void assert_error_has(const char *a, const char *b)
{
    char line[1024];
    lv_last_error_line(line, sizeof line);
    if (!strstr(line, a) || (b && !strstr(line, b)))
        fail_msg("error \"%s\" lacks \"%s\" / \"%s\"", line, a, b ? b : "");
}

static int setup(void **state)
{
    (void)state;
    const char *demo = getenv("LLMVQ_DEMO_DIR");
    if (!demo) return -1;
    char mp[1024], tp[1024];
    snprintf(mp, sizeof mp, "%s/stories260K.bin", demo);
    snprintf(tp, sizeof tp, "%s/tok512.bin", demo);
    snprintf(g.text_path, sizeof g.text_path, "%s/tinystories_val_subset.txt", demo);
    if (io_model_open(&g.m, mp, IO_MODEL_AUTO) != LV_OK ||
        io_tokenizer_open(&g.tok, tp, g.m->cfg.vocab_size) != LV_OK ||
        io_data_tokens(g.text_path, g.tok, g.m->cfg.vocab_size, &g.tokens, &g.n) != LV_OK) {
        fprintf(stderr, "setup: %s\n", lv_last_error());
        return -1;
    }
    snprintf(g.dir, sizeof g.dir, "/tmp/llmvq_test_eval.XXXXXX");
    return mkdtemp(g.dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    static const char *const names[] = {"same.tok", "empty.txt", "bad.tok"};
    char p[1024];
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        snprintf(p, sizeof p, "%s/%s", g.dir, names[i]);
        remove(p);
    }
    rmdir(g.dir);
    free(g.tokens);
    io_tokenizer_free(g.tok);
    io_model_free(g.m);
    return 0;
}

static stage_eval_result eval_ok(const int32_t *tk, int64_t n, int ctx, int64_t max_tokens,
                                 int batch)
{
    stage_eval_opts o = {.ctx = ctx, .max_tokens = max_tokens, .batch = batch};
    stage_eval_result r = {0};
    if (stage_eval_ppl(g.m, tk, n, &o, &r) != LV_OK) fail_msg("eval: %s", lv_last_error());
    return r;
}

/* (a) the golden perplexity */
static void test_golden_ppl(void **state)
{
    (void)state;
    stage_eval_opts o = {.ctx = 512, .progress = 1};
    stage_eval_result r = {0};
    assert_int_equal(stage_eval_ppl(g.m, g.tokens, g.n, &o, &r), LV_OK);
    printf("  stories260K ctx 512: ppl %.17g nll %.17g n_tokens %lld n_predicted %lld\n", r.ppl,
           r.nll, (long long)r.n_tokens, (long long)r.n_predicted);
    const char *th = getenv("OMP_NUM_THREADS");
    printf("  %.3f s, %.0f tokens/s (OMP_NUM_THREADS=%s)\n", r.wall_s, r.tokens_per_s,
           th ? th : "unset");
    assert_int_equal(r.n_tokens, g.n);
    assert_int_equal(r.n_predicted, g.n - 1);
    assert_int_equal(r.ctx, 512);
    assert_true(fabs(r.ppl / REF_PPL - 1.0) < 0.005);
    assert_true(fabs(exp(r.nll) - r.ppl) < 1e-12 * r.ppl);
}

/* The convention, recomputed window by window with its own log-softmax:
 * window k = tokens [k*ctx, min((k+1)*ctx, n)), position p -> token k*ctx+p+1. */
static double nll_by_windows(const int32_t *tk, int64_t n, int ctx, int64_t *n_pred)
{
    const int V = g.m->cfg.vocab_size;
    kern_fwd_ws *ws = NULL;
    assert_int_equal(kern_fwd_ws_init(&ws, &g.m->cfg, 1, ctx, 1), LV_OK);
    double sum = 0;
    *n_pred = 0;
    for (int64_t s = 0; s < n; s += ctx) {
        int len = (int)(n - s < ctx ? n - s : ctx);
        const float *lg = NULL;
        assert_int_equal(kern_model_forward(g.m, tk + s, 1, len, ws, &lg), LV_OK);
        for (int p = 0; p < len && s + p + 1 < n; p++) {
            const float *row = lg + (int64_t)p * V;
            double mx = row[0], z = 0;
            for (int v = 1; v < V; v++) mx = row[v] > mx ? row[v] : mx;
            for (int v = 0; v < V; v++) z += exp(row[v] - mx);
            sum += mx + log(z) - row[tk[s + p + 1]];
            (*n_pred)++;
        }
    }
    kern_fwd_ws_free(ws);
    return sum / (double)*n_pred;
}

static void test_convention(void **state)
{
    (void)state;
    /* full windows only, a 1-token tail (predicts nothing), a short tail */
    const int64_t ns[] = {128, 129, 150, 40};
    for (size_t i = 0; i < sizeof ns / sizeof *ns; i++) {
        int64_t np = 0;
        double want = nll_by_windows(g.tokens, ns[i], 64, &np);
        for (int batch = 1; batch <= 3; batch++) {
            stage_eval_result r = eval_ok(g.tokens, g.n, 64, ns[i], batch);
            assert_int_equal(r.n_tokens, ns[i]);
            assert_int_equal(r.n_predicted, np);
            assert_int_equal(np, ns[i] - 1);
            if (fabs(r.nll - want) > 1e-5 * want)
                fail_msg("n %lld batch %d: nll %.9g, by windows %.9g", (long long)ns[i], batch,
                         r.nll, want);
        }
    }
}

/* (c) invariants */
static void test_invariants(void **state)
{
    (void)state;
    stage_eval_result a = eval_ok(g.tokens, g.n, 512, 3000, 0);
    assert_int_equal(a.n_tokens, 3000);
    assert_int_equal(a.n_predicted, 2999);
    stage_eval_result c64 = eval_ok(g.tokens, g.n, 64, 20000, 0);
    stage_eval_result c512 = eval_ok(g.tokens, g.n, 512, 20000, 0);
    stage_eval_result c0 = eval_ok(g.tokens, g.n, 0, 20000, 0);
    printf("  20000 tokens: ppl ctx 64 %.6f, ctx 512 %.6f\n", c64.ppl, c512.ppl);
    assert_true(isfinite(c64.ppl) && isfinite(c512.ppl));
    assert_true(c64.ppl > c512.ppl);
    assert_int_equal(c0.ctx, 512); /* ctx <= 0: the model's seq_len */
    assert_true(c0.ppl == c512.ppl);
    /* batching does not change the result beyond float summation order */
    stage_eval_result b1 = eval_ok(g.tokens, g.n, 512, 20000, 1);
    assert_true(fabs(b1.nll - c512.nll) < 1e-6 * c512.nll);

    /* a token file with the same tokens gives the identical perplexity */
    char path[1024];
    snprintf(path, sizeof path, "%s/same.tok", g.dir);
    assert_int_equal(io_tokens_write(path, g.tokens, 20000, g.m->cfg.vocab_size), LV_OK);
    int32_t *tk = NULL;
    int64_t n = 0;
    assert_int_equal(io_data_tokens(path, NULL, g.m->cfg.vocab_size, &tk, &n), LV_OK);
    assert_int_equal(n, 20000);
    stage_eval_result f = eval_ok(tk, n, 512, 0, 0);
    assert_true(f.ppl == c512.ppl && f.nll == c512.nll);
    free(tk);
}

/* (d) bad inputs */
static void test_bad_inputs(void **state)
{
    (void)state;
    char path[1024];
    int32_t *tk = NULL;
    int64_t n = 0;
    const int V = g.m->cfg.vocab_size;
    snprintf(path, sizeof path, "%s/empty.txt", g.dir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fclose(f);
    assert_int_not_equal(io_data_tokens(path, g.tok, V, &tk, &n), LV_OK);
    assert_error_has(path, "empty data file");
    snprintf(path, sizeof path, "%s/does_not_exist.txt", g.dir);
    assert_int_not_equal(io_data_tokens(path, g.tok, V, &tk, &n), LV_OK);
    assert_error_has(path, "cannot open");
    assert_null(tk);

    /* a token file whose ids do not fit this model */
    int32_t big[3] = {1, 700, 5};
    snprintf(path, sizeof path, "%s/bad.tok", g.dir);
    assert_int_equal(io_tokens_write(path, big, 3, 1000), LV_OK);
    assert_int_not_equal(io_data_tokens(path, g.tok, V, &tk, &n), LV_OK);
    assert_error_has(path, "id 700");

    stage_eval_opts o = {.ctx = 512};
    stage_eval_result r = {0};
    assert_int_not_equal(stage_eval_ppl(g.m, big, 3, &o, &r), LV_OK);
    assert_error_has("token 1 has id 700", "vocabulary");
    o.ctx = 1024;
    assert_int_not_equal(stage_eval_ppl(g.m, g.tokens, 5000, &o, &r), LV_OK);
    assert_error_has("ctx 1024 exceeds the model's seq_len 512", NULL);
    o.ctx = 64;
    assert_int_not_equal(stage_eval_ppl(g.m, g.tokens, 1, &o, &r), LV_OK);
    assert_error_has("at least 2", NULL);
}

/* ------------------------------------------------------------ generation */

typedef struct {
    char text[8192];
    size_t len;
    int n_emit;
} gen_buf;

static void emit_text(void *user, int32_t prev, int32_t token)
{
    gen_buf *b = user;
    const char *p = io_tokenizer_decode(g.tok, prev, token);
    size_t l = strlen(p);
    if (b->len + l < sizeof b->text) {
        memcpy(b->text + b->len, p, l);
        b->len += l;
        b->text[b->len] = '\0';
    }
    b->n_emit++;
}

static void generate(const stage_gen_opts *o, gen_buf *b, int32_t **out, int *n_out)
{
    const int32_t bos = 1;
    memset(b, 0, sizeof *b);
    if (stage_generate(g.m, &bos, 1, o, emit_text, b, out, n_out) != LV_OK)
        fail_msg("generate: %s", lv_last_error());
}

/* (b) the golden greedy sample */
static void test_greedy(void **state)
{
    (void)state;
    static const char want[] = "Once upon a time, there was a little girl named Lily. She loved "
                               "to play outside in the park. One day, she saw a big, red ball.";
    stage_gen_opts o = {.steps = 256, .temperature = 0.0f};
    gen_buf b;
    int32_t *out = NULL;
    int n = 0;
    generate(&o, &b, &out, &n);
    printf("  greedy (%d tokens): %.160s...\n", n, b.text);
    assert_int_equal(strncmp(b.text, want, strlen(want)), 0);
    assert_true(n >= 2 && n <= 257 && out[0] == 1);
    assert_int_equal(b.n_emit, n - 1);
    free(out);

    /* a tiny nucleus holds only the most likely token: the same text */
    stage_gen_opts on = {.steps = 256, .temperature = 1.0f, .top_p = 1e-6f, .seed = 5};
    gen_buf bn;
    generate(&on, &bn, &out, &n);
    assert_string_equal(bn.text, b.text);
    free(out);
}

static void test_sampling(void **state)
{
    (void)state;
    stage_gen_opts o = {.steps = 200, .temperature = 1.0f, .top_p = 0.9f, .seed = 42};
    gen_buf a, b;
    int32_t *oa = NULL, *ob = NULL;
    int na = 0, nb = 0;
    generate(&o, &a, &oa, &na);
    generate(&o, &b, &ob, &nb);
    assert_int_equal(na, nb);
    assert_memory_equal(oa, ob, (size_t)na * sizeof *oa);
    for (int i = 1; i < na; i++) assert_true(oa[i] > 2 && oa[i] < g.m->cfg.vocab_size);
    free(ob);
    o.seed = 43;
    generate(&o, &b, &ob, &nb);
    assert_true(na != nb || memcmp(oa, ob, (size_t)na * sizeof *oa) != 0);
    free(ob);
    o.top_p = 0.0f; /* full distribution */
    generate(&o, &b, &ob, &nb);
    assert_true(nb >= 2 && nb <= 201);
    free(ob);
    free(oa);

    /* a prompt is kept and continued; bad prompts are refused */
    int32_t *pt = NULL, *out = NULL;
    int64_t np = 0;
    int n = 0;
    assert_int_equal(io_tokenizer_encode(g.tok, "Once upon a time", 16, 1, 0, &pt, &np), LV_OK);
    stage_gen_opts og = {.steps = 40, .temperature = 0.0f};
    assert_int_equal(stage_generate(g.m, pt, (int)np, &og, NULL, NULL, &out, &n), LV_OK);
    assert_true(n > np && n <= 41);
    assert_memory_equal(out, pt, (size_t)np * sizeof *pt);
    free(out);
    assert_int_not_equal(stage_generate(g.m, pt + 1, (int)np - 1, &og, NULL, NULL, &out, &n),
                         LV_OK);
    assert_error_has("must start with BOS", NULL);
    free(pt);
}

int main(void)
{
    lv_log_set_quiet(getenv("LLMVQ_TEST_VERBOSE") == NULL);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_golden_ppl),
        cmocka_unit_test(test_convention),
        cmocka_unit_test(test_invariants),
        cmocka_unit_test(test_bad_inputs),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_sampling),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
