/* kern.h: compute kernels of llmvq. One interface, two implementations:
 *  - the CPU reference (kernels/cpu/, C11 + OpenMP + OpenBLAS): what tests check;
 *  - CUDA (kernels/cuda/, cuBLAS + own kernels) behind the same lv_backend table.
 *
 * Shapes are given as (B, T, C) etc.; all buffers are float32, row-major.
 * Activations of a calibration batch are (B, T, dim) = B sequences of T tokens,
 * positions 0..T-1 within each sequence. */
#ifndef KERN_H
#define KERN_H

#include <stddef.h>
#include <stdint.h>

#include "lv.h"
#include "lv_model.h"

/* ------------------------------------------------------------------------
 * CPU reference ops (kernels/cpu/). All are host pointers, synchronous.
 * ---------------------------------------------------------------------- */

/* out (n, d_out) = x (n, d_in) @ w^T, w (d_out, d_in): one cblas_sgemm. */
void kern_matmul_ref(float *out, const float *x, const float *w, int64_t n, int d_in,
                     int d_out);

/* out (n, dim) = x / sqrt(mean(x^2) + eps) * w, row by row. out may equal x. */
void kern_rmsnorm_ref(float *out, const float *x, const float *w, int64_t n, int dim,
                      float eps);

/* In-place RoPE on x (B, T, n_heads, head_dim); token t of each sequence has
 * position pos0 + t. style picks the pairing (see lv_rope_style). */
void kern_rope_ref(float *x, int B, int T, int n_heads, int head_dim, int pos0, float theta,
                   lv_rope_style style);

/* Causal attention with GQA, scale 1/sqrt(head_dim).
 * q (B, T, n_heads*hd), k, v (B, T, n_kv_heads*hd) -> out (B, T, n_heads*hd).
 * Query head h reads KV head h / (n_heads / n_kv_heads). out must not overlap q, k, v.
 * Tiles of 64 queries through sgemm, OpenMP over (tile, sequence, kv head).
 * att: scratch of at least kern_attention_scratch(T, n_heads, omp threads) floats. */
void kern_attention_ref(float *out, const float *q, const float *k, const float *v, int B,
                        int T, int n_heads, int n_kv_heads, int head_dim, float *att);
size_t kern_attention_scratch(int T, int n_heads, int n_threads);

/* out (n) = silu(gate) * up. out may equal gate. */
void kern_swiglu_ref(float *out, const float *gate, const float *up, int64_t n);

/* In-place softmax over each row of x (n, d). */
void kern_softmax_ref(float *x, int64_t n, int d);

/* Sum over rows of -log softmax(logits[i])[targets[i]], in double, for the rows
 * with targets[i] >= 0. logits (n, vocab). */
double kern_xent_sum_ref(const float *logits, const int32_t *targets, int64_t n, int vocab);

/* out (n, dim) = emb[tokens[i]] rows; emb (vocab, dim). Tokens must be valid. */
void kern_embed_ref(float *out, const float *emb, const int32_t *tokens, int64_t n, int dim);

/* ------------------------------------------------------------------------
 * Transformer forward (kernels/forward.c), GEMM-based over a whole batch.
 * ---------------------------------------------------------------------- */

typedef struct kern_fwd_ws kern_fwd_ws; /* workspace sized for (B, T), opaque */

/* Allocate a workspace for batches of up to B x T tokens of this config.
 * with_logits: also hold (B, T, vocab) logits. Caller frees. */
lv_status kern_fwd_ws_init(kern_fwd_ws **ws, const lv_model_config *cfg, int B, int T,
                           int with_logits);
void kern_fwd_ws_free(kern_fwd_ws *ws);

/* x (B, T, dim) <- block `layer` applied to x (positions 0..T-1 in each sequence). */
lv_status kern_block_forward(const lv_model *m, int layer, float *x, int B, int T,
                             kern_fwd_ws *ws);

/* The inputs of the block's linear layers, handed to a tap as they are computed
 * (calibration accumulates Hessians from them). */
typedef enum {
    KERN_TAP_ATTN_IN = 0, /* rmsnorm(x): input of wq, wk, wv   (B*T, dim) */
    KERN_TAP_WO_IN,       /* attention output: input of wo     (B*T, dim) */
    KERN_TAP_FFN_IN,      /* rmsnorm(x): input of w1, w3       (B*T, dim) */
    KERN_TAP_W2_IN,       /* silu(w1 x) * w3 x: input of w2    (B*T, hidden) */
} kern_tap;
/* x (n, d) is borrowed for the duration of the call. A non-OK return stops the
 * forward and is passed up. */
typedef lv_status (*kern_tap_fn)(void *user, kern_tap which, const float *x, int64_t n, int d);

/* kern_block_forward that also calls tap (when not NULL) with each linear input. */
lv_status kern_block_forward_tap(const lv_model *m, int layer, float *x, int B, int T,
                                 kern_fwd_ws *ws, kern_tap_fn tap, void *user);

/* Full forward: tokens (B, T) -> logits (B, T, vocab), returned as a borrowed
 * pointer into ws (valid until the next call). */
lv_status kern_model_forward(const lv_model *m, const int32_t *tokens, int B, int T,
                             kern_fwd_ws *ws, const float **logits);

/* ------------------------------------------------------------------------
 * Single-token decoding with a KV cache (generate).
 * ---------------------------------------------------------------------- */

typedef struct kern_kv_cache kern_kv_cache;
lv_status kern_kv_cache_init(kern_kv_cache **kv, const lv_model_config *cfg, int max_pos);
void kern_kv_cache_free(kern_kv_cache *kv);
/* Run token at position pos (0-based, < max_pos); logits (vocab) borrowed from kv. */
lv_status kern_decode_step(const lv_model *m, kern_kv_cache *kv, int32_t token, int pos,
                           const float **logits);

/* ------------------------------------------------------------------------
 * Backends (ggml style): an opaque handle over a table of function pointers.
 * An op a backend lacks is NULL; the dispatchers return LV_ERR_UNSUPPORTED.
 * ---------------------------------------------------------------------- */

typedef struct lv_backend lv_backend;

typedef struct {
    const char *name;
    lv_status (*alloc)(lv_backend *be, void **ptr, size_t bytes);
    void (*free)(lv_backend *be, void *ptr);
    lv_status (*h2d)(lv_backend *be, void *dst, const void *src, size_t bytes);
    lv_status (*d2h)(lv_backend *be, void *dst, const void *src, size_t bytes);
    lv_status (*sync)(lv_backend *be);
    /* Ops on backend memory, same semantics as the _ref functions above. */
    lv_status (*matmul)(lv_backend *be, float *out, const float *x, const float *w, int64_t n,
                        int d_in, int d_out);
    lv_status (*rmsnorm)(lv_backend *be, float *out, const float *x, const float *w, int64_t n,
                         int dim, float eps);
    lv_status (*rope)(lv_backend *be, float *x, int B, int T, int n_heads, int head_dim,
                      int pos0, float theta, lv_rope_style style);
    lv_status (*attention)(lv_backend *be, float *out, const float *q, const float *k,
                           const float *v, int B, int T, int n_heads, int n_kv_heads,
                           int head_dim);
    lv_status (*swiglu)(lv_backend *be, float *out, const float *gate, const float *up,
                        int64_t n);
    lv_status (*softmax)(lv_backend *be, float *x, int64_t n, int d);
    lv_status (*embed)(lv_backend *be, float *out, const float *emb, const int32_t *tokens,
                       int64_t n, int dim);
} lv_backend_ops;

struct lv_backend {
    const lv_backend_ops *ops;
    void *impl; /* backend-private state */
};

/* The CPU reference backend (always available; host memory). Caller frees. */
lv_status lv_backend_cpu_init(lv_backend **be);
/* The CUDA backend on device `device`. LV_ERR_UNSUPPORTED when the build has no
 * CUDA or the machine has no usable GPU (the message says which). */
lv_status lv_backend_cuda_init(lv_backend **be, int device);
/* Number of usable CUDA devices (0 without CUDA build, driver or GPU). */
int lv_cuda_device_count(void);
void lv_backend_free(lv_backend *be);

/* ========================================================================
 * Layer-wise quantization numerics (kernels/cpu/quant_ref.c): the hot loops of
 * the VQ init and AQLM stages (stages/vq.c, stages/aqlm.c). Host pointers,
 * synchronous; OpenMP inside where noted, results independent of thread count.
 * ====================================================================== */

/* H (d, d) double += X^T X for x (n, d) float; each H element summed over the
 * samples in order (deterministic). OpenMP over H rows. */
void kern_hessian_accum_ref(double *H, const float *x, int64_t n, int d);

/* Weighted k-means assignment: idx[i] = argmin_j sum_a w[i,a] (x[i,a] - c[j,a])^2,
 * ties to the lowest j; dist[i] (optional, may be NULL) = that minimum, in double.
 * x (n, g), w (n, g) or NULL for unit weights, c (k, g). OpenMP over i. */
void kern_kmeans_assign_ref(int32_t *idx, double *dist, const float *x, const float *w,
                            int64_t n, int g, const float *c, int k);

/* Beam-search candidate scores for one (input group, codebook) step of one row:
 * scores[b, k] = base[b] - 2 s <cb[k], u[b]> + s^2 cnorm[k], where u[b] (g) is the
 * H-weighted residual of beam b with this codebook's code removed and cnorm[k] =
 * cb[k]^T H_ii cb[k]. scores (nb, K), base (nb), u (nb, g), cb (K, g), cnorm (K).
 * Single-threaded (the caller parallelises over rows). */
void kern_beam_score_ref(double *scores, const double *base, const double *u, const float *cb,
                         const double *cnorm, double s, int nb, int K, int g);

/* Additive-codebook dequantization: out[r, i*g + a] = scales[r] * sum_m
 * codebooks[m, codes[r, i, m], a] for i*g + a < d_in (the last group is cut when
 * g does not divide d_in). out (d_out, d_in), codes (d_out, n_groups, M),
 * codebooks (M, K, g), scales (d_out) or NULL for 1. OpenMP over rows. */
void kern_aq_dequant_ref(float *out, const uint16_t *codes, const float *codebooks,
                         const float *scales, int64_t d_out, int64_t d_in, int64_t n_groups,
                         int M, int K, int g);

#endif
