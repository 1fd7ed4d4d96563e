/* lv_quant.h: quantized models in memory: additive-codebook (AQLM) linears and
 * the blocks and model built from them. What the quantize stages produce, the
 * HDF5 checkpoint and model files store (io/h5model.c, docs/formats-h5.md), and
 * the quantized kernels read. */
#ifndef LV_QUANT_H
#define LV_QUANT_H

#include <stdint.h>

#include "lv.h"
#include "lv_model.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Additive-codebook quantized linear:
 *   What[r, i*g + a] = scales[r] * sum_m codebooks[m, codes[r, i, m], a],
 * for i*g + a < d_in (when g does not divide d_in the last group is cut; the
 * quantizer pads the input dimension with zero Hessian, see docs/quant-numerics.md).
 * Codes of up to 16 bits; codebooks and scales are float32 in memory and on disk.
 * Optional outlier columns (VPTQ-style, quant.outlier_cols, docs/quant-numerics.md):
 * n_outl input columns whose weights get a dense correction kept at 16 bits,
 *   W[r, outl_idx[j]] = What[r, outl_idx[j]] + outl_w[r, j],
 * fitted after the codes so that the layer objective is minimal given them. */
typedef struct lv_aq_layer {
    int64_t d_out, d_in; /* true shape of W (out_features, in_features) */
    int64_t n_groups;    /* ceil(d_in / g) */
    int M;               /* number of codebooks */
    int nbits;           /* 2^nbits entries per codebook, 1..16 */
    int g;               /* group size along d_in */
    uint16_t *codes;     /* (d_out, n_groups, M), owned */
    float *codebooks;    /* (M, 2^nbits, g), owned */
    float *scales;       /* (d_out), owned */
    int n_outl;          /* outlier columns, 0 = none (then both pointers are NULL) */
    int32_t *outl_idx;   /* (n_outl) input columns, strictly ascending, < d_in, owned */
    float *outl_w;       /* (d_out, n_outl) corrections of those columns, owned */
} lv_aq_layer;

/* The seven linears of a LLaMA block, in this order everywhere (files too). */
typedef enum {
    LV_LIN_WQ = 0, LV_LIN_WK, LV_LIN_WV, LV_LIN_WO, LV_LIN_W1, LV_LIN_W2, LV_LIN_W3,
    LV_LIN_COUNT
} lv_lin;

/* Names used in files and messages: "wq" ... "w3". */
const char *lv_lin_name(lv_lin which);
/* Where an FP layer keeps linear `which` (lv_lin order: wq wk wv wo w1 w2 w3). */
static inline const float **lv_layer_slot(lv_layer *L, lv_lin which)
{
    const float **slot[LV_LIN_COUNT] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w1, &L->w2, &L->w3};
    return slot[which];
}
static inline const float *lv_layer_weight(const lv_layer *L, lv_lin which)
{
    return *lv_layer_slot((lv_layer *)L, which);
}

/* (d_out, d_in) of a linear for a config. */
void lv_lin_shape(const lv_model_config *cfg, lv_lin which, int64_t *d_out, int64_t *d_in);

typedef struct {
    float *attn_norm;             /* (dim), owned: tuned by block fine-tuning */
    float *ffn_norm;              /* (dim), owned */
    lv_aq_layer lin[LV_LIN_COUNT];
    double rel_err[LV_LIN_COUNT]; /* layer-wise relative error tr(dW H dW^T)/tr(W H W^T) */
    double block_mse;             /* relative MSE of the block's outputs (after fine-tuning) */
    /* Optional LoRA adapters (ApiQ init, stages/apiq.c): the linear's weight is
     * What + lora_B[k] lora_A[k]. lora_rank 0: none, every pointer NULL. With
     * lora_rank r > 0, linear k has an adapter when lora_A[k] and lora_B[k] are
     * both non-NULL (both NULL: none for that linear). Not counted in bits per
     * weight: adapters are a starting point for fine-tuning, kept in fp32. */
    int lora_rank;
    float *lora_A[LV_LIN_COUNT];  /* (lora_rank, d_in) row-major, owned, or NULL */
    float *lora_B[LV_LIN_COUNT];  /* (d_out, lora_rank) row-major, owned, or NULL */
} lv_qblock;

typedef struct {
    lv_model_config cfg;
    int M, nbits, g;              /* quantization config of the linears */
    float *tok_emb;               /* (vocab, dim), owned, not quantized */
    float *final_norm;            /* (dim), owned */
    float *wcls;                  /* (vocab, dim), owned; NULL when cfg.tied_cls */
    lv_qblock *blocks;            /* (n_layers), owned */
    uint64_t job_hash, model_hash;
    int shared_codebooks;         /* LV_SHARE_*: LV_SHARE_MODEL, every linear of every block
                                     holds an identical copy of ONE codebook tensor
                                     (quant.share_codebooks = model); LV_SHARE_TYPE, one
                                     tensor per linear type (wq of every block, ...;
                                     quant.share_codebooks = type). Each distinct tensor is
                                     stored once in files and counted once in bits per weight */
    int scale_bits;               /* 0 or 16: fp16 scales; 8: every linear's scales are on
                                     the 8-bit grid of lv_scale8_value (quant.scale_bits = 8):
                                     16 bits for the linear's base + 8 per row */
} lv_qmodel;

/* Codebook sharing of a quantized model (lv_qmodel.shared_codebooks). */
enum { LV_SHARE_NONE = 0, LV_SHARE_MODEL = 1, LV_SHARE_TYPE = 2 };

/* Number of distinct shared codebook tensors ("slots") of a sharing mode:
 * 1 for LV_SHARE_MODEL, LV_LIN_COUNT for LV_SHARE_TYPE (0 for none). */
static inline int lv_share_slots(int share)
{
    return share == LV_SHARE_TYPE ? LV_LIN_COUNT : share == LV_SHARE_MODEL ? 1 : 0;
}
/* The slot whose tensor linear `which` uses (any block); 0 unless LV_SHARE_TYPE. */
static inline int lv_share_slot(int share, int which)
{
    return share == LV_SHARE_TYPE ? which : 0;
}
/* 1 when linear `which` of block l holds the first copy of its tensor (the
 * one counted and stored): always without sharing. */
static inline int lv_share_owner(int share, int l, int which)
{
    return share == LV_SHARE_NONE || (l == 0 && (share == LV_SHARE_TYPE || which == 0));
}
/* The name of a sharing mode as in job files: "none", "model", "type". */
const char *lv_share_name(int share);

/* Allocate arrays of L for the given shape (codes zero, scales one). */
lv_status lv_aq_layer_init(lv_aq_layer *L, int64_t d_out, int64_t d_in, int M, int nbits, int g);
void lv_aq_layer_free(lv_aq_layer *L);

/* Replaces L's outlier columns by n zeroed ones (indices 0 until set); n = 0
 * removes them. */
lv_status lv_aq_outliers_alloc(lv_aq_layer *L, int n);
/* W (d_out, d_in) += L's outlier corrections (nothing without outliers). */
void lv_aq_outliers_add_w(const lv_aq_layer *L, float *W);
/* y (n, d_out) += x (n, d_in)[:, outl_idx] @ outl_w^T (nothing without outliers). */
void lv_aq_outliers_add_y(const lv_aq_layer *L, const float *x, int64_t n, float *y);
/* Outlier columns valid: 0 <= n_outl <= d_in, indices strictly ascending and
 * < d_in, corrections finite. LV_ERR_FORMAT naming `what` otherwise. */
lv_status lv_aq_outliers_check(const lv_aq_layer *L, const char *what);
/* Bits of L's outlier columns: 16 per correction, 32 per index. */
double lv_aq_outliers_bits(const lv_aq_layer *L);

/* x rounded to the nearest IEEE fp16 value (ties to even; subnormals kept),
 * as a float: what an fp16 store and load give. |x| beyond the fp16 range
 * (65504 + half an ulp) becomes +-Inf, NaN stays NaN. */
float lv_round_f16(float x);

/* Codebooks, scales and outlier corrections of L rounded to fp16 values in place (quant.fp16: the
 * stored model is then exactly what the HF AQLM export holds). A value that
 * is not finite in fp16 leaves L unchanged and is LV_ERR_NUMERIC naming
 * `what` and the tensor. */
lv_status lv_aq_layer_round_f16(lv_aq_layer *L, const char *what);

/* 8-bit scales (quant.scale_bits = 8): the scales of a linear are base * 2^(-q/32),
 * q = 0..255 (8 octaves below base, steps of 2.2 %), each rounded to an fp16 value;
 * base = the largest scale, itself an fp16 value. The grid is computed with IEEE
 * double square roots and products only (no libm), so every platform decodes q to
 * the same float. */
float lv_scale8_value(float base, int q);
/* Scales of L moved to the nearest grid value (by absolute difference, ties to the
 * smaller q) in place. Scales must be finite and > 0 with base finite in fp16:
 * otherwise LV_ERR_NUMERIC naming `what` and the row, and L unchanged. */
lv_status lv_aq_layer_round_scales8(lv_aq_layer *L, const char *what);
/* 1 when every scale of L is a grid value of its largest scale, else 0. */
int lv_aq_scales8_ok(const lv_aq_layer *L);

/* Empty blocks for cfg (norms, linears allocated per the shapes and config). */
lv_status lv_qblock_init(lv_qblock *b, const lv_model_config *cfg, int M, int nbits, int g);
void lv_qblock_free(lv_qblock *b);

/* Zero LoRA factors of rank r (1 <= r <= min(d_out, d_in) of every linear) for
 * all seven linears of b, whose lin[] must be initialised; replaces (frees) any
 * adapters b had. */
lv_status lv_qblock_lora_init(lv_qblock *b, int r);
/* Frees the adapters of b (lora_rank 0 afterwards). */
void lv_qblock_lora_free(lv_qblock *b);

/* Quantized model skeleton: copies embeddings/final norm/classifier of fp,
 * blocks allocated empty. */
lv_status lv_qmodel_init(lv_qmodel **out, const lv_model *fp, int M, int nbits, int g);
void lv_qmodel_free(lv_qmodel *q);

/* Total storage bits per quantized weight over all linears of the model:
 * codes + codebooks (16-bit) + scales (16-bit; with scale_bits 8, 16 per linear
 * + 8 per row), as in AQLM's accounting; with shared_codebooks each distinct
 * codebook tensor counts once. */
double lv_qmodel_bits_per_weight(const lv_qmodel *q);

#ifdef __cplusplus
}
#endif

#endif
