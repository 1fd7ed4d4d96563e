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
 * Work split over ranks for the stages that optimise many layers jointly
 * (shared codebooks). The stage computes the per-layer (or per-block) part
 * only for the items it owns and calls share(item) in item order on EVERY
 * rank, which must make buf identical everywhere (the owner's bytes, e.g. an
 * MPI broadcast from the owner). Joint quantities are then summed over items
 * in item order on every rank, so results are bit-identical for any number of
 * ranks. NULL (or owns == NULL) = everything local, share never called.
 * ====================================================================== */
typedef struct {
    void *user;
    int (*owns)(void *user, int item);
    lv_status (*share)(void *user, int item, void *buf, size_t bytes);
} stage_dist;

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

/* What (d_out, d_in) = dequantized layer (caller-allocated), outlier columns included. */
lv_status stage_aqlm_dequant(const stage_aqlm_layer *L, float *What);

/* Outlier columns of L (stages/outliers.c, quant.outlier_cols): with L's codes,
 * codebooks and scales fixed, chooses up to n input columns O greedily by the
 * decrease of tr((W - W') H (W - W')^T) and sets their 16-bit corrections to
 * the exact minimiser R = (W - What) H[:, O] H[O, O]^{-1} (W' = What + R on
 * those columns). Replaces any outlier columns L had; n = 0 removes them.
 * Columns with no signal left (conditional Hessian diagonal <= 1e-12 of the
 * largest) are never chosen, so *n_chosen (optional) may be below n.
 * Deterministic. d_in <= 65536; memory ~ 2 d_in^2 + 3 d_out d_in doubles. */
lv_status stage_outliers_fit(const float *W, const float *H, int64_t d_out, int64_t d_in,
                             lv_aq_layer *L, int n, int *n_chosen);

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

/* ========================================================================
 * Block fine-tuning (stages/finetune.c, stages/finetune_grad.c; docs/finetune.md).
 * Codes fixed; Adam trains codebooks, per-row scales and the two RMSNorm
 * weights of a quantized block so that its outputs match the FP block's.
 * Host memory, synchronous, not collective. Same inputs + seed give
 * bit-identical results (our loops fix every reduction order; OpenBLAS's
 * GEMMs are deterministic for a fixed thread count).
 * ====================================================================== */

/* Zero fields take the default named in brackets. */
typedef struct {
    float lr;            /* Adam learning rate [1e-3] (codebooks ~1, scales ~ row RMS) */
    float beta1, beta2;  /* Adam betas [0.9, 0.95] (AQLM main.py's defaults); eps 1e-8 */
    int max_epochs;      /* passes over the training sequences [10] */
    int batch_seqs;      /* sequences per Adam step = per saved micro-batch [8] */
    int patience;        /* stop after this many epochs without held-out improvement [3] */
    double holdout_frac; /* held out: the last ceil(frac * n_seq) sequences, >= 1 [0.1] */
    uint64_t seed;       /* order of the training sequences in each epoch */
    int freeze_norms;    /* 1: keep the RMSNorm weights, train codebooks + scales only */
    int verbose;         /* lv_log per epoch */
    int share;           /* stage_finetune_shared only: LV_SHARE_TYPE (one codebook per
                            linear type) or LV_SHARE_MODEL [model] */
} stage_ft_config;

typedef struct {
    double mse_before, mse_after; /* held-out relative MSE sum (y - y_fp)^2 / sum y_fp^2 */
    double train_loss;            /* mean training MSE (the loss) over the last epoch */
    int epochs, best_epoch;       /* epochs run; epoch whose parameters were kept (0: input) */
    int diverged;                 /* 1: a non-finite loss stopped training early */
    int64_t n_train, n_holdout, steps;
    double wall_s;
} stage_ft_stats;

/* Fine-tune block b in place. x_in (n_seq, T, dim): the block's calibration
 * inputs; y_fp (n_seq, T, dim): the FP block's outputs on them (both borrowed).
 * The last sequences are held out (with n_seq == 1 the one sequence serves as
 * both). b keeps the parameters of the best held-out epoch: never worse than
 * it came in (unchanged when no epoch improved, also on error). ft may be
 * NULL (all defaults), stats may be NULL. b->block_mse is not touched. */
lv_status stage_finetune_block(const lv_model_config *cfg, lv_qblock *b, const float *x_in,
                               const float *y_fp, int64_t n_seq, int T,
                               const stage_ft_config *ft, stage_ft_stats *stats);

/* Joint fine-tuning of n_blocks blocks whose linears ALL share one codebook
 * tensor (every lv_aq_layer of every block holds an identical copy, as
 * stage_aqlm_run_shared leaves them). Loss: sum over blocks of block l's MSE
 * against y_fp[l] divided by mean(y_fp[l]^2) (each block's relative MSE counts
 * equally); the codebook gradient is the sum over all 7 * n_blocks copies,
 * each block's scales and norms get their own. Every Adam step writes the one
 * updated codebook into every copy: the copies stay bit-identical. Batches,
 * hold-out and early stop as stage_finetune_block (same sequences for every
 * block); the best held-out epoch is kept (never worse than the input).
 * x_in[l], y_fp[l] (n_seq, T, dim): block l's inputs and FP outputs
 * (borrowed; entries of blocks this rank does not own may be NULL).
 * dist (may be NULL): item = block; a rank computes gradients and held-out
 * errors of its own blocks only; afterwards the codebooks are right on every
 * rank, scales/norms only in the blocks the rank owns. stats: mse_* are the
 * mean over blocks of the held-out relative MSE. */
lv_status stage_finetune_shared(const lv_model_config *cfg, lv_qblock *blocks, int n_blocks,
                                const float *const *x_in, const float *const *y_fp,
                                int64_t n_seq, int T, const stage_ft_config *ft,
                                const stage_dist *dist, stage_ft_stats *stats);

/* The pieces, for tests and for PV-tuning: forward + backward of one block. */
#define STAGE_FT_N_SEGS (2 * LV_LIN_COUNT + 2)

/* The trainable parameters of b in flat-gradient order: codebooks (M, K, g) and
 * scales (d_out) of wq, wk, wv, wo, w1, w2, w3, then attn_norm and ffn_norm (dim).
 * seg[s] points into b, len[s] its length (either may be NULL). Returns the total. */
int64_t stage_ft_param_segments(const lv_model_config *cfg, lv_qblock *b, float **seg,
                                int64_t *len);

/* Workspace for batches of up to B sequences of exactly T tokens of blocks
 * shaped like b: dequantized weights + saved activations (~(12 dim + 2 kv_dim
 * + 5 hidden) * B*T floats + the 7 weight matrices). Caller frees. */
typedef struct stage_ft_ws stage_ft_ws;
lv_status stage_ft_ws_init(stage_ft_ws **ws, const lv_model_config *cfg, const lv_qblock *b,
                           int B, int T);
void stage_ft_ws_free(stage_ft_ws *ws);

/* y (B, T, dim) = block b applied to x (B, T, dim): kern_block_forward's op
 * sequence on the dequantized weights (same floats). */
lv_status stage_ft_block_forward(stage_ft_ws *ws, const lv_qblock *b, const float *x, int B,
                                 int T, float *y);

/* *loss = mean over (B, T, dim) of (block(x) - y_fp)^2 and grad (flat, in
 * stage_ft_param_segments order, overwritten) its gradient. */
lv_status stage_ft_block_grad(stage_ft_ws *ws, const lv_qblock *b, const float *x,
                              const float *y_fp, int B, int T, double *loss, float *grad);
/* ---------------- block backward with an upstream gradient (PV-tuning) ----------------
 * The pieces stage_ft_block_grad is made of, for chaining blocks: forward with
 * the activations kept, then a backward from any dy. Same floats as
 * stage_ft_block_grad (which is forward_save + backward with dy from the MSE). */

/* As stage_ft_block_forward, and the activations stay in ws for a following
 * stage_ft_block_backward on the same b and x. y (B, T, dim) may be NULL. */
lv_status stage_ft_block_forward_save(stage_ft_ws *ws, const lv_qblock *b, const float *x, int B,
                                      int T, float *y);

/* Backward of the last forward kept in ws (stage_ft_block_forward_save, _forward
 * or _grad: b and x (B, T, dim) must be the ones it ran on, b unchanged since).
 * dy (B, T, dim): dL/dy. accumulate 0 overwrites, 1 adds to, grad (flat,
 * stage_ft_param_segments order; NULL: not formed) and dW[k] (LV_LIN_COUNT
 * pointers, (d_out, d_in) dL/dWhat of linear k; dW or any entry NULL: not
 * formed). dx (B, T, dim) = dL/dx, overwritten; NULL: not formed; may equal dy,
 * not x. Borrowed pointers; synchronous; deterministic like stage_ft_block_grad. */
lv_status stage_ft_block_backward(stage_ft_ws *ws, const lv_qblock *b, const float *x,
                                  const float *dy, int accumulate, float *grad, float *dx,
                                  float *const *dW);
/* ---------------- end of block fine-tuning ---------------- */

/* ========================================================================
 * PV-tuning (stages/pvtune.c; docs/finetune.md "PV-tuning"), CPU reference:
 * the whole quantized model q is fine-tuned against its FP teacher fp
 * (arXiv 2405.14852). V step: Adam on the continuous parameters (codebooks,
 * per-row scales, RMSNorm weights of every block and the final norm; the
 * embeddings and the classifier stay frozen) through the full model. P step:
 * beam search re-encodes the codes towards W* = What - p_lr * dL/dWhat, and
 * only the changed groups that lower ||W* - What||_H most are kept, at most
 * p_budget * (all groups of the model) per step.
 *
 * Loss (STAGE_PV_LOSS_KL): mean over all B*T positions of KL(p_fp || p_q), the
 * next-token distributions of teacher and student; the teacher's logits are
 * computed in the same call, micro-batch by micro-batch (never stored for the
 * whole set: (B, T, vocab) floats per micro-batch). STAGE_PV_LOSS_CE: mean
 * cross-entropy of the next tokens over positions 0..T-2 (no teacher pass).
 * Each micro-batch's gradient is computed on its own and the micro-batches are
 * added in order into float buffers (the result depends on micro_batch in the
 * last bits, never on threads or ranks). Shared codebooks
 * (q->shared_codebooks: every linear holds an identical copy): the trainable
 * codebook is one tensor, its gradient is the sum over all copies (block,
 * then linear order), and every update writes it into every copy.
 * Host memory, synchronous; collective only with cfg.dist (data-parallel over
 * ranks, below); same inputs + seed give bit-identical results for any number
 * of ranks (fixed reduction orders as in block fine-tuning).
 * ====================================================================== */

typedef enum {
    STAGE_PV_LOSS_KL = 0, /* mean KL(teacher || student) over all positions */
    STAGE_PV_LOSS_CE = 1, /* mean next-token cross-entropy over positions 0..T-2 */
} stage_pv_loss;

typedef struct stage_pv_state stage_pv_state; /* below */

/* Zero fields take the default named in brackets. */
typedef struct {
    stage_pv_loss loss;   /* [KL] */
    float lr;             /* V-step Adam learning rate [1e-3] */
    float beta1, beta2;   /* Adam betas [0.9, 0.95]; eps 1e-8 */
    int freeze_norms;     /* 1: keep every RMSNorm weight (blocks' and final) */
    int train_emb;        /* 1: also train the (unquantized) token embeddings and classifier
                             (one tensor when tied), as AQLM's and PV-Tuning's
                             update_non_quantized_parameters does; they are not in the bits
                             per weight of the quantized linears [0] */
    int batch_seqs;       /* sequences per V step (one global batch) [16] */
    int micro_batch;      /* sequences per forward/backward, the memory bound [4] */
    int max_epochs;       /* passes over the training sequences [4] */
    int eval_every;       /* V steps between held-out evaluations; 0: once per epoch */
    int patience;         /* evaluations without held-out improvement before stopping [4] */
    double holdout_frac;  /* held out: the last ceil(frac * n_seq) sequences [0.1] */
    int p_every;          /* V steps between P steps; <= 0: no P steps [0: none; on
                             stories260K they did not beat V steps alone, docs/finetune.md] */
    float p_lr;           /* P-step target W* = What - p_lr * dL/dWhat [1.0] */
    double p_budget;      /* max fraction of all code groups changed per P step [1e-3];
                             < 0: none (P steps then only measure) */
    int p_beam;           /* P-step beam size [8] */
    const float *const *p_hessians; /* NULL, or (n_layers * LV_LIN_COUNT) borrowed (d_in, d_in)
                                       float H of linear (l, k) at l * 7 + k (entries may be
                                       NULL): the P-step metric; NULL = identity */
    int p_hess_diag;      /* 1: use only the diagonals of p_hessians */
    int p_check;          /* the P step measures the batch loss after its changes and, while
                             it rose, keeps only the better half of them, at most p_check
                             times, then none [4]; < 0: no check (changes as proposed) */
    uint64_t seed;        /* sequence order per epoch and beam-search orders */
    int verbose;          /* lv_log per evaluation and P step */
    int device;           /* STAGE_PV_DEVICE_CPU [0], or _CUDA: the blocks' forward and
                             backward on the current CUDA device (kern_ftcuda.h; equal to
                             the CPU to fp32 rounding, deterministic on one GPU) */
    const stage_dist *dist; /* NULL: all local. Data-parallel over ranks (every call
                             then collective, the same arguments on every rank):
                             item m = micro-batch m of each forward/backward pass
                             (its owner computes its loss, gradient and dL/dWhat,
                             shared and added in micro-batch order on every rank),
                             item l * 7 + k = linear (l, k) in the P step's beam
                             searches (new codes shared from the owner). Sums run
                             in the same order as on one rank: parameters and codes
                             are bit-identical for any number of ranks. */
    /* Checkpoints (stage_pv_tune only): every ckpt_every V steps (0: never) and
     * when stop() says so, ckpt(ckpt_user, state) is called with the driver's
     * whole state (q itself holds the current parameters and codes); after a
     * stop the driver returns LV_ERR_STOPPED with q at its current state (not
     * the best snapshot: q + the state resume the run). resume: continue from
     * such a state (q must hold the checkpointed parameters and codes): the
     * result is bit-identical to a run straight through. */
    int ckpt_every;
    lv_status (*ckpt)(void *ckpt_user, const stage_pv_state *state);
    void *ckpt_user;
    int (*stop)(void *ckpt_user); /* polled after every V step; NULL: never */
    const stage_pv_state *resume;
} stage_pv_config;

enum { STAGE_PV_DEVICE_CPU = 0, STAGE_PV_DEVICE_CUDA = 1 };

/* cfg with zero fields replaced by the defaults above (in may be NULL). */
stage_pv_config stage_pv_defaults(const stage_pv_config *in);

/* State of PV-tuning one (fp, q) pair: workspaces for micro-batches of up to
 * micro_batch sequences of exactly T tokens, Adam moments, gradient buffers
 * (~ one float per quantized weight for dL/dWhat, plus (n_layers + 1) * B*T*dim
 * activations and 2 * B*T*vocab logits). fp and q are borrowed and must
 * outlive it; q is changed in place by the steps. fp and q must have the same
 * shapes; with q->shared_codebooks every copy must be bit-identical; blocks
 * with LoRA adapters are refused (LV_ERR_UNSUPPORTED). Caller frees. cfg may be
 * NULL (defaults). */
typedef struct stage_pv stage_pv;
lv_status stage_pv_init(stage_pv **pv, const lv_model *fp, lv_qmodel *q, int micro_batch, int T,
                        const stage_pv_config *cfg);
void stage_pv_free(stage_pv *pv);

/* The trainable parameters in flat order (pointers into q): per block the
 * stage_ft_param_segments order, then final_norm; with shared codebooks the
 * one codebook tensor first (blocks[0].lin[0].codebooks), then per block the 7
 * scales, attn_norm, ffn_norm, then final_norm. *n_seg (optional) = number of
 * segments; seg, len (optional) must hold that many. Returns the total length. */
int64_t stage_pv_param_segments(const stage_pv *pv, int *n_seg, float **seg, int64_t *len);

/* *loss of q on tokens (n_seq, T) (any n_seq >= 1, in micro-batches) and its
 * gradient grad (stage_pv_param_segments order, overwritten; NULL: loss only). */
lv_status stage_pv_grad(stage_pv *pv, const int32_t *tokens, int64_t n_seq, double *loss,
                        float *grad);

/* V step: gradient over the global batch tokens (n_seq, T), then one Adam step
 * on the trainable parameters. *loss = the loss before the step. A non-finite
 * loss or gradient leaves q unchanged (*loss tells; status LV_OK). */
lv_status stage_pv_vstep(stage_pv *pv, const int32_t *tokens, int64_t n_seq, double *loss);

typedef struct {
    double loss;            /* loss on the batch (at the codes before the step) */
    double loss_after;      /* the same after the step (NaN: not measured, p_check < 0) */
    int n_halvings;         /* times the check halved the accepted changes */
    int64_t n_groups;       /* code groups (row, input group) of all quantized linears */
    int64_t budget;         /* floor(p_budget * n_groups) */
    int64_t n_proposed;     /* groups the beam searches changed with a positive gain */
    int64_t n_changed;      /* groups changed in q (<= budget) */
    int64_t n_reverted_rows;/* rows put back because the kept groups interacted badly (full H) */
    double obj_before, obj_after; /* sum over linears of tr((W* - What) H (W* - What)^T) */
    double wall_s;
} stage_pv_pstats;

/* P step on the batch tokens (n_seq, T): dL/dWhat of every linear (summed over
 * micro-batches), targets W*, beam search (cfg p_beam, p_hessians) on a copy of
 * each linear's codes, then the changed groups with the largest gains
 * 2 d^T (H e) - d^T H_ii d (e = W* - What, d = the group's change; ties: lower
 * block, linear, row, group first) are written into q, at most the budget;
 * with a full H a row whose kept groups together raise its objective is put
 * back. Never raises obj. With p_check the batch loss is then measured (one
 * more forward) and the kept changes halved, best first, while it rose: the
 * step never raises the batch loss. ps may be NULL. */
lv_status stage_pv_pstep(stage_pv *pv, const int32_t *tokens, int64_t n_seq,
                         stage_pv_pstats *ps);

typedef struct {
    double loss_before, loss_after; /* held-out loss of the input and of the kept model */
    double train_loss;     /* mean V-step loss over the last epoch */
    int epochs, evals;
    int64_t v_steps, p_steps, best_step; /* best_step: V steps behind the kept model (0: input) */
    int64_t codes_changed; /* groups changed by all P steps (also those later discarded) */
    int64_t n_train, n_holdout;
    int diverged;          /* a non-finite loss stopped training */
    double v_s, p_s, eval_s, wall_s; /* time in V steps, P steps, held-out evaluations, all */
} stage_pv_stats;

/* Everything stage_pv_tune needs, besides q and its inputs, to continue a run
 * exactly: Adam moments, the best snapshot, this epoch's order and position,
 * the RNG, counters and statistics. Arrays are borrowed (the driver's own
 * buffers in a ckpt callback; the caller's for resume). */
struct stage_pv_state {
    int64_t n_param, n_codes, n_train;
    const float *m, *v;          /* (n_param) Adam moments */
    const float *best_param;     /* (n_param) parameters of the best evaluation */
    const uint16_t *best_codes;  /* (n_codes) and its codes (linear order) */
    const int64_t *perm;         /* (n_train) this epoch's sequence order */
    uint64_t rng[4];             /* lv_rng after this epoch's shuffle */
    int64_t adam_t, p_count;     /* Adam step count, P steps taken (seeds) */
    int64_t epoch, next;         /* epoch in progress (1-based), next batch starts at perm[next] */
    int64_t epoch_steps;         /* V steps with a finite loss in this epoch */
    double epoch_loss;           /* and the sum of their losses */
    double best;                 /* held-out loss of the best snapshot */
    int64_t worse, stop;         /* evaluations without improvement; 1: training has ended */
    stage_pv_stats stats;        /* so far */
};

/* The array lengths of a stage_pv_state for tuning q on n_seq sequences with
 * cfg (NULL: defaults): trainable parameters, codes, training sequences. */
void stage_pv_state_dims(const lv_qmodel *q, int64_t n_seq, const stage_pv_config *cfg,
                         int64_t *n_param, int64_t *n_codes, int64_t *n_train);

/* PV-tuning driver: epochs over tokens (n_seq, T) in a seeded order, one V step
 * per batch_seqs sequences and a P step (on the same batch) after every p_every
 * V steps; the last ceil(holdout_frac * n_seq) sequences are held out (n_seq 1:
 * the one sequence serves both) and evaluated before training and every
 * eval_every V steps. q keeps the parameters and codes of the best evaluation:
 * never worse on the held-out loss than it came in (bit-identical when nothing
 * improved, also on error). cfg may be NULL, stats may be NULL. */
lv_status stage_pv_tune(const lv_model *fp, lv_qmodel *q, const int32_t *tokens, int64_t n_seq,
                        int T, const stage_pv_config *cfg, stage_pv_stats *stats);
/* ---------------- end of PV-tuning ---------------- */

/* ========================================================================
 * AQLM with codebooks shared by a set of layers (stages/aqlm_shared.c).
 * On small models per-matrix codebooks cost more bits than the codes
 * (stories260K 1x8g4: 2.0 bits of codes + 2.5 of codebooks); one codebook set
 * for many linears costs a fraction of a bit. See docs/quant-numerics.md.
 *
 * Inputs per layer i (n_layers of them): W[i] (d_out[i], d_in[i]) and H[i]
 * (d_in[i], d_in[i]) float32 row-major, as for stage_aqlm_run (padding rule
 * included). The layers may differ in shape; M, nbits and g are common.
 * Host memory, synchronous, not collective; same inputs + seed give
 * bit-identical results for any OMP_NUM_THREADS.
 * ====================================================================== */

/* AQLM on n_layers layers sharing one codebook tensor (M, 2^nbits, g), each
 * with its own codes and per-row scales. Minimises the joint objective
 *   J = sum_i alpha_i tr((W_i - What_i) H_i (W_i - What_i)^T),
 * alpha_i = mean_j(r_j) / r_i, r_i = tr(W_i H_i W_i^T): every layer's relative
 * error counts equally (J / sum_i alpha_i r_i is the mean relative error).
 * Init: pooled Hessian-weighted residual k-means over the scaled sub-vectors of
 * all layers; then alternate joint codebook update (Adam on J, or least squares
 * with normal equations summed over layers) + per-layer scale refit, and
 * per-layer beam search, until cfg->rel_tol or cfg->max_iters; J never
 * increases. out (n_layers) must be zeroed; afterwards every out[i].codebooks
 * holds an identical copy of the shared codebooks (so each layer stays
 * self-contained); the caller frees every out[i] (also on failure). stats
 * (may be NULL): rel_err* are J / sum_i alpha_i r_i, times are for the set.
 * With n_layers = 1 this is stage_aqlm_run. */
lv_status stage_aqlm_run_shared(int n_layers, const float *const *W, const float *const *H,
                                const int64_t *d_out, const int64_t *d_in,
                                const stage_aqlm_config *cfg, lv_aq_layer *out,
                                stage_aqlm_stats *stats);

/* As stage_aqlm_run_shared with explicit objective weights alpha_i = weight[i]
 * (n_layers, each finite and > 0); weight NULL = the default above. E.g.
 * weight[i] = d_in[i] / tr(H_i) weighs absolute errors with each H_i scaled
 * to unit mean diagonal. */
lv_status stage_aqlm_run_shared_weighted(int n_layers, const float *const *W,
                                         const float *const *H, const int64_t *d_out,
                                         const int64_t *d_in, const double *weight,
                                         const stage_aqlm_config *cfg, lv_aq_layer *out,
                                         stage_aqlm_stats *stats);

/* stage_aqlm_run_shared_weighted with the beam searches split over ranks:
 * item = layer index; each layer's codes are shared after every search. The
 * pooled init and the joint codebook updates run on every rank (identical). */
lv_status stage_aqlm_run_shared_dist(int n_layers, const float *const *W, const float *const *H,
                                     const int64_t *d_out, const int64_t *d_in,
                                     const double *weight, const stage_aqlm_config *cfg,
                                     const stage_dist *dist, lv_aq_layer *out,
                                     stage_aqlm_stats *stats);

/* The init of stage_aqlm_run_shared_weighted alone (pooled VQ, shared
 * codebooks; cfg->kmeans_iters, seed, M, nbits, g are used). Same ownership rules. */
lv_status stage_vq_run_shared(int n_layers, const float *const *W, const float *const *H,
                              const int64_t *d_out, const int64_t *d_in, const double *weight,
                              const stage_aqlm_config *cfg, lv_aq_layer *out);

/* Storage cost per weight of a set sharing one codebook tensor: (codes of all
 * layers + ONE copy of codebooks M*2^nbits*g*16 + scales 16 per row) / (all
 * weights). 0 when n < 1 or the layers differ in M, nbits or g. */
double stage_aqlm_bits_per_weight_shared(int n, const lv_aq_layer *layers);

/* ========================================================================
 * ApiQ / LoftQ-style LoRA initialisation (stages/apiq.c; arXiv 2402.05147).
 * The quantized weight What and low-rank adapters B (d_out, r), A (r, d_in)
 * are chosen together so that the linear's output on the calibration inputs
 * is preserved: minimise tr((W - What - B A) H (W - What - B A)^T), H = X^T X
 * the layer's calibration Hessian (any positive multiple). A (r, d_in) and
 * B (d_out, r) are float32 row-major, PEFT's lora_A / lora_B layout (the
 * adapted linear computes What x + B (A x), scaling 1).
 * Host memory, synchronous, not collective; deterministic for a fixed number
 * of OpenBLAS threads (no random numbers).
 * ====================================================================== */

/* Relative diagonal damping of H for the LoRA fit: H_d = H + lambda I with
 * lambda = STAGE_LORA_DAMP * mean(diag H). It makes H_d positive definite when
 * H is only PSD or singular (e.g. fewer calibration rows than d_in) and moves
 * the objective by at most that fraction. When the Cholesky factorisation of
 * H_d still fails, lambda is raised tenfold, at most up to 1e-2 * mean(diag H). */
#define STAGE_LORA_DAMP 1e-6

/* Closed-form best rank-r B A for a residual E (d_out, d_in) under the
 * H_d-metric: min over rank-r M of tr((E - M) H_d (E - M)^T). With H_d = L L^T,
 * M = [E L]_r L^-1 ([.]_r: truncated SVD, Eckart-Young); the SVD comes from an
 * eigen-decomposition of the smaller Gram matrix (E H_d E^T when d_out <= d_in,
 * needing no factor of H_d; else L^T E^T E L). The singular values are split
 * evenly: with [E L]_r = U S V^T, B = U S^1/2 and A = S^1/2 V^T L^-1, so both
 * factors have similar scale (as LoftQ/ApiQ initialise). Directions with zero
 * singular value get zero rows/columns. Eigenvector signs are fixed (largest
 * |entry| positive), so the result is deterministic. 1 <= r <= min(d_out, d_in).
 * A (r, d_in), B (d_out, r) caller-allocated outputs. *rel (may be NULL) =
 * tr((E - B A) H (E - B A)^T) / tr(E H E^T) with the undamped H (0 when E is 0
 * in the H-metric). */
lv_status stage_lora_fit(const float *E, const float *H, int64_t d_out, int64_t d_in, int r,
                         float *A, float *B, double *rel);

#define STAGE_APIQ_MAX_ITERS 16

typedef struct {
    int iters;            /* alternations run */
    int best_iter;        /* iterate kept (0: AQLM on W + LoRA fit to its residual) */
    double rel_err_q[STAGE_APIQ_MAX_ITERS];    /* What alone after step t: tr(dW H dW^T) / tr(W H W^T) */
    double rel_err_qlora[STAGE_APIQ_MAX_ITERS];/* What + B A after step t */
    double rel_err_aqlm;  /* rel_err_q[0]: plain AQLM (the baseline) */
    double rel_err_best;  /* What + B A of the kept iterate (<= rel_err_qlora[0]) */
    double aqlm_s, lora_s, wall_s; /* time in stage_aqlm_run, in stage_lora_fit, all */
} stage_apiq_stats;

/* Joint quantization + LoRA init of one layer W (d_out, d_in) with Hessian H
 * (d_in, d_in), rank r, by alternation (LoftQ/ApiQ): B A = 0; then `iters`
 * times (1..STAGE_APIQ_MAX_ITERS): What = stage_aqlm_run(W - B A, H, acfg),
 * B A = stage_lora_fit(W - What, H). Every step's What-alone and What + B A
 * errors are reported; the iterate with the lowest What + B A error is kept
 * (the first on ties), so the result is never worse than iteration 0, which is
 * plain AQLM plus the optimal LoRA of its residual. q must be zeroed; it gets
 * the kept quantized layer and the caller frees it (also on failure). A
 * (r, d_in), B (d_out, r) caller-allocated outputs. stats may be NULL. Same
 * inputs and acfg->seed give the same result. */
lv_status stage_apiq_layer(const float *W, const float *H, int64_t d_out, int64_t d_in, int r,
                           int iters, const stage_aqlm_config *acfg, lv_aq_layer *q, float *A,
                           float *B, stage_apiq_stats *stats);
/* ---------------- end of ApiQ ---------------- */

#endif
