/* test_model_logits.c: the same real model (stories260K) in llama2.c .bin form
 * and converted to an HF directory (q/k permuted for rotate-half RoPE) gives
 * the same logits to 1e-4 relative; the llama2.c writer round-trips bit-exactly. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "io.h"
#include "kern.h"

static char g_model[4096], g_tmp[4096];

static void forward_logits(const lv_model *m, const int32_t *tok, int B, int T, float *out)
{
    kern_fwd_ws *ws = NULL;
    const float *logits = NULL;
    assert_int_equal(kern_fwd_ws_init(&ws, &m->cfg, B, T, 1), LV_OK);
    assert_int_equal(kern_model_forward(m, tok, B, T, ws, &logits), LV_OK);
    memcpy(out, logits, sizeof(float) * (size_t)B * T * m->cfg.vocab_size);
    kern_fwd_ws_free(ws);
}

static void test_bin_vs_hf(void **state)
{
    (void)state;
    lv_model *a = NULL, *b = NULL, *c = NULL;
    assert_int_equal(io_model_open(&a, g_model, IO_MODEL_AUTO), LV_OK);
    char hf[4200], bin[4200];
    snprintf(hf, sizeof hf, "%s/hf", g_tmp);
    snprintf(bin, sizeof bin, "%s/rt.bin", g_tmp);
    assert_int_equal(io_model_write_hf(a, hf), LV_OK);
    assert_int_equal(io_model_open(&b, hf, IO_MODEL_AUTO), LV_OK);
    assert_int_equal(b->cfg.rope, LV_ROPE_HALF);
    assert_int_equal(a->cfg.rope, LV_ROPE_INTERLEAVED);

    const int B = 2, T = 200, V = a->cfg.vocab_size;
    int32_t *tok = malloc(sizeof(int32_t) * B * T);
    lv_rng r;
    lv_rng_seed(&r, 11);
    for (int i = 0; i < B * T; i++) tok[i] = (int32_t)(lv_rng_u64(&r) % (uint64_t)V);
    tok[0] = tok[T] = 1; /* BOS */
    size_t n = (size_t)B * T * V;
    float *la = malloc(sizeof(float) * n), *lb = malloc(sizeof(float) * n),
          *lc = malloc(sizeof(float) * n);
    forward_logits(a, tok, B, T, la);
    forward_logits(b, tok, B, T, lb);
    double maxabs = 0, maxdiff = 0;
    for (size_t i = 0; i < n; i++) {
        maxabs = fmax(maxabs, fabs(la[i]));
        maxdiff = fmax(maxdiff, fabs((double)la[i] - lb[i]));
    }
    printf("bin vs hf: max |logit| %.4f, max |diff| %.3g, relative %.3g\n", maxabs, maxdiff,
           maxdiff / maxabs);
    assert_true(maxdiff <= 1e-4 * maxabs);

    /* llama2.c writer: bit-exact round trip from the HF form back to .bin */
    assert_int_equal(io_model_write_llama2c(b, bin), LV_OK);
    assert_int_equal(io_model_open(&c, bin, IO_MODEL_AUTO), LV_OK);
    forward_logits(c, tok, B, T, lc);
    assert_memory_equal(la, lc, sizeof(float) * n);

    free(la);
    free(lb);
    free(lc);
    free(tok);
    io_model_free(a);
    io_model_free(b);
    io_model_free(c);
}

int main(void)
{
    const char *demo = getenv("LLMVQ_DEMO_DIR");
    if (!demo) {
        fprintf(stderr, "LLMVQ_DEMO_DIR not set\n");
        return 77;
    }
    snprintf(g_model, sizeof g_model, "%s/stories260K.bin", demo);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/llmvq-logits.XXXXXX");
    if (!mkdtemp(g_tmp)) return 1;
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_bin_vs_hf)};
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_tmp);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_tmp);
    return rc;
}
