/* quantize_shared.c: `llmvq quantize` with quant.share_codebooks = model (ONE
 * codebook tensor for every linear of the model) or type (one tensor per
 * linear type, shared by the blocks) (docs/pipeline.md "Shared codebooks").
 * On small models per-linear codebooks cost more bits than the codes; shared
 * tensors cost a fraction of a bit.
 *
 *  1. every rank: FP calibration through all blocks, keeping each block's
 *     inputs (n_layers + 1 activation sets, in RAM or spilled to
 *     run.scratch_dir) and every linear's Hessian;
 *  2. shared AQLM over all linears (stage_aqlm_run_shared_dist): each rank
 *     runs the beam searches of its shard's linears, codes are broadcast from
 *     their owners, the joint codebook update runs identically everywhere;
 *     rank 0 checkpoints the result as CKPT/shared_aqlm.h5;
 *  3. joint fine-tuning of all blocks (stage_finetune_shared), split the same way;
 *  4. each rank measures and checkpoints the blocks of its shard.
 * Resume: all block files verified -> nothing to do; else a verified
 * shared_aqlm.h5 skips step 2. Every item is summed in item order on every
 * rank, so the model is bit-identical for any number of ranks. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kern.h"
#include "pipe.h"
#include "pipe_plan.h"
#include "quantize_impl.h"

typedef struct {
    comm_ctx *comm;
    int n_layers, size;
    int per_item;     /* items per block: 7 (linears) or 1 (blocks) */
    int first, last;  /* this rank's blocks */
} sh_dist;

static int sh_block_owner(const sh_dist *d, int block)
{
    for (int r = 0; r < d->size; r++) {
        int f, l;
        pipe_shard_of(d->n_layers, r, d->size, &f, &l);
        if (block >= f && block < l) return r;
    }
    return 0;
}

static int sh_owns(void *user, int item)
{
    const sh_dist *d = user;
    int block = item / d->per_item;
    return block >= d->first && block < d->last;
}

static lv_status sh_share(void *user, int item, void *buf, size_t bytes)
{
    sh_dist *d = user;
    return comm_bcast(d->comm, buf, bytes, sh_block_owner(d, item / d->per_item));
}

typedef struct {
    pipe_buf *xb;       /* (n_layers + 1) storage of x (RAM or run.scratch_dir) */
    float **x;          /* (n_layers + 1) activations (n_seq, T, dim): block l's input is x[l] */
    float **H;          /* (n_layers * 7) float Hessians, linear order */
    const float **W;    /* (n_layers * 7) borrowed FP weights */
    int64_t *d_out, *d_in;
    int n_lin;
} sh_data;

static void sh_data_free(sh_data *s, int n_layers)
{
    for (int l = 0; s->xb && l <= n_layers; l++) pipe_buf_free(&s->xb[l]);
    free(s->xb);
    for (int i = 0; s->H && i < s->n_lin; i++) free(s->H[i]);
    free(s->x);
    free(s->H);
    free(s->W);
    free(s->d_out);
    free(s->d_in);
    memset(s, 0, sizeof *s);
}

/* Step 1: FP activations of every block and every linear's Hessian. */
static lv_status sh_calibrate(const qjob *q, sh_data *s, int micro)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    const int L = c->n_layers;
    const size_t act = (size_t)q->n_seq * (size_t)q->T * (size_t)c->dim;
    kern_fwd_ws *ws = NULL;
    stage_block_hessians h = {0};
    s->n_lin = L * LV_LIN_COUNT;
    LV_ALLOC(s->x, (size_t)L + 1);
    LV_ALLOC(s->xb, (size_t)L + 1);
    LV_ALLOC(s->H, (size_t)s->n_lin);
    LV_ALLOC(s->W, (size_t)s->n_lin);
    LV_ALLOC(s->d_out, (size_t)s->n_lin);
    LV_ALLOC(s->d_in, (size_t)s->n_lin);
    for (int l = 0; l <= L; l++) {
        LV_TRY(pipe_buf_alloc(&s->xb[l], act, q->scratch_dir, "act"));
        s->x[l] = s->xb[l].p;
    }
    LV_TRY(kern_fwd_ws_init(&ws, c, micro, q->T, 0));
    LV_TRY(stage_block_hessians_init(&h, c));
    kern_embed_ref(s->x[0], q->fp->tok_emb, q->seqs, q->n_seq * q->T, c->dim);
    for (int l = 0; l < L; l++) {
        memcpy(s->x[l + 1], s->x[l], act * sizeof(float));
        stage_block_hessians_zero(&h);
        LV_TRY(stage_calib_block(q->fp, l, s->x[l + 1], q->n_seq, q->T, ws, micro, &h));
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const int i = l * LV_LIN_COUNT + k;
            lv_lin_shape(c, (lv_lin)k, &s->d_out[i], &s->d_in[i]);
            s->W[i] = lv_layer_weight(&q->fp->layers[l], (lv_lin)k);
            LV_ALLOC(s->H[i], (size_t)(s->d_in[i] * s->d_in[i]));
            LV_TRY(stage_hessian_to_f32(stage_block_hessian_for(&h, (lv_lin)k), s->d_in[i],
                                        h.n_rows, s->H[i]));
        }
    }
done:
    kern_fwd_ws_free(ws);
    stage_block_hessians_free(&h);
    return st;
}

/* A verified shared_aqlm.h5 of this job and model, read into qm's blocks. */
static int sh_resume_aqlm(const qjob *q, const char *path, lv_qmodel *qm)
{
    lv_qmodel *r = NULL;
    if (access(path, F_OK) != 0) return 0;
    int ok = io_qmodel_read(&r, path) == LV_OK && r->job_hash == q->job_hash &&
             r->model_hash == q->model_hash && r->shared_codebooks == q->share &&
             !memcmp(&r->cfg, &qm->cfg, sizeof r->cfg);
    if (ok) {
        for (int l = 0; l < qm->cfg.n_layers; l++) {
            lv_qblock t = qm->blocks[l];
            qm->blocks[l] = r->blocks[l];
            r->blocks[l] = t;
        }
    } else {
        lv_warn("%s: not used, recomputing the shared AQLM step (not a verified checkpoint of "
               "this job and model)", path);
    }
    lv_qmodel_free(r);
    return ok;
}

/* The final relative error of a shared AQLM run. */
static double sh_final_rel(const stage_aqlm_stats *sx)
{
    if (sx->iters <= 0) return sx->rel_err_init;
    int i = sx->iters < STAGE_AQLM_MAX_HIST ? sx->iters : STAGE_AQLM_MAX_HIST;
    return sx->rel_err[i - 1];
}

/* Step 2: shared AQLM into qm (codes, scales, the codebook copies, rel_err):
 * one run over all linears (LV_SHARE_MODEL) or one per linear type over the
 * blocks (LV_SHARE_TYPE, slot k seeded seed * 1000003 + k). */
static lv_status sh_aqlm(qjob *q, const sh_data *s, sh_dist *d, lv_qmodel *qm)
{
    lv_status st = LV_OK;
    lv_aq_layer *out = NULL;
    const float **Ws = NULL, **Hs = NULL;
    int64_t *dos = NULL, *dis = NULL;
    int *idx = NULL;
    const stage_dist dist = {.user = d, .owns = sh_owns, .share = sh_share};
    const int L = qm->cfg.n_layers, slots = lv_share_slots(q->share);
    const int per_slot = q->share == LV_SHARE_TYPE ? L : s->n_lin;
    double rel0 = 0.0, rel1 = 0.0, wall = 0.0;
    int it_min = 1 << 30, it_max = 0;
    LV_ALLOC(out, (size_t)s->n_lin);
    LV_ALLOC(Ws, (size_t)per_slot);
    LV_ALLOC(Hs, (size_t)per_slot);
    LV_ALLOC(dos, (size_t)per_slot);
    LV_ALLOC(dis, (size_t)per_slot);
    LV_ALLOC(idx, (size_t)s->n_lin);
    for (int slot = 0; slot < slots; slot++) {
        stage_aqlm_stats sx = {0};
        stage_aqlm_config acfg = q->acfg;
        acfg.seed = (uint64_t)q->seed * 1000003ULL + (q->share == LV_SHARE_TYPE ? (uint64_t)slot : 0);
        int n = 0;
        for (int i = 0; i < s->n_lin; i++)
            if (q->share != LV_SHARE_TYPE || i % LV_LIN_COUNT == slot) {
                idx[n] = i;
                Ws[n] = s->W[i];
                Hs[n] = s->H[i];
                dos[n] = s->d_out[i];
                dis[n] = s->d_in[i];
                n++;
            }
        d->per_item = q->share == LV_SHARE_TYPE ? 1 : LV_LIN_COUNT; /* item -> block */
        LV_TRY(stage_aqlm_run_shared_dist(n, Ws, Hs, dos, dis, NULL, &acfg, &dist, out, &sx));
        for (int j = 0; j < n; j++) {
            const int i = idx[j];
            lv_qblock *b = &qm->blocks[i / LV_LIN_COUNT];
            lv_aq_layer *dst = &b->lin[i % LV_LIN_COUNT];
            lv_aq_layer_free(dst);
            *dst = out[j];
            memset(&out[j], 0, sizeof out[j]);
            LV_TRY(pipe_fit_outliers(q, s->W[i], s->H[i], dst, &b->rel_err[i % LV_LIN_COUNT]));
        }
        rel0 += sx.rel_err_init * n / s->n_lin;
        rel1 += sh_final_rel(&sx) * n / s->n_lin;
        wall += sx.wall_s;
        it_min = sx.iters < it_min ? sx.iters : it_min;
        it_max = sx.iters > it_max ? sx.iters : it_max;
        q->prof[PIPE_PROF_AQLM_INIT] += sx.init_s;
        q->prof[PIPE_PROF_BEAM] += sx.beam_s;
        q->prof[PIPE_PROF_UPDATE] += sx.update_s;
    }
    if (q->outlier_cols > 0) {
        double m = 0.0;
        for (int i = 0; i < s->n_lin; i++) m += qm->blocks[i / LV_LIN_COUNT].rel_err[i % LV_LIN_COUNT];
        lv_log("outlier columns: %lld per linear, mean layer rel err %.4f with them",
               (long long)q->outlier_cols, m / s->n_lin);
    }
    if (slots == 1)
        lv_log("shared AQLM: %d linears, mean layer rel err %.4f -> %.4f (%d alternations, %.1f s)",
               s->n_lin, rel0, rel1, it_max, wall);
    else
        lv_log("shared AQLM: %d codebooks (one per linear type) over %d linears, mean layer rel "
               "err %.4f -> %.4f (%d-%d alternations, %.1f s)", slots, s->n_lin, rel0, rel1,
               it_min, it_max, wall);
done:
    for (int i = 0; out && i < s->n_lin; i++) lv_aq_layer_free(&out[i]);
    free(out);
    free(Ws);
    free(Hs);
    free(dos);
    free(dis);
    free(idx);
    return st;
}

/* Is every block of [first, last) checkpointed and verified? */
static int sh_blocks_done(const qjob *q, int first, int last)
{
    const lv_model_config *c = &q->fp->cfg;
    for (int l = first; l < last; l++) {
        char path[4200];
        lv_qblock b;
        int got = -1;
        pipe_block_path(q, l, path, sizeof path);
        if (access(path, F_OK) != 0) return 0;
        lv_status st = io_qblock_read(path, c, q->job_hash, q->model_hash, &b, &got);
        if (st == LV_OK) lv_qblock_free(&b);
        if (st != LV_OK || got != l) {
            char why[512];
            lv_last_error_line(why, sizeof why);
            lv_warn("block %d: checkpoint not used, recomputing: %s", l,
                   st == LV_OK ? "holds another layer" : why);
            return 0;
        }
    }
    return 1;
}

lv_status pipe_quantize_shared(qjob *q, comm_ctx *comm, pipe_progress *prog, double t_start)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->fp->cfg;
    const int L = c->n_layers, rank = comm_rank(comm);
    const int micro = q->n_seq < 8 ? (int)q->n_seq : 8;
    const size_t act = (size_t)q->n_seq * (size_t)q->T * (size_t)c->dim;
    sh_dist d = {.comm = comm, .n_layers = L, .size = comm_size(comm)};
    sh_data s = {0};
    lv_qmodel *qm = NULL;
    kern_fwd_ws *ws = NULL;
    float *wscr = NULL, *yq = NULL;
    lv_layer *layers = NULL;
    char path[4200];
    int missing = 0;
    pipe_shard_of(L, rank, d.size, &d.first, &d.last);

    LV_TRY(comm_agree_flag(comm, !sh_blocks_done(q, d.first, d.last), &missing));
    if (!missing) {
        q->n_resumed = L; /* agreed by every rank */
        if (rank == 0) lv_log("every block is checkpointed and verified: nothing to recompute");
        goto done;
    }
    double t = lv_now();
    LV_TRY(sh_calibrate(q, &s, micro));
    q->prof[PIPE_PROF_CALIB] += lv_now() - t;
    lv_log("FP calibration of %d blocks: %.1f s", L, lv_now() - t_start);
    if (pipe_stop_requested())
        LV_FAIL(LV_ERR_STOPPED, "stopped by a signal before the shared AQLM step; rerun the same "
                "job to resume");

    LV_TRY(lv_qmodel_init(&qm, q->fp, q->acfg.n_codebooks, q->acfg.nbits, q->acfg.group_size));
    qm->job_hash = q->job_hash;
    qm->model_hash = q->model_hash;
    qm->shared_codebooks = q->share;
    snprintf(path, sizeof path, "%s/shared_aqlm.h5", q->ckpt_dir);
    int any_lacks = 0;
    LV_TRY(comm_agree_flag(comm, !sh_resume_aqlm(q, path, qm), &any_lacks));
    if (any_lacks) { /* every rank recomputes it: the step is collective */
        LV_TRY(sh_aqlm(q, &s, &d, qm));
        if (rank == 0) LV_TRY(io_qmodel_write(qm, path));
    } else {
        lv_log("shared AQLM resumed from %s", path);
    }
    if (pipe_stop_requested())
        LV_FAIL(LV_ERR_STOPPED, "stopped by a signal after the shared AQLM step (checkpointed in "
                "%s); rerun the same job to resume", path);

    if (q->ft_enable) {
        stage_ft_config ft = q->ft;
        stage_ft_stats fs;
        const stage_dist dist = {.user = &d, .owns = sh_owns, .share = sh_share};
        d.per_item = 1;
        ft.seed = (uint64_t)q->seed * 1000003ULL;
        ft.share = q->share;
        t = lv_now();
        LV_TRY(stage_finetune_shared(c, qm->blocks, L, (const float *const *)s.x,
                                     (const float *const *)(s.x + 1), q->n_seq, q->T, &ft,
                                     &dist, &fs));
        q->prof[PIPE_PROF_FT] += lv_now() - t;
        lv_log("shared fine-tuning: held-out rel MSE (mean over blocks) %.4g -> %.4g (%d epochs, "
               "%.1f s)", fs.mse_before, fs.mse_after, fs.epochs, fs.wall_s);
    }

    for (int l = 0; l < c->n_layers; l++) /* every rank: the copies stay identical */
        LV_TRY(pipe_round_block_f16(q, l, &qm->blocks[l]));

    /* step 4: this rank's blocks */
    size_t lin = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        lin += (size_t)(o * i);
    }
    LV_ALLOC(wscr, lin);
    LV_ALLOC(layers, (size_t)L);
    LV_ALLOC(yq, act);
    LV_TRY(kern_fwd_ws_init(&ws, c, micro, q->T, 0));
    for (int l = d.first; l < d.last && st == LV_OK; l++) {
        lv_qblock *b = &qm->blocks[l];
        const double tb = lv_now();
        lv_model view;
        st = io_qblock_fp_view(q->fp, l, b, wscr, layers, &view);
        if (st != LV_OK) break;
        memcpy(yq, s.x[l], act * sizeof(float));
        st = stage_calib_block(&view, l, yq, q->n_seq, q->T, ws, micro, NULL);
        if (st != LV_OK) break;
        b->block_mse = pipe_rel_mse(yq, s.x[l + 1], act);
        q->prof[PIPE_PROF_QFWD] += lv_now() - tb;
        pipe_block_path(q, l, path, sizeof path);
        t = lv_now();
        st = io_qblock_write(path, b, l, c, q->job_hash, q->model_hash);
        q->prof[PIPE_PROF_IO] += lv_now() - t;
        if (st == LV_OK) st = pipe_progress_block(prog, l, b, 0, lv_now() - tb);
    }
done:
    kern_fwd_ws_free(ws);
    sh_data_free(&s, L);
    lv_qmodel_free(qm);
    free(wscr);
    free(yq);
    free(layers);
    return st;
}
