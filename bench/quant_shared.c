/* quant_shared.c: AQLM with codebooks shared by all linears of a model, on a
 * real model with real Hessians, measured by perplexity.
 *
 *   bench_quant_shared [CONFIG ...]
 *   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 ./bench_quant_shared 1x8g4 1x10g8
 *
 * CONFIG is MxBgG with optional suffixes: ":lstsq" (least-squares codebook
 * update, default Adam), ":trace" (weights d_in / tr(H_i) instead of the
 * default equal relative errors), ":per" (per-matrix codebooks, stage_aqlm_run
 * per linear, for comparison), ":long" (rel_tol 1e-3 instead of the pipeline's
 * default 0.01; at most 20 alternations either way), ":seedN" (seed, default 1).
 * "rtnBgG" is the round-to-nearest baseline (B bits, asymmetric min-max per G
 * inputs). Paths default to the demo files under jobs/demo/ and can be
 * overridden with LLMVQ_MODEL, LLMVQ_TOKENIZER, LLMVQ_TEXT.
 *
 * Calibration: 64 random sequences of 256 tokens of the text, FP propagation,
 * H = X^T X / rows per block input (stages/calib.c). Evaluation: the same text,
 * ctx 512, first 60000 tokens (stage_eval_ppl). Prints: config, total bits per
 * weight (codes + one codebook copy + scales), mean layer rel. error, ppl,
 * alternations and seconds (all, init, codebook updates, beam search; per-matrix
 * runs report only the total). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"

#define N_SEQ 64
#define SEQ_T 256
#define EVAL_CTX 512
#define EVAL_TOKENS 60000

typedef struct {
    lv_model *fp;
    int32_t *toks;
    int64_t n_tok;
    bench_lins lin; /* every block linear with its FP-propagation Hessian */
} bench_ctx;

/* Hessians of every block's linears, FP propagation through the blocks. */
static lv_status calibrate(bench_ctx *b)
{
    lv_status st = LV_OK;
    int32_t *seqs = NULL;
    LV_TRY(stage_calib_sequences(b->toks, b->n_tok, N_SEQ, SEQ_T, 1234, &seqs));
    LV_TRY(bench_fp_hessians(&b->lin, b->fp, seqs, N_SEQ, SEQ_T));
done:
    free(seqs);
    return st;
}

static lv_status eval_ppl(const bench_ctx *b, const lv_model *m, double *ppl)
{
    return bench_eval_ppl(m, b->toks, b->n_tok, EVAL_CTX, EVAL_TOKENS, ppl);
}

typedef struct {
    char name[64];
    stage_aqlm_config cfg;
    int trace, per, bytype;
} bench_case;

static int parse_case(const char *s, bench_case *bc)
{
    int M = 0, B = 0, g = 0, n = 0;
    memset(bc, 0, sizeof *bc);
    if (sscanf(s, "%dx%dg%d%n", &M, &B, &g, &n) != 3 || M < 1 || B < 1 || g < 1) return -1;
    snprintf(bc->name, sizeof bc->name, "%s", s);
    bc->cfg = (stage_aqlm_config){.n_codebooks = M, .nbits = B, .group_size = g,
                                  .beam_size = 8, .max_iters = 20, .rel_tol = 0.01,
                                  .adam_steps = 100, .kmeans_iters = 20, .seed = 1};
    bc->trace = strstr(s + n, ":trace") != NULL;
    bc->per = strstr(s + n, ":per") != NULL;
    bc->bytype = strstr(s + n, ":type") != NULL ? 1 : strstr(s + n, ":block") != NULL ? 2 : 0;
    if (strstr(s + n, ":lstsq")) bc->cfg.codebook_update = STAGE_AQLM_LSTSQ;
    if (strstr(s + n, ":long")) bc->cfg.rel_tol = 1e-3;
    const char *sd = strstr(s + n, ":seed");
    if (sd) bc->cfg.seed = strtoull(sd + 5, NULL, 10);
    return 0;
}

/* Round-to-nearest baseline (bench_rtn_view): mean layer error and ppl. */
static lv_status run_rtn(bench_ctx *b, int bits, int group)
{
    lv_status st = LV_OK;
    const bench_lins *li = &b->lin;
    float *buf = NULL;
    lv_layer *layers = NULL;
    lv_model view;
    double ppl = 0.0, mean_rel = 0.0, t0 = lv_now();
    LV_TRY(bench_rtn_view(b->fp, bits, group, &buf, &layers, &view));
    const float *w = buf;
    for (int i = 0; i < li->n_lin; i++) {
        double rel = 0.0;
        LV_TRY(stage_aqlm_layer_error(li->W[i], w, li->H[i], li->d_out[i], li->d_in[i], &rel));
        mean_rel += rel / li->n_lin;
        w += li->d_out[i] * li->d_in[i];
    }
    LV_TRY(eval_ppl(b, &view, &ppl));
    char name[32];
    snprintf(name, sizeof name, "rtn%dg%d", bits, group);
    printf("%-16s %7.3f %9.5f %9.3f %5s %8.1f %8s %8s %8s\n", name, bits + 32.0 / group,
           mean_rel, ppl, "-", lv_now() - t0, "-", "-", "-");
    fflush(stdout);
done:
    free(layers);
    free(buf);
    return st;
}

/* Quantize every linear (shared or per matrix), dequantize, evaluate. */
static lv_status run_case(bench_ctx *b, const bench_case *bc)
{
    lv_status st = LV_OK;
    lv_aq_layer *out = NULL;
    lv_qmodel *qm = NULL;
    lv_model *qfp = NULL;
    double *wt = NULL;
    float *What = NULL;
    stage_aqlm_stats sx = {0};
    const bench_lins *li = &b->lin;
    const int n = li->n_lin;
    LV_ALLOC(out, n);
    LV_ALLOC(wt, n);
    LV_ALLOC(What, 256 * 1024);
    double t0 = lv_now(), bpw = 0.0, mean_rel = 0.0, ppl = 0.0;
    if (bc->per) {
        double bits = 0.0, weights = 0.0;
        for (int i = 0; i < n; i++) {
            LV_TRY(stage_aqlm_run(li->W[i], li->H[i], li->d_out[i], li->d_in[i], &bc->cfg, &out[i],
                                  NULL));
            double nw = (double)li->d_out[i] * (double)li->d_in[i];
            bits += stage_aqlm_bits_per_weight(&out[i]) * nw;
            weights += nw;
        }
        bpw = bits / weights;
    } else if (bc->bytype) { /* one codebook per linear type (wq of every block, ...) */
        double bits = 0.0, weights = 0.0;
        const int ngrp = bc->bytype == 1 ? LV_LIN_COUNT : n / LV_LIN_COUNT;
        for (int k = 0; k < ngrp; k++) {
            int nb = bc->bytype == 1 ? n / LV_LIN_COUNT : LV_LIN_COUNT;
            const float *Wk[64], *Hk[64];
            int64_t dok[64], dik[64];
            lv_aq_layer outk[64];
            int idx[64];
            for (int l = 0; l < nb; l++) {
                idx[l] = bc->bytype == 1 ? l * LV_LIN_COUNT + k : k * LV_LIN_COUNT + l;
                Wk[l] = li->W[idx[l]];
                Hk[l] = li->H[idx[l]];
                dok[l] = li->d_out[idx[l]];
                dik[l] = li->d_in[idx[l]];
            }
            LV_TRY(stage_aqlm_run_shared_weighted(nb, Wk,
                                                  Hk, dok, dik, NULL,
                                                  &bc->cfg, outk, &sx));
            double nw = 0.0;
            for (int l = 0; l < nb; l++) nw += (double)dok[l] * dik[l];
            bits += stage_aqlm_bits_per_weight_shared(nb, outk) * nw;
            weights += nw;
            for (int l = 0; l < nb; l++) out[idx[l]] = outk[l];
        }
        bpw = bits / weights;
    } else {
        for (int i = 0; i < n; i++) {
            double tr = 0.0;
            for (int64_t j = 0; j < li->d_in[i]; j++) tr += li->H[i][j * li->d_in[i] + j];
            wt[i] = (double)li->d_in[i] / tr;
        }
        LV_TRY(stage_aqlm_run_shared_weighted(n, li->W, li->H, li->d_out, li->d_in,
                                              bc->trace ? wt : NULL, &bc->cfg, out, &sx));
        bpw = stage_aqlm_bits_per_weight_shared(n, out);
    }
    double wall = lv_now() - t0;
    for (int i = 0; i < n; i++) {
        double rel = 0.0;
        if (li->d_out[i] * li->d_in[i] > 256 * 1024) LV_FAIL(LV_ERR_UNSUPPORTED, "bench: big layer");
        LV_TRY(stage_aqlm_dequant(&out[i], What));
        LV_TRY(stage_aqlm_layer_error(li->W[i], What, li->H[i], li->d_out[i], li->d_in[i], &rel));
        mean_rel += rel / n;
    }
    const stage_aqlm_config *c = &bc->cfg;
    LV_TRY(lv_qmodel_init(&qm, b->fp, c->n_codebooks, c->nbits, c->group_size));
    for (int i = 0; i < n; i++) { /* ownership of out[i] moves into the model */
        lv_aq_layer *dst = &qm->blocks[i / LV_LIN_COUNT].lin[i % LV_LIN_COUNT];
        lv_aq_layer_free(dst);
        *dst = out[i];
        memset(&out[i], 0, sizeof out[i]);
    }
    LV_TRY(io_qmodel_to_fp(qm, &qfp));
    LV_TRY(eval_ppl(b, qfp, &ppl));
    printf("%-16s %7.3f %9.5f %9.3f %5d %8.1f %8.1f %8.1f %8.1f\n", bc->name, bpw, mean_rel,
           ppl, sx.iters, wall, sx.init_s, sx.update_s, sx.beam_s);
    fflush(stdout);
done:
    for (int i = 0; out && i < n; i++) lv_aq_layer_free(&out[i]);
    free(out);
    free(wt);
    free(What);
    io_model_free(qfp);
    lv_qmodel_free(qm);
    return st;
}

int main(int argc, char **argv)
{
    static const char *dflt[] = {"rtn4g32", "rtn3g32",     "1x8g4",       "1x8g4:trace",
                                 "1x8g4:lstsq", "1x8g4:long", "1x10g8",   "2x7g8",
                                 "2x8g8",   "1x6g4:per"};
    const char *model = bench_env_or("LLMVQ_MODEL", "jobs/demo/stories260K.bin");
    const char *tokp = bench_env_or("LLMVQ_TOKENIZER", "jobs/demo/tok512.bin");
    const char *text = bench_env_or("LLMVQ_TEXT", "jobs/demo/tinystories_val_subset.txt");
    bench_ctx b = {0};
    io_tokenizer *tok = NULL;
    int rc = 0;
    lv_status st = LV_OK;
    double ppl_fp = 0.0, t0 = lv_now();
    LV_TRY(io_model_open(&b.fp, model, IO_MODEL_AUTO));
    LV_TRY(io_tokenizer_open(&tok, tokp, b.fp->cfg.vocab_size));
    LV_TRY(io_data_tokens(text, tok, b.fp->cfg.vocab_size, &b.toks, &b.n_tok));
    LV_TRY(eval_ppl(&b, b.fp, &ppl_fp));
    LV_TRY(calibrate(&b));
    printf("%s: %d linears, %lld text tokens, calibration %d x %d (%.1f s); FP ppl %.4f "
           "(ctx %d, first %d tokens)\n", model, b.lin.n_lin, (long long)b.n_tok, N_SEQ, SEQ_T,
           lv_now() - t0, ppl_fp, EVAL_CTX, EVAL_TOKENS);
    printf("%-16s %7s %9s %9s %5s %8s %8s %8s %8s\n", "config", "bpw", "mean_rel", "ppl",
           "iters", "wall_s", "init_s", "update_s", "beam_s");
    int n_cases = argc > 1 ? argc - 1 : (int)(sizeof dflt / sizeof dflt[0]);
    for (int i = 0; i < n_cases; i++) {
        const char *s = argc > 1 ? argv[i + 1] : dflt[i];
        bench_case bc;
        int rb = 0, rg = 0;
        if (sscanf(s, "rtn%dg%d", &rb, &rg) == 2 && rb >= 1 && rb <= 16 && rg >= 1) {
            if (run_rtn(&b, rb, rg) != LV_OK) {
                fprintf(stderr, "%s: %s\n", s, lv_last_error());
                rc = 1;
            }
            continue;
        }
        if (parse_case(s, &bc) != 0) {
            fprintf(stderr, "bench_quant_shared: bad config '%s' "
                    "(want MxBgG[:lstsq][:trace][:per][:long][:seedN] or rtnBgG)\n", s);
            rc = 2;
            continue;
        }
        if (run_case(&b, &bc) != LV_OK) {
            fprintf(stderr, "%s: %s\n", s, lv_last_error());
            rc = 1;
        }
    }
done:
    if (st != LV_OK) {
        fprintf(stderr, "bench_quant_shared: %s\n", lv_last_error());
        rc = 1;
    }
    bench_lins_free(&b.lin);
    free(b.toks);
    io_tokenizer_free(tok);
    io_model_free(b.fp);
    return rc;
}
