/* apiq.c: ApiQ LoRA initialisation (stages/apiq.c) on a real model with real
 * Hessians: layer errors and perplexity of AQLM alone vs AQLM + ApiQ adapters.
 *
 *   bench_apiq [CASE ...]          CASE = rRANK:iITERS, default "r4:i2 r8:i2"
 *   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ./bench_apiq r4:i2 r8:i2 r8:i1
 *
 * Calibration: 64 random sequences of 256 tokens of the text (seed 0), FP
 * propagation, H = X^T X / rows per block input (bench_fp_hessians). Every
 * linear: AQLM 1x6g4, beam 8, max_iters 4, rel_tol 0.01, Adam codebook update
 * (per-matrix codebooks, no fine-tuning). Evaluation: the same text, ctx 512,
 * first 60000 tokens. Prints per case the mean over the 35 linears of the
 * layer relative error tr(dW H dW^T) / tr(W H W^T) of plain AQLM, of ApiQ's
 * What alone and of What + B A, and the perplexity of the model with the
 * adapters applied and without them; the adapters' parameter count and their
 * cost in bits per weight at fp16 are printed separately (not in bpw_total).
 * Paths default to jobs/demo/ (LLMVQ_MODEL, LLMVQ_TOKENIZER, LLMVQ_TEXT);
 * LLMVQ_APIQ_OUT=DIR also writes DIR/rR_iI.h5 and the PEFT directory
 * DIR/rR_iI-peft for each case.
 *
 * Measured (stories260K, 1 thread; FP ppl 4.003; bpw_total 2.345 in every row;
 * rel = mean layer relative error; LoRA bpw = adapter parameters at 16 bits per
 * quantized weight, on top of bpw_total):
 *
 *   case            rel AQLM  rel What  rel What+BA  ppl w/o LoRA  ppl with  LoRA params  LoRA bpw
 *   AQLM alone      0.0799    -         -            37.42         -         0            0
 *   r 4, iters 1    0.0799    0.0799    0.0635       37.42         27.39     23120        1.633
 *   r 4, iters 2    0.0799    0.0876    0.0613       39.81         25.47     23120        1.633
 *   r 4, iters 4    0.0799    0.1016    0.0579       59.13         23.42     23120        1.633
 *   r 8, iters 1    0.0799    0.0799    0.0512       37.42         20.43     46240        3.266
 *   r 8, iters 2    0.0799    0.0922    0.0478       47.45         18.00     46240        3.266
 *   r 8, iters 4    0.0799    0.1078    0.0437       63.29         15.31     46240        3.266
 *   r 16, iters 2   0.0799    0.0915    0.0304       43.05          9.71     92480        6.531
 *
 * "ppl w/o LoRA" is ApiQ's What alone: after iteration 0 it quantizes W - B A,
 * so it is worse than plain AQLM by design and only meant to be used with the
 * adapters. The adapters are expensive on a 64-wide model (r (d_out + d_in)
 * parameters per linear); on LLaMA-2 7B rank 16 costs 16 * 16 * (4096 + 4096) /
 * 4096^2 = 0.125 bits per weight of q_proj. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"

#define N_SEQ 64
#define SEQ_T 256
#define CALIB_SEED 0
#define EVAL_CTX 512
#define EVAL_TOKENS 60000

static const stage_aqlm_config k_acfg = {.n_codebooks = 1, .nbits = 6, .group_size = 4,
                                         .beam_size = 8, .max_iters = 4, .rel_tol = 0.01,
                                         .adam_steps = 100, .kmeans_iters = 20, .seed = 1};

typedef struct {
    lv_model *fp;
    int32_t *toks;
    int64_t n_tok;
    bench_lins lin;
} bench_ctx;

/* ppl of q with (apply 1) or without (0) its adapters. */
static lv_status qmodel_ppl(const bench_ctx *b, const lv_qmodel *q, int apply, double *ppl)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    LV_TRY(io_qmodel_to_fp_opts(q, apply, &m));
    LV_TRY(bench_eval_ppl(m, b->toks, b->n_tok, EVAL_CTX, EVAL_TOKENS, ppl));
done:
    io_model_free(m);
    return st;
}

/* Plain AQLM on every linear into q (no adapters); *mean_rel over linears. */
static lv_status run_aqlm(const bench_ctx *b, lv_qmodel *q, double *mean_rel, double *wall)
{
    lv_status st = LV_OK;
    float *What = NULL;
    double t0 = lv_now(), sum = 0;
    LV_ALLOC(What, (size_t)(b->fp->cfg.hidden_dim) * (size_t)b->fp->cfg.dim);
    for (int i = 0; i < b->lin.n_lin; i++) {
        lv_qblock *blk = &q->blocks[i / LV_LIN_COUNT];
        const int k = i % LV_LIN_COUNT;
        lv_aq_layer_free(&blk->lin[k]);
        LV_TRY(stage_aqlm_run(b->lin.W[i], b->lin.H[i], b->lin.d_out[i], b->lin.d_in[i], &k_acfg,
                              &blk->lin[k], NULL));
        LV_TRY(stage_aqlm_dequant(&blk->lin[k], What));
        LV_TRY(stage_aqlm_layer_error(b->lin.W[i], What, b->lin.H[i], b->lin.d_out[i],
                                      b->lin.d_in[i], &blk->rel_err[k]));
        sum += blk->rel_err[k];
    }
    *mean_rel = sum / b->lin.n_lin;
    *wall = lv_now() - t0;
done:
    free(What);
    return st;
}

typedef struct {
    double rel_q, rel_ql, rel_aqlm; /* means over linears */
    double wall;
    int best_hist[STAGE_APIQ_MAX_ITERS];
} apiq_sum;

/* ApiQ on every linear into q (codes + adapters of rank r). */
static lv_status run_apiq(const bench_ctx *b, lv_qmodel *q, int r, int iters, apiq_sum *s)
{
    lv_status st = LV_OK;
    double t0 = lv_now();
    memset(s, 0, sizeof *s);
    for (int l = 0; l < q->cfg.n_layers; l++) LV_TRY(lv_qblock_lora_init(&q->blocks[l], r));
    for (int i = 0; i < b->lin.n_lin; i++) {
        lv_qblock *blk = &q->blocks[i / LV_LIN_COUNT];
        const int k = i % LV_LIN_COUNT;
        stage_apiq_stats as;
        lv_aq_layer_free(&blk->lin[k]);
        LV_TRY(stage_apiq_layer(b->lin.W[i], b->lin.H[i], b->lin.d_out[i], b->lin.d_in[i], r,
                                iters, &k_acfg, &blk->lin[k], blk->lora_A[k], blk->lora_B[k],
                                &as));
        blk->rel_err[k] = as.rel_err_best;
        s->rel_q += as.rel_err_q[as.best_iter];
        s->rel_ql += as.rel_err_best;
        s->rel_aqlm += as.rel_err_aqlm;
        s->best_hist[as.best_iter]++;
    }
    s->rel_q /= b->lin.n_lin;
    s->rel_ql /= b->lin.n_lin;
    s->rel_aqlm /= b->lin.n_lin;
    s->wall = lv_now() - t0;
done:
    return st;
}

static lv_status run_case(const bench_ctx *b, int r, int iters, const char *out_dir)
{
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    apiq_sum s;
    double ppl_with = 0, ppl_without = 0;
    int64_t n_params = 0;
    LV_TRY(lv_qmodel_init(&q, b->fp, k_acfg.n_codebooks, k_acfg.nbits, k_acfg.group_size));
    LV_TRY(run_apiq(b, q, r, iters, &s));
    LV_TRY(qmodel_ppl(b, q, 1, &ppl_with));
    LV_TRY(qmodel_ppl(b, q, 0, &ppl_without));
    const double lora_bpw = io_qmodel_lora_bits_per_weight(q, &n_params);
    printf("ApiQ r %d, iters %d | %.3f | %.4f | %.4f | %.4f | %.3f | %.3f | %lld | %.3f | %.1f | "
           "best iter histogram:", r, iters, lv_qmodel_bits_per_weight(q), s.rel_aqlm, s.rel_q,
           s.rel_ql, ppl_without, ppl_with, (long long)n_params, lora_bpw, s.wall);
    for (int t = 0; t < iters; t++) printf(" %d", s.best_hist[t]);
    printf("\n");
    fflush(stdout);
    if (out_dir) {
        char path[4096];
        snprintf(path, sizeof path, "%s/r%d_i%d.h5", out_dir, r, iters);
        LV_TRY(io_qmodel_write(q, path));
        snprintf(path, sizeof path, "%s/r%d_i%d-peft", out_dir, r, iters);
        LV_TRY(io_qmodel_write_peft_lora(q, path));
    }
done:
    lv_qmodel_free(q);
    return st;
}

static lv_status bench_main(int argc, char **argv)
{
    lv_status st = LV_OK;
    bench_ctx b = {0};
    io_tokenizer *tok = NULL;
    int32_t *seqs = NULL;
    lv_qmodel *q = NULL;
    const char *dir = bench_env_or("LLMVQ_DEMO_DIR", "jobs/demo");
    char mp[4096], tp[4096], xp[4096];
    snprintf(mp, sizeof mp, "%s/stories260K.bin", dir);
    snprintf(tp, sizeof tp, "%s/tok512.bin", dir);
    snprintf(xp, sizeof xp, "%s/tinystories_val_subset.txt", dir);
    const char *out_dir = getenv("LLMVQ_APIQ_OUT");
    LV_TRY(io_model_open(&b.fp, bench_env_or("LLMVQ_MODEL", mp), IO_MODEL_AUTO));
    LV_TRY(io_tokenizer_open(&tok, bench_env_or("LLMVQ_TOKENIZER", tp), b.fp->cfg.vocab_size));
    LV_TRY(io_data_tokens(bench_env_or("LLMVQ_TEXT", xp), tok, b.fp->cfg.vocab_size, &b.toks,
                          &b.n_tok));
    if (out_dir) LV_TRY(io_mkdir_p(out_dir));
    double t0 = lv_now(), ppl_fp = 0;
    LV_TRY(stage_calib_sequences(b.toks, b.n_tok, N_SEQ, SEQ_T, CALIB_SEED, &seqs));
    LV_TRY(bench_fp_hessians(&b.lin, b.fp, seqs, N_SEQ, SEQ_T));
    printf("calibration: %d x %d tokens, FP propagation, %.1f s; %d linears\n", N_SEQ, SEQ_T,
           lv_now() - t0, b.lin.n_lin);
    LV_TRY(bench_eval_ppl(b.fp, b.toks, b.n_tok, EVAL_CTX, EVAL_TOKENS, &ppl_fp));
    printf("FP ppl %.3f (ctx %d, first %d tokens)\n\n", ppl_fp, EVAL_CTX, EVAL_TOKENS);
    printf("case | bpw_total | rel AQLM | rel What (ApiQ) | rel What+BA | ppl without adapters | "
           "ppl with adapters | LoRA params | LoRA bpw (fp16) | wall s\n");
    double rel = 0, wall = 0, ppl = 0;
    LV_TRY(lv_qmodel_init(&q, b.fp, k_acfg.n_codebooks, k_acfg.nbits, k_acfg.group_size));
    LV_TRY(run_aqlm(&b, q, &rel, &wall));
    LV_TRY(qmodel_ppl(&b, q, 1, &ppl));
    printf("AQLM 1x6g4 alone | %.3f | %.4f | - | - | %.3f | - | 0 | 0 | %.1f\n",
           lv_qmodel_bits_per_weight(q), rel, ppl, wall);
    fflush(stdout);
    const char *dflt[] = {"r4:i2", "r8:i2"};
    const int n_cases = argc > 1 ? argc - 1 : 2;
    for (int c = 0; c < n_cases; c++) {
        const char *s = argc > 1 ? argv[c + 1] : dflt[c];
        int r = 0, iters = 0;
        if (sscanf(s, "r%d:i%d", &r, &iters) != 2)
            LV_FAIL(LV_ERR_INVALID_ARG, "bench_apiq: case '%s' is not rRANK:iITERS", s);
        LV_TRY(run_case(&b, r, iters, out_dir));
    }
done:
    lv_qmodel_free(q);
    free(seqs);
    bench_lins_free(&b.lin);
    free(b.toks);
    io_tokenizer_free(tok);
    io_model_free(b.fp);
    return st;
}

int main(int argc, char **argv)
{
    lv_log_set_quiet(1);
    lv_status st = bench_main(argc, argv);
    if (st != LV_OK) {
        fprintf(stderr, "bench_apiq: %s\n", lv_last_error());
        return 1;
    }
    return 0;
}
