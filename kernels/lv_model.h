/* lv_model.h: an FP LLaMA model in memory, as every loader hands it out and
 * every forward pass reads it. Weights are float32, row-major, in the PyTorch
 * nn.Linear layout (out_features, in_features). They point into a memory map of
 * the file (float32 sources: no copy) or into an arena the loader owns
 * (f16/bf16 sources converted once). io_model_free() releases both. */
#ifndef LV_MODEL_H
#define LV_MODEL_H

#include <stdint.h>

/* Which RoPE pairing the q/k weights were trained for.
 * INTERLEAVED: llama2.c / Meta: pairs (2i, 2i+1) of each head.
 * HALF: Hugging Face "rotate_half": pairs (i, i + head_dim/2); HF stores q/k
 * rows permuted for this, so the same model gives the same logits either way. */
typedef enum { LV_ROPE_INTERLEAVED = 0, LV_ROPE_HALF = 1 } lv_rope_style;

typedef struct {
    int dim;         /* hidden size */
    int hidden_dim;  /* FFN inner size */
    int n_layers;
    int n_heads;
    int n_kv_heads;  /* GQA: n_heads % n_kv_heads == 0 */
    int vocab_size;  /* always positive */
    int seq_len;     /* max positions */
    float norm_eps;  /* RMSNorm epsilon (llama2.c: 1e-5) */
    float rope_theta;/* 10000 for LLaMA-2 */
    lv_rope_style rope;
    int tied_cls;    /* 1 when wcls == tok_emb */
} lv_model_config;

struct lv_aq_layer; /* a quantized linear, lv_quant.h */

typedef struct {
    const float *attn_norm; /* (dim) */
    const float *wq;        /* (dim, dim) */
    const float *wk;        /* (kv_dim, dim) */
    const float *wv;        /* (kv_dim, dim) */
    const float *wo;        /* (dim, dim) */
    const float *ffn_norm;  /* (dim) */
    const float *w1;        /* gate (hidden_dim, dim) */
    const float *w2;        /* down (dim, hidden_dim) */
    const float *w3;        /* up   (hidden_dim, dim) */
    /* Linears kept quantized, in lv_lin order (wq wk wv wo w1 w2 w3); borrowed. NULL: the
     * float weight above is used. Non-NULL: the forward (kernels/forward.c) multiplies
     * straight from the codes (kern_aq_gemm, kern_qmm.h) and the float pointer is NULL.
     * Models from io_qmodel_view have them; every other loader leaves them NULL. */
    const struct lv_aq_layer *aq[7];
} lv_layer;

typedef struct lv_model_storage lv_model_storage; /* private to io/ */

typedef struct {
    lv_model_config cfg;
    const float *tok_emb;    /* (vocab_size, dim) */
    lv_layer *layers;        /* (n_layers), owned */
    const float *final_norm; /* (dim) */
    const float *wcls;       /* (vocab_size, dim); == tok_emb when tied_cls */
    lv_model_storage *storage; /* maps and arenas, owned; released by io_model_free */
} lv_model;

static inline int lv_cfg_head_dim(const lv_model_config *c) { return c->dim / c->n_heads; }
static inline int lv_cfg_kv_dim(const lv_model_config *c)
{
    return c->n_kv_heads * (c->dim / c->n_heads);
}
/* Parameters of the model (embedding + blocks + final norm + untied classifier). */
int64_t lv_cfg_n_params(const lv_model_config *c);

#endif
