/* finetune.c: AQLM block fine-tuning. With the codes fixed, Adam trains the
 * codebooks, per-row scales and the two RMSNorm weights of one quantized block
 * so that its outputs match the FP block's outputs on the calibration inputs
 * (loss: mean squared error, as AQLM's finetune_groupwise). The last sequences
 * are held out; after every epoch their relative MSE decides whether the
 * parameters are the best so far; training stops after `patience` epochs
 * without improvement and the best parameters (possibly the input ones) are
 * what the block keeps. Gradients: stages/finetune_grad.c. docs/finetune.md. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "stage_impl.h"

#define FT_ADAM_EPS 1e-8

stage_ft_config stage_ft_defaults(const stage_ft_config *in)
{
    stage_ft_config c = {0};
    if (in) c = *in;
    if (c.lr == 0.0f) c.lr = 1e-3f;
    if (c.beta1 == 0.0f) c.beta1 = 0.9f;
    if (c.beta2 == 0.0f) c.beta2 = 0.95f;
    if (c.max_epochs == 0) c.max_epochs = 10;
    if (c.batch_seqs == 0) c.batch_seqs = 8;
    if (c.patience == 0) c.patience = 3;
    if (c.holdout_frac == 0.0) c.holdout_frac = 0.1;
    return c;
}

lv_status stage_ft_check(const stage_ft_config *c)
{
    lv_status st = LV_OK;
    if (!(c->lr > 0.0f) || !isfinite(c->lr) || !(c->beta1 >= 0.0f && c->beta1 < 1.0f) ||
        !(c->beta2 >= 0.0f && c->beta2 < 1.0f))
        LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: lr %g, betas (%g, %g): need lr > 0, betas in [0, 1)",
                (double)c->lr, (double)c->beta1, (double)c->beta2);
    if (c->max_epochs < 0 || c->batch_seqs < 0 || c->patience < 0 ||
        !(c->holdout_frac > 0.0 && c->holdout_frac < 1.0))
        LV_FAIL(LV_ERR_INVALID_ARG,
                "fine-tune: max_epochs %d, batch_seqs %d, patience %d must be >= 0 and "
                "holdout_frac %g in (0, 1)",
                c->max_epochs, c->batch_seqs, c->patience, c->holdout_frac);
done:
    return st;
}

/* Held-out relative MSE sum (y - y_fp)^2 / sum y_fp^2 over n_seq sequences, in
 * micro-batches of up to bmax; sums in sequence order (deterministic). */
lv_status stage_ft_eval_rel(stage_ft_ws *ws, const lv_qblock *b, const float *x, const float *y_fp,
                          int64_t n_seq, int T, int dim, int bmax, float *ybuf, double *rel)
{
    lv_status st = LV_OK;
    const int64_t row = (int64_t)T * dim;
    double num = 0.0, den = 0.0;
    for (int64_t s0 = 0; s0 < n_seq; s0 += bmax) {
        int B = (int)(n_seq - s0 < bmax ? n_seq - s0 : bmax);
        LV_TRY(stage_ft_block_forward(ws, b, x + s0 * row, B, T, ybuf));
        const float *ref = y_fp + s0 * row; // (B, T, dim)
        for (int64_t i = 0; i < B * row; i++) {
            double d = (double)ybuf[i] - ref[i];
            num += d * d;
            den += (double)ref[i] * ref[i];
        }
    }
    *rel = den > 0.0 ? num / den : num;
done:
    return st;
}

/* Copy the trainable parameters between the block (segments) and a flat buffer. */
static void params_copy(float **seg, const int64_t *len, int n_seg, float *flat, int to_flat)
{
    for (int s = 0; s < n_seg; s++) {
        if (to_flat)
            memcpy(flat, seg[s], sizeof(float) * (size_t)len[s]);
        else
            memcpy(seg[s], flat, sizeof(float) * (size_t)len[s]);
        flat += len[s];
    }
}

/* One Adam step (PyTorch's form) over the first n_seg segments. */
void stage_ft_adam_step(float **seg, const int64_t *len, int n_seg, const float *grad, float *m,
                      float *v, int64_t t, const stage_ft_config *c)
{
    const double bc1 = 1.0 - pow(c->beta1, (double)t), bc2 = 1.0 - pow(c->beta2, (double)t);
    const float step = (float)(c->lr / bc1), isb2 = (float)(1.0 / sqrt(bc2));
    const float b1 = c->beta1, b2 = c->beta2;
    int64_t off = 0;
    for (int s = 0; s < n_seg; off += len[s], s++) {
        float *p = seg[s];
        const float *gs = grad + off;
        float *ms = m + off, *vs = v + off;
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < len[s]; i++) {
            ms[i] = b1 * ms[i] + (1.0f - b1) * gs[i];
            vs[i] = b2 * vs[i] + (1.0f - b2) * gs[i] * gs[i];
            p[i] -= step * ms[i] / (sqrtf(vs[i]) * isb2 + (float)FT_ADAM_EPS);
        }
    }
}

void stage_ft_shuffle(int64_t *perm, int64_t n, lv_rng *r)
{
    for (int64_t i = n - 1; i > 0; i--) {
        int64_t j = (int64_t)(lv_rng_u64(r) % (uint64_t)(i + 1));
        int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

/* State of one fine-tuning call; every buffer is allocated once per call. */
typedef struct {
    stage_ft_config ft;
    stage_ft_ws *ws;
    lv_qblock *b;                /* borrowed: trained in place */
    const float *x_in, *y_fp;    /* borrowed (n_seq, T, dim) */
    int T, bmax, n_train_seg;
    int64_t row, n_train;        /* row = T * dim floats per sequence */
    float *seg[STAGE_FT_N_SEGS]; /* the trainable parameters, into b */
    int64_t len[STAGE_FT_N_SEGS];
    float *grad, *m, *v;         /* (n_params) gradient, Adam moments */
    float *xb, *yb;              /* (bmax, T, dim) gathered batch */
    int64_t *perm;               /* (n_train) visiting order */
    lv_rng rng;
} ft_run;

/* One pass over the training sequences in a fresh seeded order, one Adam step
 * per batch. A non-finite loss stops it with sx->diverged set. */
static lv_status train_epoch(ft_run *r, stage_ft_stats *sx)
{
    lv_status st = LV_OK;
    double loss_sum = 0.0;
    int64_t n_steps = 0;
    stage_ft_shuffle(r->perm, r->n_train, &r->rng);
    for (int64_t s0 = 0; s0 < r->n_train; s0 += r->bmax) {
        int B = (int)(r->n_train - s0 < r->bmax ? r->n_train - s0 : r->bmax);
        for (int j = 0; j < B; j++) {
            const int64_t src = r->perm[s0 + j] * r->row;
            memcpy(r->xb + j * r->row, r->x_in + src, sizeof(float) * (size_t)r->row);
            memcpy(r->yb + j * r->row, r->y_fp + src, sizeof(float) * (size_t)r->row);
        }
        double loss = 0.0;
        LV_TRY(stage_ft_block_grad(r->ws, r->b, r->xb, r->yb, B, r->T, &loss, r->grad));
        if (!isfinite(loss)) {
            sx->diverged = 1;
            break;
        }
        stage_ft_adam_step(r->seg, r->len, r->n_train_seg, r->grad, r->m, r->v, ++sx->steps, &r->ft);
        loss_sum += loss;
        n_steps++;
    }
    sx->train_loss = n_steps ? loss_sum / (double)n_steps : NAN;
done:
    return st;
}

lv_status stage_finetune_block(const lv_model_config *cfg, lv_qblock *b, const float *x_in,
                               const float *y_fp, int64_t n_seq, int T,
                               const stage_ft_config *ft_in, stage_ft_stats *stats)
{
    lv_status st = LV_OK;
    ft_run r = {.ft = stage_ft_defaults(ft_in), .b = b, .x_in = x_in, .y_fp = y_fp, .T = T};
    float *best = NULL;
    int have_best = 0; /* best holds a snapshot: restored on any exit */
    stage_ft_stats sx = {0};
    const double t0 = lv_now();

    LV_TRY(stage_ft_check(&r.ft));
    if (!cfg || !b || !x_in || !y_fp)
        LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: NULL config, block, inputs or outputs");
    if (n_seq <= 0 || T <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: %lld sequences of %d tokens", (long long)n_seq, T);

    /* the last ceil(frac * n_seq) sequences, at least one, never all; a single
     * sequence is both trained on and used for the early stop */
    if (n_seq >= 2) {
        sx.n_holdout = (int64_t)ceil(r.ft.holdout_frac * (double)n_seq);
        sx.n_holdout = sx.n_holdout < 1 ? 1 : sx.n_holdout > n_seq - 1 ? n_seq - 1 : sx.n_holdout;
    }
    r.n_train = sx.n_train = n_seq - sx.n_holdout;
    r.row = (int64_t)T * cfg->dim;
    const float *x_val = x_in + (sx.n_holdout ? r.n_train * r.row : 0);
    const float *y_val = y_fp + (sx.n_holdout ? r.n_train * r.row : 0);
    const int64_t n_val = sx.n_holdout ? sx.n_holdout : n_seq;
    r.bmax = (int)(r.n_train < r.ft.batch_seqs ? r.n_train : r.ft.batch_seqs);

    LV_TRY(stage_ft_ws_init(&r.ws, cfg, b, r.bmax, T));
    const int64_t np = stage_ft_param_segments(cfg, b, r.seg, r.len);
    /* frozen norms are the last two segments: Adam just does not visit them */
    r.n_train_seg = r.ft.freeze_norms ? STAGE_FT_N_SEGS - 2 : STAGE_FT_N_SEGS;
    LV_ALLOC(best, np);
    LV_ALLOC(r.grad, np);
    LV_ALLOC(r.m, np);
    LV_ALLOC(r.v, np);
    LV_ALLOC(r.xb, (size_t)r.bmax * (size_t)r.row);
    LV_ALLOC(r.yb, (size_t)r.bmax * (size_t)r.row);
    LV_ALLOC(r.perm, r.n_train);
    for (int64_t i = 0; i < r.n_train; i++) r.perm[i] = i;
    lv_rng_seed(&r.rng, r.ft.seed ^ 0xf17e7a11b10cULL);

    LV_TRY(stage_ft_eval_rel(r.ws, b, x_val, y_val, n_val, T, cfg->dim, r.bmax, r.yb, &sx.mse_before));
    double best_mse = sx.mse_before;
    params_copy(r.seg, r.len, STAGE_FT_N_SEGS, best, 1);
    have_best = 1;
    if (r.ft.verbose)
        lv_log("finetune: %lld params, %lld train / %lld held-out seqs, held-out rel MSE %.5g",
               (long long)np, (long long)sx.n_train, (long long)sx.n_holdout, sx.mse_before);

    for (int ep = 1, worse = 0; ep <= r.ft.max_epochs && worse < r.ft.patience && !sx.diverged;
         ep++) {
        LV_TRY(train_epoch(&r, &sx));
        sx.epochs = ep;
        double cur = INFINITY;
        if (!sx.diverged)
            LV_TRY(stage_ft_eval_rel(r.ws, b, x_val, y_val, n_val, T, cfg->dim, r.bmax, r.yb, &cur));
        if (cur < best_mse) {
            best_mse = cur;
            sx.best_epoch = ep;
            params_copy(r.seg, r.len, STAGE_FT_N_SEGS, best, 1);
            worse = 0;
        } else {
            worse++;
        }
        if (r.ft.verbose)
            lv_log("finetune: epoch %d train MSE %.5g held-out rel MSE %.5g%s", ep, sx.train_loss,
                   cur, sx.diverged ? " (diverged)" : sx.best_epoch == ep ? " (best)" : "");
    }
    sx.mse_after = best_mse;
done:
    if (have_best) params_copy(r.seg, r.len, STAGE_FT_N_SEGS, best, 0);
    sx.wall_s = lv_now() - t0;
    if (stats) *stats = sx;
    stage_ft_ws_free(r.ws);
    free(best);
    free(r.grad);
    free(r.m);
    free(r.v);
    free(r.xb);
    free(r.yb);
    free(r.perm);
    return st;
}
