/* forward.c: the LLaMA forward pass on the CPU reference ops.
 *
 * Batched (kern_block_forward / kern_model_forward): every linear layer is one
 * GEMM over all B*T rows; attention runs per (sequence, head). The workspace is
 * sized once at init; the forward itself allocates nothing.
 * Decoding (kern_decode_step): one token through a KV cache, using the same ops
 * (and the same attention row function), so its logits match the batched ones.
 * A linear the layer holds quantized (lv_layer.aq) is multiplied straight from its
 * codes (kern_aq_gemm); the scratch for that grows on the first such call and is
 * reused after. */
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "kern_impl.h"
#include "kern_qmm.h"

_Static_assert(sizeof(((lv_layer *)0)->aq) / sizeof(((lv_layer *)0)->aq[0]) == LV_LIN_COUNT,
               "lv_layer.aq has one slot per linear");

struct kern_fwd_ws {
    lv_model_config cfg; /* shapes the buffers were sized for */
    int B, T;            /* capacity */
    int n_threads;       /* attention scratch is sized for this many OpenMP threads */
    float *arena;        /* every buffer below points into it */
    float *x;      // (B, T, dim) residual stream of kern_model_forward
    float *xb;     // (B, T, dim) normed input / linear output
    float *q;      // (B, T, dim)
    float *k;      // (B, T, kv_dim)
    float *v;      // (B, T, kv_dim)
    float *ao;     // (B, T, dim) attention output, before wo
    float *hb;     // (B, T, hidden) gate, then silu(gate) * up
    float *hb2;    // (B, T, hidden) up
    float *att;    // kern_attention_scratch floats: per-thread score tiles
    float *logits; // (B, T, vocab) or NULL
    kern_aq_ws *aq; /* scratch of the quantized linears */
};

struct kern_kv_cache {
    lv_model_config cfg;
    int max_pos;
    float *arena;
    float *key;    // (n_layers, max_pos, kv_dim), RoPE already applied
    float *value;  // (n_layers, max_pos, kv_dim)
    float *x;      // (dim)
    float *xb;     // (dim)
    float *q;      // (dim)
    float *ao;     // (dim)
    float *hb;     // (hidden)
    float *hb2;    // (hidden)
    float *att;    // (n_heads, max_pos)
    float *logits; // (vocab)
    kern_aq_ws *aq; /* scratch of the quantized linears */
};

static lv_status check_cfg(const lv_model_config *c)
{
    lv_status st = LV_OK;
    if (!c) LV_FAIL(LV_ERR_INVALID_ARG, "model config is NULL");
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_layers <= 0 || c->vocab_size <= 0 ||
        c->n_heads <= 0 || c->n_kv_heads <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "model config has a non-positive size (dim %d hidden %d layers %d vocab %d "
                "heads %d kv_heads %d)",
                c->dim, c->hidden_dim, c->n_layers, c->vocab_size, c->n_heads, c->n_kv_heads);
    if (c->dim % c->n_heads || (c->dim / c->n_heads) % 2 || c->n_heads % c->n_kv_heads)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "model config: dim %d must split into %d heads of even size, and n_heads into "
                "%d kv heads",
                c->dim, c->n_heads, c->n_kv_heads);
    if (c->dim / c->n_heads > 4096)
        LV_FAIL(LV_ERR_UNSUPPORTED, "head size %d is over 4096", c->dim / c->n_heads);
done:
    return st;
}

static int same_shape(const lv_model_config *a, const lv_model_config *b)
{
    return a->dim == b->dim && a->hidden_dim == b->hidden_dim && a->n_layers == b->n_layers &&
           a->n_heads == b->n_heads && a->n_kv_heads == b->n_kv_heads &&
           a->vocab_size == b->vocab_size;
}

/* Carve n floats out of the arena, 64-byte aligned (arena == NULL: just count). */
static float *carve(float *arena, size_t *used, size_t n)
{
    float *p = arena ? arena + *used : NULL;
    *used += (n + 15) & ~(size_t)15;
    return p;
}

static void ws_layout(kern_fwd_ws *w, int with_logits, size_t *total)
{
    const lv_model_config *c = &w->cfg;
    size_t n = (size_t)w->B * (size_t)w->T, used = 0;
    size_t kv = (size_t)lv_cfg_kv_dim(c);
    w->x = carve(w->arena, &used, n * c->dim);
    w->xb = carve(w->arena, &used, n * c->dim);
    w->q = carve(w->arena, &used, n * c->dim);
    w->k = carve(w->arena, &used, n * kv);
    w->v = carve(w->arena, &used, n * kv);
    w->ao = carve(w->arena, &used, n * c->dim);
    w->hb = carve(w->arena, &used, n * c->hidden_dim);
    w->hb2 = carve(w->arena, &used, n * c->hidden_dim);
    w->att = carve(w->arena, &used, kern_attention_scratch(w->T, c->n_heads, w->n_threads));
    w->logits = with_logits ? carve(w->arena, &used, n * c->vocab_size) : NULL;
    *total = used;
}

lv_status kern_fwd_ws_init(kern_fwd_ws **ws, const lv_model_config *cfg, int B, int T,
                           int with_logits)
{
    lv_status st = LV_OK;
    kern_fwd_ws *w = NULL;
    size_t total = 0;
    if (!ws) LV_FAIL(LV_ERR_INVALID_ARG, "kern_fwd_ws_init: ws is NULL");
    *ws = NULL;
    LV_TRY(check_cfg(cfg));
    if (B <= 0 || T <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "workspace batch %d x %d is empty", B, T);
    LV_ALLOC(w, 1);
    w->cfg = *cfg;
    w->B = B;
    w->T = T;
    w->n_threads = omp_get_max_threads();
    ws_layout(w, with_logits, &total);
    LV_ALLOC(w->arena, total);
    ws_layout(w, with_logits, &total);
    LV_TRY(kern_aq_ws_init(&w->aq));
    *ws = w;
    w = NULL;
done:
    kern_fwd_ws_free(w);
    return st;
}

void kern_fwd_ws_free(kern_fwd_ws *ws)
{
    if (!ws) return;
    kern_aq_ws_free(ws->aq);
    free(ws->arena);
    free(ws);
}

// x (n) += y (n)
static void add_inplace(float *x, const float *y, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* out (n, d_out) = x (n, d_in) @ W^T for linear `which` of L: its float weight through
 * sgemm, or straight from the codes when the layer holds it quantized. */
static lv_status linear(const lv_layer *L, lv_lin which, float *out, const float *x, int64_t n,
                        int d_in, int d_out, kern_aq_ws *aq_ws)
{
    lv_status st = LV_OK;
    const lv_aq_layer *q = L->aq[which];
    if (!q) {
        kern_matmul_ref(out, x, lv_layer_weight(L, which), n, d_in, d_out);
        goto done;
    }
    if (q->d_in != d_in || q->d_out != d_out)
        LV_FAIL(LV_ERR_INVALID_ARG, "forward: quantized %s is %lldx%lld, the model needs %dx%d",
                lv_lin_name(which), (long long)q->d_out, (long long)q->d_in, d_out, d_in);
    LV_TRY(kern_aq_gemm(out, x, q, n, aq_ws));
done:
    return st;
}

static lv_status check_batch(const lv_model *m, int B, int T, const kern_fwd_ws *ws)
{
    lv_status st = LV_OK;
    if (!m || !ws || !m->layers) LV_FAIL(LV_ERR_INVALID_ARG, "forward: model or workspace is NULL");
    if (!same_shape(&m->cfg, &ws->cfg))
        LV_FAIL(LV_ERR_INVALID_ARG, "forward: workspace was sized for another model shape");
    if (B <= 0 || T <= 0 || B > ws->B || T > ws->T)
        LV_FAIL(LV_ERR_INVALID_ARG, "forward: batch %d x %d does not fit the workspace (%d x %d)",
                B, T, ws->B, ws->T);
    if (omp_get_max_threads() > ws->n_threads)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "forward: %d OpenMP threads but the workspace was sized for %d; re-init it",
                omp_get_max_threads(), ws->n_threads);
done:
    return st;
}

lv_status kern_block_forward(const lv_model *m, int layer, float *x, int B, int T,
                             kern_fwd_ws *ws)
{
    return kern_block_forward_tap(m, layer, x, B, T, ws, NULL, NULL);
}

#define TAP(which, buf, d)                                                     \
    do {                                                                       \
        if (tap) LV_TRY(tap(user, (which), (buf), n, (d)));                    \
    } while (0)

lv_status kern_block_forward_tap(const lv_model *m, int layer, float *x, int B, int T,
                                 kern_fwd_ws *ws, kern_tap_fn tap, void *user)
{
    lv_status st = LV_OK;
    LV_TRY(check_batch(m, B, T, ws));
    if (!x || layer < 0 || layer >= m->cfg.n_layers)
        LV_FAIL(LV_ERR_INVALID_ARG, "block forward: layer %d of %d, x %p", layer,
                m->cfg.n_layers, (const void *)x);
    const lv_model_config *c = &m->cfg;
    const lv_layer *L = &m->layers[layer];
    const int64_t n = (int64_t)B * T;
    const int hd = lv_cfg_head_dim(c), kv = lv_cfg_kv_dim(c);

    // attention: x += wo . attn(rope(wq xb), rope(wk xb), wv xb), xb = rmsnorm(x)
    kern_rmsnorm_ref(ws->xb, x, L->attn_norm, n, c->dim, c->norm_eps);
    TAP(KERN_TAP_ATTN_IN, ws->xb, c->dim);
    LV_TRY(linear(L, LV_LIN_WQ, ws->q, ws->xb, n, c->dim, c->dim, ws->aq));
    LV_TRY(linear(L, LV_LIN_WK, ws->k, ws->xb, n, c->dim, kv, ws->aq));
    LV_TRY(linear(L, LV_LIN_WV, ws->v, ws->xb, n, c->dim, kv, ws->aq));
    kern_rope_ref(ws->q, B, T, c->n_heads, hd, 0, c->rope_theta, c->rope);
    kern_rope_ref(ws->k, B, T, c->n_kv_heads, hd, 0, c->rope_theta, c->rope);
    kern_attention_ref(ws->ao, ws->q, ws->k, ws->v, B, T, c->n_heads, c->n_kv_heads, hd,
                       ws->att);
    TAP(KERN_TAP_WO_IN, ws->ao, c->dim);
    LV_TRY(linear(L, LV_LIN_WO, ws->xb, ws->ao, n, c->dim, c->dim, ws->aq));
    add_inplace(x, ws->xb, n * c->dim);

    // FFN: x += w2 (silu(w1 xb) * w3 xb), xb = rmsnorm(x)
    kern_rmsnorm_ref(ws->xb, x, L->ffn_norm, n, c->dim, c->norm_eps);
    TAP(KERN_TAP_FFN_IN, ws->xb, c->dim);
    LV_TRY(linear(L, LV_LIN_W1, ws->hb, ws->xb, n, c->dim, c->hidden_dim, ws->aq));
    LV_TRY(linear(L, LV_LIN_W3, ws->hb2, ws->xb, n, c->dim, c->hidden_dim, ws->aq));
    kern_swiglu_ref(ws->hb, ws->hb, ws->hb2, n * c->hidden_dim);
    TAP(KERN_TAP_W2_IN, ws->hb, c->hidden_dim);
    LV_TRY(linear(L, LV_LIN_W2, ws->xb, ws->hb, n, c->hidden_dim, c->dim, ws->aq));
    add_inplace(x, ws->xb, n * c->dim);
done:
    return st;
}
#undef TAP

static lv_status check_tokens(const int32_t *tokens, int64_t n, int vocab)
{
    lv_status st = LV_OK;
    if (!tokens) LV_FAIL(LV_ERR_INVALID_ARG, "forward: tokens is NULL");
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= vocab)
            LV_FAIL(LV_ERR_INVALID_ARG, "token %d at index %lld is outside the vocabulary (%d)",
                    tokens[i], (long long)i, vocab);
done:
    return st;
}

lv_status kern_model_forward(const lv_model *m, const int32_t *tokens, int B, int T,
                             kern_fwd_ws *ws, const float **logits)
{
    lv_status st = LV_OK;
    LV_TRY(check_batch(m, B, T, ws));
    if (!logits || !ws->logits)
        LV_FAIL(LV_ERR_INVALID_ARG, "model forward: %s",
                logits ? "workspace was made without logits" : "logits is NULL");
    const lv_model_config *c = &m->cfg;
    const int64_t n = (int64_t)B * T;
    LV_TRY(check_tokens(tokens, n, c->vocab_size));

    kern_embed_ref(ws->x, m->tok_emb, tokens, n, c->dim);
    for (int l = 0; l < c->n_layers; l++) LV_TRY(kern_block_forward(m, l, ws->x, B, T, ws));
    kern_rmsnorm_ref(ws->xb, ws->x, m->final_norm, n, c->dim, c->norm_eps);
    kern_matmul_ref(ws->logits, ws->xb, m->wcls, n, c->dim, c->vocab_size);
    *logits = ws->logits;
done:
    return st;
}

/* ---------------------------------------------------------------- KV cache */

static void kv_layout(kern_kv_cache *kv, size_t *total)
{
    const lv_model_config *c = &kv->cfg;
    size_t used = 0, cache = (size_t)c->n_layers * kv->max_pos * lv_cfg_kv_dim(c);
    kv->key = carve(kv->arena, &used, cache);
    kv->value = carve(kv->arena, &used, cache);
    kv->x = carve(kv->arena, &used, c->dim);
    kv->xb = carve(kv->arena, &used, c->dim);
    kv->q = carve(kv->arena, &used, c->dim);
    kv->ao = carve(kv->arena, &used, c->dim);
    kv->hb = carve(kv->arena, &used, c->hidden_dim);
    kv->hb2 = carve(kv->arena, &used, c->hidden_dim);
    kv->att = carve(kv->arena, &used, (size_t)c->n_heads * kv->max_pos);
    kv->logits = carve(kv->arena, &used, c->vocab_size);
    *total = used;
}

lv_status kern_kv_cache_init(kern_kv_cache **kv, const lv_model_config *cfg, int max_pos)
{
    lv_status st = LV_OK;
    kern_kv_cache *k = NULL;
    size_t total = 0;
    if (!kv) LV_FAIL(LV_ERR_INVALID_ARG, "kern_kv_cache_init: kv is NULL");
    *kv = NULL;
    LV_TRY(check_cfg(cfg));
    if (max_pos <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "kv cache: max_pos %d", max_pos);
    LV_ALLOC(k, 1);
    k->cfg = *cfg;
    k->max_pos = max_pos;
    kv_layout(k, &total);
    LV_ALLOC(k->arena, total);
    kv_layout(k, &total);
    LV_TRY(kern_aq_ws_init(&k->aq));
    *kv = k;
    k = NULL;
done:
    kern_kv_cache_free(k);
    return st;
}

void kern_kv_cache_free(kern_kv_cache *kv)
{
    if (!kv) return;
    kern_aq_ws_free(kv->aq);
    free(kv->arena);
    free(kv);
}

/* One layer for the token at `pos`; its k, v go into the cache at row pos. */
static lv_status decode_layer(const lv_model *m, kern_kv_cache *kv, int l, int pos)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &m->cfg;
    const lv_layer *L = &m->layers[l];
    const int hd = lv_cfg_head_dim(c), kvd = lv_cfg_kv_dim(c);
    const int group = c->n_heads / c->n_kv_heads;
    const float scale = 1.0f / sqrtf((float)hd);
    float *key_l = kv->key + (int64_t)l * kv->max_pos * kvd;     // (max_pos, kv_dim)
    float *value_l = kv->value + (int64_t)l * kv->max_pos * kvd; // (max_pos, kv_dim)
    float *k_row = key_l + (int64_t)pos * kvd, *v_row = value_l + (int64_t)pos * kvd;

    kern_rmsnorm_ref(kv->xb, kv->x, L->attn_norm, 1, c->dim, c->norm_eps);
    LV_TRY(linear(L, LV_LIN_WQ, kv->q, kv->xb, 1, c->dim, c->dim, kv->aq));
    LV_TRY(linear(L, LV_LIN_WK, k_row, kv->xb, 1, c->dim, kvd, kv->aq));
    LV_TRY(linear(L, LV_LIN_WV, v_row, kv->xb, 1, c->dim, kvd, kv->aq));
    kern_rope_ref(kv->q, 1, 1, c->n_heads, hd, pos, c->rope_theta, c->rope);
    kern_rope_ref(k_row, 1, 1, c->n_kv_heads, hd, pos, c->rope_theta, c->rope);
#pragma omp parallel for schedule(static)
    for (int h = 0; h < c->n_heads; h++) {
        int64_t off_kv = (int64_t)(h / group) * hd;
        kern_attn_row_ref(kv->ao + h * hd, kv->q + h * hd, key_l + off_kv, value_l + off_kv,
                          pos + 1, kvd, hd, scale, kv->att + (int64_t)h * kv->max_pos);
    }
    LV_TRY(linear(L, LV_LIN_WO, kv->xb, kv->ao, 1, c->dim, c->dim, kv->aq));
    add_inplace(kv->x, kv->xb, c->dim);

    kern_rmsnorm_ref(kv->xb, kv->x, L->ffn_norm, 1, c->dim, c->norm_eps);
    LV_TRY(linear(L, LV_LIN_W1, kv->hb, kv->xb, 1, c->dim, c->hidden_dim, kv->aq));
    LV_TRY(linear(L, LV_LIN_W3, kv->hb2, kv->xb, 1, c->dim, c->hidden_dim, kv->aq));
    kern_swiglu_ref(kv->hb, kv->hb, kv->hb2, c->hidden_dim);
    LV_TRY(linear(L, LV_LIN_W2, kv->xb, kv->hb, 1, c->hidden_dim, c->dim, kv->aq));
    add_inplace(kv->x, kv->xb, c->dim);
done:
    return st;
}

lv_status kern_decode_step(const lv_model *m, kern_kv_cache *kv, int32_t token, int pos,
                           const float **logits)
{
    lv_status st = LV_OK;
    if (!m || !kv || !logits || !m->layers)
        LV_FAIL(LV_ERR_INVALID_ARG, "decode step: NULL model, cache or logits");
    if (!same_shape(&m->cfg, &kv->cfg))
        LV_FAIL(LV_ERR_INVALID_ARG, "decode step: the KV cache was made for another model shape");
    if (pos < 0 || pos >= kv->max_pos)
        LV_FAIL(LV_ERR_INVALID_ARG, "decode step: position %d outside the cache (0..%d)", pos,
                kv->max_pos - 1);
    LV_TRY(check_tokens(&token, 1, m->cfg.vocab_size));

    const lv_model_config *c = &m->cfg;
    kern_embed_ref(kv->x, m->tok_emb, &token, 1, c->dim);
    for (int l = 0; l < c->n_layers; l++) LV_TRY(decode_layer(m, kv, l, pos));
    kern_rmsnorm_ref(kv->xb, kv->x, m->final_norm, 1, c->dim, c->norm_eps);
    kern_matmul_ref(kv->logits, kv->xb, m->wcls, 1, c->dim, c->vocab_size);
    *logits = kv->logits;
done:
    return st;
}
