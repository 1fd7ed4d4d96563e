/* pvtune.c: PV-tuning (arXiv 2405.14852) of a whole quantized model against its
 * FP teacher, CPU reference (stage.h "PV-tuning"; docs/finetune.md).
 *
 * Forward of one micro-batch: embedding, the blocks through stage_ft_block_forward
 * (the input of every block is kept: (n_layers + 1) * B*T*dim floats), final
 * RMSNorm, classifier. Backward: dL/dlogits -> classifier (frozen) -> final norm
 * -> the blocks in reverse; each block's activations are recomputed into the
 * one stage_ft_ws (stage_ft_block_forward_save) and stage_ft_block_backward
 * takes the upstream gradient, adds the block's parameter gradient and, for the
 * P step, dL/dWhat, and hands dL/dx to the block below.
 *
 * Determinism: micro-batches, blocks and shared-codebook copies are summed in a
 * fixed order into float buffers; per-row losses are summed serially in double;
 * the P step ranks its candidates by a total order. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "kern_ftcuda.h"

#ifdef LLMVQ_HAVE_CUDA
#define LLMVQ_CUDA_BUILT 1
#else
#define LLMVQ_CUDA_BUILT 0
#endif
#include "stage_impl.h"

enum { PV_H_IDENTITY = 0, PV_H_DIAG = 1, PV_H_FULL = 2 };
#define PV_MAX_G 4096 /* group size bound of the P step's per-group scratch */

struct stage_pv {
    stage_pv_config cfg;   /* defaults filled in */
    const lv_model *fp;    /* borrowed teacher */
    lv_qmodel *q;          /* borrowed student, changed in place */
    int mb, T;             /* micro-batch capacity (sequences), tokens per sequence */
    int L, dim, vocab, shared;
    int64_t n_blk;         /* floats of one block's flat gradient (stage_ft_param_segments) */
    int64_t n_full;        /* L * n_blk + dim: per-copy gradient, final norm last */
    int64_t blk_off[STAGE_FT_N_SEGS]; /* segment offsets inside one block's gradient */
    /* trainable parameters (stage_pv_param_segments) */
    int n_seg;
    float **seg;           /* (n_seg) into q */
    int64_t *len, *off;    /* (n_seg) length, offset in the flat trainable vector */
    int64_t *src;          /* (n_seg) offset of the segment's gradient in gfull (-1: summed copies) */
    int *train;            /* (n_seg) 1: Adam updates it */
    int64_t n_param;
    float *gfull;          /* (n_full) */
    float *grad;           /* (n_param); == gfull without shared codebooks */
    float *m, *v;          /* (n_param) Adam moments */
    int64_t adam_t;
    /* one micro-batch */
    stage_ft_ws *ws;
    kern_ftcuda *gws;      /* cfg.device = CUDA: the blocks run here instead of ws */
    kern_fwd_ws *tws;      /* teacher forward with logits (KL only) */
    float *X;              // (L + 1, mb, T, dim) block inputs, then the last block's output
    float *hn;             // (mb, T, dim) final_norm(x_L)
    float *rf;             // (mb * T) inverse RMS of x_L
    float *dx;             // (mb, T, dim) gradient flowing down the residual stream
    float *logits;         // (mb, T, vocab) student logits, then dL/dlogits
    double *row_loss;      // (mb * T)
    /* P step */
    int64_t n_groups, budget, w_max, c_max, o_max;
    int64_t n_w, n_codes;  /* quantized weights, codes of all linears */
    float *dW;             /* (all quantized weights) dL/dWhat, linear (l, k) at dW_off[l * 7 + k] */
    int64_t *dW_off;       /* (L * 7) */
    float *Wold, *Wnew, *Wt, *E, *EH; /* (w_max) What before / after, target, residual, E H */
    float *Hbuf;           /* (dmax, dmax) identity / diagonal H for the beam search */
    double *rowobj, *rowobj2; /* (max d_out) row objectives before / after */
    uint16_t *ccopy;       /* (c_max) */
    uint16_t *csnap;       /* (n_codes) codes before a P step (its check puts them back) */
    int64_t p_count;       /* P steps taken (seeds) */
};

/* ----------------------------------------------------------------- config */

stage_pv_config stage_pv_defaults(const stage_pv_config *in)
{
    stage_pv_config c = {0};
    if (in) c = *in;
    if (c.lr == 0.0f) c.lr = 1e-3f;
    if (c.beta1 == 0.0f) c.beta1 = 0.9f;
    if (c.beta2 == 0.0f) c.beta2 = 0.95f;
    if (c.batch_seqs == 0) c.batch_seqs = 16;
    if (c.micro_batch == 0) c.micro_batch = 4;
    if (c.max_epochs == 0) c.max_epochs = 4;
    if (c.patience == 0) c.patience = 4;
    if (c.holdout_frac == 0.0) c.holdout_frac = 0.1;
    if (c.p_lr == 0.0f) c.p_lr = 1.0f;
    if (c.p_budget == 0.0) c.p_budget = 1e-3;
    if (c.p_beam == 0) c.p_beam = 8;
    if (c.p_check == 0) c.p_check = 4;
    return c;
}

static lv_status pv_check_cfg(const stage_pv_config *c)
{
    lv_status st = LV_OK;
    if ((c->loss != STAGE_PV_LOSS_KL && c->loss != STAGE_PV_LOSS_CE) || !(c->lr > 0.0f) ||
        !isfinite(c->lr) || !(c->beta1 >= 0.0f && c->beta1 < 1.0f) ||
        !(c->beta2 >= 0.0f && c->beta2 < 1.0f))
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: loss %d, lr %g, betas (%g, %g): need a known loss, "
                "lr > 0, betas in [0, 1)", (int)c->loss, (double)c->lr, (double)c->beta1,
                (double)c->beta2);
    if (c->batch_seqs < 1 || c->micro_batch < 1 || c->max_epochs < 0 || c->eval_every < 0 ||
        c->patience < 1 || !(c->holdout_frac > 0.0 && c->holdout_frac < 1.0))
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: batch_seqs %d, micro_batch %d, max_epochs %d, "
                "eval_every %d, patience %d, holdout_frac %g out of range", c->batch_seqs,
                c->micro_batch, c->max_epochs, c->eval_every, c->patience, c->holdout_frac);
    if (!(c->p_lr > 0.0f) || !isfinite(c->p_lr) || !(c->p_budget <= 1.0) || c->p_beam < 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: p_lr %g, p_budget %g, p_beam %d: need p_lr > 0, "
                "p_budget <= 1, p_beam >= 1", (double)c->p_lr, c->p_budget, c->p_beam);
    if (c->device != STAGE_PV_DEVICE_CPU && c->device != STAGE_PV_DEVICE_CUDA)
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: unknown device %d", c->device);
    if (c->device == STAGE_PV_DEVICE_CUDA && lv_cuda_device_count() < 1)
        LV_FAIL(LV_ERR_UNSUPPORTED, "pv-tune: pvtune.device = cuda, but %s",
                LLMVQ_CUDA_BUILT ? "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and "
                                   "the driver)"
                                 : "this llmvq was built without CUDA (configure with "
                                   "-DLLMVQ_CUDA=ON)");
done:
    return st;
}

/* fp and q have the same shapes, q's linears are AQ layers of them with valid
 * codes, and shared copies are identical. */
static lv_status pv_check_models(const lv_model *fp, const lv_qmodel *q)
{
    lv_status st = LV_OK;
    const lv_model_config *a = &fp->cfg, *b = &q->cfg;
    if (a->dim != b->dim || a->hidden_dim != b->hidden_dim || a->n_layers != b->n_layers ||
        a->n_heads != b->n_heads || a->n_kv_heads != b->n_kv_heads ||
        a->vocab_size != b->vocab_size || a->rope != b->rope)
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: the FP model and the quantized model differ in shape");
    if (!q->tok_emb || !q->final_norm || !q->blocks || (!b->tied_cls && !q->wcls))
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: quantized model without embeddings, final norm, "
                "blocks or classifier");
    const lv_aq_layer *L0 = &q->blocks[0].lin[0];
    for (int l = 0; l < b->n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++)
            if (q->blocks[l].lin[k].n_outl > 0)
                LV_FAIL(LV_ERR_UNSUPPORTED, "pv-tune: block %d %s has %d outlier columns "
                        "(quant.outlier_cols); PV-tuning does not train them yet", l,
                        lv_lin_name((lv_lin)k), q->blocks[l].lin[k].n_outl);
        if (q->blocks[l].lora_rank)
            LV_FAIL(LV_ERR_UNSUPPORTED, "pv-tune: block %d has rank-%d LoRA adapters (ApiQ); "
                    "PV-tuning trains What only", l, q->blocks[l].lora_rank);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            int64_t o, i;
            lv_lin_shape(b, (lv_lin)k, &o, &i);
            if (!L->codes || !L->codebooks || !L->scales || L->d_out != o || L->d_in != i ||
                L->M < 1 || L->M > 64 || L->g < 1 || L->g > PV_MAX_G || L->nbits < 1 || L->nbits > 16 ||
                L->n_groups != (i + L->g - 1) / L->g)
                LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: block %d %s is not a %lldx%lld AQ layer", l,
                        lv_lin_name((lv_lin)k), (long long)o, (long long)i);
            const int64_t nc = L->d_out * L->n_groups * L->M, K = (int64_t)1 << L->nbits;
            for (int64_t j = 0; j < nc; j++)
                if (L->codes[j] >= K)
                    LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: block %d %s code %u >= 2^%d", l,
                            lv_lin_name((lv_lin)k), L->codes[j], L->nbits);
            const int own = lv_share_slot(q->shared_codebooks, k);
            if (q->shared_codebooks &&
                (L->M != L0->M || L->nbits != L0->nbits || L->g != L0->g ||
                 memcmp(L->codebooks, q->blocks[0].lin[own].codebooks,
                        sizeof(float) * (size_t)(L->M * K * L->g))))
                LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: shared codebooks (%s), but block %d %s holds "
                        "a different codebook tensor than block 0 %s",
                        lv_share_name(q->shared_codebooks), l, lv_lin_name((lv_lin)k),
                        lv_lin_name((lv_lin)own));
        }
    }
done:
    return st;
}

/* ------------------------------------------------------------------- init */

/* Floats of the embedding (and untied classifier) gradients, 0 unless train_emb. */
static int64_t pv_emb_floats(const lv_qmodel *q, const stage_pv_config *c)
{
    return c->train_emb ? (q->cfg.tied_cls ? 1 : 2) * (int64_t)q->cfg.vocab_size * q->cfg.dim : 0;
}

/* The trainable segments (see stage_pv_param_segments) and where their
 * gradients sit in gfull. seg == NULL: only count. */
static int pv_layout(stage_pv *pv, float **seg, int64_t *len, int64_t *src, int *train)
{
    lv_qmodel *q = pv->q;
    int n = 0;
    const int fn = pv->cfg.freeze_norms;
#define PV_SEG(ptr, l_, s_, t_)                                                \
    do {                                                                       \
        if (seg) seg[n] = (ptr), len[n] = (l_), src[n] = (s_), train[n] = (t_); \
        n++;                                                                   \
    } while (0)
    for (int s = 0; s < lv_share_slots(pv->shared); s++) { /* slot s: src -1 - s */
        const lv_aq_layer *L0 = &q->blocks[0].lin[s];
        PV_SEG(L0->codebooks, (int64_t)L0->M * ((int64_t)1 << L0->nbits) * L0->g, -1 - s, 1);
    }
    for (int l = 0; l < pv->L; l++) {
        lv_qblock *b = &q->blocks[l];
        const int64_t base = (int64_t)l * pv->n_blk;
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &b->lin[k];
            if (!pv->shared)
                PV_SEG(L->codebooks, (int64_t)L->M * ((int64_t)1 << L->nbits) * L->g,
                       base + pv->blk_off[2 * k], 1);
            PV_SEG(L->scales, L->d_out, base + pv->blk_off[2 * k + 1], 1);
        }
        PV_SEG(b->attn_norm, pv->dim, base + pv->blk_off[2 * LV_LIN_COUNT], !fn);
        PV_SEG(b->ffn_norm, pv->dim, base + pv->blk_off[2 * LV_LIN_COUNT + 1], !fn);
    }
    PV_SEG(q->final_norm, pv->dim, (int64_t)pv->L * pv->n_blk, !fn);
    if (pv->cfg.train_emb) { /* after the final norm, in gfull as in the trainable vector */
        const int64_t ne = (int64_t)pv->vocab * pv->dim, e0 = (int64_t)pv->L * pv->n_blk + pv->dim;
        PV_SEG(q->tok_emb, ne, e0, 1);
        if (!q->cfg.tied_cls) PV_SEG(q->wcls, ne, e0 + ne, 1);
    }
#undef PV_SEG
    return n;
}

/* Counts of the P step (codes, groups, budget, dW offsets); its buffers
 * (one float per quantized weight for dL/dWhat and more) come with the first
 * P step (pv_alloc_pstep), so V-only tuning never holds them. */
static lv_status pv_count_pstep(stage_pv *pv)
{
    lv_status st = LV_OK;
    int64_t total = 0, omax = 0;
    LV_ALLOC(pv->dW_off, (size_t)pv->L * LV_LIN_COUNT);
    for (int l = 0; l < pv->L; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &pv->q->blocks[l].lin[k];
            pv->dW_off[l * LV_LIN_COUNT + k] = total;
            total += L->d_out * L->d_in;
            pv->n_codes += L->d_out * L->n_groups * L->M;
            pv->n_groups += L->d_out * L->n_groups;
            pv->w_max = L->d_out * L->d_in > pv->w_max ? L->d_out * L->d_in : pv->w_max;
            pv->c_max = L->d_out * L->n_groups * L->M > pv->c_max ? L->d_out * L->n_groups * L->M
                                                                  : pv->c_max;
            omax = L->d_out > omax ? L->d_out : omax;
        }
    pv->n_w = total;
    pv->o_max = omax;
    pv->budget = pv->cfg.p_budget < 0.0 ? 0 : (int64_t)floor(pv->cfg.p_budget * (double)pv->n_groups);
done:
    return st;
}

static lv_status pv_alloc_pstep(stage_pv *pv)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &pv->q->cfg;
    const int64_t dmax = c->dim > c->hidden_dim ? c->dim : c->hidden_dim, omax = pv->o_max;
    if (pv->dW) return LV_OK;
    LV_ALLOC(pv->dW, pv->n_w);
    LV_ALLOC(pv->Wold, pv->w_max);
    LV_ALLOC(pv->Wnew, pv->w_max);
    LV_ALLOC(pv->Wt, pv->w_max);
    LV_ALLOC(pv->E, pv->w_max);
    LV_ALLOC(pv->EH, pv->w_max);
    LV_ALLOC(pv->Hbuf, dmax * dmax);
    LV_ALLOC(pv->rowobj, omax);
    LV_ALLOC(pv->rowobj2, omax);
    LV_ALLOC(pv->ccopy, pv->c_max);
    LV_ALLOC(pv->csnap, pv->n_codes);
done:
    return st;
}

lv_status stage_pv_init(stage_pv **out, const lv_model *fp, lv_qmodel *q, int micro_batch, int T,
                        const stage_pv_config *cfg)
{
    lv_status st = LV_OK;
    stage_pv *pv = NULL;
    if (!out) LV_FAIL(LV_ERR_INVALID_ARG, "stage_pv_init: out is NULL");
    *out = NULL;
    if (!fp || !q || !fp->layers) LV_FAIL(LV_ERR_INVALID_ARG, "stage_pv_init: NULL model");
    LV_ALLOC(pv, 1);
    pv->cfg = stage_pv_defaults(cfg);
    LV_TRY(pv_check_cfg(&pv->cfg));
    LV_TRY(pv_check_models(fp, q));
    if (micro_batch < 1 || T < 1 || T > q->cfg.seq_len || (pv->cfg.loss == STAGE_PV_LOSS_CE && T < 2))
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: micro-batch %d x %d tokens (seq_len %d; CE needs T >= 2)",
                micro_batch, T, q->cfg.seq_len);
    pv->fp = fp;
    pv->q = q;
    pv->mb = micro_batch;
    pv->T = T;
    pv->L = q->cfg.n_layers;
    pv->dim = q->cfg.dim;
    pv->vocab = q->cfg.vocab_size;
    pv->shared = q->shared_codebooks;

    int64_t blen[STAGE_FT_N_SEGS];
    pv->n_blk = stage_ft_param_segments(&q->cfg, &q->blocks[0], NULL, blen);
    for (int s = 0; s < STAGE_FT_N_SEGS; s++)
        pv->blk_off[s] = s ? pv->blk_off[s - 1] + blen[s - 1] : 0;
    pv->n_full = (int64_t)pv->L * pv->n_blk + pv->dim + pv_emb_floats(q, &pv->cfg);
    pv->n_seg = pv_layout(pv, NULL, NULL, NULL, NULL);
    LV_ALLOC(pv->seg, pv->n_seg);
    LV_ALLOC(pv->len, pv->n_seg);
    LV_ALLOC(pv->off, pv->n_seg);
    LV_ALLOC(pv->src, pv->n_seg);
    LV_ALLOC(pv->train, pv->n_seg);
    pv_layout(pv, pv->seg, pv->len, pv->src, pv->train);
    for (int s = 0; s < pv->n_seg; s++) {
        pv->off[s] = pv->n_param;
        pv->n_param += pv->len[s];
    }
    LV_ALLOC(pv->gfull, pv->n_full);
    if (pv->shared) {
        LV_ALLOC(pv->grad, pv->n_param);
    } else {
        LV_ASSERT(pv->n_param == pv->n_full);
        pv->grad = pv->gfull;
    }
    LV_ALLOC(pv->m, pv->n_param);
    LV_ALLOC(pv->v, pv->n_param);

    const size_t n = (size_t)micro_batch * (size_t)T, nd = n * (size_t)pv->dim;
    if (pv->cfg.device == STAGE_PV_DEVICE_CUDA)
        LV_TRY(kern_ftcuda_init(&pv->gws, &q->cfg, &q->blocks[0], micro_batch, T));
    else
        LV_TRY(stage_ft_ws_init(&pv->ws, &q->cfg, &q->blocks[0], micro_batch, T));
    if (pv->cfg.loss == STAGE_PV_LOSS_KL) LV_TRY(kern_fwd_ws_init(&pv->tws, &fp->cfg, micro_batch, T, 1));
    LV_ALLOC(pv->X, (size_t)(pv->L + 1) * nd);
    LV_ALLOC(pv->hn, nd);
    LV_ALLOC(pv->rf, n);
    LV_ALLOC(pv->dx, nd);
    LV_ALLOC(pv->logits, n * (size_t)pv->vocab);
    LV_ALLOC(pv->row_loss, n);
    LV_TRY(pv_count_pstep(pv));
    *out = pv;
    pv = NULL;
done:
    stage_pv_free(pv);
    return st;
}

void stage_pv_free(stage_pv *pv)
{
    if (!pv) return;
    stage_ft_ws_free(pv->ws);
    kern_ftcuda_free(pv->gws);
    kern_fwd_ws_free(pv->tws);
    if (pv->grad != pv->gfull) free(pv->grad);
    void *ptrs[] = {pv->seg,    pv->len, pv->off,    pv->src,      pv->train,  pv->gfull,
                    pv->m,      pv->v,   pv->X,      pv->hn,       pv->rf,     pv->dx,
                    pv->logits, pv->row_loss, pv->dW, pv->dW_off,  pv->Wold,   pv->Wnew,
                    pv->Wt,     pv->E,   pv->EH,     pv->Hbuf,     pv->rowobj, pv->rowobj2,
                    pv->ccopy,  pv->csnap};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) free(ptrs[i]);
    free(pv);
}

int64_t stage_pv_param_segments(const stage_pv *pv, int *n_seg, float **seg, int64_t *len)
{
    if (!pv) return 0;
    if (n_seg) *n_seg = pv->n_seg;
    if (seg) memcpy(seg, pv->seg, sizeof(float *) * (size_t)pv->n_seg);
    if (len) memcpy(len, pv->len, sizeof(int64_t) * (size_t)pv->n_seg);
    return pv->n_param;
}

/* --------------------------------------------------------- forward/backward */

static lv_status pv_check_tokens(const stage_pv *pv, const int32_t *tokens, int64_t n_seq)
{
    lv_status st = LV_OK;
    if (!tokens || n_seq < 1) LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: no tokens (%lld sequences)",
                                      (long long)n_seq);
    for (int64_t i = 0; i < n_seq * pv->T; i++)
        if (tokens[i] < 0 || tokens[i] >= pv->vocab)
            LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: token %d at %lld is outside the vocabulary (%d)",
                    tokens[i], (long long)i, pv->vocab);
done:
    return st;
}

/* Positions whose loss counts, per sequence. */
static int64_t pv_positions(const stage_pv *pv)
{
    return pv->cfg.loss == STAGE_PV_LOSS_CE ? pv->T - 1 : pv->T;
}

/* Loss of each row of the student logits (n, vocab) in row_loss (double), and
 * with grad != 0 the logits replaced by dL/dlogits * inv_n.
 * KL: sum_v p_t (log p_t - log p_s), dL/dz = p_s - p_t; CE: lse - z[target],
 * dL/dz = p_s - onehot; softmaxes in double. */
static void pv_logit_rows(stage_pv *pv, const float *tl, const int32_t *tok, int64_t n,
                          double inv_n, int grad)
{
    const int V = pv->vocab, T = pv->T, ce = pv->cfg.loss == STAGE_PV_LOSS_CE;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *z = pv->logits + i * V; // (vocab)
        double mx = -INFINITY, se = 0.0;
        for (int v = 0; v < V; v++) mx = z[v] > mx ? z[v] : mx;
        for (int v = 0; v < V; v++) se += exp((double)z[v] - mx);
        const double lse = mx + log(se);
        double loss = 0.0;
        if (ce) {
            const int t = (int)(i % T), target = t < T - 1 ? tok[i + 1] : -1;
            if (target >= 0) loss = lse - z[target];
            if (grad)
                for (int v = 0; v < V; v++)
                    z[v] = target < 0 ? 0.0f
                                      : (float)((exp(z[v] - lse) - (v == target)) * inv_n);
        } else {
            const float *zt = tl + i * V;
            double mt = -INFINITY, st_ = 0.0;
            for (int v = 0; v < V; v++) mt = zt[v] > mt ? zt[v] : mt;
            for (int v = 0; v < V; v++) st_ += exp((double)zt[v] - mt);
            const double lset = mt + log(st_);
            for (int v = 0; v < V; v++) {
                const double lt = zt[v] - lset, ls = z[v] - lse, pt = exp(lt);
                loss += pt * (lt - ls);
                if (grad) z[v] = (float)((exp(ls) - pt) * inv_n);
            }
        }
        pv->row_loss[i] = loss;
    }
}

/* Final RMSNorm backward (out = w * r * x): gw += sum_i dh r x; dx = r w dh -
 * r^3/dim x sum_j(w dh x). Column sums run over rows in order (deterministic). */
static void pv_final_norm_bwd(stage_pv *pv, const float *x, const float *dh, int64_t n, float *gw,
                              float *dx)
{
    const int dim = pv->dim;
    const float *w = pv->q->final_norm, *r = pv->rf;
#pragma omp parallel for schedule(static)
    for (int j = 0; j < dim; j++) {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += (double)dh[i * dim + j] * r[i] * x[i * dim + j];
        gw[j] += (float)s;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim, *di = dh + i * dim; // (dim)
        float *gi = dx + i * dim;
        double dot = 0.0;
        for (int j = 0; j < dim; j++) dot += (double)w[j] * di[j] * xi[j];
        const float ri = r[i], c3 = (float)((double)ri * ri * ri * dot / dim);
        for (int j = 0; j < dim; j++) gi[j] = ri * w[j] * di[j] - c3 * xi[j];
    }
}

/* One micro-batch tok (B, T): *sum += the loss summed over its counted
 * positions; grad: gfull += dL/dparams * inv_n; dW: the dW buffers += dL/dWhat
 * * inv_n. */
static lv_status pv_micro(stage_pv *pv, const int32_t *tok, int B, double inv_n, int grad,
                          int dW, double *sum)
{
    lv_status st = LV_OK;
    lv_qmodel *q = pv->q;
    const int T = pv->T, dim = pv->dim;
    const int64_t n = (int64_t)B * T, stride = (int64_t)pv->mb * T * dim;
    const float *cls = q->cfg.tied_cls ? q->tok_emb : q->wcls, *tl = NULL;
    float *xL = pv->X + (int64_t)pv->L * stride;

    if (pv->tws) LV_TRY(kern_model_forward(pv->fp, tok, B, T, pv->tws, &tl));
    kern_embed_ref(pv->X, q->tok_emb, tok, n, dim);
    for (int l = 0; l < pv->L; l++)
        LV_TRY(pv->gws ? kern_ftcuda_forward(pv->gws, &q->blocks[l], pv->X + l * stride, B, T,
                                             pv->X + (l + 1) * stride)
                       : stage_ft_block_forward(pv->ws, &q->blocks[l], pv->X + l * stride, B, T,
                                                pv->X + (l + 1) * stride));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) { /* r as kern_rmsnorm_ref forms it */
        double ss = 0.0;
        for (int j = 0; j < dim; j++) ss += (double)xL[i * dim + j] * xL[i * dim + j];
        pv->rf[i] = (float)(1.0 / sqrt(ss / dim + (double)q->cfg.norm_eps));
    }
    kern_rmsnorm_ref(pv->hn, xL, q->final_norm, n, dim, q->cfg.norm_eps);
    kern_matmul_ref(pv->logits, pv->hn, cls, n, dim, pv->vocab);
    pv_logit_rows(pv, tl, tok, n, inv_n, grad || dW);
    for (int64_t i = 0; i < n; i++) *sum += pv->row_loss[i];
    if (!grad && !dW) goto done;

    float *gemb = grad && pv->cfg.train_emb ? pv->gfull + (int64_t)pv->L * pv->n_blk + dim : NULL;
    if (gemb) /* dcls (vocab, dim) += dlogits^T @ hn: the tied table's first part */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, pv->vocab, dim, (int)n, 1.0f,
                    pv->logits, pv->vocab, pv->hn, dim, 1.0f,
                    q->cfg.tied_cls ? gemb : gemb + (int64_t)pv->vocab * dim, dim);
    // dh (n, dim) = dlogits (n, vocab) @ cls (vocab, dim), into hn (no longer needed)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, dim, pv->vocab, 1.0f,
                pv->logits, pv->vocab, cls, dim, 0.0f, pv->hn, dim);
    pv_final_norm_bwd(pv, xL, pv->hn, n, pv->gfull + (int64_t)pv->L * pv->n_blk, pv->dx);
    for (int l = pv->L - 1; l >= 0; l--) {
        lv_qblock *b = &q->blocks[l];
        const float *x = pv->X + l * stride;
        float *dWl[LV_LIN_COUNT];
        for (int k = 0; k < LV_LIN_COUNT; k++) dWl[k] = pv->dW + pv->dW_off[l * LV_LIN_COUNT + k];
        /* the last block's activations are still in ws from the forward */
        float *gl = grad ? pv->gfull + (int64_t)l * pv->n_blk : NULL;
        if (pv->gws) {
            if (l < pv->L - 1) LV_TRY(kern_ftcuda_forward(pv->gws, b, x, B, T, NULL));
            LV_TRY(kern_ftcuda_backward(pv->gws, b, pv->dx, 1, gl, l > 0 || gemb ? pv->dx : NULL,
                                        dW ? dWl : NULL));
            continue;
        }
        if (l < pv->L - 1) LV_TRY(stage_ft_block_forward_save(pv->ws, b, x, B, T, NULL));
        LV_TRY(stage_ft_block_backward(pv->ws, b, x, pv->dx, 1, gl, l > 0 || gemb ? pv->dx : NULL,
                                       dW ? dWl : NULL));
    }
    if (gemb) /* the embedding rows of the tokens += dL/dx_0, positions in order */
        for (int64_t i = 0; i < n; i++) {
            float *e = gemb + (int64_t)tok[i] * dim;
            const float *d = pv->dx + i * dim;
            for (int j = 0; j < dim; j++) e[j] += d[j];
        }
done:
    return st;
}

/* Sum of one micro-batch's per-row losses and, with grad/dW, its gradients
 * (computed into zeroed buffers g (n_full) and w (n_w) that pv_micro adds into). */
static lv_status pv_micro_into(stage_pv *pv, const int32_t *tok, int B, double inv_n, int grad,
                               int dW, float *g, float *w, double *loss)
{
    lv_status st = LV_OK;
    float *gf = pv->gfull, *dw = pv->dW;
    if (grad) memset(g, 0, sizeof(float) * (size_t)pv->n_full);
    if (dW) memset(w, 0, sizeof(float) * (size_t)pv->n_w);
    pv->gfull = g;
    pv->dW = w;
    *loss = 0.0;
    st = pv_micro(pv, tok, B, inv_n, grad, dW, loss);
    pv->gfull = gf;
    pv->dW = dw;
    return st;
}

/* Add one micro-batch's result (an item buffer: loss, then gradient, then dW). */
static void pv_add_item(stage_pv *pv, const unsigned char *item, int grad, int dW, double *sum)
{
    double l;
    memcpy(&l, item, sizeof l);
    *sum += l;
    const float *g = (const float *)(item + sizeof(double));
    if (grad)
        for (int64_t i = 0; i < pv->n_full; i++) pv->gfull[i] += g[i];
    if (dW) {
        const float *w = g + (grad ? pv->n_full : 0);
        for (int64_t i = 0; i < pv->n_w; i++) pv->dW[i] += w[i];
    }
}

/* Loss over tokens (n_seq, T) in micro-batches; gradients (grad: gfull, dW:
 * the dW buffers) zeroed first. Every micro-batch's loss and gradients are
 * computed on their own and added in micro-batch order, so the sums are the
 * same whichever rank computed each micro-batch (cfg.dist: item m = micro-batch
 * m of this pass; each rank computes the ones it owns, then every item is
 * shared from its owner and added in order on every rank). */
static lv_status pv_pass(stage_pv *pv, const int32_t *tokens, int64_t n_seq, int grad, int dW,
                         double *loss)
{
    lv_status st = LV_OK;
    unsigned char *items = NULL;
    LV_TRY(pv_check_tokens(pv, tokens, n_seq));
    const int64_t n_pos = n_seq * pv_positions(pv), n_mb = (n_seq + pv->mb - 1) / pv->mb;
    const double inv_n = 1.0 / (double)n_pos;
    const stage_dist *d = pv->cfg.dist && pv->cfg.dist->owns ? pv->cfg.dist : NULL;
    /* one item: the micro-batch's loss (double), gradient (n_full), dW (n_w) */
    const size_t ib = sizeof(double) + sizeof(float) * (size_t)((grad ? pv->n_full : 0) +
                                                                (dW ? pv->n_w : 0));
    int64_t n_own = 0;
    for (int64_t m = 0; m < n_mb; m++) n_own += !d || d->owns(d->user, (int)m);
    /* local: one item buffer reused; distributed: one per owned micro-batch + one to receive */
    const int64_t n_buf = d ? n_own + 1 : 1;
    LV_ALLOC(items, (size_t)n_buf * ib);
    double sum = 0.0;
    if (grad) memset(pv->gfull, 0, sizeof(float) * (size_t)pv->n_full);
    if (dW) memset(pv->dW, 0, sizeof(float) * (size_t)pv->n_w);
    for (int64_t m = 0, j = 0; m < n_mb; m++) {
        if (d && !d->owns(d->user, (int)m)) continue;
        unsigned char *it = items + (size_t)(d ? j++ : 0) * ib;
        float *g = (float *)(it + sizeof(double));
        double l = 0.0;
        const int64_t s0 = m * pv->mb;
        const int B = (int)(n_seq - s0 < pv->mb ? n_seq - s0 : pv->mb);
        LV_TRY(pv_micro_into(pv, tokens + s0 * pv->T, B, inv_n, grad, dW, g,
                             g + (grad ? pv->n_full : 0), &l));
        memcpy(it, &l, sizeof l);
        if (!d) pv_add_item(pv, it, grad, dW, &sum);
    }
    for (int64_t m = 0, j = 0; d && m < n_mb; m++) {
        unsigned char *it = d->owns(d->user, (int)m) ? items + (size_t)j++ * ib
                                                     : items + (size_t)n_own * ib;
        LV_TRY(d->share(d->user, (int)m, it, ib));
        pv_add_item(pv, it, grad, dW, &sum);
    }
    *loss = sum / (double)n_pos;
done:
    free(items);
    return st;
}

/* grad (trainable layout) from gfull: shared codebook = sum of its copies in
 * (block, linear) order; every other segment copied. */
static void pv_gather(stage_pv *pv)
{
    if (!pv->shared) return;
    for (int s = 0; s < pv->n_seg; s++) {
        float *g = pv->grad + pv->off[s];
        if (pv->src[s] >= 0) {
            memcpy(g, pv->gfull + pv->src[s], sizeof(float) * (size_t)pv->len[s]);
            continue;
        }
        memset(g, 0, sizeof(float) * (size_t)pv->len[s]);
        const int slot = -1 - (int)pv->src[s];
        for (int l = 0; l < pv->L; l++)
            for (int k = 0; k < LV_LIN_COUNT; k++) {
                if (lv_share_slot(pv->shared, k) != slot) continue;
                const float *c = pv->gfull + (int64_t)l * pv->n_blk + pv->blk_off[2 * k];
                for (int64_t i = 0; i < pv->len[s]; i++) g[i] += c[i];
            }
    }
}

/* Write each shared codebook (block 0, linear = its slot) into every other copy. */
static void pv_broadcast(stage_pv *pv)
{
    if (!pv->shared) return;
    for (int l = 0; l < pv->L; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const float *C = pv->q->blocks[0].lin[lv_share_slot(pv->shared, k)].codebooks;
            if (!lv_share_owner(pv->shared, l, k))
                memcpy(pv->q->blocks[l].lin[k].codebooks, C, sizeof(float) * (size_t)pv->len[0]);
        }
}

lv_status stage_pv_grad(stage_pv *pv, const int32_t *tokens, int64_t n_seq, double *loss,
                        float *grad)
{
    lv_status st = LV_OK;
    if (!pv || !loss) LV_FAIL(LV_ERR_INVALID_ARG, "stage_pv_grad: NULL state or loss");
    LV_TRY(pv_pass(pv, tokens, n_seq, grad != NULL, 0, loss));
    if (grad) {
        pv_gather(pv);
        memcpy(grad, pv->grad, sizeof(float) * (size_t)pv->n_param);
    }
done:
    return st;
}

lv_status stage_pv_vstep(stage_pv *pv, const int32_t *tokens, int64_t n_seq, double *loss)
{
    lv_status st = LV_OK;
    if (!pv || !loss) LV_FAIL(LV_ERR_INVALID_ARG, "stage_pv_vstep: NULL state or loss");
    LV_TRY(pv_pass(pv, tokens, n_seq, 1, 0, loss));
    if (!isfinite(*loss)) goto done;
    pv_gather(pv);
    for (int64_t i = 0; i < pv->n_param; i++)
        if (!isfinite(pv->grad[i])) {
            *loss = NAN;
            goto done;
        }
    const stage_ft_config ftc = {.lr = pv->cfg.lr, .beta1 = pv->cfg.beta1, .beta2 = pv->cfg.beta2};
    pv->adam_t++;
    for (int s = 0; s < pv->n_seg; s++)
        if (pv->train[s])
            stage_ft_adam_step(&pv->seg[s], &pv->len[s], 1, pv->grad + pv->off[s],
                               pv->m + pv->off[s], pv->v + pv->off[s], pv->adam_t, &ftc);
    pv_broadcast(pv);
done:
    return st;
}

/* ------------------------------------------------------------------ P step */

/* A changed group proposed by a beam search; codes live in the heap's slot. */
typedef struct {
    double gain;
    int64_t lin, row, grp; /* lin = l * 7 + k */
    int64_t slot;
} pv_cand;

/* 1 when a ranks before b: larger gain, then lower (lin, row, grp). */
static int pv_better(const pv_cand *a, const pv_cand *b)
{
    if (a->gain != b->gain) return a->gain > b->gain;
    if (a->lin != b->lin) return a->lin < b->lin;
    if (a->row != b->row) return a->row < b->row;
    return a->grp < b->grp;
}

/* The best `cap` candidates seen: a binary heap whose root is the worst kept. */
typedef struct {
    pv_cand *c;
    uint16_t *codes; /* (cap, M) */
    int64_t n, cap;
    int M;
} pv_heap;

static void pv_heap_sift_down(pv_heap *h, int64_t i)
{
    for (;;) {
        int64_t w = i, a = 2 * i + 1, b = a + 1;
        if (a < h->n && pv_better(&h->c[w], &h->c[a])) w = a;
        if (b < h->n && pv_better(&h->c[w], &h->c[b])) w = b;
        if (w == i) return;
        pv_cand t = h->c[i];
        h->c[i] = h->c[w];
        h->c[w] = t;
        i = w;
    }
}

/* Offer x with its m new codes (m <= h->M). */
static void pv_heap_push(pv_heap *h, const pv_cand *x, const uint16_t *codes, int m)
{
    if (h->cap == 0) return;
    pv_cand c = *x;
    if (h->n < h->cap) {
        int64_t i = h->n++;
        c.slot = i;
        memcpy(h->codes + i * h->M, codes, sizeof(uint16_t) * (size_t)m);
        h->c[i] = c;
        while (i > 0 && pv_better(&h->c[(i - 1) / 2], &h->c[i])) {
            pv_cand t = h->c[i];
            h->c[i] = h->c[(i - 1) / 2];
            h->c[(i - 1) / 2] = t;
            i = (i - 1) / 2;
        }
        return;
    }
    if (!pv_better(&c, &h->c[0])) return;
    c.slot = h->c[0].slot;
    memcpy(h->codes + c.slot * h->M, codes, sizeof(uint16_t) * (size_t)m);
    h->c[0] = c;
    pv_heap_sift_down(h, 0);
}

static int pv_cand_pos_cmp(const void *pa, const void *pb)
{
    const pv_cand *a = pa, *b = pb;
    if (a->lin != b->lin) return a->lin < b->lin ? -1 : 1;
    if (a->row != b->row) return a->row < b->row ? -1 : 1;
    return a->grp < b->grp ? -1 : a->grp > b->grp;
}

/* The metric of linear (l, k) for the beam search and the gains: *H (d_in,
 * d_in) float (identity / diagonal built in Hbuf), *mode. */
static void pv_metric(stage_pv *pv, int l, int k, int64_t d_in, const float **H, int *mode)
{
    const float *src = pv->cfg.p_hessians ? pv->cfg.p_hessians[l * LV_LIN_COUNT + k] : NULL;
    if (src && !pv->cfg.p_hess_diag) {
        *H = src;
        *mode = PV_H_FULL;
        return;
    }
    memset(pv->Hbuf, 0, sizeof(float) * (size_t)(d_in * d_in));
    for (int64_t j = 0; j < d_in; j++) pv->Hbuf[j * d_in + j] = src ? src[j * d_in + j] : 1.0f;
    *H = pv->Hbuf;
    *mode = src ? PV_H_DIAG : PV_H_IDENTITY;
}

/* E = Wt - What, EH = E H; rowobj[r] = E_r . EH_r. Returns the sum, i.e.
 * tr((Wt - What) H (Wt - What)^T) of the linear. */
static double pv_objective(stage_pv *pv, const float *What, const float *H, int mode,
                           int64_t d_out, int64_t d_in, double *rowobj)
{
    const int64_t nw = d_out * d_in;
    for (int64_t j = 0; j < nw; j++) pv->E[j] = pv->Wt[j] - What[j];
    if (mode == PV_H_FULL)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)d_out, (int)d_in, (int)d_in,
                    1.0f, pv->E, (int)d_in, H, (int)d_in, 0.0f, pv->EH, (int)d_in);
    else
        for (int64_t r = 0; r < d_out; r++)
            for (int64_t j = 0; j < d_in; j++)
                pv->EH[r * d_in + j] = pv->E[r * d_in + j] * H[j * d_in + j];
    double tot = 0.0;
    for (int64_t r = 0; r < d_out; r++) {
        double s = 0.0;
        for (int64_t j = 0; j < d_in; j++) s += (double)pv->E[r * d_in + j] * pv->EH[r * d_in + j];
        rowobj[r] = s;
        tot += s;
    }
    return tot;
}

/* Wold = What of L, Wt = Wold - p_lr * dW. */
static void pv_target(stage_pv *pv, const lv_aq_layer *L, const float *dW)
{
    const int64_t nw = L->d_out * L->d_in;
    const float lr = pv->cfg.p_lr;
    kern_aq_dequant_ref(pv->Wold, L->codes, L->codebooks, L->scales, L->d_out, L->d_in,
                        L->n_groups, L->M, 1 << L->nbits, L->g);
    for (int64_t j = 0; j < nw; j++) pv->Wt[j] = pv->Wold[j] - lr * dW[j];
}

/* Candidates of one linear: its groups whose codes in `nc` differ from L's,
 * with gain = 2 d . (E H)_group - d^T H_ii d > 0 (EH from pv_objective at Wold). */
static void pv_propose(stage_pv *pv, const lv_aq_layer *L, int64_t lin, const uint16_t *nc,
                       const float *H, pv_heap *heap, int64_t *n_prop)
{
    const int64_t d_in = L->d_in, K = (int64_t)1 << L->nbits;
    const int M = L->M, g = L->g;
    double d[PV_MAX_G];
    for (int64_t r = 0; r < L->d_out; r++)
        for (int64_t i = 0; i < L->n_groups; i++) {
            const uint16_t *co = L->codes + (r * L->n_groups + i) * M, *cn = nc + (r * L->n_groups + i) * M;
            if (!memcmp(co, cn, sizeof(uint16_t) * (size_t)M)) continue;
            const int len = (int)(d_in - i * g < g ? d_in - i * g : g);
            double gain = 0.0;
            for (int a = 0; a < len; a++) {
                float qn = 0.0f; /* the new value as kern_aq_dequant_ref forms it */
                for (int m = 0; m < M; m++) qn += L->codebooks[((int64_t)m * K + cn[m]) * g + a];
                d[a] = (double)(L->scales[r] * qn) - pv->Wold[r * d_in + i * g + a];
                gain += 2.0 * d[a] * pv->EH[r * d_in + i * g + a];
            }
            for (int a = 0; a < len; a++) {
                const float *h = H + (i * g + a) * d_in + i * g;
                double t = 0.0;
                for (int b = 0; b < len; b++) t += (double)h[b] * d[b];
                gain -= d[a] * t;
            }
            if (!(gain > 0.0)) continue;
            (*n_prop)++;
            const pv_cand c = {.gain = gain, .lin = lin, .row = r, .grp = i};
            pv_heap_push(heap, &c, cn, M);
        }
}

/* Write the accepted candidates c (n, all of linear lin) into q; with a full H
 * a row whose objective rose is put back. Updates ps. */
static void pv_apply_linear(stage_pv *pv, int64_t lin, const pv_cand *c, int64_t n,
                            const pv_heap *heap, stage_pv_pstats *ps)
{
    const int l = (int)(lin / LV_LIN_COUNT), k = (int)(lin % LV_LIN_COUNT);
    lv_aq_layer *L = &pv->q->blocks[l].lin[k];
    const int64_t ng = L->n_groups, rowc = ng * L->M;
    const float *H = NULL;
    int mode = 0;
    pv_metric(pv, l, k, L->d_in, &H, &mode);
    pv_target(pv, L, pv->dW + pv->dW_off[lin]);
    const double before = pv_objective(pv, pv->Wold, H, mode, L->d_out, L->d_in, pv->rowobj);
    memcpy(pv->ccopy, L->codes, sizeof(uint16_t) * (size_t)(L->d_out * rowc));
    for (int64_t j = 0; j < n; j++)
        memcpy(L->codes + (c[j].row * ng + c[j].grp) * L->M, heap->codes + c[j].slot * heap->M,
               sizeof(uint16_t) * (size_t)L->M);
    kern_aq_dequant_ref(pv->Wnew, L->codes, L->codebooks, L->scales, L->d_out, L->d_in, ng, L->M,
                        1 << L->nbits, L->g);
    pv_objective(pv, pv->Wnew, H, mode, L->d_out, L->d_in, pv->rowobj2);
    double after = before;
    for (int64_t j = 0; j < n;) {
        const int64_t r = c[j].row;
        int64_t e = j;
        while (e < n && c[e].row == r) e++;
        if (pv->rowobj2[r] > pv->rowobj[r]) { /* interactions (full H only): keep the row as it was */
            memcpy(L->codes + r * rowc, pv->ccopy + r * rowc, sizeof(uint16_t) * (size_t)rowc);
            ps->n_reverted_rows++;
        } else {
            after += pv->rowobj2[r] - pv->rowobj[r];
            ps->n_changed += e - j;
        }
        j = e;
    }
    ps->obj_after += after - before;
}

/* Candidates best first (pv_better), for the prefixes the check keeps. */
static int pv_cand_rank_cmp(const void *pa, const void *pb)
{
    const pv_cand *a = pa, *b = pb;
    return pv_better(a, b) ? -1 : pv_better(b, a) ? 1 : 0;
}

/* Write the n best candidates (rank: best first) into q, linear by linear;
 * ps->n_changed, n_reverted_rows, obj_after describe the result. */
static void pv_apply_best(stage_pv *pv, const pv_heap *heap, const pv_cand *rank, int64_t n,
                          pv_cand *pos, stage_pv_pstats *ps)
{
    memcpy(pos, rank, sizeof(pv_cand) * (size_t)n);
    qsort(pos, (size_t)n, sizeof pos[0], pv_cand_pos_cmp);
    ps->n_changed = ps->n_reverted_rows = 0;
    ps->obj_after = ps->obj_before;
    for (int64_t j = 0; j < n;) {
        int64_t e = j;
        while (e < n && pos[e].lin == pos[j].lin) e++;
        pv_apply_linear(pv, pos[j].lin, pos + j, e - j, heap, ps);
        j = e;
    }
}

/* Copy the codes of every linear out of q (restore 0) or back into it. */
static void pv_codes_copy(stage_pv *pv, uint16_t *codes, int restore)
{
    for (int l = 0; l < pv->L; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &pv->q->blocks[l].lin[k];
            const size_t nb = sizeof(uint16_t) * (size_t)(L->d_out * L->n_groups * L->M);
            if (restore)
                memcpy(L->codes, codes, nb);
            else
                memcpy(codes, L->codes, nb);
            codes += nb / sizeof(uint16_t);
        }
}

/* Beam search of every linear towards its target; proposals into heap.
 * cfg.dist: item = linear index l * 7 + k; each rank searches the linears it
 * owns, the new codes are shared from their owners and every rank proposes
 * from all linears in order (the same heap everywhere). cnew: n_codes. */
static lv_status pv_search(stage_pv *pv, pv_heap *heap, uint16_t *cnew, stage_pv_pstats *ps)
{
    lv_status st = LV_OK;
    lv_rng sr;
    lv_rng_seed(&sr, pv->cfg.seed ^ 0x9e3779b97f4a7c15ULL * (uint64_t)pv->p_count);
    const uint64_t seed0 = lv_rng_u64(&sr);
    const stage_dist *d = pv->cfg.dist && pv->cfg.dist->owns ? pv->cfg.dist : NULL;
    for (int pass = 0; pass < 2; pass++) {
        uint16_t *nc = cnew;
        for (int l = 0; l < pv->L; l++)
            for (int k = 0; k < LV_LIN_COUNT; k++) {
                const int64_t lin = (int64_t)l * LV_LIN_COUNT + k;
                const lv_aq_layer *L = &pv->q->blocks[l].lin[k];
                const int64_t nb = L->d_out * L->n_groups * L->M;
                const float *H = NULL;
                int mode = 0;
                if (pass == 0 && d && !d->owns(d->user, (int)lin)) {
                    nc += nb;
                    continue;
                }
                pv_metric(pv, l, k, L->d_in, &H, &mode);
                pv_target(pv, L, pv->dW + pv->dW_off[lin]);
                if (pass == 0) {
                    memcpy(nc, L->codes, sizeof(uint16_t) * (size_t)nb);
                    lv_aq_layer Lc = *L; /* the same codebooks and scales, codes on the copy */
                    Lc.codes = nc;
                    LV_TRY(stage_aqlm_beam_search(pv->Wt, H, &Lc, pv->cfg.p_beam,
                                                  seed0 + (uint64_t)lin, NULL));
                } else {
                    if (d) LV_TRY(d->share(d->user, (int)lin, nc, sizeof(uint16_t) * (size_t)nb));
                    ps->obj_before +=
                        pv_objective(pv, pv->Wold, H, mode, L->d_out, L->d_in, pv->rowobj);
                    pv_propose(pv, L, lin, nc, H, heap, &ps->n_proposed);
                }
                nc += nb;
            }
    }
done:
    return st;
}

lv_status stage_pv_pstep(stage_pv *pv, const int32_t *tokens, int64_t n_seq,
                         stage_pv_pstats *ps_out)
{
    lv_status st = LV_OK;
    stage_pv_pstats ps = {.loss_after = NAN};
    pv_heap heap = {0};
    pv_cand *pos = NULL;
    uint16_t *cnew = NULL;
    int restore = 0; /* pv->csnap holds the codes from before the step */
    const double t0 = lv_now();
    if (!pv) LV_FAIL(LV_ERR_INVALID_ARG, "stage_pv_pstep: state is NULL");
    LV_TRY(pv_alloc_pstep(pv));
    LV_TRY(pv_pass(pv, tokens, n_seq, 0, 1, &ps.loss));
    ps.n_groups = pv->n_groups;
    ps.budget = pv->budget;
    if (!isfinite(ps.loss) || ps.budget == 0) goto done;
    int mmax = 0;
    for (int l = 0; l < pv->L; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            mmax = pv->q->blocks[l].lin[k].M > mmax ? pv->q->blocks[l].lin[k].M : mmax;
    heap.cap = pv->budget;
    heap.M = mmax;
    LV_ALLOC(heap.c, heap.cap);
    LV_ALLOC(heap.codes, (size_t)heap.cap * (size_t)mmax);
    LV_ALLOC(pos, heap.cap);
    pv->p_count++;
    LV_ALLOC(cnew, pv->n_codes);
    LV_TRY(pv_search(pv, &heap, cnew, &ps));
    qsort(heap.c, (size_t)heap.n, sizeof heap.c[0], pv_cand_rank_cmp);
    pv_codes_copy(pv, pv->csnap, 0);
    restore = 1;
    int64_t n = heap.n;
    pv_apply_best(pv, &heap, heap.c, n, pos, &ps);
    /* the check: keep the best half while the batch loss rose */
    for (int tries = 0; pv->cfg.p_check > 0 && n > 0; tries++) {
        LV_TRY(pv_pass(pv, tokens, n_seq, 0, 0, &ps.loss_after));
        if (ps.loss_after <= ps.loss) break;
        pv_codes_copy(pv, pv->csnap, 1);
        n = tries < pv->cfg.p_check ? n / 2 : 0;
        ps.n_halvings++;
        pv_apply_best(pv, &heap, heap.c, n, pos, &ps);
        if (n == 0) ps.loss_after = ps.loss;
    }
    restore = 0;
done:
    if (restore) pv_codes_copy(pv, pv->csnap, 1); /* an error half-way: as before the step */
    free(heap.c);
    free(heap.codes);
    free(pos);
    free(cnew);
    ps.wall_s = lv_now() - t0;
    if (ps_out) *ps_out = ps;
    return st;
}

/* ------------------------------------------------------------------ driver */

/* Copy everything PV-tuning changes (trainable parameters p (n_param), codes of
 * every linear (n_codes)) out of q, or back into it (restore). */
static void pv_snapshot(stage_pv *pv, float *p, uint16_t *codes, int restore)
{
    for (int s = 0; s < pv->n_seg; s++) {
        float *a = pv->seg[s], *b = p + pv->off[s];
        memcpy(restore ? a : b, restore ? b : a, sizeof(float) * (size_t)pv->len[s]);
    }
    for (int l = 0; l < pv->L; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &pv->q->blocks[l].lin[k];
            const size_t nb = sizeof(uint16_t) * (size_t)(L->d_out * L->n_groups * L->M);
            memcpy(restore ? (void *)L->codes : (void *)codes, restore ? (void *)codes : (void *)L->codes, nb);
            codes += nb / sizeof(uint16_t);
        }
    if (restore) pv_broadcast(pv);
}

/* State of one stage_pv_tune call. */
typedef struct {
    stage_pv *pv;
    stage_pv_config c;
    const int32_t *val;   /* (n_val, T) held-out tokens, borrowed */
    int64_t n_val;
    double best;          /* held-out loss of the snapshot */
    float *bp;            /* (n_param) snapshot of the best parameters */
    uint16_t *bc;         /* (n_codes) and codes */
    int worse;            /* evaluations since the last improvement */
    stage_pv_stats sx;
} pv_run;

/* Held-out loss now; the best so far is snapshotted. */
static lv_status pv_eval_keep(pv_run *r)
{
    lv_status st = LV_OK;
    double cur = 0.0, t = lv_now();
    LV_TRY(stage_pv_grad(r->pv, r->val, r->n_val, &cur, NULL));
    r->sx.eval_s += lv_now() - t;
    r->sx.evals++;
    const int better = cur < r->best;
    if (better) {
        r->best = cur;
        r->sx.best_step = r->sx.v_steps;
        pv_snapshot(r->pv, r->bp, r->bc, 0);
        r->worse = 0;
    } else {
        r->worse++;
    }
    if (r->c.verbose)
        lv_log("pv-tune: %lld V / %lld P steps, held-out loss %.6g%s", (long long)r->sx.v_steps,
               (long long)r->sx.p_steps, cur, better ? " (best)" : "");
done:
    return st;
}

/* One V step on tb (B, T), the P step when due, the evaluation when due.
 * *stop = 1 on divergence or when patience ran out. */
static lv_status pv_train_step(pv_run *r, const int32_t *tb, int B, double *loss, int *stop)
{
    lv_status st = LV_OK;
    double t = lv_now();
    LV_TRY(stage_pv_vstep(r->pv, tb, B, loss));
    r->sx.v_s += lv_now() - t;
    if (!isfinite(*loss)) {
        r->sx.diverged = 1;
        *stop = 1;
        goto done;
    }
    r->sx.v_steps++;
    if (r->c.p_every > 0 && r->sx.v_steps % r->c.p_every == 0) {
        stage_pv_pstats ps;
        t = lv_now();
        LV_TRY(stage_pv_pstep(r->pv, tb, B, &ps));
        r->sx.p_s += lv_now() - t;
        r->sx.p_steps++;
        r->sx.codes_changed += ps.n_changed;
        if (r->c.verbose)
            lv_log("pv-tune: P step %lld: %lld of %lld proposed groups changed (budget %lld), "
                   "objective %.4g -> %.4g, %.2f s", (long long)r->sx.p_steps,
                   (long long)ps.n_changed, (long long)ps.n_proposed, (long long)ps.budget,
                   ps.obj_before, ps.obj_after, ps.wall_s);
    }
    if (r->c.eval_every > 0 && r->sx.v_steps % r->c.eval_every == 0) {
        LV_TRY(pv_eval_keep(r));
        if (r->worse >= r->c.patience) *stop = 1;
    }
done:
    return st;
}

/* Held-out sequences of n_seq: the last ceil(frac * n_seq), at least one,
 * never all (n_seq 1: none, the one sequence serves both). */
static int64_t pv_holdout(int64_t n_seq, double frac)
{
    if (n_seq < 2) return 0;
    int64_t h = (int64_t)ceil(frac * (double)n_seq);
    return h < 1 ? 1 : h > n_seq - 1 ? n_seq - 1 : h;
}

void stage_pv_state_dims(const lv_qmodel *q, int64_t n_seq, const stage_pv_config *cfg,
                         int64_t *n_param, int64_t *n_codes, int64_t *n_train)
{
    const stage_pv_config c = stage_pv_defaults(cfg);
    const int64_t dim = q->cfg.dim;
    int64_t np = dim + pv_emb_floats(q, &c), nc = 0;
    for (int l = 0; l < q->cfg.n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            const int64_t cb = (int64_t)L->M * ((int64_t)1 << L->nbits) * L->g;
            np += L->d_out + (lv_share_owner(q->shared_codebooks, l, k) ? cb : 0);
            nc += L->d_out * L->n_groups * L->M;
        }
        np += 2 * dim;
    }
    *n_param = np;
    *n_codes = nc;
    *n_train = n_seq - pv_holdout(n_seq, c.holdout_frac);
}

/* Fill st from the run (q holds the current parameters and codes). */
static void pv_state_of(const pv_run *r, const int64_t *perm, const lv_rng *rng, int64_t ep,
                        int64_t next, int64_t steps, double loss_sum, int stop,
                        stage_pv_state *st)
{
    *st = (stage_pv_state){.n_param = r->pv->n_param, .n_codes = r->pv->n_codes,
                           .n_train = r->sx.n_train, .m = r->pv->m, .v = r->pv->v,
                           .best_param = r->bp, .best_codes = r->bc, .perm = perm,
                           .adam_t = r->pv->adam_t, .p_count = r->pv->p_count, .epoch = ep,
                           .next = next, .epoch_steps = steps, .epoch_loss = loss_sum,
                           .best = r->best, .worse = r->worse, .stop = stop, .stats = r->sx};
    memcpy(st->rng, rng->s, sizeof st->rng);
}

static lv_status pv_restore(pv_run *r, const stage_pv_state *s, int64_t *perm, lv_rng *rng)
{
    lv_status st = LV_OK;
    stage_pv *pv = r->pv;
    if (s->n_param != pv->n_param || s->n_codes != pv->n_codes || s->n_train != r->sx.n_train ||
        !s->m || !s->v || !s->best_param || !s->best_codes || !s->perm || s->epoch < 1 ||
        s->next < 0 || s->next > s->n_train || s->adam_t < 0 || s->p_count < 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: the state to resume from does not fit (%lld "
                "parameters, %lld codes, %lld training sequences; this run has %lld, %lld, %lld)",
                (long long)s->n_param, (long long)s->n_codes, (long long)s->n_train,
                (long long)pv->n_param, (long long)pv->n_codes, (long long)r->sx.n_train);
    for (int64_t i = 0; i < s->n_train; i++)
        if (s->perm[i] < 0 || s->perm[i] >= s->n_train)
            LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: the state's sequence order is corrupt");
    memcpy(pv->m, s->m, sizeof(float) * (size_t)pv->n_param);
    memcpy(pv->v, s->v, sizeof(float) * (size_t)pv->n_param);
    memcpy(r->bp, s->best_param, sizeof(float) * (size_t)pv->n_param);
    memcpy(r->bc, s->best_codes, sizeof(uint16_t) * (size_t)pv->n_codes);
    memcpy(perm, s->perm, sizeof(int64_t) * (size_t)s->n_train);
    memcpy(rng->s, s->rng, sizeof s->rng);
    pv->adam_t = s->adam_t;
    pv->p_count = s->p_count;
    r->best = s->best;
    r->worse = (int)s->worse;
    const int64_t n_train = r->sx.n_train, n_holdout = r->sx.n_holdout;
    r->sx = s->stats;
    r->sx.n_train = n_train;
    r->sx.n_holdout = n_holdout;
done:
    return st;
}

lv_status stage_pv_tune(const lv_model *fp, lv_qmodel *q, const int32_t *tokens, int64_t n_seq,
                        int T, const stage_pv_config *cfg, stage_pv_stats *stats)
{
    lv_status st = LV_OK;
    pv_run r = {.c = stage_pv_defaults(cfg)};
    int32_t *tb = NULL;
    int64_t *perm = NULL;
    int have_best = 0;
    const double t0 = lv_now();
    LV_TRY(pv_check_cfg(&r.c));
    if (!fp || !q || !tokens || n_seq < 1 || T < 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "pv-tune: NULL model or tokens, or %lld sequences of %d tokens",
                (long long)n_seq, T);
    r.sx.n_holdout = pv_holdout(n_seq, r.c.holdout_frac);
    const int64_t n_train = r.sx.n_train = n_seq - r.sx.n_holdout;
    r.val = tokens + (r.sx.n_holdout ? n_train * T : 0);
    r.n_val = r.sx.n_holdout ? r.sx.n_holdout : n_seq;
    const int bmax = (int)(n_train < r.c.batch_seqs ? n_train : r.c.batch_seqs);
    LV_TRY(stage_pv_init(&r.pv, fp, q, r.c.micro_batch < bmax ? r.c.micro_batch : bmax, T, &r.c));
    r.sx.n_train = n_train;
    {
        int64_t np, nc, nt;
        stage_pv_state_dims(q, n_seq, &r.c, &np, &nc, &nt);
        LV_ASSERT(np == r.pv->n_param && nc == r.pv->n_codes && nt == n_train);
    }
    LV_ALLOC(r.bp, r.pv->n_param);
    LV_ALLOC(r.bc, r.pv->n_codes);
    LV_ALLOC(tb, (size_t)bmax * (size_t)T);
    LV_ALLOC(perm, n_train);
    for (int64_t i = 0; i < n_train; i++) perm[i] = i;
    lv_rng rng;
    lv_rng_seed(&rng, r.c.seed ^ 0x9f7e7a11b10cULL);

    const stage_pv_state *rs = r.c.resume;
    int stop = 0;
    int64_t ep0 = 1, next0 = 0, steps = 0;
    double loss_sum = 0.0;
    if (rs) {
        LV_TRY(pv_restore(&r, rs, perm, &rng));
        have_best = 1;
        ep0 = rs->epoch, next0 = rs->next, steps = rs->epoch_steps, loss_sum = rs->epoch_loss;
        stop = rs->stop != 0;
        if (stop) { /* the end-of-epoch bookkeeping the run did after that step */
            r.sx.epochs = (int)ep0;
            r.sx.train_loss = steps ? loss_sum / (double)steps : NAN;
        }
        if (r.c.verbose)
            lv_log("pv-tune: resumed at epoch %lld, %lld V / %lld P steps, best held-out loss "
                   "%.6g", (long long)ep0, (long long)r.sx.v_steps, (long long)r.sx.p_steps,
                   r.best);
    } else {
        double t = lv_now();
        LV_TRY(stage_pv_grad(r.pv, r.val, r.n_val, &r.sx.loss_before, NULL));
        r.sx.eval_s += lv_now() - t;
        if (!isfinite(r.sx.loss_before))
            LV_FAIL(LV_ERR_NUMERIC, "pv-tune: the input model's held-out loss is %g",
                    r.sx.loss_before);
        r.best = r.sx.loss_before;
        pv_snapshot(r.pv, r.bp, r.bc, 0);
        have_best = 1;
    }
    if (r.c.verbose && !rs)
        lv_log("pv-tune: %lld parameters, %lld code groups (P budget %lld), %lld train / %lld "
               "held-out seqs of %d, held-out loss %.6g", (long long)r.pv->n_param,
               (long long)r.pv->n_groups, (long long)r.pv->budget, (long long)n_train,
               (long long)r.sx.n_holdout, T, r.sx.loss_before);

    for (int64_t ep = ep0; ep <= r.c.max_epochs && !stop; ep++) {
        int64_t s0 = 0;
        if (rs && ep == ep0) {
            s0 = next0; /* the order of this epoch came with the state */
        } else {
            loss_sum = 0.0, steps = 0;
            stage_ft_shuffle(perm, n_train, &rng);
        }
        for (; s0 < n_train && !stop;) {
            const int B = (int)(n_train - s0 < bmax ? n_train - s0 : bmax);
            for (int j = 0; j < B; j++)
                memcpy(tb + (int64_t)j * T, tokens + perm[s0 + j] * T, sizeof(int32_t) * (size_t)T);
            double loss = 0.0;
            LV_TRY(pv_train_step(&r, tb, B, &loss, &stop));
            if (isfinite(loss)) loss_sum += loss, steps++;
            s0 += B;
            const int halt = r.c.stop && r.c.stop(r.c.ckpt_user);
            if (r.c.ckpt && ((r.c.ckpt_every > 0 && r.sx.v_steps % r.c.ckpt_every == 0) || halt)) {
                stage_pv_state cs;
                pv_state_of(&r, perm, &rng, ep, s0, steps, loss_sum, stop, &cs);
                LV_TRY(r.c.ckpt(r.c.ckpt_user, &cs));
            }
            if (halt) {
                have_best = 0; /* q stays at the checkpointed state */
                LV_FAIL(LV_ERR_STOPPED, "pv-tune: stopped by request after %lld V steps%s",
                        (long long)r.sx.v_steps, r.c.ckpt ? " (checkpointed)" : "");
            }
        }
        r.sx.epochs = (int)ep;
        r.sx.train_loss = steps ? loss_sum / (double)steps : NAN;
        if (r.c.eval_every == 0 && !r.sx.diverged) {
            LV_TRY(pv_eval_keep(&r));
            if (r.worse >= r.c.patience) stop = 1;
        }
    }
    r.sx.loss_after = r.best;
done:
    if (have_best) pv_snapshot(r.pv, r.bp, r.bc, 1);
    r.sx.wall_s = lv_now() - t0;
    if (stats) *stats = r.sx;
    stage_pv_free(r.pv);
    free(r.bp);
    free(r.bc);
    free(tb);
    free(perm);
    return st;
}
