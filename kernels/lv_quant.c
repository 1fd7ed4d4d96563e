/* lv_quant.c: allocation and accounting of quantized layers, blocks, models. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "lv_quant.h"

static const char *lin_names[LV_LIN_COUNT] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};

const char *lv_lin_name(lv_lin which)
{
    return (which >= 0 && which < LV_LIN_COUNT) ? lin_names[which] : "?";
}

void lv_lin_shape(const lv_model_config *cfg, lv_lin which, int64_t *d_out, int64_t *d_in)
{
    int64_t dim = cfg->dim, kv = lv_cfg_kv_dim(cfg), hid = cfg->hidden_dim;
    switch (which) {
    case LV_LIN_WQ: *d_out = dim; *d_in = dim; break;
    case LV_LIN_WK:
    case LV_LIN_WV: *d_out = kv; *d_in = dim; break;
    case LV_LIN_WO: *d_out = dim; *d_in = dim; break;
    case LV_LIN_W1:
    case LV_LIN_W3: *d_out = hid; *d_in = dim; break;
    case LV_LIN_W2: *d_out = dim; *d_in = hid; break;
    default: *d_out = 0; *d_in = 0; break;
    }
}

lv_status lv_aq_layer_init(lv_aq_layer *L, int64_t d_out, int64_t d_in, int M, int nbits, int g)
{
    lv_status st = LV_OK;
    memset(L, 0, sizeof *L);
    if (d_out <= 0 || d_in <= 0 || M < 1 || M > 64 || nbits < 1 || nbits > 16 || g < 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "quantized layer: bad shape/config (%lld x %lld, M %d, "
                "nbits %d, g %d)", (long long)d_out, (long long)d_in, M, nbits, g);
    L->d_out = d_out;
    L->d_in = d_in;
    L->n_groups = (d_in + g - 1) / g;
    L->M = M;
    L->nbits = nbits;
    L->g = g;
    LV_ALLOC(L->codes, (size_t)d_out * (size_t)L->n_groups * (size_t)M);
    LV_ALLOC(L->codebooks, (size_t)M * ((size_t)1 << nbits) * (size_t)g);
    LV_ALLOC(L->scales, (size_t)d_out);
    for (int64_t r = 0; r < d_out; r++) L->scales[r] = 1.0f;
done:
    if (st != LV_OK) lv_aq_layer_free(L);
    return st;
}

void lv_aq_layer_free(lv_aq_layer *L)
{
    if (!L) return;
    free(L->codes);
    free(L->codebooks);
    free(L->scales);
    free(L->outl_idx);
    free(L->outl_w);
    memset(L, 0, sizeof *L);
}

lv_status lv_aq_outliers_alloc(lv_aq_layer *L, int n)
{
    lv_status st = LV_OK;
    free(L->outl_idx);
    free(L->outl_w);
    L->outl_idx = NULL;
    L->outl_w = NULL;
    L->n_outl = 0;
    if (n < 0 || n > L->d_in)
        LV_FAIL(LV_ERR_INVALID_ARG, "quantized layer: %d outlier columns of %lld", n,
                (long long)L->d_in);
    if (n == 0) goto done;
    LV_ALLOC(L->outl_idx, (size_t)n);
    LV_ALLOC(L->outl_w, (size_t)L->d_out * (size_t)n);
    L->n_outl = n;
done:
    return st;
}

void lv_aq_outliers_add_w(const lv_aq_layer *L, float *W)
{
    for (int64_t r = 0; r < L->d_out && L->n_outl > 0; r++)
        for (int j = 0; j < L->n_outl; j++)
            W[r * L->d_in + L->outl_idx[j]] += L->outl_w[r * L->n_outl + j];
}

void lv_aq_outliers_add_y(const lv_aq_layer *L, const float *x, int64_t n, float *y)
{
    if (L->n_outl <= 0) return;
#pragma omp parallel for schedule(static)
    for (int64_t t = 0; t < n; t++) {
        const float *xt = x + t * L->d_in;
        float *yt = y + t * L->d_out;
        for (int64_t r = 0; r < L->d_out; r++) {
            const float *w = L->outl_w + r * L->n_outl;
            float acc = 0.0f;
            for (int j = 0; j < L->n_outl; j++) acc += xt[L->outl_idx[j]] * w[j];
            yt[r] += acc;
        }
    }
}

lv_status lv_aq_outliers_check(const lv_aq_layer *L, const char *what)
{
    lv_status st = LV_OK;
    if (L->n_outl < 0 || L->n_outl > L->d_in || (L->n_outl > 0 && (!L->outl_idx || !L->outl_w)))
        LV_FAIL(LV_ERR_FORMAT, "%s: %d outlier columns of %lld inputs", what, L->n_outl,
                (long long)L->d_in);
    for (int j = 0; j < L->n_outl; j++)
        if (L->outl_idx[j] < 0 || L->outl_idx[j] >= L->d_in ||
            (j > 0 && L->outl_idx[j] <= L->outl_idx[j - 1]))
            LV_FAIL(LV_ERR_FORMAT, "%s: outlier column index %d (entry %d) is out of range "
                    "[0, %lld) or not strictly ascending", what, L->outl_idx[j], j,
                    (long long)L->d_in);
    for (int64_t i = 0; i < L->d_out * L->n_outl; i++)
        if (!isfinite(L->outl_w[i]))
            LV_FAIL(LV_ERR_FORMAT, "%s: outlier correction %lld is not finite", what, (long long)i);
done:
    return st;
}

double lv_aq_outliers_bits(const lv_aq_layer *L)
{
    return L->n_outl > 0 ? (double)L->n_outl * (16.0 * (double)L->d_out + 32.0) : 0.0;
}

lv_status lv_qblock_init(lv_qblock *b, const lv_model_config *cfg, int M, int nbits, int g)
{
    lv_status st = LV_OK;
    memset(b, 0, sizeof *b);
    LV_ALLOC(b->attn_norm, (size_t)cfg->dim);
    LV_ALLOC(b->ffn_norm, (size_t)cfg->dim);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(cfg, (lv_lin)k, &o, &i);
        LV_TRY(lv_aq_layer_init(&b->lin[k], o, i, M, nbits, g));
    }
done:
    if (st != LV_OK) lv_qblock_free(b);
    return st;
}

void lv_qblock_free(lv_qblock *b)
{
    if (!b) return;
    free(b->attn_norm);
    free(b->ffn_norm);
    for (int k = 0; k < LV_LIN_COUNT; k++) lv_aq_layer_free(&b->lin[k]);
    lv_qblock_lora_free(b);
    memset(b, 0, sizeof *b);
}

void lv_qblock_lora_free(lv_qblock *b)
{
    if (!b) return;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        free(b->lora_A[k]);
        free(b->lora_B[k]);
        b->lora_A[k] = NULL;
        b->lora_B[k] = NULL;
    }
    b->lora_rank = 0;
}

lv_status lv_qblock_lora_init(lv_qblock *b, int r)
{
    lv_status st = LV_OK;
    lv_qblock_lora_free(b);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        if (r < 1 || L->d_out <= 0 || L->d_in <= 0 || r > L->d_out || r > L->d_in)
            LV_FAIL(LV_ERR_INVALID_ARG, "LoRA rank %d does not fit linear %s (%lld x %lld)", r,
                    lv_lin_name((lv_lin)k), (long long)L->d_out, (long long)L->d_in);
    }
    b->lora_rank = r;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        LV_ALLOC(b->lora_A[k], (size_t)r * (size_t)b->lin[k].d_in);
        LV_ALLOC(b->lora_B[k], (size_t)b->lin[k].d_out * (size_t)r);
    }
done:
    if (st != LV_OK) lv_qblock_lora_free(b);
    return st;
}

lv_status lv_qmodel_init(lv_qmodel **out, const lv_model *fp, int M, int nbits, int g)
{
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    const lv_model_config *c = &fp->cfg;
    size_t emb = (size_t)c->vocab_size * (size_t)c->dim;
    *out = NULL;
    LV_ALLOC(q, 1);
    q->cfg = *c;
    q->M = M;
    q->nbits = nbits;
    q->g = g;
    LV_ALLOC(q->tok_emb, emb);
    memcpy(q->tok_emb, fp->tok_emb, emb * sizeof(float));
    LV_ALLOC(q->final_norm, (size_t)c->dim);
    memcpy(q->final_norm, fp->final_norm, (size_t)c->dim * sizeof(float));
    if (!c->tied_cls) {
        LV_ALLOC(q->wcls, emb);
        memcpy(q->wcls, fp->wcls, emb * sizeof(float));
    }
    LV_ALLOC(q->blocks, (size_t)c->n_layers);
    for (int l = 0; l < c->n_layers; l++) {
        LV_TRY(lv_qblock_init(&q->blocks[l], c, M, nbits, g));
        memcpy(q->blocks[l].attn_norm, fp->layers[l].attn_norm, (size_t)c->dim * sizeof(float));
        memcpy(q->blocks[l].ffn_norm, fp->layers[l].ffn_norm, (size_t)c->dim * sizeof(float));
    }
    *out = q;
    q = NULL;
done:
    lv_qmodel_free(q);
    return st;
}

void lv_qmodel_free(lv_qmodel *q)
{
    if (!q) return;
    for (int l = 0; q->blocks && l < q->cfg.n_layers; l++) lv_qblock_free(&q->blocks[l]);
    free(q->blocks);
    free(q->tok_emb);
    free(q->final_norm);
    free(q->wcls);
    free(q);
}

const char *lv_share_name(int share)
{
    return share == LV_SHARE_MODEL ? "model" : share == LV_SHARE_TYPE ? "type" : "none";
}

double lv_qmodel_bits_per_weight(const lv_qmodel *q)
{
    double bits = 0, weights = 0;
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            bits += (double)L->d_out * (double)L->n_groups * L->M * L->nbits;
            if (lv_share_owner(q->shared_codebooks, l, k))
                bits += (double)L->M * (double)(1 << L->nbits) * L->g * 16.0;
            bits += (q->scale_bits == 8 ? 16.0 + (double)L->d_out * 8.0 : (double)L->d_out * 16.0) +
                    lv_aq_outliers_bits(L);
            weights += (double)L->d_out * (double)L->d_in;
        }
    return weights > 0 ? bits / weights : 0.0;
}

float lv_round_f16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    const uint32_t sign = u & 0x80000000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return x; /* Inf, NaN */
    float y;
    if (a < 0x38800000u) { /* below 2^-14: fp16 subnormals are multiples of 2^-24 */
        const float q = ldexpf(fabsf(x), 24); /* exact: a scaling by a power of two */
        y = ldexpf(nearbyintf(q), -24);       /* ties to even in the default rounding mode */
    } else {
        /* keep 10 of the 23 mantissa bits, ties to even */
        uint32_t r = a + 0x0fffu + ((a >> 13) & 1u);
        r &= ~0x1fffu;
        if (r > 0x477fe000u) r = 0x7f800000u; /* beyond 65504: Inf */
        memcpy(&y, &r, sizeof y);
    }
    uint32_t v;
    memcpy(&v, &y, sizeof v);
    v |= sign;
    memcpy(&y, &v, sizeof y);
    return y;
}

lv_status lv_aq_layer_round_f16(lv_aq_layer *L, const char *what)
{
    lv_status st = LV_OK;
    const int64_t ncb = (int64_t)L->M * ((int64_t)1 << L->nbits) * L->g;
    for (int64_t i = 0; i < ncb; i++)
        if (!isfinite(lv_round_f16(L->codebooks[i])))
            LV_FAIL(LV_ERR_NUMERIC, "%s: codebooks[%lld] = %g is not finite in fp16 (|x| <= 65504)",
                    what, (long long)i, (double)L->codebooks[i]);
    for (int64_t i = 0; i < L->d_out; i++)
        if (!isfinite(lv_round_f16(L->scales[i])))
            LV_FAIL(LV_ERR_NUMERIC, "%s: scales[%lld] = %g is not finite in fp16 (|x| <= 65504)",
                    what, (long long)i, (double)L->scales[i]);
    for (int64_t i = 0; i < L->d_out * L->n_outl; i++)
        if (!isfinite(lv_round_f16(L->outl_w[i])))
            LV_FAIL(LV_ERR_NUMERIC, "%s: outlier correction %lld = %g is not finite in fp16", what,
                    (long long)i, (double)L->outl_w[i]);
    for (int64_t i = 0; i < ncb; i++) L->codebooks[i] = lv_round_f16(L->codebooks[i]);
    for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = lv_round_f16(L->scales[i]);
    for (int64_t i = 0; i < L->d_out * L->n_outl; i++) L->outl_w[i] = lv_round_f16(L->outl_w[i]);
done:
    return st;
}

/* r = 2^(-1/32) from five correctly rounded square roots of 0.5 (IEEE double). */
static double scale8_ratio(void)
{
    double r = 0.5;
    for (int i = 0; i < 5; i++) r = sqrt(r);
    return r;
}

float lv_scale8_value(float base, int q)
{
    double f = 1.0;
    const double r = scale8_ratio();
    for (int i = 0; i < q; i++) f *= r; /* the products of scale8_grid, in its order */
    return lv_round_f16((float)((double)base * f));
}

/* The 256 grid values of base, decreasing (non-increasing after fp16 rounding). */
static void scale8_grid(float base, float *v)
{
    const double r = scale8_ratio();
    double f = 1.0;
    for (int q = 0; q < 256; q++, f *= r) v[q] = lv_round_f16((float)((double)base * f));
}

static int scale8_nearest(const float *v, float s)
{
    int best = 0;
    for (int q = 1; q < 256; q++)
        if (fabs((double)v[q] - s) < fabs((double)v[best] - s)) best = q;
    return best;
}

static float scale8_base(const lv_aq_layer *L)
{
    float m = 0.0f;
    for (int64_t i = 0; i < L->d_out; i++) m = L->scales[i] > m ? L->scales[i] : m;
    return lv_round_f16(m);
}

lv_status lv_aq_layer_round_scales8(lv_aq_layer *L, const char *what)
{
    lv_status st = LV_OK;
    float v[256];
    if (!L->scales) LV_FAIL(LV_ERR_INVALID_ARG, "%s: no scales to put on the 8-bit grid", what);
    for (int64_t i = 0; i < L->d_out; i++)
        if (!(L->scales[i] > 0.0f) || !isfinite(L->scales[i]))
            LV_FAIL(LV_ERR_NUMERIC, "%s: scales[%lld] = %g: quant.scale_bits = 8 needs finite scales "
                    "> 0 (use 16)", what, (long long)i, (double)L->scales[i]);
    const float base = scale8_base(L);
    if (!isfinite(base) || !(base > 0.0f))
        LV_FAIL(LV_ERR_NUMERIC, "%s: largest scale %g is not a finite fp16 value > 0", what,
                (double)base);
    scale8_grid(base, v);
    for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = v[scale8_nearest(v, L->scales[i])];
done:
    return st;
}

int lv_aq_scales8_ok(const lv_aq_layer *L)
{
    float v[256];
    if (!L->scales || L->d_out < 1) return 0;
    const float base = scale8_base(L);
    if (!isfinite(base) || !(base > 0.0f)) return 0;
    scale8_grid(base, v);
    for (int64_t i = 0; i < L->d_out; i++)
        if (!(L->scales[i] > 0.0f) || v[scale8_nearest(v, L->scales[i])] != L->scales[i]) return 0;
    return 1;
}
