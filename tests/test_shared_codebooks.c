/* test_shared_codebooks.c: one codebook tensor for every linear of a model
 * (quant.share_codebooks = model): joint fine-tuning of all blocks
 * (stage_finetune_shared) keeps the copies identical, lowers the held-out
 * error, never returns worse, is bit-identical per seed and refuses blocks
 * that do not share; the model file stores the tensor once, reads it back
 * exactly, counts it once in bits per weight and refuses to store copies that
 * differ. The same for one tensor per linear type (quant.share_codebooks =
 * type: 7 tensors, each shared by the blocks). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <math.h>

#include "io.h"
#include "kern.h"
#include "stage.h"

#define N_SEQ 32
#define T 32

typedef struct {
    lv_model *fp;
    lv_qmodel *qm;
    lv_qmodel *qt; /* one codebook per linear type: shared AQLM over the 3 blocks' linear k */
    float *x[4]; /* block inputs; x[l + 1] = FP output of block l */
} fixture;

static const lv_model_config CFG = {.dim = 32, .hidden_dim = 48, .n_layers = 3, .n_heads = 4,
                                    .n_kv_heads = 2, .vocab_size = 64, .seq_len = 32,
                                    .norm_eps = 1e-5f, .rope_theta = 10000.0f,
                                    .rope = LV_ROPE_INTERLEAVED, .tied_cls = 1};

/* A synthetic model, its FP activations on random tokens, and a quantized
 * model from shared AQLM (1x5g4) over all 21 linears with their Hessians. */
static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    assert_non_null(f);
    const lv_model_config *c = &CFG;
    const size_t act = (size_t)N_SEQ * T * c->dim;
    const int n_lin = c->n_layers * LV_LIN_COUNT;
    assert_int_equal(io_model_synth(&f->fp, c, 7), LV_OK);
    static int32_t tok[N_SEQ * T];
    lv_rng r;
    lv_rng_seed(&r, 3);
    for (int i = 0; i < N_SEQ * T; i++) tok[i] = (int32_t)(lv_rng_u64(&r) % (uint64_t)c->vocab_size);
    kern_fwd_ws *ws = NULL;
    stage_block_hessians h = {0};
    assert_int_equal(kern_fwd_ws_init(&ws, c, 4, T, 0), LV_OK);
    assert_int_equal(stage_block_hessians_init(&h, c), LV_OK);
    float *H[21];
    const float *W[21];
    int64_t d_out[21], d_in[21];
    for (int l = 0; l <= c->n_layers; l++) assert_non_null(f->x[l] = malloc(act * sizeof(float)));
    kern_embed_ref(f->x[0], f->fp->tok_emb, tok, N_SEQ * T, c->dim);
    for (int l = 0; l < c->n_layers; l++) {
        memcpy(f->x[l + 1], f->x[l], act * sizeof(float));
        stage_block_hessians_zero(&h);
        assert_int_equal(stage_calib_block(f->fp, l, f->x[l + 1], N_SEQ, T, ws, 4, &h), LV_OK);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            int i = l * LV_LIN_COUNT + k;
            lv_lin_shape(c, (lv_lin)k, &d_out[i], &d_in[i]);
            W[i] = lv_layer_weight(&f->fp->layers[l], (lv_lin)k);
            assert_non_null(H[i] = malloc(sizeof(float) * (size_t)(d_in[i] * d_in[i])));
            assert_int_equal(stage_hessian_to_f32(stage_block_hessian_for(&h, (lv_lin)k), d_in[i],
                                                  h.n_rows, H[i]), LV_OK);
        }
    }
    lv_aq_layer out[21];
    memset(out, 0, sizeof out);
    const stage_aqlm_config acfg = {.n_codebooks = 1, .nbits = 5, .group_size = 4,
                                    .beam_size = 4, .max_iters = 2, .seed = 1};
    assert_int_equal(stage_aqlm_run_shared(n_lin, W, (const float *const *)H, d_out, d_in, &acfg,
                                           out, NULL), LV_OK);
    assert_int_equal(lv_qmodel_init(&f->qm, f->fp, 1, 5, 4), LV_OK);
    for (int i = 0; i < n_lin; i++) {
        lv_aq_layer *dst = &f->qm->blocks[i / LV_LIN_COUNT].lin[i % LV_LIN_COUNT];
        lv_aq_layer_free(dst);
        *dst = out[i];
    }
    f->qm->shared_codebooks = LV_SHARE_MODEL;
    assert_int_equal(lv_qmodel_init(&f->qt, f->fp, 1, 5, 4), LV_OK);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const float *Wk[3], *Hk[3];
        int64_t ok[3], ik[3];
        lv_aq_layer ot[3];
        memset(ot, 0, sizeof ot);
        for (int l = 0; l < c->n_layers; l++) {
            const int i = l * LV_LIN_COUNT + k;
            Wk[l] = W[i], Hk[l] = H[i], ok[l] = d_out[i], ik[l] = d_in[i];
        }
        stage_aqlm_config tc = acfg;
        tc.seed = 10 + (uint64_t)k;
        assert_int_equal(stage_aqlm_run_shared(c->n_layers, Wk, Hk, ok, ik, &tc, ot, NULL), LV_OK);
        for (int l = 0; l < c->n_layers; l++) {
            lv_aq_layer *dst = &f->qt->blocks[l].lin[k];
            lv_aq_layer_free(dst);
            *dst = ot[l];
        }
    }
    f->qt->shared_codebooks = LV_SHARE_TYPE;
    for (int i = 0; i < n_lin; i++) free(H[i]);
    kern_fwd_ws_free(ws);
    stage_block_hessians_free(&h);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int l = 0; l < 4; l++) free(f->x[l]);
    lv_qmodel_free(f->qm);
    lv_qmodel_free(f->qt);
    io_model_free(f->fp);
    free(f);
    return 0;
}

static size_t cb_bytes(const lv_aq_layer *L)
{
    return sizeof(float) * ((size_t)L->M << L->nbits) * (size_t)L->g;
}

static void expect_copies_identical(const lv_qmodel *q)
{
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *O = &q->blocks[0].lin[lv_share_slot(q->shared_codebooks, k)];
            assert_memory_equal(q->blocks[l].lin[k].codebooks, O->codebooks, cb_bytes(O));
        }
}

/* A deep copy of src's blocks (codes, codebooks, scales, norms). */
static lv_qmodel *clone_of(const fixture *f, const lv_qmodel *src)
{
    lv_qmodel *q = NULL;
    assert_int_equal(lv_qmodel_init(&q, f->fp, 1, 5, 4), LV_OK);
    q->shared_codebooks = src->shared_codebooks;
    for (int l = 0; l < CFG.n_layers; l++) {
        const lv_qblock *s = &src->blocks[l];
        lv_qblock *d = &q->blocks[l];
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *a = &s->lin[k];
            lv_aq_layer *b = &d->lin[k];
            memcpy(b->codes, a->codes, sizeof(uint16_t) * (size_t)(a->d_out * a->n_groups * a->M));
            memcpy(b->codebooks, a->codebooks, cb_bytes(a));
            memcpy(b->scales, a->scales, sizeof(float) * (size_t)a->d_out);
        }
        memcpy(d->attn_norm, s->attn_norm, sizeof(float) * (size_t)CFG.dim);
        memcpy(d->ffn_norm, s->ffn_norm, sizeof(float) * (size_t)CFG.dim);
    }
    return q;
}

static lv_qmodel *clone(const fixture *f) { return clone_of(f, f->qm); }

static stage_ft_stats run_ft(fixture *f, lv_qmodel *q)
{
    stage_ft_config ft = {.lr = 1e-3f, .max_epochs = 6, .batch_seqs = 4, .patience = 3,
                          .holdout_frac = 0.25, .seed = 5, .share = q->shared_codebooks};
    stage_ft_stats fs;
    assert_int_equal(stage_finetune_shared(&CFG, q->blocks, CFG.n_layers,
                                           (const float *const *)f->x,
                                           (const float *const *)(f->x + 1), N_SEQ, T, &ft, NULL,
                                           &fs), LV_OK);
    return fs;
}

static void test_finetune_lowers_error_keeps_sharing(void **state)
{
    fixture *f = *state;
    lv_qmodel *q = clone(f);
    stage_ft_stats fs = run_ft(f, q);
    printf("  held-out rel MSE (mean over blocks) %.5f -> %.5f, %d epochs, best %d\n",
           fs.mse_before, fs.mse_after, fs.epochs, fs.best_epoch);
    assert_true(fs.mse_after <= fs.mse_before);
    assert_true(fs.mse_after < 0.98 * fs.mse_before); /* it does learn something */
    assert_true(fs.best_epoch >= 1);
    expect_copies_identical(q);
    /* the codebooks moved (else the "sharing" would be trivially kept) */
    assert_memory_not_equal(q->blocks[0].lin[0].codebooks, f->qm->blocks[0].lin[0].codebooks,
                            cb_bytes(&q->blocks[0].lin[0]));
    lv_qmodel_free(q);
}

static void test_finetune_deterministic(void **state)
{
    fixture *f = *state;
    lv_qmodel *a = clone(f), *b = clone(f);
    run_ft(f, a);
    run_ft(f, b);
    for (int l = 0; l < CFG.n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *x = &a->blocks[l].lin[k], *y = &b->blocks[l].lin[k];
            assert_memory_equal(x->codebooks, y->codebooks, cb_bytes(x));
            assert_memory_equal(x->scales, y->scales, sizeof(float) * (size_t)x->d_out);
        }
        assert_memory_equal(a->blocks[l].attn_norm, b->blocks[l].attn_norm, sizeof(float) * CFG.dim);
        assert_memory_equal(a->blocks[l].ffn_norm, b->blocks[l].ffn_norm, sizeof(float) * CFG.dim);
    }
    lv_qmodel_free(a);
    lv_qmodel_free(b);
}

static void test_finetune_refuses_unshared(void **state)
{
    fixture *f = *state;
    lv_qmodel *q = clone(f);
    q->blocks[2].lin[LV_LIN_W2].codebooks[3] += 0.5f;
    stage_ft_config ft = {.max_epochs = 1};
    assert_int_equal(stage_finetune_shared(&CFG, q->blocks, CFG.n_layers,
                                           (const float *const *)f->x,
                                           (const float *const *)(f->x + 1), N_SEQ, T, &ft, NULL,
                                           NULL), LV_ERR_INVALID_ARG);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, "block 2 w2"));
    lv_qmodel_free(q);
}

/* q (sharing mode `mode`, n_cb distinct codebook tensors of 2^5 entries of 4)
 * written and read back: same codebooks, codes and scales; bits per weight
 * count each tensor once; then a copy of linear (bl, bk) changed at entry bi
 * is refused, the message naming "name". */
static void file_round_trip(lv_qmodel *q, int mode, int n_cb, int bl, int bk, int bi,
                            const char *name)
{
    char path[] = "/tmp/llmvq-shared-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    lv_qmodel *back = NULL;
    assert_int_equal(io_qmodel_write(q, path), LV_OK);
    assert_int_equal(io_qmodel_read(&back, path), LV_OK);
    assert_int_equal(back->shared_codebooks, mode);
    double bits = 0, weights = 0; /* codes + scales of every linear + each tensor once */
    for (int l = 0; l < CFG.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *a = &q->blocks[l].lin[k], *L = &back->blocks[l].lin[k];
            assert_memory_equal(a->codebooks, L->codebooks, cb_bytes(a));
            assert_memory_equal(a->codes, L->codes,
                                sizeof(uint16_t) * (size_t)(a->d_out * a->n_groups * a->M));
            assert_memory_equal(a->scales, L->scales, sizeof(float) * (size_t)a->d_out);
            bits += (double)L->d_out * L->n_groups * L->M * L->nbits + 16.0 * L->d_out;
            weights += (double)L->d_out * L->d_in;
        }
    const double one = 16.0 * 32 * 4;
    bits += n_cb * one;
    printf("  %d codebook tensor(s): bits per weight %.4f (expected %.4f); unshared accounting "
           "would say %.4f\n", n_cb, lv_qmodel_bits_per_weight(back), bits / weights,
           (bits + one * (CFG.n_layers * LV_LIN_COUNT - n_cb)) / weights);
    assert_true(fabs(lv_qmodel_bits_per_weight(back) - bits / weights) < 1e-12);
    lv_qmodel_free(back);

    float *v = &q->blocks[bl].lin[bk].codebooks[bi];
    const float saved = *v;
    *v += 1.0f;
    assert_int_equal(io_qmodel_write(q, path), LV_ERR_INVALID_ARG);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, name));
    *v = saved;
    unlink(path);
}

/* One tensor for the model: stored once, read back exactly, counted once. */
static void test_file_stores_once(void **state)
{
    fixture *f = *state;
    file_round_trip(f->qm, LV_SHARE_MODEL, 1, 1, LV_LIN_WK, 0, "block 1 wk");
}

/* quant.share_codebooks = type: fine-tuning keeps each type's copies
 * identical, moves every type's tensor, lowers the error, and is bit-identical
 * per seed; model-mode fine-tuning refuses the 7 differing tensors. */
static void test_type_finetune(void **state)
{
    fixture *f = *state;
    lv_qmodel *a = clone_of(f, f->qt), *b = clone_of(f, f->qt);
    stage_ft_stats fs = run_ft(f, a);
    run_ft(f, b);
    printf("  per type: held-out rel MSE (mean over blocks) %.5f -> %.5f, %d epochs, best %d\n",
           fs.mse_before, fs.mse_after, fs.epochs, fs.best_epoch);
    assert_true(fs.mse_after < 0.98 * fs.mse_before);
    expect_copies_identical(a);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *x = &a->blocks[0].lin[k];
        assert_memory_not_equal(x->codebooks, f->qt->blocks[0].lin[k].codebooks, cb_bytes(x));
        if (k) assert_memory_not_equal(x->codebooks, a->blocks[0].lin[0].codebooks, cb_bytes(x));
    }
    for (int l = 0; l < CFG.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *x = &a->blocks[l].lin[k], *y = &b->blocks[l].lin[k];
            assert_memory_equal(x->codebooks, y->codebooks, cb_bytes(x));
            assert_memory_equal(x->scales, y->scales, sizeof(float) * (size_t)x->d_out);
        }
    lv_qmodel_free(b);
    stage_ft_config one = {.max_epochs = 1}; /* share 0 = model */
    assert_int_equal(stage_finetune_shared(&CFG, a->blocks, CFG.n_layers,
                                           (const float *const *)f->x,
                                           (const float *const *)(f->x + 1), N_SEQ, T, &one, NULL,
                                           NULL), LV_ERR_INVALID_ARG);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, "block 0 wk"));
    lv_qmodel_free(a);
}

/* The file stores the 7 tensors once (root "codebooks" (7, M, 2^B, g)),
 * reads them back exactly, counts each once, refuses differing copies. */
static void test_type_file(void **state)
{
    fixture *f = *state;
    file_round_trip(f->qt, LV_SHARE_TYPE, LV_LIN_COUNT, 2, LV_LIN_W3, 1, "block 2 w3");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_finetune),
        cmocka_unit_test(test_type_file),
        cmocka_unit_test(test_finetune_lowers_error_keeps_sharing),
        cmocka_unit_test(test_finetune_deterministic),
        cmocka_unit_test(test_finetune_refuses_unshared),
        cmocka_unit_test(test_file_stores_once),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
