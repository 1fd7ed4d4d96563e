/* finetune_block.c: block fine-tuning on a real block: stories260K, AQLM
 * 1x6g4 (beam 8, 4 alternations) on every linear of one block from its
 * calibration Hessians, then stage_finetune_block at one or more learning rates.
 *
 *   bench_finetune_block [layer (0)] [n_seq (128)] [T (256)] [epochs (20)] [batch (8)] [lr ...]
 *   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 ./bench_finetune_block 0 128 256 20 8 1e-4 1e-3
 *
 * Data: LLMVQ_DEMO_DIR (default jobs/demo) holds stories260K.bin, tok512.bin and
 * tinystories_val_subset.txt. Prints held-out relative MSE before/after, epochs
 * and wall time per learning rate. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "stage.h"

static int fail(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, lv_last_error());
    return 1;
}

/* The seven linears of `layer` quantized from the Hessians in h. */
static lv_status quantize_block(const lv_model *m, int layer, const stage_block_hessians *h,
                                lv_qblock *b)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &m->cfg;
    const lv_layer *L = &m->layers[layer];
    const int64_t dmax = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    float *H = NULL;
    stage_aqlm_config acfg = {.n_codebooks = 1, .nbits = 6, .group_size = 4, .beam_size = 8,
                              .max_iters = 4, .rel_tol = 0.01, .adam_steps = 100};
    LV_ALLOC(H, dmax * dmax);
    LV_TRY(lv_qblock_init(b, c, 1, 6, 4));
    memcpy(b->attn_norm, L->attn_norm, sizeof(float) * (size_t)c->dim);
    memcpy(b->ffn_norm, L->ffn_norm, sizeof(float) * (size_t)c->dim);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        LV_TRY(stage_hessian_to_f32(stage_block_hessian_for(h, (lv_lin)k), i, h->n_rows, H));
        acfg.seed = (uint64_t)layer * 16 + (uint64_t)k;
        lv_aq_layer_free(&b->lin[k]);
        stage_aqlm_stats sx;
        LV_TRY(stage_aqlm_run(lv_layer_weight(L, (lv_lin)k), H, o, i, &acfg, &b->lin[k], &sx));
        b->rel_err[k] = sx.rel_err[(sx.iters < STAGE_AQLM_MAX_HIST ? sx.iters : STAGE_AQLM_MAX_HIST) - 1];
    }
done:
    free(H);
    return st;
}

static lv_status block_copy(const lv_model_config *c, const lv_qblock *s, lv_qblock *d)
{
    lv_status st = LV_OK;
    LV_TRY(lv_qblock_init(d, c, s->lin[0].M, s->lin[0].nbits, s->lin[0].g));
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *a = &s->lin[k];
        memcpy(d->lin[k].codes, a->codes, sizeof(uint16_t) * (size_t)(a->d_out * a->n_groups * a->M));
        memcpy(d->lin[k].codebooks, a->codebooks, sizeof(float) * (size_t)(a->M * ((int64_t)1 << a->nbits) * a->g));
        memcpy(d->lin[k].scales, a->scales, sizeof(float) * (size_t)a->d_out);
    }
    memcpy(d->attn_norm, s->attn_norm, sizeof(float) * (size_t)c->dim);
    memcpy(d->ffn_norm, s->ffn_norm, sizeof(float) * (size_t)c->dim);
done:
    return st;
}

int main(int argc, char **argv)
{
    const int layer = argc > 1 ? atoi(argv[1]) : 0;
    const int64_t n_seq = argc > 2 ? atoll(argv[2]) : 128;
    const int T = argc > 3 ? atoi(argv[3]) : 256;
    const int epochs = argc > 4 ? atoi(argv[4]) : 20;
    const int batch = argc > 5 ? atoi(argv[5]) : 8;
    const char *dir = getenv("LLMVQ_DEMO_DIR") ? getenv("LLMVQ_DEMO_DIR") : "jobs/demo";
    char path[4096];
    lv_model *m = NULL;
    io_tokenizer *tok = NULL;
    int32_t *toks = NULL, *seqs = NULL;
    int64_t n_tok = 0;
    kern_fwd_ws *fws = NULL;
    stage_block_hessians h = {0};
    lv_qblock q = {0};
    int rc = 0;

    snprintf(path, sizeof path, "%s/stories260K.bin", dir);
    if (io_model_open(&m, path, IO_MODEL_AUTO) != LV_OK) return fail(path);
    const lv_model_config *c = &m->cfg;
    if (layer < 0 || layer >= c->n_layers || n_seq < 2 || T < 2 || T > c->seq_len) {
        fprintf(stderr, "usage: bench_finetune_block [layer] [n_seq >= 2] [T <= %d] [epochs] "
                        "[batch] [lr ...]\n", c->seq_len);
        io_model_free(m);
        return 2;
    }
    snprintf(path, sizeof path, "%s/tok512.bin", dir);
    if (io_tokenizer_open(&tok, path, c->vocab_size) != LV_OK) return fail(path);
    snprintf(path, sizeof path, "%s/tinystories_val_subset.txt", dir);
    if (io_data_tokens(path, tok, c->vocab_size, &toks, &n_tok) != LV_OK) return fail(path);
    if (stage_calib_sequences(toks, n_tok, n_seq, T, 0, &seqs) != LV_OK) return fail("calib");

    const size_t act = (size_t)n_seq * (size_t)T * (size_t)c->dim;
    float *x = malloc(act * sizeof(float)), *y = malloc(act * sizeof(float));
    if (!x || !y) return fail("out of memory");
    const int micro = 8;
    double t0 = lv_now();
    if (kern_fwd_ws_init(&fws, c, micro, T, 0) != LV_OK || stage_block_hessians_init(&h, c) != LV_OK)
        return fail("workspace");
    kern_embed_ref(x, m->tok_emb, seqs, n_seq * T, c->dim);
    for (int l = 0; l < layer; l++)
        if (stage_calib_block(m, l, x, n_seq, T, fws, micro, NULL) != LV_OK) return fail("fp pass");
    memcpy(y, x, act * sizeof(float));
    if (stage_calib_block(m, layer, y, n_seq, T, fws, micro, &h) != LV_OK) return fail("fp block");
    double t1 = lv_now();
    if (quantize_block(m, layer, &h, &q) != LV_OK) return fail("aqlm");
    double t2 = lv_now();
    printf("stories260K block %d: %lld seqs x %d tokens (calibration %.2f s), AQLM 1x6g4 "
           "beam 8 x4 iters: %.2f s; layer rel err q %.3f k %.3f v %.3f o %.3f gate %.3f "
           "down %.3f up %.3f\n", layer, (long long)n_seq, T, t1 - t0, t2 - t1, q.rel_err[0],
           q.rel_err[1], q.rel_err[2], q.rel_err[3], q.rel_err[4], q.rel_err[5], q.rel_err[6]);
    printf("%-9s %-6s %12s %12s %7s %5s %6s %9s %9s\n", "lr", "norms", "heldout_bef",
           "heldout_aft", "epochs", "best", "steps", "wall_s", "s/epoch");
    const int n_lr = argc > 6 ? argc - 6 : 1;
    for (int a = 0; a < 2 * n_lr && !rc; a++) {
        float lr = argc > 6 ? (float)atof(argv[6 + a / 2]) : 1e-4f;
        lv_qblock b = {0};
        stage_ft_stats sx;
        stage_ft_config ft = {.lr = lr, .max_epochs = epochs, .batch_seqs = batch,
                              .patience = 3, .holdout_frac = 0.1, .seed = 1,
                              .freeze_norms = a % 2, .verbose = getenv("VERBOSE") != NULL};
        if (block_copy(c, &q, &b) != LV_OK ||
            stage_finetune_block(c, &b, x, y, n_seq, T, &ft, &sx) != LV_OK) {
            rc = fail("finetune");
        } else {
            printf("%-9.3g %-6s %12.5f %12.5f %7d %5d %6lld %9.2f %9.3f\n", (double)lr,
                   a % 2 ? "frozen" : "tuned", sx.mse_before, sx.mse_after, sx.epochs,
                   sx.best_epoch, (long long)sx.steps, sx.wall_s,
                   sx.epochs ? sx.wall_s / sx.epochs : 0.0);
            fflush(stdout);
        }
        lv_qblock_free(&b);
    }
    lv_qblock_free(&q);
    stage_block_hessians_free(&h);
    kern_fwd_ws_free(fws);
    free(x);
    free(y);
    free(seqs);
    free(toks);
    io_tokenizer_free(tok);
    io_model_free(m);
    return rc;
}
