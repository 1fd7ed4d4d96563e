/* quantize.c: `llmvq quantize JOBFILE [--set section.key=value ...]`.
 *
 * Block by block: calibration inputs -> FP block with Hessian taps -> AQLM on
 * each linear -> quantized block -> next block's inputs (FP or quantized
 * outputs, per quant.propagation). Each finished block is checkpointed as its
 * own HDF5 file; a rerun of the same job resumes from the verified ones.
 * Under MPI with propagation = fp, ranks take contiguous shards of blocks and
 * rank 0 assembles the model from the checkpoints (docs/pipeline.md). */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "comm.h"
#include "job.h"
#include "kern.h"
#include "pipe.h"
#include "pipe_plan.h"
#include "quantize_impl.h"


static lv_status read_job(qjob *q, const job_file *j)
{
    lv_status st = LV_OK;
    const char *ck = NULL;
    LV_TRY(job_get_str(j, "model.path", &q->model_path));
    LV_TRY(job_get_str(j, "model.tokenizer", &q->tok_path));
    LV_TRY(job_get_str(j, "calibration.data", &q->calib_path));
    LV_TRY(job_get_int(j, "calibration.nsamples", &q->nsamples));
    LV_TRY(job_get_int(j, "calibration.seqlen", &q->seqlen));
    LV_TRY(job_get_int(j, "calibration.skip_tokens", &q->calib_skip));
    LV_TRY(job_get_int(j, "run.seed", &q->seed));
    LV_TRY(job_get_str(j, "run.checkpoint_dir", &ck));
    LV_TRY(job_get_str(j, "run.scratch_dir", &q->scratch_dir));
    LV_TRY(job_get_str(j, "output.dir", &q->out_dir));
    LV_TRY(job_get_str(j, "output.eval_data", &q->eval_path));
    LV_TRY(job_get_int(j, "output.eval_ctx", &q->eval_ctx));
    LV_TRY(job_get_int(j, "output.eval_max_tokens", &q->eval_max));
    LV_TRY(job_get_str(j, "quant.propagation", &q->prop));
    const char *share = NULL;
    LV_TRY(job_get_str(j, "quant.share_codebooks", &share));
    q->share = !strcmp(share, "model") ? LV_SHARE_MODEL
               : !strcmp(share, "type") ? LV_SHARE_TYPE : LV_SHARE_NONE;
    LV_TRY(job_get_bool(j, "quant.fp16", &q->fp16));
    LV_TRY(job_get_int(j, "quant.outlier_cols", &q->outlier_cols));
    if (q->share && strcmp(q->prop, "fp") != 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "quant.share_codebooks = %s needs quant.propagation = fp "
                "(the shared codebooks are fitted to every block's Hessian at once, so all "
                "blocks see the FP model's activations)", share);
    LV_TRY(pipe_job_stage_configs(j, &q->acfg, &q->ft_enable, &q->ft));
    LV_TRY(pipe_job_pv_config(j, &q->pv_enable, &q->pv, &q->pv_nsamples));
    {
        const char *sb = NULL;
        LV_TRY(job_get_str(j, "quant.scale_bits", &sb));
        q->scale_bits = strcmp(sb, "8") ? 16 : 8;
    }
    {
        const char *pd = NULL;
        LV_TRY(job_get_str(j, "pvtune.data", &pd));
        q->pv_data_model = strcmp(pd, "model") == 0;
    }
    LV_TRY(job_get_int(j, "apiq.rank", &q->apiq_rank));
    LV_TRY(job_get_int(j, "apiq.iters", &q->apiq_iters));
    if (q->apiq_rank > 0 && (q->share || q->ft_enable))
        LV_FAIL(LV_ERR_INVALID_ARG, "apiq.rank = %lld needs quant.share_codebooks = none and "
                "finetune.enable = false (ApiQ fits adapters per linear; block fine-tuning does "
                "not train through them yet)", (long long)q->apiq_rank);
    if (q->outlier_cols > 0 && (q->pv_enable || q->apiq_rank > 0))
        LV_FAIL(LV_ERR_INVALID_ARG, "quant.outlier_cols = %lld needs pvtune.enable = false and "
                "apiq.rank = 0 (neither trains with outlier columns yet)",
                (long long)q->outlier_cols);
    if (q->pv_enable && q->pv.device == STAGE_PV_DEVICE_CUDA && lv_cuda_device_count() < 1)
        LV_FAIL(LV_ERR_UNSUPPORTED, "pvtune.device = cuda, but no CUDA device is usable here "
                "(a CPU-only build, no GPU, or CUDA_VISIBLE_DEVICES hides it); use "
                "pvtune.device = cpu");
    if (q->pv_enable && q->apiq_rank > 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "pvtune.enable needs apiq.rank = 0 (PV-tuning does not train "
                "through ApiQ adapters yet)");
    if (ck[0])
        snprintf(q->ckpt_dir, sizeof q->ckpt_dir, "%s", ck);
    else
        snprintf(q->ckpt_dir, sizeof q->ckpt_dir, "%s/checkpoint", q->out_dir);
    q->job_hash = job_hash_blocks(j); /* blocks, shared AQLM: [pvtune] does not matter */
    q->pv_hash = job_hash(j);         /* PV-tuning files and the final model */
done:
    return st;
}

/* Identity of the model: its config and a sample of every tensor (FNV-1a of
 * the first and last 4 KiB of each). Cheap for 70B, and two models that share
 * a config but not weights differ in it. */
static uint64_t model_hash(const lv_model *m)
{
    uint64_t h = 0xcbf29ce484222325ULL;
#define MIX(ptr, n)                                                          \
    do {                                                                     \
        const unsigned char *b_ = (const unsigned char *)(ptr);              \
        for (size_t i_ = 0; i_ < (n); i_++) { h ^= b_[i_]; h *= 0x100000001b3ULL; } \
    } while (0)
    MIX(&m->cfg, sizeof m->cfg);
    const lv_model_config *c = &m->cfg;
    size_t emb = (size_t)c->vocab_size * c->dim;
    const float *t[4] = {m->tok_emb, m->final_norm, m->wcls, NULL};
    size_t n[4] = {emb, (size_t)c->dim, emb, 0};
    for (int k = 0; k < 3; k++) {
        size_t s = n[k] < 1024 ? n[k] : 1024;
        MIX(t[k], s * 4);
        MIX(t[k] + n[k] - s, s * 4);
    }
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const float *w = lv_layer_weight(&m->layers[l], (lv_lin)k);
            int64_t o, i;
            lv_lin_shape(c, (lv_lin)k, &o, &i);
            size_t len = (size_t)(o * i), s = len < 1024 ? len : 1024;
            MIX(w, s * 4);
            MIX(w + len - s, s * 4);
        }
#undef MIX
    return h;
}

lv_status pipe_eval_model(const lv_model *m, const qjob *q, double *ppl)
{
    lv_status st = LV_OK;
    int32_t *toks = NULL;
    int64_t n = 0;
    stage_eval_result r;
    LV_TRY(io_data_tokens(q->eval_path, q->tok, m->cfg.vocab_size, &toks, &n));
    stage_eval_opts eo = {.ctx = (int)q->eval_ctx, .max_tokens = q->eval_max, .batch = 0, .progress = 0};
    LV_TRY(stage_eval_ppl(m, toks, n, &eo, &r));
    *ppl = r.ppl;
done:
    free(toks);
    return st;
}

typedef struct {
    kern_fwd_ws *ws;
    stage_block_hessians h;
    pipe_buf act[3];          /* storage of the three below */
    float *x_in, *y_fp, *y_q; /* (n_seq, T, dim) each: swapped as blocks advance */
    float *H32;               /* (max d_in)^2 */
    float *wq_scratch;        /* floats of one block's linears */
    lv_layer *layers;         /* (n_layers) */
} qwork;

static void qwork_free(qwork *w)
{
    kern_fwd_ws_free(w->ws);
    stage_block_hessians_free(&w->h);
    for (int i = 0; i < 3; i++) pipe_buf_free(&w->act[i]);
    free(w->H32);
    free(w->wq_scratch);
    free(w->layers);
    memset(w, 0, sizeof *w);
}

static lv_status qwork_init(qwork *w, const qjob *q, int micro)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    size_t act = (size_t)q->n_seq * (size_t)q->T * (size_t)c->dim;
    size_t dmax = (size_t)(c->dim > c->hidden_dim ? c->dim : c->hidden_dim), lin = 0;
    memset(w, 0, sizeof *w);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        lin += (size_t)(o * i);
    }
    LV_TRY(kern_fwd_ws_init(&w->ws, c, micro, q->T, 0));
    LV_TRY(stage_block_hessians_init(&w->h, c));
    for (int i = 0; i < 3; i++) LV_TRY(pipe_buf_alloc(&w->act[i], act, q->scratch_dir, "act"));
    w->x_in = w->act[0].p;
    w->y_fp = w->act[1].p;
    w->y_q = w->act[2].p;
    LV_ALLOC(w->H32, dmax * dmax);
    LV_ALLOC(w->wq_scratch, lin);
    LV_ALLOC(w->layers, (size_t)c->n_layers);
done:
    if (st != LV_OK) qwork_free(w);
    return st;
}

const char *const pipe_prof_names[PIPE_PROF_N] = {"calibration_s", "aqlm_init_s", "beam_search_s",
                                                   "codebook_update_s", "finetune_s",
                                                   "quantized_forward_s", "checkpoint_io_s",
                                                   "apiq_s", "pvtune_s"};

lv_status pipe_fit_outliers(qjob *q, const float *W, const float *H, lv_aq_layer *L, double *rel)
{
    lv_status st = LV_OK;
    float *What = NULL;
    const double t = lv_now();
    const int n = q->outlier_cols < L->d_in ? (int)q->outlier_cols : (int)L->d_in;
    if (n > 0) LV_TRY(stage_outliers_fit(W, H, L->d_out, L->d_in, L, n, NULL));
    LV_ALLOC(What, (size_t)(L->d_out * L->d_in));
    LV_TRY(stage_aqlm_dequant(L, What));
    LV_TRY(stage_aqlm_layer_error(W, What, H, L->d_out, L->d_in, rel));
    q->prof[PIPE_PROF_UPDATE] += lv_now() - t;
done:
    free(What);
    return st;
}

/* Quantize the seven linears of block `layer` from the Hessians in w->h. */
static lv_status quantize_linears(qjob *q, int layer, qwork *w, lv_qblock *b)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    stage_aqlm_config acfg = q->acfg;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        LV_TRY(stage_hessian_to_f32(stage_block_hessian_for(&w->h, (lv_lin)k), i, w->h.n_rows,
                                    w->H32));
        /* one seed per (run seed, layer, linear): resume-independent */
        acfg.seed = (uint64_t)q->seed * 1000003ULL + (uint64_t)layer * 16 + (uint64_t)k;
        stage_aqlm_stats stats;
        lv_aq_layer_free(&b->lin[k]);
        if (q->apiq_rank > 0) { /* quantization and adapters fitted together */
            stage_apiq_stats as;
            LV_TRY(stage_apiq_layer(lv_layer_weight(&q->fp->layers[layer], (lv_lin)k), w->H32, o,
                                    i, (int)q->apiq_rank, (int)q->apiq_iters, &acfg, &b->lin[k],
                                    b->lora_A[k], b->lora_B[k], &as));
            q->prof[PIPE_PROF_APIQ] += as.wall_s;
            b->rel_err[k] = as.rel_err_best;
            continue;
        }
        LV_TRY(stage_aqlm_run(lv_layer_weight(&q->fp->layers[layer], (lv_lin)k), w->H32, o, i, &acfg,
                              &b->lin[k], &stats));
        q->prof[PIPE_PROF_AQLM_INIT] += stats.init_s;
        q->prof[PIPE_PROF_BEAM] += stats.beam_s;
        q->prof[PIPE_PROF_UPDATE] += stats.update_s;
        b->rel_err[k] = stats.iters > 0 ? stats.rel_err[(stats.iters < STAGE_AQLM_MAX_HIST
                                                         ? stats.iters : STAGE_AQLM_MAX_HIST) - 1]
                                        : stats.rel_err_init;
        if (q->outlier_cols > 0)
            LV_TRY(pipe_fit_outliers(q, lv_layer_weight(&q->fp->layers[layer], (lv_lin)k), w->H32,
                                     &b->lin[k], &b->rel_err[k]));
    }
done:
    return st;
}

double pipe_rel_mse(const float *a, const float *ref, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        double d = (double)a[i] - ref[i];
        num += d * d;
        den += (double)ref[i] * ref[i];
    }
    return den > 0 ? num / den : 0;
}

static void swap_ptr(float **a, float **b)
{
    float *t = *a;
    *a = *b;
    *b = t;
}

void pipe_block_path(const qjob *q, int layer, char *path, size_t cap)
{
    snprintf(path, cap, "%s/block_%03d.h5", q->ckpt_dir, layer);
}

/* One block: resume it from its checkpoint when that verifies, else quantize it
 * and checkpoint it; then advance the activations w->x_in to its outputs. */
lv_status pipe_round_block_f16(const qjob *q, int layer, lv_qblock *b)
{
    lv_status st = LV_OK;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        char what[64];
        snprintf(what, sizeof what, "quant.fp16: block %d %s", layer, lv_lin_name((lv_lin)k));
        if (q->fp16) LV_TRY(lv_aq_layer_round_f16(&b->lin[k], what));
        snprintf(what, sizeof what, "quant.scale_bits = 8: block %d %s", layer, lv_lin_name((lv_lin)k));
        if (q->scale_bits == 8) LV_TRY(lv_aq_layer_round_scales8(&b->lin[k], what));
    }
done:
    return st;
}

static lv_status run_block(qjob *q, int layer, qwork *w, lv_qblock *b, int micro)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    const size_t n = (size_t)q->n_seq * (size_t)q->T * (size_t)c->dim;
    const int prop_fp = !strcmp(q->prop, "fp");
    char path[4200];
    int resumed = 0;
    lv_model view;
    double t = lv_now();
    pipe_block_path(q, layer, path, sizeof path);
    if (access(path, F_OK) == 0) {
        lv_qblock tmp;
        int got = -1;
        if (io_qblock_read(path, c, q->job_hash, q->model_hash, &tmp, &got) == LV_OK && got == layer) {
            lv_qblock_free(b);
            *b = tmp;
            resumed = 1;
        } else {
            char why[512];
            lv_last_error_line(why, sizeof why);
            lv_warn("block %d: checkpoint not used, recomputing: %s", layer, got == layer || got < 0 ? why : "holds another layer");
            if (got >= 0) lv_qblock_free(&tmp);
        }
    }
    q->prof[PIPE_PROF_IO] += lv_now() - t;
    t = lv_now();
    if (!resumed || prop_fp) {
        memcpy(w->y_fp, w->x_in, n * sizeof(float));
        if (!resumed) stage_block_hessians_zero(&w->h);
        LV_TRY(stage_calib_block(q->fp, layer, w->y_fp, q->n_seq, q->T, w->ws, micro,
                                 resumed ? NULL : &w->h));
    }
    q->prof[PIPE_PROF_CALIB] += lv_now() - t;
    if (!resumed) LV_TRY(quantize_linears(q, layer, w, b));
    t = lv_now();
    if (!resumed && q->ft_enable) {
        /* codes fixed; codebooks, scales and norms trained against the FP outputs */
        stage_ft_config ft = q->ft;
        stage_ft_stats fs;
        ft.seed = (uint64_t)q->seed * 1000003ULL + (uint64_t)layer;
        LV_TRY(stage_finetune_block(c, b, w->x_in, w->y_fp, q->n_seq, q->T, &ft, &fs));
        lv_log("block %d: fine-tuning: held-out rel MSE %.4g -> %.4g (%d epochs, %.1f s)",
               layer + 1, fs.mse_before, fs.mse_after, fs.epochs, fs.wall_s);
    }
    q->prof[PIPE_PROF_FT] += lv_now() - t;
    if (!resumed) LV_TRY(pipe_round_block_f16(q, layer, b));
    t = lv_now();
    if (!resumed || !prop_fp) {
        LV_TRY(io_qblock_fp_view(q->fp, layer, b, w->wq_scratch, w->layers, &view));
        memcpy(w->y_q, w->x_in, n * sizeof(float));
        LV_TRY(stage_calib_block(&view, layer, w->y_q, q->n_seq, q->T, w->ws, micro, NULL));
    }
    if (!resumed) b->block_mse = pipe_rel_mse(w->y_q, w->y_fp, n);
    q->prof[PIPE_PROF_QFWD] += lv_now() - t;
    t = lv_now();
    if (!resumed) {
        LV_TRY(io_qblock_write(path, b, layer, c, q->job_hash, q->model_hash));
        q->prof[PIPE_PROF_IO] += lv_now() - t;
    } else {
        q->n_resumed++;
    }
    swap_ptr(&w->x_in, prop_fp ? &w->y_fp : &w->y_q);
done:
    return st;
}

static lv_status load_tokens(qjob *q, const char *path, int32_t **toks, int64_t *n)
{
    lv_status st = LV_OK;
    char magic[8] = {0};
    FILE *f = fopen(path, "rb");
    int is_tok = f && fread(magic, 1, 8, f) == 8 && !memcmp(magic, "LVQTOK01", 8);
    if (f) fclose(f);
    if (!is_tok && !q->tok) {
        char found[4200];
        const char *tp = q->tok_path;
        if (!tp[0]) {
            LV_TRY(pipe_find_tokenizer(q->model_path, q->fp->cfg.vocab_size, found, sizeof found));
            tp = found;
        }
        LV_TRY(io_tokenizer_open(&q->tok, tp, q->fp->cfg.vocab_size));
    }
    LV_TRY(io_data_tokens(path, q->tok, q->fp->cfg.vocab_size, toks, n));
done:
    return st;
}

static lv_status write_summary(const qjob *q, const lv_qmodel *qm, const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *blocks = NULL;
    char *s = NULL;
    FILE *f = NULL;
    char tmp[4200];
    if (!o) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    cJSON_AddStringToObject(o, "model", q->model_path);
    cJSON_AddNumberToObject(o, "bpw_total", lv_qmodel_bits_per_weight(qm));
    cJSON_AddNumberToObject(o, "outlier_cols", (double)q->outlier_cols);
    cJSON_AddNumberToObject(o, "num_codebooks", qm->M);
    cJSON_AddNumberToObject(o, "nbits", qm->nbits);
    cJSON_AddNumberToObject(o, "group_size", qm->g);
    if (q->eval_path[0]) {
        cJSON_AddNumberToObject(o, "ppl_fp", q->ppl_fp);
        cJSON_AddNumberToObject(o, "ppl_quant", q->ppl_quant);
    } else {
        cJSON_AddNullToObject(o, "ppl_fp");
        cJSON_AddNullToObject(o, "ppl_quant");
    }
    if (q->pv_enable) {
        cJSON *pv = cJSON_AddObjectToObject(o, "pvtune");
        const stage_pv_stats *x = &q->pv_stats;
        if (q->eval_path[0]) cJSON_AddNumberToObject(pv, "ppl_blockwise", q->ppl_blockwise);
        cJSON_AddBoolToObject(pv, "resumed", q->pv_resumed);
        cJSON_AddNumberToObject(pv, "ranks", q->n_ranks);
        cJSON_AddNumberToObject(pv, "resumed_after_v_steps", (double)q->pv_resumed_from);
        if (!q->pv_resumed) {
            cJSON_AddNumberToObject(pv, "loss_before", x->loss_before);
            cJSON_AddNumberToObject(pv, "loss_after", x->loss_after);
            cJSON_AddNumberToObject(pv, "v_steps", (double)x->v_steps);
            cJSON_AddNumberToObject(pv, "p_steps", (double)x->p_steps);
            cJSON_AddNumberToObject(pv, "codes_changed", (double)x->codes_changed);
            cJSON_AddNumberToObject(pv, "v_s", x->v_s);
            cJSON_AddNumberToObject(pv, "p_s", x->p_s);
            cJSON_AddNumberToObject(pv, "wall_s", x->wall_s);
            cJSON_AddNumberToObject(pv, "eval_s", x->eval_s);
            cJSON_AddNumberToObject(pv, "best_step", (double)x->best_step);
            cJSON_AddNumberToObject(pv, "epochs", x->epochs);
            if (x->v_steps > 0) cJSON_AddNumberToObject(pv, "s_per_v_step", x->v_s / (double)x->v_steps);
            if (x->p_steps > 0) cJSON_AddNumberToObject(pv, "s_per_p_step", x->p_s / (double)x->p_steps);
        }
    }
    if (q->apiq_rank > 0) {
        int64_t n_lora = 0;
        double lbits = io_qmodel_lora_bits_per_weight(qm, &n_lora);
        cJSON_AddNumberToObject(o, "lora_rank", (double)q->apiq_rank);
        cJSON_AddNumberToObject(o, "lora_params", (double)n_lora);
        cJSON_AddNumberToObject(o, "lora_bits_per_weight_fp16", lbits);
        if (q->eval_path[0]) cJSON_AddNumberToObject(o, "ppl_quant_no_lora", q->ppl_quant_no_lora);
    }
    cJSON_AddNumberToObject(o, "wall_s", q->wall_s);
    cJSON_AddNumberToObject(o, "peak_rss_bytes", (double)lv_peak_rss_bytes());
    cJSON_AddNumberToObject(o, "blocks_resumed", q->n_resumed);
    char hex[32];
    snprintf(hex, sizeof hex, "%016" PRIx64, q->job_hash);
    cJSON_AddStringToObject(o, "job_hash", hex);
    snprintf(hex, sizeof hex, "%016" PRIx64, q->pv_hash);
    cJSON_AddStringToObject(o, "job_hash_full", hex);
    snprintf(hex, sizeof hex, "%016" PRIx64, q->model_hash);
    cJSON_AddStringToObject(o, "model_hash", hex);
    cJSON *prof = cJSON_AddObjectToObject(o, "profile");
    for (int i = 0; i < PIPE_PROF_N; i++) cJSON_AddNumberToObject(prof, pipe_prof_names[i], q->prof[i]);
    cJSON_AddNumberToObject(prof, "eval_s", q->eval_s);
    cJSON_AddStringToObject(prof, "note", "seconds summed over ranks; eval_s is rank 0's "
                            "evaluation of the FP and quantized models");
    blocks = cJSON_AddArrayToObject(o, "blocks");
    for (int l = 0; l < qm->cfg.n_layers; l++) {
        cJSON *b = cJSON_CreateObject();
        cJSON_AddNumberToObject(b, "block_mse", qm->blocks[l].block_mse);
        for (int k = 0; k < LV_LIN_COUNT; k++)
            cJSON_AddNumberToObject(b, lv_lin_name((lv_lin)k), qm->blocks[l].rel_err[k]);
        cJSON_AddItemToArray(blocks, b);
    }
    s = cJSON_Print(o);
    if (!s) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid()) >= (int)sizeof tmp)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: path too long", path);
    f = fopen(tmp, "w");
    if (!f) LV_FAIL(LV_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    if (fprintf(f, "%s\n", s) < 0 || fclose(f) != 0) {
        f = NULL;
        LV_FAIL(LV_ERR_IO, "%s: write failed", tmp);
    }
    f = NULL;
    LV_TRY(io_commit_file(tmp, path));
done:
    if (f) fclose(f);
    free(s);
    cJSON_Delete(o);
    return st;
}

/* The inputs of this rank's first block, w->x_in, streamed through the ranks:
 * rank 0 embeds the calibration tokens; every other rank receives them from
 * the rank before, in chunks of `micro` sequences. Each chunk then runs
 * through this shard's FP blocks and goes on to the next rank, so the FP
 * calibration pass is a pipeline over the ranks and no rank recomputes the
 * blocks before its shard. The chunks are the micro-batches every FP pass uses,
 * so the floats are those of a single process. Collective over the ranks. */
static lv_status stream_inputs(qjob *q, comm_ctx *comm, int first, int last, qwork *w,
                               int micro)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    const int rank = comm_rank(comm), size = comm_size(comm);
    const int64_t row = (int64_t)q->T * c->dim;
    const int tag = 7001;
    float *chunk = NULL;
    const double t0 = lv_now();
    if (rank == 0) kern_embed_ref(w->x_in, q->fp->tok_emb, q->seqs, q->n_seq * q->T, c->dim);
    if (size == 1) goto done;
    LV_ALLOC(chunk, (size_t)micro * (size_t)row);
    for (int64_t s0 = 0; s0 < q->n_seq; s0 += micro) {
        const int B = (int)(q->n_seq - s0 < micro ? q->n_seq - s0 : micro);
        const size_t bytes = sizeof(float) * (size_t)B * (size_t)row;
        float *x = w->x_in + s0 * row;
        if (rank > 0) LV_TRY(comm_recv(comm, x, bytes, rank - 1, tag));
        if (rank == size - 1) continue;
        memcpy(chunk, x, bytes);
        for (int l = first; l < last; l++)
            LV_TRY(stage_calib_block(q->fp, l, chunk, B, q->T, w->ws, micro, NULL));
        LV_TRY(comm_send(comm, chunk, bytes, rank + 1, tag));
    }
done:
    q->prof[PIPE_PROF_CALIB] += lv_now() - t0;
    free(chunk);
    return st;
}

/* This rank's part: its inputs streamed from the rank before, then its blocks. */
static lv_status quantize_shard(qjob *q, comm_ctx *comm, pipe_progress *prog, int first,
                                int last, double t_start)
{
    lv_status st = LV_OK;
    qwork w;
    lv_qblock b;
    const lv_model_config *c = &q->fp->cfg;
    const int micro = q->n_seq < 8 ? (int)q->n_seq : 8;
    memset(&w, 0, sizeof w);
    memset(&b, 0, sizeof b);
    LV_TRY(qwork_init(&w, q, micro));
    LV_TRY(stream_inputs(q, comm, first, last, &w, micro));
    if (first < last && comm_size(comm) > 1 && q->rank_logs)
        lv_log("inputs of block %d received (%.1f s)", first, lv_now() - t_start);
    for (int l = first; l < last; l++) {
        if (pipe_stop_requested())
            LV_FAIL(LV_ERR_STOPPED, "stopped by a signal before block %d; finished blocks are "
                    "checkpointed in %s; rerun the same job to resume", l, q->ckpt_dir);
        int before = q->n_resumed;
        const double tb = lv_now();
        LV_TRY(lv_qblock_init(&b, c, q->acfg.n_codebooks, q->acfg.nbits, q->acfg.group_size));
        if (q->apiq_rank > 0) LV_TRY(lv_qblock_lora_init(&b, (int)q->apiq_rank));
        memcpy(b.attn_norm, q->fp->layers[l].attn_norm, sizeof(float) * (size_t)c->dim);
        memcpy(b.ffn_norm, q->fp->layers[l].ffn_norm, sizeof(float) * (size_t)c->dim);
        LV_TRY(run_block(q, l, &w, &b, micro));
        LV_TRY(pipe_progress_block(prog, l, &b, q->n_resumed > before, lv_now() - tb));
        lv_qblock_free(&b);
    }
done:
    lv_qblock_free(&b);
    qwork_free(&w);
    return st;
}

/* Every block from its verified checkpoint into *out (rank 0; every rank
 * when PV-tuning follows). */
static lv_status assemble_blocks(qjob *q, lv_qmodel **out)
{
    lv_status st = LV_OK;
    lv_qmodel *qm = NULL;
    char path[4200];
    const lv_model_config *c = &q->fp->cfg;
    LV_TRY(lv_qmodel_init(&qm, q->fp, q->acfg.n_codebooks, q->acfg.nbits, q->acfg.group_size));
    for (int l = 0; l < c->n_layers; l++) {
        int got = -1;
        pipe_block_path(q, l, path, sizeof path);
        lv_qblock_free(&qm->blocks[l]);
        LV_TRY(io_qblock_read(path, c, q->job_hash, q->model_hash, &qm->blocks[l], &got));
        if (got != l) LV_FAIL(LV_ERR_FORMAT, "%s: holds block %d, expected %d", path, got, l);
    }
    qm->job_hash = q->job_hash;
    qm->model_hash = q->model_hash;
    qm->shared_codebooks = q->share;
    *out = qm;
    qm = NULL;
done:
    lv_qmodel_free(qm);
    return st;
}

/* Rank 0: the final model qm written, evaluated and summarised. */
static lv_status finish(qjob *q, const lv_qmodel *qm_in, double t_start)
{
    lv_status st = LV_OK;
    lv_model *qfp = NULL;
    char path[4200];
    /* the blocks' scales were put on the 8-bit grid as each was done (and after
     * PV-tuning): the final model says so, and bits per weight count 8 */
    lv_qmodel fin = *qm_in;
    fin.scale_bits = q->scale_bits == 8 ? 8 : 0;
    const lv_qmodel *qm = &fin;
    snprintf(path, sizeof path, "%s/model.h5", q->out_dir);
    LV_TRY(io_qmodel_write(qm, path));
    lv_log("wrote %s (%.3f bits per weight: codes + codebooks + scales%s)", path,
           lv_qmodel_bits_per_weight(qm), q->outlier_cols > 0 ? " + outlier columns" : "");
    const double te = lv_now();
    if (q->eval_path[0]) {
        LV_TRY(pipe_eval_model(q->fp, q, &q->ppl_fp));
        LV_TRY(io_qmodel_to_fp(qm, &qfp));
        LV_TRY(pipe_eval_model(qfp, q, &q->ppl_quant));
        if (q->apiq_rank > 0) { /* the same quantized model without its adapters */
            io_model_free(qfp);
            qfp = NULL;
            LV_TRY(io_qmodel_to_fp_opts(qm, 0, &qfp));
            LV_TRY(pipe_eval_model(qfp, q, &q->ppl_quant_no_lora));
        }
    }
    q->eval_s = lv_now() - te;
    q->wall_s = lv_now() - t_start;
    snprintf(path, sizeof path, "%s/summary.json", q->out_dir);
    LV_TRY(write_summary(q, qm, path));
    if (q->eval_path[0] && q->apiq_rank > 0)
        printf("perplexity FP %.4f -> quantized %.4f with its rank-%lld ApiQ adapters (%.4f "
               "without them) at %.3f bits per weight + %.3f of fp16 adapters (%.1f s)\n",
               q->ppl_fp, q->ppl_quant, (long long)q->apiq_rank, q->ppl_quant_no_lora,
               lv_qmodel_bits_per_weight(qm), io_qmodel_lora_bits_per_weight(qm, NULL),
               q->wall_s);
    else if (q->eval_path[0])
        printf("perplexity FP %.4f -> quantized %.4f at %.3f bits per weight (%.1f s)\n",
               q->ppl_fp, q->ppl_quant, lv_qmodel_bits_per_weight(qm), q->wall_s);
    else
        printf("quantized at %.3f bits per weight (%.1f s)\n", lv_qmodel_bits_per_weight(qm),
               q->wall_s);
done:
    io_model_free(qfp);
    return st;
}

/* Load the job's model and calibration data (every rank, identically). */
static lv_status prepare(qjob *q, const job_file *j)
{
    lv_status st = LV_OK;
    int32_t *toks = NULL;
    int64_t n_tok = 0;
    LV_TRY(read_job(q, j));
    LV_TRY(io_model_open(&q->fp, q->model_path, IO_MODEL_AUTO));
    const lv_model_config *c = &q->fp->cfg;
    q->model_hash = model_hash(q->fp);
    q->T = q->seqlen > 0 ? (int)q->seqlen : c->seq_len;
    if (q->T > c->seq_len)
        LV_FAIL(LV_ERR_INVALID_ARG, "calibration.seqlen %d is beyond the model's seq_len %d", q->T,
                c->seq_len);
    q->n_seq = q->nsamples;
    LV_TRY(load_tokens(q, q->calib_path, &toks, &n_tok));
    if (q->calib_skip > 0 && q->calib_skip > n_tok - q->T)
        LV_FAIL(LV_ERR_INVALID_ARG, "calibration.skip_tokens = %lld leaves fewer than one "
                "sequence of %d tokens in %s (%lld tokens)", (long long)q->calib_skip, q->T,
                q->calib_path, (long long)n_tok);
    LV_TRY(stage_calib_sequences(toks + q->calib_skip, n_tok - q->calib_skip, q->n_seq, q->T,
                                 (uint64_t)q->seed, &q->seqs));
    if (q->pv_enable && q->pv_nsamples > 0 && !q->pv_data_model) /* model: pipe_pv_tune samples */
        LV_TRY(stage_calib_sequences(toks + q->calib_skip, n_tok - q->calib_skip,
                                     q->pv_nsamples, q->T,
                                     (uint64_t)q->seed * 1000003ULL + 991, &q->pv_seqs));
    if (q->eval_path[0] && access(q->eval_path, R_OK) != 0)
        LV_FAIL(LV_ERR_IO, "%s: cannot read output.eval_data: %s", q->eval_path, strerror(errno));
done:
    free(toks);
    return st;
}

/* Collective. Every rank returns the same status; *failed_rank is the lowest
 * rank that failed (-1 when none), whose own message is in its lv_last_error. */
static lv_status run_quantize(qjob *q, const job_file *j, comm_ctx *comm, int *failed_rank)
{
    lv_status st = LV_OK, global = LV_OK;
    const int rank = comm_rank(comm), size = comm_size(comm);
    lv_qmodel *qm = NULL;
    q->n_ranks = size;
    double t0 = lv_now();
    *failed_rank = -1;

    st = prepare(q, j);
    if (st == LV_OK && rank == 0) {
        st = io_mkdir_p(q->out_dir);
        if (st == LV_OK) st = io_mkdir_p(q->ckpt_dir);
    }
    LV_TRY(comm_agree_status(comm, st, &global, failed_rank));
    if (global != LV_OK) {
        st = global;
        goto done;
    }
    const lv_model_config *c = &q->fp->cfg;
    int first, last;
    pipe_shard_of(c->n_layers, rank, size, &first, &last);
    if (rank == 0)
        lv_log("quantize %s: %d blocks on %d rank%s, %lld x %d calibration tokens, %dx%dg%d, "
               "beam %d, propagation %s%s, checkpoints in %s", q->model_path, c->n_layers, size,
               size > 1 ? "s" : "", (long long)q->n_seq, q->T, q->acfg.n_codebooks,
               q->acfg.nbits, q->acfg.group_size, q->acfg.beam_size, q->prop,
               q->share == LV_SHARE_MODEL  ? ", codebooks shared by all linears"
               : q->share == LV_SHARE_TYPE ? ", one codebook per linear type shared by the blocks"
                                           : "",
               q->ckpt_dir);
    if (size > 1 && q->rank_logs) lv_log("shard: blocks %d..%d", first, last - 1);
    pipe_progress prog;
    LV_TRY(pipe_progress_init(&prog, comm, c->n_layers, t0, q->rank_logs));
    st = q->share ? pipe_quantize_shared(q, comm, &prog, t0)
                        : quantize_shard(q, comm, &prog, first, last, t0);
    {
        lv_status wst = pipe_progress_finish(&prog, st);
        if (st == LV_OK) st = wst;
    }
    pipe_progress_free(&prog);
    LV_TRY(comm_agree_status(comm, st, &global, failed_rank));
    if (global != LV_OK) {
        st = global;
        goto done;
    }
    if (rank == 0 || q->pv_enable) st = assemble_blocks(q, &qm);
    if (q->pv_enable) { /* every rank takes part */
        if (size > 1) {
            LV_TRY(comm_agree_status(comm, st, &global, failed_rank));
            st = global;
        }
        if (st == LV_OK) st = pipe_pv_tune(q, comm, &qm);
        if (size > 1 && st != LV_ERR_STOPPED) {
            lv_status pst = comm_agree_status(comm, st, &global, failed_rank);
            if (st == LV_OK) st = pst != LV_OK ? pst : global;
        }
        if (st != LV_OK) goto done;
    }
    LV_TRY(comm_allreduce_sum_f64(comm, q->prof, PIPE_PROF_N));
    if (rank == 0) st = finish(q, qm, t0);
    /* the others wait while rank 0 assembles and evaluates, however long that
     * takes (a dead rank 0 ends the job through mpirun/srun) */
    const double timeout = comm_timeout(comm);
    comm_set_timeout(comm, 1e9);
    lv_status ast = comm_agree_status(comm, st, &global, failed_rank);
    comm_set_timeout(comm, timeout);
    LV_TRY(ast);
    st = global;
done:
    lv_qmodel_free(qm);
    return st;
}

int pipe_cmd_quantize(int argc, char **argv)
{
    const char *pos[1] = {NULL};
    int n_pos = 0, quiet = 0, help_keys = 0, rank_logs = 0;
    const pipe_opt opts[] = {
        {"set", PIPE_OPT_STR, NULL, "section.key=value: override a job key (repeatable)"},
        {"quiet", PIPE_OPT_FLAG, &quiet, "no progress on stderr"},
        {"rank-logs", PIPE_OPT_FLAG, &rank_logs,
         "every rank also logs its own blocks (default: rank 0 prints one line per block)"},
        {"help-keys", PIPE_OPT_FLAG, &help_keys, "print every job-file key (markdown) and exit"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *sets[64];
    int n_sets = 0;
    char *rest[256];
    int n_rest = 0;
    /* --set may repeat: take those out before the generic parser */
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--set") || !strncmp(argv[i], "--set=", 6)) {
            const char *v = argv[i][5] == '=' ? argv[i] + 6 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v || n_sets == 64) {
                fprintf(stderr, "llmvq quantize: --set needs section.key=value (at most 64)\n");
                return PIPE_EXIT_USAGE;
            }
            sets[n_sets++] = v;
        } else if (n_rest < 256) {
            rest[n_rest++] = argv[i];
        }
    }
    int rc = pipe_opts_parse("quantize", "JOBFILE [--set section.key=value ...]", opts, n_opts,
                             n_rest, rest, pos, 1, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (help_keys) {
        job_schema_markdown(stdout);
        return PIPE_EXIT_OK;
    }
    if (n_pos != 1) {
        fprintf(stderr, "llmvq quantize: need exactly one JOBFILE (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (quiet) lv_log_set_quiet(1);
    lv_status st = LV_OK;
    job_file *j = NULL;
    comm_ctx *comm = NULL;
    comm_config ccfg = {.allow_nccl = 0, .timeout_s = 0};
    int failed_rank = -1, rank = 0, mpi_up = 0;
    qjob q;
    memset(&q, 0, sizeof q);
    q.rank_logs = rank_logs;
    if (MPI_Init(NULL, NULL) != MPI_SUCCESS) {
        fprintf(stderr, "llmvq quantize: MPI_Init failed\n");
        return PIPE_EXIT_ERROR;
    }
    mpi_up = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    /* one progress stream: rank 0's (errors are printed by every rank regardless) */
    if (rank != 0 && !rank_logs && !quiet) lv_log_set_quiet(2);
    LV_TRY(job_load(&j, pos[0]));
    for (int i = 0; i < n_sets; i++) LV_TRY(job_set(j, sets[i]));
    LV_TRY(job_validate(j));
    pipe_signals_install();
    LV_TRY(job_get_float(j, "run.comm_timeout_s", &ccfg.timeout_s));
    LV_TRY(comm_ctx_init(&comm, MPI_COMM_WORLD, &ccfg));
    lv_error_set_rank(comm_size(comm) > 1 ? comm_rank(comm) : -1);
    st = run_quantize(&q, j, comm, &failed_rank);
done:
    free(q.seqs);
    free(q.pv_seqs);
    io_tokenizer_free(q.tok);
    io_model_free(q.fp);
    job_free(j);
    int code = PIPE_EXIT_OK;
    if (st == LV_ERR_STOPPED) {
        /* every rank stopped at a safe point; one line from rank 0 */
        if (rank == 0) {
            char line[1024];
            lv_last_error_line(line, sizeof line);
            fprintf(stderr, "llmvq quantize: %s\n", line[0] ? line : "stopped by a signal");
        }
        code = PIPE_EXIT_STOPPED;
    } else if (st != LV_OK) {
        /* the rank that failed says why; the others name it */
        if (failed_rank < 0 || failed_rank == rank)
            code = pipe_report_error("quantize");
        else
            code = PIPE_EXIT_ERROR;
    }
    comm_ctx_free(comm);
    if (mpi_up) MPI_Finalize();
    return code;
}
