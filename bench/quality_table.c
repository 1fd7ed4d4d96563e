/* quality_table.c: the quality table of issue 4 (docs/quality.md): perplexity
 * against total bits per weight for round-to-nearest baselines and each stage
 * of llmvq (VQ init, AQLM beam search, block fine-tuning), per-matrix and
 * shared codebooks, on one model with ONE calibration set for every row.
 *
 *   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 OMP_WAIT_POLICY=passive \
 *     ./bench_quality_table [--rows LIST] [--max-tokens N] [--cfg2 C] [--cfg4 C]
 *                           [--shared-cfg C]
 *
 * --rows: comma-separated rows or groups (default all):
 *   fp; rtn = rtn2,rtn3,rtn4; pm2 = pm2-init,pm2-aqlm,pm2-ft; shared =
 *   sh-init,sh-aqlm,sh-ft; pm4 = pm4-init,pm4-aqlm,pm4-ft; sh4 =
 *   sh4-init,sh4-aqlm,sh4-ft. FP always runs (the ppl increase is relative to it).
 * --cfg2 / --cfg4 (MxBgG, per-matrix codebooks; defaults 1x6g4 = the shipped
 *   2-bit per-matrix job, 1x4g1 = jobs/stories260K-4bit.ini) and --shared-cfg (codebooks
 *   shared by all linears, default 1x8g4); --shared4-cfg (the ~4-bit shared rows,
 *   default 1x8g2 = jobs/stories260K-4bit.ini).
 * Paths default to jobs/demo/ (run from the repository root); override with
 * LLMVQ_MODEL, LLMVQ_TOKENIZER, LLMVQ_TEXT.
 *
 * Per-matrix rows chain the blocks as pipeline/quantize.c does with the job
 * defaults (propagation quantized: each block's Hessians and fine-tuning
 * targets come from the quantized model's activations so far; AQLM beam 8,
 * max_iters 4, rel_tol 0.01, Adam 100 steps; fine-tuning 16 epochs, lr 1e-3,
 * batch 8, patience 3, holdout 0.1; seeds per block/linear as the pipeline's
 * with run.seed 0). Shared rows need every block's Hessians before they start,
 * so they use FP propagation; their fine-tuning row trains all blocks jointly
 * (stage_finetune_shared), as `llmvq quantize` with quant.share_codebooks = model.
 *
 * Calibration: 64 sequences x 256 tokens, seed 0, from the text. Evaluation:
 * the same text, ctx 512, first --max-tokens tokens (default 60000).
 * Each row runs in its own forked process, so peak RSS (getrusage) is that
 * row's (it includes the loaded model and text, ~2 MiB). Wall time is
 * calibration + quantization + fine-tuning, not the evaluation. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include "bench_common.h"

#define N_SEQ 64
#define SEQ_T 256
#define CALIB_SEED 0
#define EVAL_CTX 512

enum { K_FP, K_RTN, K_PM, K_SHARED, K_SHTYPE }; /* row kinds (K_SHTYPE: one codebook per linear type) */
enum { S_INIT, S_AQLM, S_FT };               /* stages */

typedef struct {
    const char *id;
    int kind, stage, bits; /* bits: RTN only */
    int cfg;               /* 0: cfg2, 1: cfg4, 2: shared cfg */
    const char *method;
} row_def;

static const row_def ROWS[] = {
    {"fp", K_FP, 0, 0, 0, "FP (float32)"},
    {"rtn2", K_RTN, 0, 2, 0, "RTN min-max g32"},
    {"rtn3", K_RTN, 0, 3, 0, "RTN min-max g32"},
    {"rtn4", K_RTN, 0, 4, 0, "RTN min-max g32"},
    {"pm2-init", K_PM, S_INIT, 0, 0, "per-matrix: VPTQ init only"},
    {"pm2-aqlm", K_PM, S_AQLM, 0, 0, "per-matrix: + AQLM beam search"},
    {"pm2-ft", K_PM, S_FT, 0, 0, "per-matrix: + block fine-tuning"},
    {"sh-init", K_SHARED, S_INIT, 0, 2, "shared by 35 linears: VPTQ init only"},
    {"sh-aqlm", K_SHARED, S_AQLM, 0, 2, "shared by 35 linears: + AQLM beam search"},
    {"sh-ft", K_SHARED, S_FT, 0, 2, "shared by 35 linears: + shared block fine-tuning"},
    {"pm4-init", K_PM, S_INIT, 0, 1, "per-matrix: VPTQ init only"},
    {"pm4-aqlm", K_PM, S_AQLM, 0, 1, "per-matrix: + AQLM beam search"},
    {"pm4-ft", K_PM, S_FT, 0, 1, "per-matrix: + block fine-tuning"},
    {"sh4-init", K_SHARED, S_INIT, 0, 3, "shared by 35 linears: VPTQ init only"},
    {"sh4-aqlm", K_SHARED, S_AQLM, 0, 3, "shared by 35 linears: + AQLM beam search"},
    {"sh4-ft", K_SHARED, S_FT, 0, 3, "shared by 35 linears: + shared block fine-tuning"},
    {"st4-init", K_SHTYPE, S_INIT, 0, 3, "one per linear type, shared by 5 blocks: VPTQ init only"},
    {"st4-aqlm", K_SHTYPE, S_AQLM, 0, 3, "one per linear type, shared by 5 blocks: + AQLM beam search"},
    {"st4-ft", K_SHTYPE, S_FT, 0, 3, "one per linear type, shared by 5 blocks: + shared block fine-tuning"},
};
#define N_ROWS ((int)(sizeof ROWS / sizeof ROWS[0]))

typedef struct {
    int ok;
    int64_t n_tok; /* tokens of the text */
    double bpw, ppl, wall_s, rss_mib;
    char note[160];
} row_result;

typedef struct {
    const char *model, *tokp, *text;
    lv_model *fp;
    io_tokenizer *tok;
    int32_t *toks, *seqs; /* text tokens; calibration sequences (N_SEQ, SEQ_T) */
    int64_t n_tok, max_tokens;
    int cfg[4][3];        /* M, nbits, g of cfg2, cfg4, shared, shared4 */
} qt_ctx;

static int parse_cfg(const char *s, int out[3])
{
    int M = 0, B = 0, g = 0, n = 0;
    if (sscanf(s, "%dx%dg%d%n", &M, &B, &g, &n) != 3 || s[n] || M < 1 || B < 1 || B > 16 ||
        g < 1)
        return -1;
    out[0] = M;
    out[1] = B;
    out[2] = g;
    return 0;
}

/* The pipeline's AQLM settings with the job defaults and the shipped jobs'
 * max_iters 4 (per-matrix); shared runs get up to 20 alternations. */
static stage_aqlm_config aqlm_cfg(const int c[3], int shared)
{
    return (stage_aqlm_config){.n_codebooks = c[0], .nbits = c[1], .group_size = c[2],
                               .beam_size = 8, .max_iters = shared ? 20 : 4, .rel_tol = 0.01,
                               .adam_steps = 100, .kmeans_iters = 20, .seed = 0};
}

/* Per-matrix codebooks, block by block with quantized propagation, up to
 * `stage`, as pipeline/quantize.c's run_block. *qm_out is owned by the caller. */
static lv_status run_per_matrix(const qt_ctx *q, const int cf[3], int stage, lv_qmodel **qm_out,
                                row_result *res)
{
    lv_status st = LV_OK;
    const lv_model *fp = q->fp;
    const lv_model_config *c = &fp->cfg;
    const int64_t n_seq = N_SEQ;
    const int T = SEQ_T, micro = 8;
    const size_t act = (size_t)n_seq * T * (size_t)c->dim;
    const size_t dmax = (size_t)(c->dim > c->hidden_dim ? c->dim : c->hidden_dim);
    kern_fwd_ws *ws = NULL;
    stage_block_hessians h = {0};
    float *x_in = NULL, *y_fp = NULL, *y_q = NULL, *H32 = NULL, *wscr = NULL;
    lv_layer *layers = NULL;
    lv_qmodel *qm = NULL;
    size_t lin = 0;
    double ft_before = 0.0, ft_after = 0.0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        lin += (size_t)(o * i);
    }
    LV_TRY(lv_qmodel_init(&qm, fp, cf[0], cf[1], cf[2]));
    LV_TRY(kern_fwd_ws_init(&ws, c, micro, T, 0));
    LV_TRY(stage_block_hessians_init(&h, c));
    LV_ALLOC(x_in, act);
    LV_ALLOC(y_fp, act);
    LV_ALLOC(y_q, act);
    LV_ALLOC(H32, dmax * dmax);
    LV_ALLOC(wscr, lin);
    LV_ALLOC(layers, (size_t)c->n_layers);
    kern_embed_ref(x_in, fp->tok_emb, q->seqs, n_seq * T, c->dim);
    stage_aqlm_config acfg = aqlm_cfg(cf, 0);
    const stage_vq_config vcfg = {.n_codebooks = cf[0], .nbits = cf[1], .group_size = cf[2],
                                  .kmeans_iters = acfg.kmeans_iters, .use_hessian = 1};
    for (int l = 0; l < c->n_layers; l++) {
        lv_qblock *b = &qm->blocks[l];
        memcpy(b->attn_norm, fp->layers[l].attn_norm, sizeof(float) * (size_t)c->dim);
        memcpy(b->ffn_norm, fp->layers[l].ffn_norm, sizeof(float) * (size_t)c->dim);
        memcpy(y_fp, x_in, act * sizeof(float));
        stage_block_hessians_zero(&h);
        LV_TRY(stage_calib_block(fp, l, y_fp, n_seq, T, ws, micro, &h));
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            int64_t o, i;
            lv_lin_shape(c, (lv_lin)k, &o, &i);
            LV_TRY(stage_hessian_to_f32(stage_block_hessian_for(&h, (lv_lin)k), i, h.n_rows,
                                        H32));
            const float *W = lv_layer_weight(&fp->layers[l], (lv_lin)k);
            const uint64_t seed = (uint64_t)l * 16 + (uint64_t)k; /* the pipeline's, seed 0 */
            lv_aq_layer_free(&b->lin[k]);
            if (stage == S_INIT) {
                stage_vq_config v = vcfg;
                v.seed = seed;
                LV_TRY(stage_vq_run(W, H32, o, i, &v, &b->lin[k]));
            } else {
                acfg.seed = seed;
                LV_TRY(stage_aqlm_run(W, H32, o, i, &acfg, &b->lin[k], NULL));
            }
        }
        if (stage == S_FT) {
            stage_ft_config ft = {.lr = 1e-3f, .max_epochs = 16, .seed = (uint64_t)l};
            stage_ft_stats fs;
            LV_TRY(stage_finetune_block(c, b, x_in, y_fp, n_seq, T, &ft, &fs));
            ft_before += fs.mse_before / c->n_layers;
            ft_after += fs.mse_after / c->n_layers;
        }
        lv_model view;
        LV_TRY(io_qblock_fp_view(fp, l, b, wscr, layers, &view));
        memcpy(y_q, x_in, act * sizeof(float));
        LV_TRY(stage_calib_block(&view, l, y_q, n_seq, T, ws, micro, NULL));
        float *t = x_in;
        x_in = y_q;
        y_q = t;
    }
    res->bpw = lv_qmodel_bits_per_weight(qm);
    if (stage == S_FT)
        snprintf(res->note, sizeof res->note, "held-out block rel MSE %.3g -> %.3g (mean)",
                 ft_before, ft_after);
    *qm_out = qm;
    qm = NULL;
done:
    lv_qmodel_free(qm);
    stage_block_hessians_free(&h);
    kern_fwd_ws_free(ws);
    free(x_in);
    free(y_fp);
    free(y_q);
    free(H32);
    free(wscr);
    free(layers);
    return st;
}

/* Joint fine-tuning of all blocks of qm (shared codebooks) on the FP
 * activations of the calibration set, as `llmvq quantize` with
 * quant.share_codebooks = model. */
static lv_status shared_finetune(const qt_ctx *q, lv_qmodel *qm, row_result *res)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    const int L = c->n_layers, micro = 8;
    const size_t act = (size_t)N_SEQ * SEQ_T * (size_t)c->dim;
    float **x = NULL;
    kern_fwd_ws *ws = NULL;
    stage_ft_stats fs;
    LV_ALLOC(x, (size_t)L + 1);
    LV_TRY(kern_fwd_ws_init(&ws, c, micro, SEQ_T, 0));
    for (int l = 0; l <= L; l++) LV_ALLOC(x[l], act);
    kern_embed_ref(x[0], q->fp->tok_emb, q->seqs, (int64_t)N_SEQ * SEQ_T, c->dim);
    for (int l = 0; l < L; l++) {
        memcpy(x[l + 1], x[l], act * sizeof(float));
        LV_TRY(stage_calib_block(q->fp, l, x[l + 1], N_SEQ, SEQ_T, ws, micro, NULL));
    }
    stage_ft_config ft = {.lr = 1e-3f, .max_epochs = 16, .seed = 0, .verbose = 1,
                          .share = qm->shared_codebooks};
    const char *e = getenv("QT_SHFT_LR");
    if (e) ft.lr = (float)atof(e);
    e = getenv("QT_SHFT_EPOCHS");
    if (e) ft.max_epochs = atoi(e);
    LV_TRY(stage_finetune_shared(c, qm->blocks, L, (const float *const *)x,
                                 (const float *const *)(x + 1), N_SEQ, SEQ_T, &ft, NULL, &fs));
    snprintf(res->note, sizeof res->note, "held-out block rel MSE %.3g -> %.3g (mean, %d epochs)",
             fs.mse_before, fs.mse_after, fs.epochs);
done:
    for (int l = 0; x && l <= L; l++) free(x[l]);
    free(x);
    kern_fwd_ws_free(ws);
    return st;
}

/* Codebooks shared by every linear (share LV_SHARE_MODEL) or one per linear
 * type shared by the blocks (LV_SHARE_TYPE, slot k seeded seed + k), with
 * FP-propagation Hessians, up to `stage`. */
static lv_status run_shared(const qt_ctx *q, const int cf[3], int stage, int share,
                            lv_qmodel **qm_out, row_result *res)
{
    lv_status st = LV_OK;
    bench_lins li = {0};
    lv_aq_layer *out = NULL, *tmp = NULL;
    lv_qmodel *qm = NULL;
    const float **Ws = NULL, **Hs = NULL;
    int64_t *dos = NULL, *dis = NULL;
    LV_TRY(bench_fp_hessians(&li, q->fp, q->seqs, N_SEQ, SEQ_T));
    const int n = li.n_lin, slots = lv_share_slots(share);
    const int per = share == LV_SHARE_TYPE ? n / LV_LIN_COUNT : n;
    LV_ALLOC(out, n);
    LV_ALLOC(tmp, per);
    LV_ALLOC(Ws, per);
    LV_ALLOC(Hs, per);
    LV_ALLOC(dos, per);
    LV_ALLOC(dis, per);
    double rel0 = 0.0, rel1 = 0.0;
    int iters = 0;
    for (int s = 0; s < slots; s++) {
        stage_aqlm_stats sx = {0};
        stage_aqlm_config acfg = aqlm_cfg(cf, 1);
        acfg.seed += share == LV_SHARE_TYPE ? (uint64_t)s : 0;
        int m = 0;
        for (int i = 0; i < n; i++)
            if (share != LV_SHARE_TYPE || i % LV_LIN_COUNT == s)
                Ws[m] = li.W[i], Hs[m] = li.H[i], dos[m] = li.d_out[i], dis[m] = li.d_in[i], m++;
        if (stage == S_INIT)
            LV_TRY(stage_vq_run_shared(m, Ws, Hs, dos, dis, NULL, &acfg, tmp));
        else
            LV_TRY(stage_aqlm_run_shared(m, Ws, Hs, dos, dis, &acfg, tmp, &sx));
        for (int j = 0, i = 0; i < n; i++)
            if (share != LV_SHARE_TYPE || i % LV_LIN_COUNT == s) {
                out[i] = tmp[j];
                memset(&tmp[j], 0, sizeof tmp[j]);
                j++;
            }
        rel0 += sx.rel_err_init * m / n;
        rel1 += (sx.iters > 0 ? sx.rel_err[(sx.iters < STAGE_AQLM_MAX_HIST ? sx.iters
                                                                          : STAGE_AQLM_MAX_HIST) - 1]
                              : sx.rel_err_init) * m / n;
        iters = sx.iters > iters ? sx.iters : iters;
    }
    if (share == LV_SHARE_MODEL) res->bpw = stage_aqlm_bits_per_weight_shared(n, out);
    if (stage != S_INIT)
        snprintf(res->note, sizeof res->note, "mean layer rel err %.4f -> %.4f (%s%d alternations)",
                 rel0, rel1, slots > 1 ? "<= " : "", iters);
    LV_TRY(lv_qmodel_init(&qm, q->fp, cf[0], cf[1], cf[2]));
    for (int i = 0; i < n; i++) { /* ownership of out[i] moves into the model */
        lv_aq_layer *dst = &qm->blocks[i / LV_LIN_COUNT].lin[i % LV_LIN_COUNT];
        lv_aq_layer_free(dst);
        *dst = out[i];
        memset(&out[i], 0, sizeof out[i]);
    }
    qm->shared_codebooks = share;
    if (share != LV_SHARE_MODEL) res->bpw = lv_qmodel_bits_per_weight(qm);
    if (stage == S_FT) LV_TRY(shared_finetune(q, qm, res));
    *qm_out = qm;
    qm = NULL;
done:
    for (int i = 0; out && i < n; i++) lv_aq_layer_free(&out[i]);
    for (int i = 0; tmp && i < per; i++) lv_aq_layer_free(&tmp[i]);
    free(out);
    free(tmp);
    free(Ws);
    free(Hs);
    free(dos);
    free(dis);
    lv_qmodel_free(qm);
    bench_lins_free(&li);
    return st;
}

/* Model, text and calibration sequences. Only in the children: the parent
 * must not start OpenMP (io_model_open's checks use it), or libgomp in a
 * forked child deadlocks. */
static lv_status qt_load(qt_ctx *q)
{
    lv_status st = LV_OK;
    LV_TRY(io_model_open(&q->fp, q->model, IO_MODEL_AUTO));
    LV_TRY(io_tokenizer_open(&q->tok, q->tokp, q->fp->cfg.vocab_size));
    LV_TRY(io_data_tokens(q->text, q->tok, q->fp->cfg.vocab_size, &q->toks, &q->n_tok));
    LV_TRY(stage_calib_sequences(q->toks, q->n_tok, N_SEQ, SEQ_T, CALIB_SEED, &q->seqs));
done:
    return st;
}

static void qt_unload(qt_ctx *q)
{
    free(q->toks);
    free(q->seqs);
    io_tokenizer_free(q->tok);
    io_model_free(q->fp);
    q->toks = q->seqs = NULL;
    q->tok = NULL;
    q->fp = NULL;
}

/* One row, in the current (child) process. */
static lv_status run_row(qt_ctx *q, const row_def *r, row_result *res)
{
    lv_status st = LV_OK;
    lv_qmodel *qm = NULL;
    lv_model *qfp = NULL;
    float *buf = NULL;
    lv_layer *layers = NULL;
    LV_TRY(qt_load(q));
    double t0 = lv_now();
    res->n_tok = q->n_tok;
    if (r->kind == K_FP) {
        res->bpw = 32.0;
        res->wall_s = 0.0;
        LV_TRY(bench_eval_ppl(q->fp, q->toks, q->n_tok, EVAL_CTX, q->max_tokens, &res->ppl));
    } else if (r->kind == K_RTN) {
        lv_model view;
        LV_TRY(bench_rtn_view(q->fp, r->bits, 32, &buf, &layers, &view));
        res->wall_s = lv_now() - t0;
        res->bpw = r->bits + 32.0 / 32;
        LV_TRY(bench_eval_ppl(&view, q->toks, q->n_tok, EVAL_CTX, q->max_tokens, &res->ppl));
    } else {
        if (r->kind == K_PM)
            LV_TRY(run_per_matrix(q, q->cfg[r->cfg], r->stage, &qm, res));
        else
            LV_TRY(run_shared(q, q->cfg[r->cfg], r->stage,
                              r->kind == K_SHTYPE ? LV_SHARE_TYPE : LV_SHARE_MODEL, &qm, res));
        res->wall_s = lv_now() - t0;
        LV_TRY(io_qmodel_to_fp(qm, &qfp));
        LV_TRY(bench_eval_ppl(qfp, q->toks, q->n_tok, EVAL_CTX, q->max_tokens, &res->ppl));
    }
    res->rss_mib = (double)lv_peak_rss_bytes() / (1024.0 * 1024.0);
    res->ok = 1;
done:
    free(buf);
    free(layers);
    io_model_free(qfp);
    lv_qmodel_free(qm);
    qt_unload(q);
    return st;
}

/* Run row r in a forked child; its result comes back over a pipe. */
static void run_forked(qt_ctx *q, const row_def *r, row_result *res)
{
    int fd[2];
    memset(res, 0, sizeof *res);
    fflush(stdout);
    fflush(stderr);
    if (pipe(fd) != 0) {
        snprintf(res->note, sizeof res->note, "pipe: %s", strerror(errno));
        return;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(res->note, sizeof res->note, "fork: %s", strerror(errno));
        close(fd[0]);
        close(fd[1]);
        return;
    }
    if (pid == 0) {
        close(fd[0]);
        row_result rr;
        memset(&rr, 0, sizeof rr);
        if (run_row(q, r, &rr) != LV_OK)
            snprintf(rr.note, sizeof rr.note, "failed: %s", lv_last_error());
        ssize_t w = write(fd[1], &rr, sizeof rr);
        close(fd[1]);
        _exit(w == (ssize_t)sizeof rr && rr.ok ? 0 : 1);
    }
    close(fd[1]);
    size_t got = 0;
    while (got < sizeof *res) {
        ssize_t k = read(fd[0], (char *)res + got, sizeof *res - got);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        got += (size_t)k;
    }
    close(fd[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (got != sizeof *res) {
        memset(res, 0, sizeof *res);
        snprintf(res->note, sizeof res->note, "child died (status %d)", status);
    }
}

static int select_rows(const char *list, int *sel)
{
    char buf[1024];
    if (snprintf(buf, sizeof buf, "%s", list) >= (int)sizeof buf) return -1;
    for (char *save = NULL, *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        int hit = 0;
        for (int i = 0; i < N_ROWS; i++) {
            const char *id = ROWS[i].id;
            size_t n = strlen(t);
            int group = !strcmp(t, "all") ||
                        (!strcmp(t, "rtn") && ROWS[i].kind == K_RTN) ||
                        (!strcmp(t, "shared") && ROWS[i].kind == K_SHARED && ROWS[i].cfg == 2) ||
                        ((!strcmp(t, "pm2") || !strcmp(t, "pm4") || !strcmp(t, "sh4") ||
                          !strcmp(t, "st4")) &&
                         !strncmp(id, t, n) &&
                         id[n] == '-');
            if (group || !strcmp(t, id)) {
                sel[i] = 1;
                hit = 1;
            }
        }
        if (!hit) return -1;
    }
    return 0;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_quality_table [--rows LIST] [--max-tokens N] [--cfg2 MxBgG] "
            "[--cfg4 MxBgG] [--shared-cfg MxBgG] [--shared4-cfg MxBgG] [--json FILE]\n  rows: all, "
            "fp, rtn, rtn2, rtn3, rtn4, pm2, pm2-init, pm2-aqlm, pm2-ft, shared, sh-init, sh-aqlm, "
            "sh-ft, pm4, pm4-init, pm4-aqlm, pm4-ft, sh4, sh4-init, sh4-aqlm, sh4-ft, st4, st4-init, "
            "st4-aqlm, st4-ft\n");
}

/* The table as JSON (bench/run_all.sh turns it into the Pareto plot and docs/results.md). */
static int write_json(const char *path, const qt_ctx *q, const int *sel, const row_result *res,
                      const char *const names[4], int64_t n_tok, int64_t n_eval)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "bench_quality_table: %s: cannot create\n", path);
        return -1;
    }
    fprintf(f, "{\n  \"model\": \"%s\", \"text\": \"%s\", \"text_tokens\": %lld, "
            "\"eval_tokens\": %lld, \"eval_ctx\": %d,\n  \"calibration\": \"%d x %d tokens, seed %d\",\n"
            "  \"rows\": [", q->model, q->text, (long long)n_tok, (long long)n_eval, EVAL_CTX,
            N_SEQ, SEQ_T, CALIB_SEED);
    int first = 1;
    for (int i = 0; i < N_ROWS; i++) {
        if (!sel[i]) continue;
        const row_def *r = &ROWS[i];
        const char *kind = r->kind == K_FP ? "fp" : r->kind == K_RTN ? "rtn"
                           : r->kind == K_SHARED ? "shared" : r->kind == K_SHTYPE ? "shared-type" : "per-matrix";
        char config[64];
        if (r->kind == K_RTN) snprintf(config, sizeof config, "%d-bit g32", r->bits);
        else if (r->kind == K_FP) snprintf(config, sizeof config, "fp32");
        else snprintf(config, sizeof config, "%s", names[r->cfg]);
        fprintf(f, "%s\n    {\"id\": \"%s\", \"kind\": \"%s\", \"method\": \"%s\", "
                "\"config\": \"%s\", \"ok\": %s", first ? "" : ",", r->id, kind, r->method,
                config, res[i].ok ? "true" : "false");
        if (res[i].ok)
            fprintf(f, ", \"bpw\": %.6f, \"ppl\": %.6f, \"wall_s\": %.2f, \"peak_rss_mib\": %.1f",
                    res[i].bpw, res[i].ppl, res[i].wall_s, res[i].rss_mib);
        fprintf(f, "}");
        first = 0;
    }
    fprintf(f, "\n  ]\n}\n");
    return fclose(f) == 0 ? 0 : -1;
}

int main(int argc, char **argv)
{
    const char *model = bench_env_or("LLMVQ_MODEL", "jobs/demo/stories260K.bin");
    const char *tokp = bench_env_or("LLMVQ_TOKENIZER", "jobs/demo/tok512.bin");
    const char *text = bench_env_or("LLMVQ_TEXT", "jobs/demo/tinystories_val_subset.txt");
    const char *rows = "all", *names[4] = {"1x6g4", "1x4g1", "1x8g4", "1x8g2"}, *json = NULL;
    qt_ctx q;
    int sel[N_ROWS] = {0}, rc = 0;
    row_result res[N_ROWS];
    memset(&q, 0, sizeof q);
    memset(res, 0, sizeof res);
    q.max_tokens = 60000;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage();
            return 0;
        }
        if (!v) {
            usage();
            return 2;
        }
        if (!strcmp(a, "--rows")) rows = v;
        else if (!strcmp(a, "--max-tokens")) q.max_tokens = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--cfg2")) names[0] = v;
        else if (!strcmp(a, "--cfg4")) names[1] = v;
        else if (!strcmp(a, "--shared-cfg")) names[2] = v;
        else if (!strcmp(a, "--shared4-cfg")) names[3] = v;
        else if (!strcmp(a, "--json")) json = v;
        else {
            usage();
            return 2;
        }
        i++;
    }
    for (int c = 0; c < 4; c++)
        if (parse_cfg(names[c], q.cfg[c]) != 0) {
            fprintf(stderr, "bench_quality_table: bad config '%s' (want MxBgG)\n", names[c]);
            return 2;
        }
    if (select_rows(rows, sel) != 0) {
        fprintf(stderr, "bench_quality_table: bad --rows '%s'\n", rows);
        usage();
        return 2;
    }
    sel[0] = 1; /* FP: the reference of the ppl increase */
    q.model = model;
    q.tokp = tokp;
    q.text = text;
    for (int i = 0; i < N_ROWS; i++) {
        if (!sel[i]) continue;
        run_forked(&q, &ROWS[i], &res[i]);
        fprintf(stderr, "[quality_table] %-9s %s bpw %.3f ppl %.4f wall %.1f s rss %.1f MiB %s\n",
                ROWS[i].id, res[i].ok ? "ok  " : "FAIL", res[i].bpw, res[i].ppl, res[i].wall_s,
                res[i].rss_mib, res[i].note);
        if (!res[i].ok) rc = 1;
    }
    const double ppl_fp = res[0].ok ? res[0].ppl : NAN;
    const int64_t n_tok = res[0].n_tok;
    const int64_t n_eval = q.max_tokens > 0 && q.max_tokens < n_tok ? q.max_tokens : n_tok;
    printf("model %s, text %s (%lld tokens); calibration %d x %d tokens, seed %d, one set for "
           "every row; eval ctx %d on the first %lld tokens\n\n", model, text,
           (long long)n_tok, N_SEQ, SEQ_T, CALIB_SEED, EVAL_CTX, (long long)n_eval);
    printf("| method | config | total bpw | ppl | ppl vs FP | wall (s) | peak RSS (MiB) | "
           "notes |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n");
    for (int i = 0; i < N_ROWS; i++) {
        const row_def *r = &ROWS[i];
        if (!sel[i]) continue;
        char config[64];
        if (r->kind == K_FP) snprintf(config, sizeof config, "-");
        else if (r->kind == K_RTN) snprintf(config, sizeof config, "%d-bit, g32, fp16 scale+zero", r->bits);
        else snprintf(config, sizeof config, "%s%s", names[r->cfg],
                      r->kind == K_SHARED ? " shared, FP prop." : r->kind == K_SHTYPE ? " per type, FP prop." : ", quantized prop.");
        if (!res[i].ok) {
            printf("| %s | %s | - | - | - | - | - | %s |\n", r->method, config, res[i].note);
            continue;
        }
        char inc[32];
        if (r->kind == K_FP) snprintf(inc, sizeof inc, "-");
        else snprintf(inc, sizeof inc, "%+.1f %%", 100.0 * (res[i].ppl / ppl_fp - 1.0));
        printf("| %s | %s | %.3f | %.3f | %s | %.1f | %.1f | %s |\n", r->method, config,
               res[i].bpw, res[i].ppl, inc, res[i].wall_s, res[i].rss_mib, res[i].note);
    }
    if (json && write_json(json, &q, sel, res, names, n_tok, n_eval) != 0) rc = 1;
    return rc;
}
