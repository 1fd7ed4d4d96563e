/* bench_common.h: pieces shared by the quality benches (quant_shared.c,
 * quality_table.c): FP-propagation Hessians of every linear of a model,
 * perplexity on a token stream, and the round-to-nearest baseline.
 * Header-only (static inline), included by one bench executable each. */
#ifndef BENCH_COMMON_H
#define BENCH_COMMON_H

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "kern.h"
#include "stage.h"

#define BENCH_MAX_LIN 1024

/* Every block linear of fp, in (block, lv_lin) order, with its float Hessian. */
typedef struct {
    const lv_model *fp;
    int n_lin;
    const float *W[BENCH_MAX_LIN], *H[BENCH_MAX_LIN];
    int64_t d_out[BENCH_MAX_LIN], d_in[BENCH_MAX_LIN];
    float *Hbuf; /* (n_layers, 4 Hessians) float copies, owned */
} bench_lins;

static inline const char *bench_env_or(const char *name, const char *dflt)
{
    const char *v = getenv(name);
    return v && v[0] ? v : dflt;
}

static inline void bench_lins_free(bench_lins *b)
{
    free(b->Hbuf);
    b->Hbuf = NULL;
    b->n_lin = 0;
}

/* Hessians (H = X^T X / rows) of every block linear of fp on the calibration
 * sequences seqs (n_seq, T), FP propagation through the blocks. */
static inline lv_status bench_fp_hessians(bench_lins *b, const lv_model *fp, const int32_t *seqs,
                                          int64_t n_seq, int T)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &fp->cfg;
    float *x = NULL;
    kern_fwd_ws *ws = NULL;
    stage_block_hessians h = {0};
    const int64_t d = c->dim, hd = c->hidden_dim, per_block = 3 * d * d + hd * hd;
    const int micro = n_seq < 8 ? (int)n_seq : 8;
    memset(b, 0, sizeof *b);
    b->fp = fp;
    if ((int64_t)c->n_layers * LV_LIN_COUNT > BENCH_MAX_LIN)
        LV_FAIL(LV_ERR_UNSUPPORTED, "bench: more than %d linears", BENCH_MAX_LIN);
    LV_ALLOC(x, (size_t)n_seq * (size_t)T * (size_t)d);
    LV_ALLOC(b->Hbuf, (size_t)c->n_layers * (size_t)per_block);
    LV_TRY(kern_fwd_ws_init(&ws, c, micro, T, 0));
    LV_TRY(stage_block_hessians_init(&h, c));
    kern_embed_ref(x, fp->tok_emb, seqs, n_seq * T, c->dim);
    for (int l = 0; l < c->n_layers; l++) {
        stage_block_hessians_zero(&h);
        LV_TRY(stage_calib_block(fp, l, x, n_seq, T, ws, micro, &h));
        float *hb = b->Hbuf + (size_t)l * (size_t)per_block;
        const double *src[4] = {h.attn, h.wo, h.ffn, h.down};
        float *dst[4] = {hb, hb + d * d, hb + 2 * d * d, hb + 3 * d * d};
        for (int t = 0; t < 4; t++)
            LV_TRY(stage_hessian_to_f32(src[t], t == 3 ? hd : d, h.n_rows, dst[t]));
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            int i = b->n_lin++;
            lv_lin_shape(c, (lv_lin)k, &b->d_out[i], &b->d_in[i]);
            b->W[i] = lv_layer_weight(&fp->layers[l], (lv_lin)k);
            b->H[i] = k <= LV_LIN_WV ? dst[0] : k == LV_LIN_WO ? dst[1]
                    : k == LV_LIN_W2 ? dst[3] : dst[2];
        }
    }
done:
    stage_block_hessians_free(&h);
    kern_fwd_ws_free(ws);
    free(x);
    if (st != LV_OK) bench_lins_free(b);
    return st;
}

/* ppl of m on the first max_tokens of toks (<= 0: all), windows of ctx. */
static inline lv_status bench_eval_ppl(const lv_model *m, const int32_t *toks, int64_t n,
                                       int ctx, int64_t max_tokens, double *ppl)
{
    lv_status st = LV_OK;
    stage_eval_result r;
    stage_eval_opts eo = {.ctx = ctx, .max_tokens = max_tokens};
    LV_TRY(stage_eval_ppl(m, toks, n, &eo, &r));
    *ppl = r.ppl;
done:
    return st;
}

/* Round-to-nearest baseline of DESIGN.md: asymmetric min-max per group of
 * `group` inputs, `bits` bits, 16-bit min and step per group (bits + 32/group
 * bits per weight), on every block linear of fp. *view is fp with its linears
 * replaced (shallow; *buf holds the weights in (block, lv_lin) order and
 * *layers the layer table: the caller frees both, not the view). */
static inline lv_status bench_rtn_view(const lv_model *fp, int bits, int group, float **buf,
                                       lv_layer **layers, lv_model *view)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &fp->cfg;
    int64_t total = 0;
    *buf = NULL;
    *layers = NULL;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        total += (int64_t)c->n_layers * o * i;
    }
    LV_ALLOC(*buf, total);
    LV_ALLOC(*layers, (size_t)c->n_layers);
    memcpy(*layers, fp->layers, sizeof(lv_layer) * (size_t)c->n_layers);
    *view = *fp;
    view->layers = *layers;
    view->storage = NULL;
    const float levels = (float)((1 << bits) - 1);
    float *w = *buf;
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            int64_t d_out, d_in;
            lv_lin_shape(c, (lv_lin)k, &d_out, &d_in);
            const float *W = lv_layer_weight(&fp->layers[l], (lv_lin)k);
            for (int64_t r = 0; r < d_out; r++)
                for (int64_t j0 = 0; j0 < d_in; j0 += group) {
                    const int64_t j1 = j0 + group < d_in ? j0 + group : d_in;
                    const float *src = W + r * d_in;
                    float lo = src[j0], hi = src[j0];
                    for (int64_t j = j0; j < j1; j++) {
                        lo = src[j] < lo ? src[j] : lo;
                        hi = src[j] > hi ? src[j] : hi;
                    }
                    const float step = hi > lo ? (hi - lo) / levels : 1.0f;
                    for (int64_t j = j0; j < j1; j++)
                        w[r * d_in + j] = lo + step * nearbyintf((src[j] - lo) / step);
                }
            *lv_layer_slot(&(*layers)[l], (lv_lin)k) = w;
            w += d_out * d_in;
        }
done:
    if (st != LV_OK) {
        free(*buf);
        free(*layers);
        *buf = NULL;
        *layers = NULL;
    }
    return st;
}

#endif
