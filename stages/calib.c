/* calib.c: calibration: cut calibration sequences from a token stream, embed
 * them, and run them block by block, accumulating each linear layer's input
 * Hessian H = X^T X on the way (q/k/v share one, gate/up share one).
 *
 * Streaming: only the current block's inputs (n_seq, T, dim) are held; the
 * block runs over micro-batches of sequences, so the workspace is
 * (micro_batch, T) regardless of n_seq. */
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "stage.h"

lv_status stage_calib_sequences(const int32_t *tokens, int64_t n_tokens, int64_t n_seq, int T,
                                uint64_t seed, int32_t **out)
{
    lv_status st = LV_OK;
    int32_t *seqs = NULL;
    *out = NULL;
    if (n_seq <= 0 || T <= 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "calibration: %lld sequences of %d tokens", (long long)n_seq, T);
    if (n_tokens < T)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "calibration data has %lld tokens, fewer than one sequence of %d",
                (long long)n_tokens, T);
    LV_ALLOC(seqs, (size_t)n_seq * (size_t)T);
    /* Random crops as the AQLM reference takes them, from the seeded RNG:
     * same seed, same sequences. */
    lv_rng r;
    lv_rng_seed(&r, seed ^ 0xca1b7a7e5eedULL);
    uint64_t span = (uint64_t)(n_tokens - T) + 1;
    for (int64_t s = 0; s < n_seq; s++) {
        uint64_t off = lv_rng_u64(&r) % span;
        memcpy(seqs + s * T, tokens + off, sizeof(int32_t) * (size_t)T);
    }
    *out = seqs;
    seqs = NULL;
done:
    free(seqs);
    return st;
}

lv_status stage_block_hessians_init(stage_block_hessians *h, const lv_model_config *cfg)
{
    lv_status st = LV_OK;
    memset(h, 0, sizeof *h);
    h->dim = cfg->dim;
    h->hidden = cfg->hidden_dim;
    size_t d2 = (size_t)cfg->dim * (size_t)cfg->dim, h2 = (size_t)cfg->hidden_dim * cfg->hidden_dim;
    LV_ALLOC(h->attn, d2);
    LV_ALLOC(h->wo, d2);
    LV_ALLOC(h->ffn, d2);
    LV_ALLOC(h->down, h2);
done:
    if (st != LV_OK) stage_block_hessians_free(h);
    return st;
}

void stage_block_hessians_free(stage_block_hessians *h)
{
    if (!h) return;
    free(h->attn);
    free(h->wo);
    free(h->ffn);
    free(h->down);
    memset(h, 0, sizeof *h);
}

void stage_block_hessians_zero(stage_block_hessians *h)
{
    size_t d2 = (size_t)h->dim * h->dim, h2 = (size_t)h->hidden * h->hidden;
    memset(h->attn, 0, d2 * sizeof(double));
    memset(h->wo, 0, d2 * sizeof(double));
    memset(h->ffn, 0, d2 * sizeof(double));
    memset(h->down, 0, h2 * sizeof(double));
    h->n_rows = 0;
}

const double *stage_block_hessian_for(const stage_block_hessians *h, lv_lin which)
{
    switch (which) {
    case LV_LIN_WQ:
    case LV_LIN_WK:
    case LV_LIN_WV: return h->attn;
    case LV_LIN_WO: return h->wo;
    case LV_LIN_W1:
    case LV_LIN_W3: return h->ffn;
    case LV_LIN_W2: return h->down;
    default: return NULL;
    }
}

/* kern_block_forward_tap callback: route each linear input to its Hessian. */
static lv_status accum_tap(void *user, kern_tap which, const float *x, int64_t n, int d)
{
    stage_block_hessians *h = user;
    double *H = NULL;
    switch (which) {
    case KERN_TAP_ATTN_IN: H = h->attn; break;
    case KERN_TAP_WO_IN: H = h->wo; break;
    case KERN_TAP_FFN_IN: H = h->ffn; break;
    case KERN_TAP_W2_IN: H = h->down; break;
    }
    if (!H) return LV_ERR_INVALID_ARG;
    kern_hessian_accum_ref(H, x, n, d);
    if (which == KERN_TAP_ATTN_IN) h->n_rows += n;
    return LV_OK;
}

lv_status stage_calib_block(const lv_model *m, int layer, float *x, int64_t n_seq, int T,
                            kern_fwd_ws *ws, int micro_batch, stage_block_hessians *h)
{
    lv_status st = LV_OK;
    const int64_t row = (int64_t)T * m->cfg.dim;
    if (micro_batch <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "calibration: micro batch %d", micro_batch);
    for (int64_t s = 0; s < n_seq; s += micro_batch) {
        int B = (int)(n_seq - s < micro_batch ? n_seq - s : micro_batch);
        LV_TRY(kern_block_forward_tap(m, layer, x + s * row, B, T, ws, h ? accum_tap : NULL, h));
    }
done:
    return st;
}

lv_status stage_hessian_to_f32(const double *H, int64_t d, int64_t n_rows, float *out)
{
    lv_status st = LV_OK;
    if (n_rows <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "Hessian of no rows");
    const double inv = 1.0 / (double)n_rows;
    for (int64_t i = 0; i < d * d; i++) out[i] = (float)(H[i] * inv);
done:
    return st;
}
