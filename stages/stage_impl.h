/* stage_impl.h: private to stages/ (no public header includes it).
 *
 * stage_qprob is one layer-wise quantization problem with the input dimension
 * padded to a multiple of the group size g (the padding rule of
 * docs/quant-numerics.md): W (d_out, d_pad) with zero padded columns, H
 * (d_pad, d_pad) with zero padded rows and columns. When g divides d_in the
 * caller's arrays are borrowed, otherwise padded copies are owned. */
#ifndef STAGE_IMPL_H
#define STAGE_IMPL_H

#include <stdint.h>

#include "stage.h"

typedef struct {
    int64_t d_out, d_in, d_pad, n_groups;
    int g;
    const float *W; /* (d_out, d_pad) */
    const float *H; /* (d_pad, d_pad) */
    float *W_own;   /* owned padded copies (NULL when borrowed) */
    float *H_own;
} stage_qprob;

/* Validate shapes and build the padded problem. Free with stage_qprob_free. */
lv_status stage_qprob_init(stage_qprob *p, const float *W, const float *H, int64_t d_out,
                           int64_t d_in, int g);
void stage_qprob_free(stage_qprob *p);

/* Check that L matches p (shape and group size). */
lv_status stage_qprob_check_layer(const stage_qprob *p, const stage_aqlm_layer *L);

/* VQ init on a padded problem into an initialised layer L (M, nbits, g from L). */
lv_status stage_vq_init_prob(const stage_qprob *p, const stage_vq_config *cfg,
                             stage_aqlm_layer *L);

/* Per-row scales (scales (d_out)) = RMS of the padded rows; 1 for a zero row. */
void stage_vq_row_scales(const stage_qprob *p, float *scales);

/* Pooled VQ init of n problems into one codebook set: row scales of every
 * layer, then (residual) weighted k-means over the scaled sub-vectors of all
 * layers in layer order; layer i's coordinate weights are multiplied by
 * alpha[i] (NULL: 1). Codebooks (M, 2^nbits, g) go to C (may be
 * L[0].codebooks when n == 1); codes and scales to each L[i]. With n == 1 and
 * alpha 1 this is stage_vq_init_prob exactly. */
lv_status stage_vq_init_set(int n, const stage_qprob *p, const double *alpha,
                            const stage_vq_config *cfg, stage_aqlm_layer *L, float *C);

/* stage_vq_kmeans's full scan for tests: the nearest of the k centroids c
 * (k, g) to each point x (n, g) under the weights w (n, g) or NULL, ties to
 * the lowest index; idx, dist (n) as kern_kmeans_assign_ref, second (n) the
 * smallest distance over the other centroids. The float32 prefilter is used
 * where the CPU and the inputs allow it, with the same result. */
lv_status stage_vq_kmeans_scan(const float *x, const float *w, int64_t n, int g, const float *c,
                               int k, int32_t *idx, double *dist, double *second);

/* k-means++'s update for tests: mind (n) = min(mind, distance to c_j) for the
 * m centroids c (m, g) in turn, with the same prefilter. mind >= 0 on entry. */
lv_status stage_vq_kmeans_min_update(const float *x, const float *w, int64_t n, int g,
                                     const float *c, int m, double *mind);

/* ---------------------------------------------------------------- AQLM internals
 * (aqlm.c; aqlm_shared.c drives them for sets of layers sharing codebooks) */

enum {
    STAGE_AQ_NEED_ADAM = 1,  /* per-row scale Adam state (+ codebook state, see below) */
    STAGE_AQ_NEED_BEAM = 2,  /* beam-search scratch, one block per OpenMP thread */
    STAGE_AQ_NEED_LSTSQ = 4, /* dense normal equations (N, N) */
    STAGE_AQ_LAYER_ONLY = 8, /* skip codebook-sized buffers (bestC, gC/vC/vmC, A/b): a
                                shared set keeps one copy of those (stage_aq_set) */
};

/* Workspace of one layer, allocated once per public call. */
typedef struct {
    int64_t K, N;             /* codebook entries, codebook parameters M*K*g */
    float *Q, *E, *EH;        /* (d_out, d_pad): unscaled reconstruction, W - What, E H */
    double *rowdot;           /* (d_out) */
    double *gC, *vC, *vmC;    /* (N) codebook gradient and Adam moments */
    double *gS, *vS, *vmS;    /* (d_out) scale gradient and Adam moments */
    float *bestC, *bestS;     /* (N), (d_out) */
    double mean_s;            /* mean |scale| at the start of an Adam phase */
    double *cnorm;            /* (n_groups, M, K): c^T H_ii c */
    unsigned char *beam;      /* n_threads * beam_bytes */
    size_t beam_bytes;
    int n_threads, beam_size;
    double *A, *b;            /* (N, N), (N) */
} stage_aq_ws;

lv_status stage_aq_ws_init(stage_aq_ws *w, const stage_qprob *p, const stage_aqlm_layer *L,
                           int need, int beam_size);
void stage_aq_ws_free(stage_aq_ws *w);

/* Objective tr(E H E^T) of L; leaves Q, E = W - What and EH = E H in w. */
double stage_aq_eval(const stage_qprob *p, const stage_aqlm_layer *L, stage_aq_ws *w);
/* tr(W H W^T) (uses E/EH as scratch). */
double stage_aq_ref_norm(const stage_qprob *p, stage_aq_ws *w);
/* Closed-form per-row scales; never raises the layer's objective. */
lv_status stage_aq_update_scales(const stage_qprob *p, stage_aqlm_layer *L, stage_aq_ws *w);
/* Beam search over L->codes with codebooks and scales fixed (needs STAGE_AQ_NEED_BEAM). */
/* kern_beam_score_ref with the codebook transposed, cbT (g, K): bit-identical
 * scores (the same operations in the same order), vectorised over K. */
void stage_aq_beam_score(double *scores, const double *base, const double *u, const float *cbT,
                         const double *cnorm, double s, int nb, int64_t K, int g);

lv_status stage_aq_beam(const stage_qprob *p, stage_aqlm_layer *L, stage_aq_ws *w,
                        uint64_t seed, int64_t *n_candidates);
lv_status stage_aq_check_config(const stage_aqlm_config *cfg);

/* n layers sharing one codebook tensor C: the joint objective is
 * sum_i alpha[i] * tr(E_i H_i E_i^T). Every L[i].codebooks holds a copy of C
 * (or is C itself when n == 1). Codebook-sized state is kept once, here. */
typedef struct {
    int n;
    const stage_qprob *p;     /* (n) borrowed */
    stage_aqlm_layer *L;      /* (n) borrowed */
    stage_aq_ws *w;           /* (n) borrowed */
    const double *alpha;      /* (n) borrowed objective weights; NULL = all 1 */
    int64_t K, N;
    float *C;                 /* (N) borrowed: the codebooks (M, K, g) */
    double *gC, *vC, *vmC;    /* (N) borrowed: joint gradient, Adam moments */
    float *bestC;             /* (N) borrowed */
    double *A, *b;            /* (N, N), (N) borrowed; NULL unless LSTSQ */
    int64_t adam_t;           /* Adam step count, kept across alternations */
} stage_aq_set;

/* Joint objective (each w[i] is left holding layer i's Q/E/EH). */
double stage_aq_set_eval(stage_aq_set *s);
/* Copy C into every L[i].codebooks that is not C itself. */
void stage_aq_set_broadcast(const stage_aq_set *s);
/* Joint codebook update per cfg (Adam on C with per-layer scales, or least
 * squares with normal equations summed over layers, then per-layer scale
 * refit). Never raises the joint objective. */
lv_status stage_aq_set_update_codebooks(stage_aq_set *s, const stage_aqlm_config *cfg);

/* ---------------------------------------------------------------- fine-tuning
 * pieces (finetune.c) shared by the block and the shared-codebook trainers */

/* The config with zero fields replaced by their defaults (stage.h). */
stage_ft_config stage_ft_defaults(const stage_ft_config *in);
lv_status stage_ft_check(const stage_ft_config *c);
/* Held-out relative MSE sum (y - y_fp)^2 / sum y_fp^2 of block b over n_seq
 * sequences in micro-batches of up to bmax (ybuf (bmax, T, dim)); fixed order. */
lv_status stage_ft_eval_rel(stage_ft_ws *ws, const lv_qblock *b, const float *x,
                            const float *y_fp, int64_t n_seq, int T, int dim, int bmax,
                            float *ybuf, double *rel);
/* One Adam step (PyTorch's form, eps 1e-8) over n_seg segments; grad, m, v are
 * flat in segment order; t is the 1-based step number. */
void stage_ft_adam_step(float **seg, const int64_t *len, int n_seg, const float *grad, float *m,
                        float *v, int64_t t, const stage_ft_config *c);
/* Fisher-Yates shuffle of perm (n) with r. */
void stage_ft_shuffle(int64_t *perm, int64_t n, lv_rng *r);

#endif
