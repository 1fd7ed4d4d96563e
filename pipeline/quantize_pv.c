/* quantize_pv.c: the PV-tuning phase of `llmvq quantize` ([pvtune] enable),
 * after every block is quantized. Collective: every rank assembles the
 * block-wise model from the checkpoints and takes part; the V steps'
 * micro-batches and the P steps' beam searches are split over the ranks
 * (stage_pv_config.dist: item i belongs to rank i % size, shared by MPI
 * broadcast from it), so the result is bit-identical for any number of ranks.
 *
 * Files in CKPT (run.checkpoint_dir):
 *   blockwise.h5  the model before PV-tuning (rank 0, for comparison);
 *   pv_state.h5   every pvtune.checkpoint_every V steps and on a stop signal:
 *                 the model at that step + group "pv_state" (Adam moments, best
 *                 snapshot, epoch order and position, RNG, counters); a rerun
 *                 of the same job and model continues from it bit-identically;
 *   pvtuned.h5    the result; a rerun whose pvtuned.h5 verifies takes it as is
 *                 (pv_state.h5 is removed once it is written). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "pipe.h"
#include "quantize_impl.h"

typedef struct {
    qjob *q;
    comm_ctx *comm;
    int rank, size;
    lv_qmodel *qm; /* the model being tuned */
    char state_path[4200];
    double io_s;
} pv_ctx;

static int pv_owns(void *user, int item)
{
    const pv_ctx *c = user;
    return item % c->size == c->rank;
}

static lv_status pv_share(void *user, int item, void *buf, size_t bytes)
{
    pv_ctx *c = user;
    return comm_bcast(c->comm, buf, bytes, item % c->size);
}

/* Sequences PV-tuning trains and holds out on: pvtune.nsamples, or the
 * calibration sequences' count. */
static int64_t pv_count(const qjob *q)
{
    return q->pv_nsamples > 0 ? q->pv_nsamples : q->n_seq;
}

/* pvtune.data = model: q->pv_seqs (pv_count, T) = a stream of stories sampled
 * from the FP model (each from BOS, temperature 1, no top-p, up to seq_len
 * tokens, story s with seed base + s) cut into sequences of T tokens. Sampled on
 * rank 0 and broadcast, so every rank trains on the same tokens even where the
 * ranks' CPUs would round the FP model differently. Collective. */
static lv_status pv_sample_local(qjob *q, int64_t total)
{
    lv_status st = LV_OK;
    const double t0 = lv_now();
    const uint64_t base = (uint64_t)q->seed * 1000003ULL + 4243;
    const int32_t bos = 1;
    int32_t *story = NULL;
    int64_t have = 0, n_stories = 0;
    while (have < total) {
        const stage_gen_opts go = {.steps = q->fp->cfg.seq_len, .temperature = 1.0f,
                                   .top_p = 0.0f, .seed = base + (uint64_t)n_stories};
        int len = 0;
        LV_TRY(stage_generate(q->fp, &bos, 1, &go, NULL, NULL, &story, &len));
        const int64_t take = total - have < len ? total - have : len;
        memcpy(q->pv_seqs + have, story, sizeof(int32_t) * (size_t)take);
        have += take;
        n_stories++;
        free(story);
        story = NULL;
    }
    lv_log("pv-tune: sampled %lld sequences of %d tokens (%lld stories) from the FP model in "
           "%.1f s", (long long)(total / q->T), q->T, (long long)n_stories, lv_now() - t0);
done:
    free(story);
    return st;
}

static lv_status pv_sample(pv_ctx *c)
{
    lv_status st = LV_OK;
    qjob *q = c->q;
    const int64_t total = pv_count(q) * q->T;
    int failed = 0;
    LV_ALLOC(q->pv_seqs, (size_t)total);
    if (c->rank == 0) st = pv_sample_local(q, total);
    if (c->size > 1) { /* every rank learns whether rank 0 sampled, then gets its tokens */
        const lv_status lst = st;
        LV_TRY(comm_agree_flag(c->comm, lst != LV_OK, &failed));
        if (lst != LV_OK) {
            st = lst;
            goto done;
        }
        if (failed) LV_FAIL(LV_ERR_MPI, "pv-tune: rank 0 failed to sample the PV-tuning sequences");
        LV_TRY(comm_bcast(c->comm, q->pv_seqs, sizeof(int32_t) * (size_t)total, 0));
    }
done:
    return st;
}

/* Scalars of a stage_pv_state, in file order. */
enum {
    PVI_ADAM_T = 0, PVI_P_COUNT, PVI_EPOCH, PVI_NEXT, PVI_EPOCH_STEPS, PVI_WORSE, PVI_STOP,
    PVI_EPOCHS, PVI_EVALS, PVI_V_STEPS, PVI_P_STEPS, PVI_BEST_STEP, PVI_CODES_CHANGED,
    PVI_DIVERGED, PVI_N
};
enum {
    PVD_EPOCH_LOSS = 0, PVD_BEST, PVD_LOSS_BEFORE, PVD_TRAIN_LOSS, PVD_V_S, PVD_P_S, PVD_EVAL_S,
    PVD_N
};

/* The arrays of group pv_state for s (write: from s; read: into the buffers
 * s points at, which the caller allocated with the lengths in s). */
static int pv_arrays(stage_pv_state *s, int64_t *ints, double *dbls, io_array *a)
{
    int n = 0;
    a[n++] = (io_array){"adam_m", IO_ARR_F32, s->n_param, (void *)s->m};
    a[n++] = (io_array){"adam_v", IO_ARR_F32, s->n_param, (void *)s->v};
    a[n++] = (io_array){"best_param", IO_ARR_F32, s->n_param, (void *)s->best_param};
    a[n++] = (io_array){"best_codes", IO_ARR_U16, s->n_codes, (void *)s->best_codes};
    a[n++] = (io_array){"perm", IO_ARR_I64, s->n_train, (void *)s->perm};
    a[n++] = (io_array){"rng", IO_ARR_U64, 4, s->rng};
    a[n++] = (io_array){"ints", IO_ARR_I64, PVI_N, ints};
    a[n++] = (io_array){"doubles", IO_ARR_F64, PVD_N, dbls};
    return n;
}

static void pv_pack(const stage_pv_state *s, int64_t *i, double *d)
{
    const stage_pv_stats *x = &s->stats;
    i[PVI_ADAM_T] = s->adam_t, i[PVI_P_COUNT] = s->p_count, i[PVI_EPOCH] = s->epoch;
    i[PVI_NEXT] = s->next, i[PVI_EPOCH_STEPS] = s->epoch_steps, i[PVI_WORSE] = s->worse;
    i[PVI_STOP] = s->stop, i[PVI_EPOCHS] = x->epochs, i[PVI_EVALS] = x->evals;
    i[PVI_V_STEPS] = x->v_steps, i[PVI_P_STEPS] = x->p_steps, i[PVI_BEST_STEP] = x->best_step;
    i[PVI_CODES_CHANGED] = x->codes_changed, i[PVI_DIVERGED] = x->diverged;
    d[PVD_EPOCH_LOSS] = s->epoch_loss, d[PVD_BEST] = s->best, d[PVD_LOSS_BEFORE] = x->loss_before;
    d[PVD_TRAIN_LOSS] = x->train_loss, d[PVD_V_S] = x->v_s, d[PVD_P_S] = x->p_s;
    d[PVD_EVAL_S] = x->eval_s;
}

static void pv_unpack(stage_pv_state *s, const int64_t *i, const double *d)
{
    stage_pv_stats *x = &s->stats;
    s->adam_t = i[PVI_ADAM_T], s->p_count = i[PVI_P_COUNT], s->epoch = i[PVI_EPOCH];
    s->next = i[PVI_NEXT], s->epoch_steps = i[PVI_EPOCH_STEPS], s->worse = i[PVI_WORSE];
    s->stop = i[PVI_STOP], x->epochs = (int)i[PVI_EPOCHS], x->evals = (int)i[PVI_EVALS];
    x->v_steps = i[PVI_V_STEPS], x->p_steps = i[PVI_P_STEPS], x->best_step = i[PVI_BEST_STEP];
    x->codes_changed = i[PVI_CODES_CHANGED], x->diverged = (int)i[PVI_DIVERGED];
    s->epoch_loss = d[PVD_EPOCH_LOSS], s->best = d[PVD_BEST], x->loss_before = d[PVD_LOSS_BEFORE];
    x->train_loss = d[PVD_TRAIN_LOSS], x->v_s = d[PVD_V_S], x->p_s = d[PVD_P_S];
    x->eval_s = d[PVD_EVAL_S];
}

/* ckpt hook: rank 0 writes pv_state.h5; every rank learns whether it worked. */
static lv_status pv_save(void *user, const stage_pv_state *s)
{
    pv_ctx *c = user;
    lv_status st = LV_OK, global = LV_OK;
    if (c->rank == 0) {
        const double t0 = lv_now();
        stage_pv_state w = *s;
        int64_t ints[PVI_N];
        double dbls[PVD_N];
        io_array a[8];
        pv_pack(s, ints, dbls);
        const int n = pv_arrays(&w, ints, dbls, a);
        st = io_qmodel_write_extra(c->qm, c->state_path, "pv_state", a, n);
        c->io_s += lv_now() - t0;
        if (st == LV_OK)
            lv_log("pv-tune: checkpoint after %lld V steps in %s", (long long)s->stats.v_steps,
                   c->state_path);
    }
    if (c->size == 1) return st;
    int bad = -1;
    lv_status cst = comm_agree_status(c->comm, st, &global, &bad);
    return cst != LV_OK ? cst : global;
}

/* stop hook: a stop signal on any rank stops every rank after the same step. */
static int pv_stop(void *user)
{
    pv_ctx *c = user;
    int any = pipe_stop_requested();
    if (c->size > 1 && comm_agree_flag(c->comm, any, &any) != LV_OK) return 1;
    return any;
}

/* One allocation for the arrays of a stage_pv_state of these lengths; s points
 * into it (caller frees the return value; NULL when out of memory). */
static void *pv_state_alloc(stage_pv_state *s, int64_t np, int64_t nc, int64_t nt)
{
    unsigned char *b = malloc(sizeof(float) * (size_t)(3 * np) + sizeof(int64_t) * (size_t)nt +
                              sizeof(uint16_t) * (size_t)nc + 16);
    *s = (stage_pv_state){.n_param = np, .n_codes = nc, .n_train = nt};
    if (!b) return NULL;
    float *f = (float *)b;
    int64_t *perm = (int64_t *)(f + 3 * np);
    s->m = f, s->v = f + np, s->best_param = f + 2 * np, s->perm = perm;
    s->best_codes = (uint16_t *)(perm + nt);
    return b;
}

/* A verified pv_state.h5 of this job and model: its model into *qm, its state
 * into *s and the buffers (caller frees *buf). 0 when there is none. */
static int pv_load_state(pv_ctx *c, lv_qmodel **qm, stage_pv_state *s, void **buf)
{
    qjob *q = c->q;
    lv_qmodel *r = NULL;
    int64_t np, nc, nt, ints[PVI_N];
    double dbls[PVD_N];
    io_array a[8];
    if (access(c->state_path, F_OK) != 0) return 0;
    stage_pv_state_dims(*qm, pv_count(q), &q->pv, &np, &nc, &nt);
    void *b = pv_state_alloc(s, np, nc, nt);
    if (!b) return 0;
    const int n = pv_arrays(s, ints, dbls, a);
    const lv_status rst = io_qmodel_read_extra(&r, c->state_path, "pv_state", a, n);
    if (rst != LV_OK || r->job_hash != q->pv_hash || r->model_hash != q->model_hash ||
        memcmp(&r->cfg, &(*qm)->cfg, sizeof r->cfg) != 0 ||
        r->shared_codebooks != (*qm)->shared_codebooks) {
        char why[512];
        if (rst != LV_OK)
            lv_last_error_line(why, sizeof why);
        else
            snprintf(why, sizeof why, "written by another job or model");
        lv_warn("%s: not used, PV-tuning from the start (%s)", c->state_path, why);
        lv_qmodel_free(r);
        free(b);
        return 0;
    }
    pv_unpack(s, ints, dbls);
    lv_qmodel_free(*qm);
    *qm = r;
    *buf = b;
    return 1;
}

lv_status pipe_pv_state_inspect(const char *path, pipe_pv_progress *out)
{
    lv_status st = LV_OK;
    lv_qmodel *r = NULL;
    void *b = NULL;
    int64_t np = 0, nc = 0, nt = 0, ints[PVI_N];
    double dbls[PVD_N];
    io_array a[8];
    memset(out, 0, sizeof *out);
    LV_TRY(io_qmodel_extra_length(path, "pv_state/adam_m", &np));
    LV_TRY(io_qmodel_extra_length(path, "pv_state/best_codes", &nc));
    LV_TRY(io_qmodel_extra_length(path, "pv_state/perm", &nt));
    stage_pv_state s;
    if (!(b = pv_state_alloc(&s, np, nc, nt))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    const int n = pv_arrays(&s, ints, dbls, a);
    LV_TRY(io_qmodel_read_extra(&r, path, "pv_state", a, n));
    pv_unpack(&s, ints, dbls);
    *out = (pipe_pv_progress){.epoch = s.epoch, .v_steps = s.stats.v_steps,
                              .p_steps = s.stats.p_steps, .n_param = np, .n_codes = nc,
                              .n_train = nt, .best = s.best, .loss_before = s.stats.loss_before,
                              .job_hash = r->job_hash};
done:
    lv_qmodel_free(r);
    free(b);
    return st;
}

lv_status pipe_pv_tune(qjob *q, comm_ctx *comm, lv_qmodel **qm)
{
    lv_status st = LV_OK, global = LV_OK;
    char path[4200];
    lv_qmodel *r = NULL;
    lv_model *bw = NULL;
    void *sbuf = NULL;
    int bad = -1;
    const double t0 = lv_now();
    pv_ctx c = {.q = q, .comm = comm, .rank = comm_rank(comm), .size = comm_size(comm)};
    snprintf(c.state_path, sizeof c.state_path, "%s/pv_state.h5", q->ckpt_dir);

    /* rank 0: the block-wise model on disk and evaluated; the others wait */
    int done_already = 0;
    if (c.rank == 0) {
        snprintf(path, sizeof path, "%s/blockwise.h5", q->ckpt_dir);
        st = io_qmodel_write(*qm, path);
        if (st == LV_OK && q->eval_path[0]) {
            st = io_qmodel_to_fp(*qm, &bw);
            if (st == LV_OK) st = pipe_eval_model(bw, q, &q->ppl_blockwise);
            if (st == LV_OK) lv_log("block-wise model: ppl %.4f", q->ppl_blockwise);
        }
        snprintf(path, sizeof path, "%s/pvtuned.h5", q->ckpt_dir);
        if (st == LV_OK && access(path, F_OK) == 0) {
            if (io_qmodel_read(&r, path) == LV_OK && r->job_hash == q->pv_hash &&
                r->model_hash == q->model_hash && !memcmp(&r->cfg, &(*qm)->cfg, sizeof r->cfg)) {
                lv_log("PV-tuning resumed from %s", path);
                lv_qmodel_free(*qm);
                *qm = r;
                r = NULL;
                q->pv_resumed = done_already = 1;
            } else {
                lv_warn("%s: not used, PV-tuning again (not a verified result of this job and "
                        "model)", path);
            }
        }
    }
    if (c.size > 1) {
        const double timeout = comm_timeout(comm);
        comm_set_timeout(comm, 1e9); /* the evaluation takes as long as it takes */
        lv_status ast = comm_agree_status(comm, st, &global, &bad);
        comm_set_timeout(comm, timeout);
        LV_TRY(ast);
        if (global != LV_OK) LV_FAIL(global, "pv-tune: rank %d failed before PV-tuning", bad);
        LV_TRY(comm_bcast(comm, &done_already, sizeof done_already, 0));
    } else {
        LV_TRY(st);
    }
    if (done_already) goto done;

    if (q->pv_data_model && !q->pv_seqs) LV_TRY(pv_sample(&c));
    const int32_t *pv_seqs = q->pv_seqs ? q->pv_seqs : q->seqs;
    const int64_t pv_n = pv_count(q);
    stage_pv_state rs;
    const int resumed = pv_load_state(&c, qm, &rs, &sbuf);
    if (c.size > 1) { /* every rank read the same file: the same verdict, unless I/O failed */
        int some_not = 0, some_did = 0;
        LV_TRY(comm_agree_flag(comm, !resumed, &some_not));
        LV_TRY(comm_agree_flag(comm, resumed, &some_did));
        if (some_not && some_did)
            LV_FAIL(LV_ERR_IO, "%s: readable on some ranks only; check that run.checkpoint_dir "
                    "is on a file system every rank sees", c.state_path);
    }
    (*qm)->job_hash = q->pv_hash; /* pv_state.h5 and pvtuned.h5 belong to the whole job */
    c.qm = *qm;
    const stage_dist dist = {.user = &c, .owns = pv_owns, .share = pv_share};
    stage_pv_config pv = q->pv;
    pv.seed = (uint64_t)q->seed * 1000003ULL + 77;
    pv.dist = c.size > 1 ? &dist : NULL;
    pv.ckpt = pv_save;
    pv.ckpt_user = &c;
    pv.stop = pv_stop;
    pv.resume = resumed ? &rs : NULL;
    if (c.rank == 0 && c.size > 1)
        lv_log("pv-tune: data-parallel over %d ranks (micro-batch m and linear i on rank "
               "i %% %d)", c.size, c.size);
    LV_TRY(stage_pv_tune(q->fp, *qm, pv_seqs, pv_n, q->T, &pv, &q->pv_stats));
    for (int l = 0; l < (*qm)->cfg.n_layers; l++) LV_TRY(pipe_round_block_f16(q, l, &(*qm)->blocks[l]));
    if (resumed) q->pv_resumed_from = rs.stats.v_steps;
    lv_log("PV-tuning: held-out loss %.5g -> %.5g, %lld V steps, %lld P steps (%lld code groups "
           "changed), %.1f s", q->pv_stats.loss_before, q->pv_stats.loss_after,
           (long long)q->pv_stats.v_steps, (long long)q->pv_stats.p_steps,
           (long long)q->pv_stats.codes_changed, q->pv_stats.wall_s);
    if (c.rank == 0) {
        snprintf(path, sizeof path, "%s/pvtuned.h5", q->ckpt_dir);
        st = io_qmodel_write(*qm, path);
        if (st == LV_OK && unlink(c.state_path) != 0 && errno != ENOENT)
            lv_warn("%s: cannot remove: %s", c.state_path, strerror(errno));
    }
    if (c.size > 1) {
        LV_TRY(comm_agree_status(comm, st, &global, &bad));
        st = global;
    }
done:
    q->prof[PIPE_PROF_PV] += lv_now() - t0;
    q->prof[PIPE_PROF_IO] += c.io_s;
    lv_qmodel_free(r);
    io_model_free(bw);
    free(sbuf);
    return st;
}
