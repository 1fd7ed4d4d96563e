/* stage.h: the stages of llmvq (calibration, VPTQ init, AQLM search,
 * fine-tuning, PV-tuning, eval). */
#ifndef STAGE_H
#define STAGE_H

#include <stdint.h>

#include "lv.h"
#include "lv_model.h"
#include "lv_quant.h"
#include "kern.h"

/* ---------------- eval: perplexity ----------------
 * Convention (DESIGN.md): the token stream is cut into non-overlapping windows
 * of ctx tokens, each run from position 0 with no state carried over; position
 * p of window k predicts token k*ctx + p + 1, so every token after the first is
 * predicted once; a short last window counts; ppl = exp(mean NLL). */

typedef struct {
    int ctx;            /* window length; <= 0 means the model's seq_len */
    int64_t max_tokens; /* use only the first max_tokens tokens; <= 0 = all */
    int batch;          /* windows per forward call; <= 0 = automatic */
    int progress;       /* print progress with ETA on stderr */
} stage_eval_opts;

typedef struct {
    double nll;         /* mean negative log-likelihood, nats per predicted token */
    double ppl;         /* exp(nll) */
    int64_t n_tokens;   /* tokens used (including the first, unpredicted one) */
    int64_t n_predicted;
    int ctx;
    double wall_s;
    double tokens_per_s;
} stage_eval_result;

lv_status stage_eval_ppl(const lv_model *m, const int32_t *tokens, int64_t n,
                         const stage_eval_opts *opts, stage_eval_result *res);

/* ---------------- generate ---------------- */

typedef struct {
    int steps;          /* total positions including the prompt; <= 0: seq_len */
    float temperature;  /* 0 = greedy */
    float top_p;        /* nucleus; >= 1 or <= 0 disables */
    uint64_t seed;
} stage_gen_opts;

/* Sample from `prompt` tokens (must start with BOS; n_prompt >= 1). Calls emit
 * with each new token (after the prompt) until steps or BOS/EOS is produced.
 * Tokens out: (*out, *n_out) malloc'd, the whole sequence including prompt. */
typedef void (*stage_gen_emit)(void *user, int32_t prev, int32_t token);
lv_status stage_generate(const lv_model *m, const int32_t *prompt, int n_prompt,
                         const stage_gen_opts *opts, stage_gen_emit emit, void *user,
                         int32_t **out, int *n_out);

/* ========================================================================
 * Layer-wise quantization: VPTQ-style init and AQLM (stages/vq.c, stages/aqlm.c).
 * See docs/quant-numerics.md for objective, update rules and padding rule.
 *
 * Inputs of every function: W (d_out, d_in) float32 row-major, the layer weight;
 * H (d_in, d_in) float32 row-major, symmetric PSD, H = X^T X (any positive
 * multiple). Objective: tr((W - What) H (W - What)^T). When g does not divide
 * d_in, the input dimension is zero-padded to n_groups * g with zero Hessian
 * rows/columns: padded weights cost nothing and are dropped by dequant.
 * All host memory, synchronous, not collective. Same inputs + same seed give
 * bit-identical codes for any OMP_NUM_THREADS.
 * ====================================================================== */

/* The quantized layer is lv_aq_layer (kernels/lv_quant.h):
 * What[r, i*g + a] = scales[r] * sum_m codebooks[m, codes[r, i, m], a];
 * allocate with lv_aq_layer_init, free with lv_aq_layer_free. */
typedef lv_aq_layer stage_aqlm_layer;

/* What (d_out, d_in) = dequantized layer (caller-allocated). */
lv_status stage_aqlm_dequant(const stage_aqlm_layer *L, float *What);

/* *rel = tr(dW H dW^T) / tr(W H W^T), dW = W - What; all (d_out, d_in), H (d_in, d_in). */
lv_status stage_aqlm_layer_error(const float *W, const float *What, const float *H,
                                 int64_t d_out, int64_t d_in, double *rel);

/* Exact storage cost per original weight: (codes d_out*n_groups*M*nbits +
 * codebooks M*2^nbits*g*16 + scales d_out*16) / (d_out*d_in). */
double stage_aqlm_bits_per_weight(const stage_aqlm_layer *L);

/* ---------------- VQ init (VPTQ-style Hessian-weighted k-means) ---------------- */

typedef struct {
    int k;             /* clusters */
    int max_iters;     /* Lloyd iterations after k-means++ seeding */
    double tol;        /* stop when the relative objective decrease is below tol (0: never) */
    uint64_t seed;     /* k-means++ seeding */
} stage_vq_kmeans_config;

/* Weighted k-means of x (n, g) with per-coordinate weights w (n, g) (NULL = 1):
 * k-means++ seeding (D^2 sampling under the weighted distance), then Lloyd
 * steps; empty clusters keep their centroid, so the objective never increases.
 * centroids (k, g) and idx (n) are caller-allocated outputs. hist (optional,
 * max_iters + 1 doubles) gets the objective after seeding and after each
 * iteration; *n_hist (optional) how many were written. */
lv_status stage_vq_kmeans(const float *x, const float *w, int64_t n, int g,
                          const stage_vq_kmeans_config *cfg, float *centroids, int32_t *idx,
                          double *hist, int *n_hist);

typedef struct {
    int n_codebooks;   /* 1 = plain VQ, >= 2 = residual codebooks (fit in sequence) */
    int nbits;         /* 2^nbits centroids per codebook */
    int group_size;    /* vector length g along d_in */
    int kmeans_iters;  /* 0: 20 */
    int use_hessian;   /* weight coordinates by diag(H) (importance); 0: unweighted */
    uint64_t seed;
} stage_vq_config;

/* VQ init: per-row scales (row RMS), then (residual) weighted k-means of the
 * scaled g-vectors of W, coordinate weight diag(H)[j] * scale[r]^2. out must be
 * zeroed; it is initialised here and the caller frees it (also on failure). */
lv_status stage_vq_run(const float *W, const float *H, int64_t d_out, int64_t d_in,
                       const stage_vq_config *cfg, stage_aqlm_layer *out);

/* ---------------- AQLM ---------------- */

typedef enum {
    STAGE_AQLM_ADAM = 0,  /* Adam (beta1 0, beta2 0.95, AMSGrad) on codebooks + scales */
    STAGE_AQLM_LSTSQ = 1, /* closed-form least squares on codebooks, then closed-form scales */
} stage_aqlm_update;

/* Zero fields take the default named in brackets. */
typedef struct {
    int n_codebooks;          /* M */
    int nbits;                /* bits per code, 1..16 */
    int group_size;           /* g */
    int beam_size;            /* [8] */
    int max_iters;            /* alternations of (codebook update, beam search) [10] */
    double rel_tol;           /* stop when (prev - cur) / prev < rel_tol; 0 = run max_iters */
    stage_aqlm_update codebook_update;
    float adam_lr;            /* [1e-3], in units of the scaled codebooks (~1) */
    int adam_steps;           /* Adam steps per alternation [100] */
    int kmeans_iters;         /* residual k-means init [20] */
    int no_scale_update;      /* 1: keep the initial per-row scales */
    uint64_t seed;
    int verbose;              /* lv_log progress */
} stage_aqlm_config;

#define STAGE_AQLM_MAX_HIST 64

typedef struct {
    double rel_err_init;               /* after the VQ init */
    double rel_err[STAGE_AQLM_MAX_HIST]; /* after each alternation (first min(iters, 64)) */
    int iters;                         /* alternations run */
    int64_t n_candidates;              /* beam-search candidate scores computed */
    double beam_s, update_s, init_s, wall_s; /* time in beam search, codebook updates, init, all */
} stage_aqlm_stats;

/* Full AQLM on one layer: VQ init from residual k-means, then alternate codebook
 * update (cfg->codebook_update) + scale refit and beam search until rel_tol or
 * max_iters. out must be zeroed; the caller frees it (also on failure).
 * stats may be NULL. */
lv_status stage_aqlm_run(const float *W, const float *H, int64_t d_out, int64_t d_in,
                         const stage_aqlm_config *cfg, stage_aqlm_layer *out,
                         stage_aqlm_stats *stats);

/* Objective tr((W - What) H (W - What)^T) of layer L (absolute, not relative). */
lv_status stage_aqlm_objective(const float *W, const float *H, const stage_aqlm_layer *L,
                               double *obj);

/* Beam search over L->codes (updated in place), codebooks and scales fixed.
 * Never increases the objective (falls back to the starting codes). seed
 * shuffles the order of groups and codebooks. *n_candidates (optional) += the
 * number of candidate scores computed. */
lv_status stage_aqlm_beam_search(const float *W, const float *H, stage_aqlm_layer *L,
                                 int beam_size, uint64_t seed, int64_t *n_candidates);

/* Codebook update with codes fixed, per cfg->codebook_update (adam_lr, adam_steps;
 * no_scale_update). Never raises the objective. LSTSQ needs M * 2^nbits * g <= 8192
 * (LV_ERR_UNSUPPORTED otherwise). */
lv_status stage_aqlm_update_codebooks(const float *W, const float *H, stage_aqlm_layer *L,
                                      const stage_aqlm_config *cfg);

/* Closed-form per-row scales with codes and codebooks fixed:
 * s_r = (w_r H q_r^T) / (q_r H q_r^T), q_r the unscaled reconstruction. */
lv_status stage_aqlm_update_scales(const float *W, const float *H, stage_aqlm_layer *L);

/* ========================================================================
 * Calibration (stages/calib.c): calibration sequences and per-block Hessians.
 * ====================================================================== */

/* n_seq sequences of T tokens, random crops of tokens[0..n_tokens) chosen by
 * the seeded RNG. *out (n_seq, T) malloc'd. */
lv_status stage_calib_sequences(const int32_t *tokens, int64_t n_tokens, int64_t n_seq, int T,
                                uint64_t seed, int32_t **out);

/* Input Hessians of one block, H = sum over calibration rows of x^T x, double. */
typedef struct {
    int dim, hidden;
    double *attn;   /* (dim, dim): input of wq, wk, wv */
    double *wo;     /* (dim, dim): input of wo */
    double *ffn;    /* (dim, dim): input of w1 (gate), w3 (up) */
    double *down;   /* (hidden, hidden): input of w2 */
    int64_t n_rows; /* rows accumulated */
} stage_block_hessians;

lv_status stage_block_hessians_init(stage_block_hessians *h, const lv_model_config *cfg);
void stage_block_hessians_free(stage_block_hessians *h);
void stage_block_hessians_zero(stage_block_hessians *h);
/* The Hessian that linear `which` sees (borrowed). */
const double *stage_block_hessian_for(const stage_block_hessians *h, lv_lin which);

/* x (n_seq, T, dim) <- block `layer` of m applied to x, in micro-batches of
 * sequences (ws sized for (micro_batch, T)); accumulates into h when not NULL. */
lv_status stage_calib_block(const lv_model *m, int layer, float *x, int64_t n_seq, int T,
                            kern_fwd_ws *ws, int micro_batch, stage_block_hessians *h);

/* out (d, d) float = H / n_rows. */
lv_status stage_hessian_to_f32(const double *H, int64_t d, int64_t n_rows, float *out);

#endif
