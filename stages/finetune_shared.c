/* finetune_shared.c: joint fine-tuning of blocks whose linears all share one
 * codebook tensor (stage.h: stage_finetune_shared; docs/finetune.md "Shared
 * codebooks"). Block fine-tuning one block at a time cannot train a codebook
 * that 35 linears use: each block would pull it its own way and undo the
 * others. Here every Adam step sees every block's gradient on the same
 * batch of sequences: the codebook gradient is the sum over all copies (each
 * block's loss normalised to its relative MSE), the step is written into
 * every copy, and each block's scales and norms take their own steps.
 *
 * Over ranks (stage_dist, item = block): a rank computes gradients of its own
 * blocks; the per-block codebook gradients and losses are shared and summed in
 * block order on every rank, so every rank takes the identical codebook step
 * and the result does not depend on the number of ranks. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "stage_impl.h"

/* Per-block trainable segments other than the codebooks: 7 scales + 2 norms. */
#define FS_OWN_SEGS (LV_LIN_COUNT + 2)

typedef struct {
    const lv_model_config *cfg;
    lv_qblock *blocks; /* borrowed, trained in place */
    int nb;
    const float *const *x_in, *const *y_fp;
    const stage_dist *dist;
    stage_ft_config ft;
    int T, bmax, n_own_segs;
    int share, slots;  /* LV_SHARE_MODEL (1 slot) or LV_SHARE_TYPE (7: slot k is linear k) */
    int64_t row, n_train, np, N, own_len; /* own_len: floats of the FS_OWN_SEGS segments */
    stage_ft_ws *ws;
    float *grad;       /* (np) gradient of one block */
    float *gown;       /* (own_len) its scale/norm part, compacted */
    float *gC;         /* (nb, slots, N) codebook gradient of each block, weighted */
    float *gsum;       /* (slots, N) */
    double *wrel;      /* (nb) 1 / mean(y_fp[l]^2) over the training sequences */
    float *C, *mC, *vC; /* (slots, N) shared codebooks and their Adam moments */
    float *m, *v;      /* (nb, own_len) per-block Adam moments */
    float *best;       /* (nb, np) snapshot of every block's parameters */
    float *xb, *yb;    /* (bmax, T, dim) */
    int64_t *perm;
    lv_rng rng;
} fs_run;

static int fs_owns(const fs_run *r, int l)
{
    return !r->dist || !r->dist->owns || r->dist->owns(r->dist->user, l);
}

static lv_status fs_share(const fs_run *r, int l, void *buf, size_t bytes)
{
    if (!r->dist || !r->dist->owns) return LV_OK;
    return r->dist->share(r->dist->user, l, buf, bytes);
}

/* Block l's scale/norm segments (FS_OWN_SEGS or FS_OWN_SEGS - 2 when norms are frozen). */
static void fs_own_segments(fs_run *r, int l, float **seg, int64_t *len, int64_t *off_in_grad)
{
    float *s[STAGE_FT_N_SEGS];
    int64_t n[STAGE_FT_N_SEGS], off[STAGE_FT_N_SEGS], o = 0;
    stage_ft_param_segments(r->cfg, &r->blocks[l], s, n);
    for (int i = 0; i < STAGE_FT_N_SEGS; i++) off[i] = o, o += n[i];
    int j = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++, j++)
        seg[j] = s[2 * k + 1], len[j] = n[2 * k + 1], off_in_grad[j] = off[2 * k + 1];
    for (int k = 0; k < 2; k++, j++)
        seg[j] = s[2 * LV_LIN_COUNT + k], len[j] = n[2 * LV_LIN_COUNT + k],
        off_in_grad[j] = off[2 * LV_LIN_COUNT + k];
}

/* Write C into every codebook copy of every block. */
static void fs_broadcast(fs_run *r)
{
    for (int l = 0; l < r->nb; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            memcpy(r->blocks[l].lin[k].codebooks, r->C + lv_share_slot(r->share, k) * r->N,
                   sizeof(float) * (size_t)r->N);
}

static void fs_snapshot(fs_run *r, int to_best)
{
    for (int l = 0; l < r->nb; l++) {
        float *seg[STAGE_FT_N_SEGS];
        int64_t len[STAGE_FT_N_SEGS];
        float *flat = r->best + (int64_t)l * r->np;
        stage_ft_param_segments(r->cfg, &r->blocks[l], seg, len);
        for (int s = 0; s < STAGE_FT_N_SEGS; s++) {
            if (to_best)
                memcpy(flat, seg[s], sizeof(float) * (size_t)len[s]);
            else
                memcpy(seg[s], flat, sizeof(float) * (size_t)len[s]);
            flat += len[s];
        }
    }
    for (int s = 0; s < r->slots && !to_best; s++) /* slot s: linear s of block 0 owns it */
        memcpy(r->C + s * r->N, r->blocks[0].lin[s].codebooks, sizeof(float) * (size_t)r->N);
}

/* Mean over blocks of the held-out relative MSE. */
static lv_status fs_eval(fs_run *r, const int64_t n_val, int64_t val0, double *mean)
{
    lv_status st = LV_OK;
    double sum = 0.0;
    for (int l = 0; l < r->nb; l++) {
        double rel = 0.0;
        if (fs_owns(r, l))
            LV_TRY(stage_ft_eval_rel(r->ws, &r->blocks[l], r->x_in[l] + val0 * r->row,
                                     r->y_fp[l] + val0 * r->row, n_val, r->T, r->cfg->dim,
                                     r->bmax, r->yb, &rel));
        LV_TRY(fs_share(r, l, &rel, sizeof rel));
        sum += rel;
    }
    *mean = sum / r->nb;
done:
    return st;
}

/* One Adam step on the batch of training sequences perm[s0 .. s0+B). */
static lv_status fs_step(fs_run *r, int64_t s0, int B, int64_t t, double *loss_out)
{
    lv_status st = LV_OK;
    double loss_sum = 0.0;
    for (int l = 0; l < r->nb; l++) {
        double loss = 0.0;
        const int64_t NC = r->slots * r->N;
        float *gC = r->gC + (int64_t)l * NC;
        if (fs_owns(r, l)) {
            for (int j = 0; j < B; j++) {
                const int64_t src = r->perm[s0 + j] * r->row;
                memcpy(r->xb + j * r->row, r->x_in[l] + src, sizeof(float) * (size_t)r->row);
                memcpy(r->yb + j * r->row, r->y_fp[l] + src, sizeof(float) * (size_t)r->row);
            }
            LV_TRY(stage_ft_block_grad(r->ws, &r->blocks[l], r->xb, r->yb, B, r->T, &loss,
                                       r->grad));
            loss *= r->wrel[l];
            /* codebook gradient of the block: its 7 copies summed in linear order */
            int64_t off = 0, len[STAGE_FT_N_SEGS];
            stage_ft_param_segments(r->cfg, &r->blocks[l], NULL, len);
            memset(gC, 0, sizeof(float) * (size_t)NC);
            for (int s = 0; s < STAGE_FT_N_SEGS; off += len[s], s++)
                if (s < 2 * LV_LIN_COUNT && s % 2 == 0) {
                    float *gs = gC + lv_share_slot(r->share, s / 2) * r->N;
                    for (int64_t i = 0; i < r->N; i++) gs[i] += (float)r->wrel[l] * r->grad[off + i];
                }
            /* its own scales and norms: their step now (gradients are all taken at
             * the same parameters; the other blocks do not see these) */
            float *seg[FS_OWN_SEGS];
            int64_t olen[FS_OWN_SEGS], ooff[FS_OWN_SEGS], o = 0;
            fs_own_segments(r, l, seg, olen, ooff);
            for (int s = 0; s < r->n_own_segs; o += olen[s], s++)
                memcpy(r->gown + o, r->grad + ooff[s], sizeof(float) * (size_t)olen[s]);
            stage_ft_adam_step(seg, olen, r->n_own_segs, r->gown, r->m + (int64_t)l * r->own_len,
                               r->v + (int64_t)l * r->own_len, t, &r->ft);
        }
        LV_TRY(fs_share(r, l, gC, sizeof(float) * (size_t)NC));
        LV_TRY(fs_share(r, l, &loss, sizeof loss));
        loss_sum += loss;
    }
    *loss_out = loss_sum / r->nb;
    if (!isfinite(loss_sum)) goto done; /* every rank sees the same sum: all stop */
    const int64_t NC = r->slots * r->N;
    memset(r->gsum, 0, sizeof(float) * (size_t)NC);
    for (int l = 0; l < r->nb; l++) {
        const float *gC = r->gC + (int64_t)l * NC;
        for (int64_t i = 0; i < NC; i++) r->gsum[i] += gC[i];
    }
    float *cseg[1] = {r->C};
    int64_t clen[1] = {NC};
    stage_ft_adam_step(cseg, clen, 1, r->gsum, r->mC, r->vC, t, &r->ft);
    fs_broadcast(r);
done:
    return st;
}

static void fs_free(fs_run *r)
{
    stage_ft_ws_free(r->ws);
    void *p[] = {r->grad, r->gown, r->gC, r->gsum, r->wrel, r->C, r->mC, r->vC,
                 r->m,    r->v,    r->best, r->xb, r->yb, r->perm};
    for (size_t i = 0; i < sizeof p / sizeof p[0]; i++) free(p[i]);
}

static lv_status fs_check_blocks(const lv_qblock *blocks, int nb, int share)
{
    lv_status st = LV_OK;
    const lv_aq_layer *L0 = &blocks[0].lin[0];
    const size_t bytes = sizeof(float) * ((size_t)L0->M << L0->nbits) * (size_t)L0->g;
    for (int l = 0; l < nb; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &blocks[l].lin[k];
            const int own = lv_share_slot(share, k);
            if (L->M != L0->M || L->nbits != L0->nbits || L->g != L0->g ||
                memcmp(L->codebooks, blocks[0].lin[own].codebooks, bytes) != 0)
                LV_FAIL(LV_ERR_INVALID_ARG, "shared fine-tuning: block %d %s does not hold the "
                        "shared codebooks of block 0 %s", l, lv_lin_name((lv_lin)k),
                        lv_lin_name((lv_lin)own));
        }
done:
    return st;
}

lv_status stage_finetune_shared(const lv_model_config *cfg, lv_qblock *blocks, int n_blocks,
                                const float *const *x_in, const float *const *y_fp,
                                int64_t n_seq, int T, const stage_ft_config *ft_in,
                                const stage_dist *dist, stage_ft_stats *stats)
{
    lv_status st = LV_OK;
    fs_run r = {.cfg = cfg, .blocks = blocks, .nb = n_blocks, .x_in = x_in, .y_fp = y_fp,
                .dist = dist, .ft = stage_ft_defaults(ft_in), .T = T};
    int have_best = 0;
    stage_ft_stats sx = {0};
    const double t0 = lv_now();

    LV_TRY(stage_ft_check(&r.ft));
    if (!cfg || !blocks || n_blocks < 1 || !x_in || !y_fp || n_seq <= 0 || T <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "shared fine-tuning: need blocks (have %d), inputs, outputs, "
                "sequences (%lld) and T (%d)", n_blocks, (long long)n_seq, T);
    for (int l = 0; l < n_blocks; l++)
        if (fs_owns(&r, l) && (!x_in[l] || !y_fp[l]))
            LV_FAIL(LV_ERR_INVALID_ARG, "shared fine-tuning: no inputs/outputs for block %d", l);
    r.share = r.ft.share == LV_SHARE_TYPE ? LV_SHARE_TYPE : LV_SHARE_MODEL;
    r.slots = lv_share_slots(r.share);
    LV_TRY(fs_check_blocks(blocks, n_blocks, r.share));

    /* hold-out as stage_finetune_block */
    if (n_seq >= 2) {
        sx.n_holdout = (int64_t)ceil(r.ft.holdout_frac * (double)n_seq);
        sx.n_holdout = sx.n_holdout < 1 ? 1 : sx.n_holdout > n_seq - 1 ? n_seq - 1 : sx.n_holdout;
    }
    r.n_train = sx.n_train = n_seq - sx.n_holdout;
    r.row = (int64_t)T * cfg->dim;
    const int64_t val0 = sx.n_holdout ? r.n_train : 0, n_val = sx.n_holdout ? sx.n_holdout : n_seq;
    r.bmax = (int)(r.n_train < r.ft.batch_seqs ? r.n_train : r.ft.batch_seqs);
    r.n_own_segs = r.ft.freeze_norms ? FS_OWN_SEGS - 2 : FS_OWN_SEGS;

    LV_TRY(stage_ft_ws_init(&r.ws, cfg, &blocks[0], r.bmax, T));
    int64_t len[STAGE_FT_N_SEGS];
    r.np = stage_ft_param_segments(cfg, &blocks[0], NULL, len);
    r.N = len[0];
    r.own_len = r.np - LV_LIN_COUNT * r.N;
    LV_ALLOC(r.grad, r.np);
    LV_ALLOC(r.gown, r.own_len);
    const int64_t NC = r.slots * r.N;
    LV_ALLOC(r.gC, (size_t)n_blocks * (size_t)NC);
    LV_ALLOC(r.gsum, NC);
    LV_ALLOC(r.wrel, n_blocks);
    LV_ALLOC(r.C, NC);
    LV_ALLOC(r.mC, NC);
    LV_ALLOC(r.vC, NC);
    LV_ALLOC(r.m, (size_t)n_blocks * (size_t)r.own_len);
    LV_ALLOC(r.v, (size_t)n_blocks * (size_t)r.own_len);
    LV_ALLOC(r.best, (size_t)n_blocks * (size_t)r.np);
    LV_ALLOC(r.xb, (size_t)r.bmax * (size_t)r.row);
    LV_ALLOC(r.yb, (size_t)r.bmax * (size_t)r.row);
    LV_ALLOC(r.perm, r.n_train);
    for (int s = 0; s < r.slots; s++)
        memcpy(r.C + s * r.N, blocks[0].lin[s].codebooks, sizeof(float) * (size_t)r.N);
    for (int l = 0; l < n_blocks; l++) {
        double ss = 0.0;
        if (fs_owns(&r, l))
            for (int64_t i = 0; i < r.n_train * r.row; i++) ss += (double)y_fp[l][i] * y_fp[l][i];
        r.wrel[l] = ss > 0.0 ? (double)(r.n_train * r.row) / ss : 1.0;
    }
    for (int64_t i = 0; i < r.n_train; i++) r.perm[i] = i;
    lv_rng_seed(&r.rng, r.ft.seed ^ 0x5a4edf17e7a11ULL);

    LV_TRY(fs_eval(&r, n_val, val0, &sx.mse_before));
    double best_mse = sx.mse_before;
    fs_snapshot(&r, 1);
    have_best = 1;
    if (r.ft.verbose)
        lv_log("shared fine-tuning: %d blocks, %lld codebook + %lld per-block params, %lld train / "
               "%lld held-out seqs, held-out rel MSE %.5g", n_blocks, (long long)NC,
               (long long)r.own_len, (long long)sx.n_train, (long long)sx.n_holdout,
               sx.mse_before);

    for (int ep = 1, worse = 0; ep <= r.ft.max_epochs && worse < r.ft.patience && !sx.diverged;
         ep++) {
        double loss_sum = 0.0;
        int64_t n_steps = 0;
        stage_ft_shuffle(r.perm, r.n_train, &r.rng);
        for (int64_t s0 = 0; s0 < r.n_train; s0 += r.bmax) {
            int B = (int)(r.n_train - s0 < r.bmax ? r.n_train - s0 : r.bmax);
            double loss = 0.0;
            LV_TRY(fs_step(&r, s0, B, ++sx.steps, &loss));
            if (!isfinite(loss)) {
                sx.diverged = 1;
                break;
            }
            loss_sum += loss;
            n_steps++;
        }
        sx.train_loss = n_steps ? loss_sum / (double)n_steps : NAN;
        sx.epochs = ep;
        double cur = INFINITY;
        if (!sx.diverged) LV_TRY(fs_eval(&r, n_val, val0, &cur));
        if (cur < best_mse) {
            best_mse = cur;
            sx.best_epoch = ep;
            fs_snapshot(&r, 1);
            worse = 0;
        } else {
            worse++;
        }
        if (r.ft.verbose)
            lv_log("shared fine-tuning: epoch %d train rel MSE %.5g held-out rel MSE %.5g%s", ep,
                   sx.train_loss, cur,
                   sx.diverged ? " (diverged)" : sx.best_epoch == ep ? " (best)" : "");
    }
    sx.mse_after = best_mse;
done:
    if (have_best) {
        fs_snapshot(&r, 0);
        fs_broadcast(&r);
    }
    sx.wall_s = lv_now() - t0;
    if (stats) *stats = sx;
    fs_free(&r);
    return st;
}
