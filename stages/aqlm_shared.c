/* aqlm_shared.c: AQLM on a set of layers that share one codebook tensor, each
 * with its own codes and per-row scales (stage.h, docs/quant-numerics.md
 * "Shared codebooks"). stage_aqlm_run is the set of one.
 *
 * The pieces are aqlm.c's (per-layer workspaces, beam search, scale refit) and
 * vq.c's (k-means), joined through stage_impl.h: the codebook-sized state
 * (codebooks, Adam moments, normal equations) exists once for the set, and
 * every layer's objective enters the joint one with its weight alpha_i. */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "stage_impl.h"

/* Beam-search order seeds: per alternation (as before sharing) and per layer,
 * layer 0 taking the alternation's seed unchanged. */
#define SH_ITER_SEED 0x5851F42D4C957F2Dull
#define SH_LAYER_SEED 0x9E3779B97F4A7C15ull

typedef struct {
    int n;
    stage_qprob *p;           /* (n) */
    stage_aq_ws *w;           /* (n) */
    double *ref;              /* (n) tr(W_i H_i W_i^T) */
    double *alpha;            /* (n) objective weights */
    double jref;              /* sum_i alpha_i ref_i: J / jref is the reported error */
    float *C, *bestC;         /* (N) shared codebooks, best copy */
    double *gC, *vC, *vmC;    /* (N) joint Adam state; NULL unless Adam */
    double *A, *b;            /* (N, N), (N); NULL unless least squares */
    stage_aq_set set;
} sh_ctx;

static void sh_free(sh_ctx *c)
{
    for (int i = 0; c->p && i < c->n; i++) stage_qprob_free(&c->p[i]);
    for (int i = 0; c->w && i < c->n; i++) stage_aq_ws_free(&c->w[i]);
    void *ptrs[] = {c->p,     c->w,  c->ref, c->alpha, c->C, c->bestC,
                    c->gC,    c->vC, c->vmC, c->A,     c->b};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) free(ptrs[i]);
    memset(c, 0, sizeof *c);
}

/* Objective weights: the caller's, or mean(ref) / ref_i (exactly 1 for n = 1). */
static lv_status sh_weights(sh_ctx *c, const double *weight)
{
    lv_status st = LV_OK;
    double mean_ref = 0.0;
    for (int i = 0; i < c->n; i++) {
        c->ref[i] = stage_aq_ref_norm(&c->p[i], &c->w[i]);
        if (!(c->ref[i] > 0.0) || !isfinite(c->ref[i]))
            LV_FAIL(LV_ERR_NUMERIC, "aqlm: layer %d of %d: tr(W H W^T) = %g is not positive", i,
                    c->n, c->ref[i]);
        mean_ref += c->ref[i];
    }
    mean_ref /= (double)c->n;
    c->jref = 0.0;
    for (int i = 0; i < c->n; i++) {
        if (weight && !(weight[i] > 0.0 && isfinite(weight[i])))
            LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: weight[%d] = %g must be finite and > 0", i,
                    weight[i]);
        c->alpha[i] = weight ? weight[i] : mean_ref / c->ref[i];
        c->jref += c->alpha[i] * c->ref[i];
    }
done:
    return st;
}

/* Validate, pad every problem, initialise out[i] and the workspaces (need:
 * STAGE_AQ_NEED_* for the per-layer part), weights, and the shared state. */
static lv_status sh_init(sh_ctx *c, int n, const float *const *W, const float *const *H,
                         const int64_t *d_out, const int64_t *d_in, const double *weight,
                         const stage_aqlm_config *cfg, lv_aq_layer *out, int need, int beam)
{
    lv_status st = LV_OK;
    memset(c, 0, sizeof *c);
    LV_TRY(stage_aq_check_config(cfg));
    if (n < 1 || !W || !H || !d_out || !d_in || !out)
        LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: shared set needs n_layers >= 1 (have %d), W, H, "
                "d_out, d_in and out", n);
    const int M = cfg->n_codebooks, g = cfg->group_size;
    c->n = n;
    LV_ALLOC(c->p, n);
    LV_ALLOC(c->w, n);
    LV_ALLOC(c->ref, n);
    LV_ALLOC(c->alpha, n);
    for (int i = 0; i < n; i++) {
        LV_TRY(stage_qprob_init(&c->p[i], W[i], H[i], d_out[i], d_in[i], g));
        LV_TRY(lv_aq_layer_init(&out[i], d_out[i], d_in[i], M, cfg->nbits, g));
        LV_TRY(stage_aq_ws_init(&c->w[i], &c->p[i], &out[i], need | STAGE_AQ_LAYER_ONLY, beam));
    }
    LV_TRY(sh_weights(c, weight));
    const int64_t N = c->w[0].N;
    LV_ALLOC(c->C, N);
    LV_ALLOC(c->bestC, N);
    if (need & STAGE_AQ_NEED_ADAM) {
        LV_ALLOC(c->gC, N);
        LV_ALLOC(c->vC, N);
        LV_ALLOC(c->vmC, N);
    }
    if (need & STAGE_AQ_NEED_LSTSQ) { /* the size limit was checked by stage_aq_ws_init */
        LV_ALLOC(c->A, N * N);
        LV_ALLOC(c->b, N);
    }
    c->set = (stage_aq_set){.n = n, .p = c->p, .L = out, .w = c->w, .alpha = c->alpha,
                            .K = c->w[0].K, .N = N, .C = c->C, .gC = c->gC, .vC = c->vC,
                            .vmC = c->vmC, .bestC = c->bestC, .A = c->A, .b = c->b};
done:
    return st;
}

/* Pooled VQ init of every layer into the shared codebooks. */
static lv_status sh_vq_init(sh_ctx *c, const stage_aqlm_config *cfg, lv_aq_layer *out)
{
    lv_status st = LV_OK;
    const stage_vq_config vc = {.n_codebooks = cfg->n_codebooks, .nbits = cfg->nbits,
                                .group_size = cfg->group_size,
                                .kmeans_iters = cfg->kmeans_iters, .use_hessian = 1,
                                .seed = cfg->seed};
    LV_TRY(stage_vq_init_set(c->n, c->p, c->alpha, &vc, out, c->C));
    stage_aq_set_broadcast(&c->set);
done:
    return st;
}

static void sh_log(const sh_ctx *c, const stage_aqlm_config *cfg, int it, double cur)
{
    if (c->n == 1)
        lv_log("aqlm %lldx%lld %dx%dg%d: iter %d rel err %.6f", (long long)c->p[0].d_out,
               (long long)c->p[0].d_in, cfg->n_codebooks, cfg->nbits, cfg->group_size, it, cur);
    else
        lv_log("aqlm shared by %d layers %dx%dg%d: iter %d mean rel err %.6f", c->n,
               cfg->n_codebooks, cfg->nbits, cfg->group_size, it, cur);
}

/* Alternate joint codebook update (+ scales) and per-layer beam search. */
static lv_status sh_alternate(sh_ctx *c, const stage_aqlm_config *cfg, int iters,
                              const stage_dist *dist, stage_aqlm_stats *sx)
{
    lv_status st = LV_OK;
    double prev = stage_aq_set_eval(&c->set) / c->jref, t1;
    sx->rel_err_init = prev;
    for (int it = 0; it < iters; it++) {
        t1 = lv_now();
        LV_TRY(stage_aq_set_update_codebooks(&c->set, cfg));
        sx->update_s += lv_now() - t1;
        t1 = lv_now();
        const uint64_t seed = cfg->seed + SH_ITER_SEED * (uint64_t)(it + 1);
        for (int i = 0; i < c->n; i++)
            if (!dist || !dist->owns || dist->owns(dist->user, i))
                LV_TRY(stage_aq_beam(&c->p[i], &c->set.L[i], &c->w[i],
                                     seed + SH_LAYER_SEED * (uint64_t)i, &sx->n_candidates));
        if (dist && dist->owns)
            for (int i = 0; i < c->n; i++) {
                const lv_aq_layer *L = &c->set.L[i];
                LV_TRY(dist->share(dist->user, i, L->codes,
                                   sizeof(uint16_t) * (size_t)(L->d_out * L->n_groups * L->M)));
            }
        sx->beam_s += lv_now() - t1;
        double cur = stage_aq_set_eval(&c->set) / c->jref;
        if (it < STAGE_AQLM_MAX_HIST) sx->rel_err[it] = cur;
        sx->iters = it + 1;
        if (cfg->verbose) sh_log(c, cfg, it + 1, cur);
        if (!isfinite(cur)) LV_FAIL(LV_ERR_NUMERIC, "aqlm: objective became %g", cur);
        int stop = prev > 0.0 && (prev - cur) < cfg->rel_tol * prev;
        prev = cur;
        if (stop || cur == 0.0) break;
    }
done:
    return st;
}

lv_status stage_aqlm_run_shared_dist(int n_layers, const float *const *W, const float *const *H,
                                     const int64_t *d_out, const int64_t *d_in,
                                     const double *weight, const stage_aqlm_config *cfg,
                                     const stage_dist *dist, lv_aq_layer *out,
                                     stage_aqlm_stats *stats)
{
    lv_status st = LV_OK;
    sh_ctx c = {0};
    stage_aqlm_stats sx = {0};
    double t0 = lv_now();
    LV_TRY(stage_aq_check_config(cfg));
    const int beam = cfg->beam_size > 0 ? cfg->beam_size : 8;
    const int iters = cfg->max_iters > 0 ? cfg->max_iters : 10;
    const int need = STAGE_AQ_NEED_BEAM | (cfg->codebook_update == STAGE_AQLM_LSTSQ
                                               ? STAGE_AQ_NEED_LSTSQ : STAGE_AQ_NEED_ADAM);
    LV_TRY(sh_init(&c, n_layers, W, H, d_out, d_in, weight, cfg, out, need, beam));
    LV_TRY(sh_vq_init(&c, cfg, out));
    sx.init_s = lv_now() - t0;
    LV_TRY(sh_alternate(&c, cfg, iters, dist, &sx));
    sx.wall_s = lv_now() - t0;
    if (stats) *stats = sx;
done:
    sh_free(&c);
    return st;
}

lv_status stage_aqlm_run_shared_weighted(int n_layers, const float *const *W,
                                         const float *const *H, const int64_t *d_out,
                                         const int64_t *d_in, const double *weight,
                                         const stage_aqlm_config *cfg, lv_aq_layer *out,
                                         stage_aqlm_stats *stats)
{
    return stage_aqlm_run_shared_dist(n_layers, W, H, d_out, d_in, weight, cfg, NULL, out,
                                      stats);
}

lv_status stage_aqlm_run_shared(int n_layers, const float *const *W, const float *const *H,
                                const int64_t *d_out, const int64_t *d_in,
                                const stage_aqlm_config *cfg, lv_aq_layer *out,
                                stage_aqlm_stats *stats)
{
    return stage_aqlm_run_shared_weighted(n_layers, W, H, d_out, d_in, NULL, cfg, out, stats);
}

lv_status stage_vq_run_shared(int n_layers, const float *const *W, const float *const *H,
                              const int64_t *d_out, const int64_t *d_in, const double *weight,
                              const stage_aqlm_config *cfg, lv_aq_layer *out)
{
    lv_status st = LV_OK;
    sh_ctx c = {0};
    LV_TRY(sh_init(&c, n_layers, W, H, d_out, d_in, weight, cfg, out, 0, 0));
    LV_TRY(sh_vq_init(&c, cfg, out));
done:
    sh_free(&c);
    return st;
}

double stage_aqlm_bits_per_weight_shared(int n, const lv_aq_layer *layers)
{
    if (n < 1 || !layers) return 0.0;
    const lv_aq_layer *L0 = &layers[0];
    double bits = (double)L0->M * (double)((int64_t)1 << L0->nbits) * L0->g * 16.0;
    double weights = 0.0;
    for (int i = 0; i < n; i++) {
        const lv_aq_layer *L = &layers[i];
        if (L->M != L0->M || L->nbits != L0->nbits || L->g != L0->g) return 0.0;
        bits += (double)L->d_out * (double)L->n_groups * L->M * L->nbits; /* codes */
        bits += (double)L->d_out * 16.0 + lv_aq_outliers_bits(L);         /* scales, outliers */
        weights += (double)L->d_out * (double)L->d_in;
    }
    return weights > 0.0 ? bits / weights : 0.0;
}
