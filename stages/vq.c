/* vq.c: VPTQ-style initialisation of a layer: Hessian-weighted k-means of the
 * weight sub-vectors (k-means++ seeding, Lloyd), importance from diag(H),
 * optional residual codebooks; plus the padded problem shared with aqlm.c.
 *
 * Sub-vectors are g consecutive inputs of one output row (the AQLM layout),
 * not VPTQ's column vectors, so the result seeds AQLM directly. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "stage_impl.h"

/* ---------------------------------------------------------------- problem */

lv_status stage_qprob_init(stage_qprob *p, const float *W, const float *H, int64_t d_out,
                           int64_t d_in, int g)
{
    lv_status st = LV_OK;
    memset(p, 0, sizeof *p);
    if (!W || !H) LV_FAIL(LV_ERR_INVALID_ARG, "quant: W and H are required");
    if (d_out <= 0 || d_in <= 0 || g <= 0 || g > 4096)
        LV_FAIL(LV_ERR_INVALID_ARG, "quant: bad shape d_out=%lld d_in=%lld g=%d",
                (long long)d_out, (long long)d_in, g);
    int64_t n_groups = (d_in + g - 1) / g;
    int64_t d_pad = n_groups * g;
    /* GEMMs take int sizes */
    if (d_pad > INT32_MAX / 2 || d_out > INT32_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "quant: layer too large (%lld x %lld)", (long long)d_out,
                (long long)d_in);
    p->d_out = d_out;
    p->d_in = d_in;
    p->d_pad = d_pad;
    p->n_groups = n_groups;
    p->g = g;
    if (d_pad == d_in) {
        p->W = W;
        p->H = H;
        return LV_OK;
    }
    LV_ALLOC(p->W_own, d_out * d_pad);
    LV_ALLOC(p->H_own, d_pad * d_pad);
    for (int64_t r = 0; r < d_out; r++)
        memcpy(p->W_own + r * d_pad, W + r * d_in, (size_t)d_in * sizeof(float));
    for (int64_t r = 0; r < d_in; r++)
        memcpy(p->H_own + r * d_pad, H + r * d_in, (size_t)d_in * sizeof(float));
    p->W = p->W_own;
    p->H = p->H_own;
done:
    if (st != LV_OK) stage_qprob_free(p);
    return st;
}

void stage_qprob_free(stage_qprob *p)
{
    if (!p) return;
    free(p->W_own);
    free(p->H_own);
    memset(p, 0, sizeof *p);
}

lv_status stage_qprob_check_layer(const stage_qprob *p, const stage_aqlm_layer *L)
{
    lv_status st = LV_OK;
    if (!L || !L->codes || !L->codebooks || !L->scales)
        LV_FAIL(LV_ERR_INVALID_ARG, "quant: layer is not initialised");
    if (L->d_out != p->d_out || L->d_in != p->d_in || L->g != p->g ||
        L->n_groups != p->n_groups)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "quant: layer is %lldx%lld g=%d but the problem is %lldx%lld g=%d",
                (long long)L->d_out, (long long)L->d_in, L->g, (long long)p->d_out,
                (long long)p->d_in, p->g);
done:
    return st;
}

/* ---------------------------------------------------------------- k-means */

static inline double wdist(const float *x, const float *w, const float *c, int g)
{
    double d = 0.0;
    for (int a = 0; a < g; a++) {
        double diff = (double)x[a] - (double)c[a];
        d += (w ? (double)w[a] : 1.0) * diff * diff;
    }
    return d;
}

static double rng_unit_double(lv_rng *rng)
{
    return (double)(lv_rng_u64(rng) >> 11) / 9007199254740992.0; /* [0, 1), 53 bits */
}

/* mind[i] = min(mind[i], wdist(point i, c)) for every point, wdist's
 * arithmetic per point (vectorised across points: the same operations per
 * point in the same order, hence the same bits). */
static inline __attribute__((always_inline)) void km_min_body(const float *x, const float *w,
                                                             int64_t i0, int64_t i1, int g,
                                                             const float *c, double *mind)
{
#pragma omp simd
    for (int64_t i = i0; i < i1; i++) {
        const double d = wdist(x + i * g, w ? w + i * g : NULL, c, g);
        if (d < mind[i]) mind[i] = d;
    }
}

static void km_min_range(const float *x, const float *w, int64_t i0, int64_t i1, int g,
                         const float *c, double *mind)
{
    km_min_body(x, w, i0, i1, g, c, mind);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void km_min_range_avx2(const float *x, const float *w,
                                                              int64_t i0, int64_t i1, int g,
                                                              const float *c, double *mind)
{
    km_min_body(x, w, i0, i1, g, c, mind);
}
#endif

static void km_min_update(const float *x, const float *w, int64_t n, int g, const float *c,
                          double *mind)
{
    void (*fn)(const float *, const float *, int64_t, int64_t, int, const float *, double *) =
        km_min_range;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) fn = km_min_range_avx2;
#endif
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += chunk) fn(x, w, i0, i0 + chunk < n ? i0 + chunk : n, g, c, mind);
}

/* k-means++: first centroid uniform, then D^2 sampling under the weighted
 * distance. mind (n) is scratch. When n <= k every point becomes a centroid
 * (the rest repeat points cyclically), which is already optimal. */
static void kmeanspp_seed(const float *x, const float *w, int64_t n, int g, int k,
                          float *c, double *mind, lv_rng *rng)
{
    if (n <= k) {
        for (int j = 0; j < k; j++)
            memcpy(c + (int64_t)j * g, x + (j % n) * g, (size_t)g * sizeof(float));
        return;
    }
    int64_t first = (int64_t)(rng_unit_double(rng) * (double)n);
    memcpy(c, x + first * g, (size_t)g * sizeof(float));
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) mind[i] = wdist(x + i * g, w ? w + i * g : NULL, c, g);
    for (int j = 1; j < k; j++) {
        double total = 0.0;
        for (int64_t i = 0; i < n; i++) total += mind[i]; /* serial: fixed order */
        int64_t pick;
        if (total > 0.0) {
            double target = rng_unit_double(rng) * total, acc = 0.0;
            pick = n - 1;
            for (int64_t i = 0; i < n; i++) {
                acc += mind[i];
                if (acc > target && mind[i] > 0.0) {
                    pick = i;
                    break;
                }
            }
        } else {
            pick = (int64_t)(rng_unit_double(rng) * (double)n);
        }
        float *cj = c + (int64_t)j * g;
        memcpy(cj, x + pick * g, (size_t)g * sizeof(float));
        km_min_update(x, w, n, g, cj, mind);
    }
}

/* Weighted mean per coordinate of each cluster; a coordinate with no weight
 * (empty cluster, zero Hessian diagonal) keeps its value, so the objective
 * cannot rise. num, den: (k, g) double scratch. Serial: fixed summation order. */
static void kmeans_update(const float *x, const float *w, int64_t n, int g, int k,
                          const int32_t *idx, float *c, double *num, double *den)
{
    memset(num, 0, (size_t)k * g * sizeof(double));
    memset(den, 0, (size_t)k * g * sizeof(double));
    for (int64_t i = 0; i < n; i++) {
        double *nj = num + (int64_t)idx[i] * g, *dj = den + (int64_t)idx[i] * g;
        for (int a = 0; a < g; a++) {
            double wa = w ? (double)w[i * g + a] : 1.0;
            nj[a] += wa * (double)x[i * g + a];
            dj[a] += wa;
        }
    }
    for (int64_t t = 0; t < (int64_t)k * g; t++)
        if (den[t] > 0.0) c[t] = (float)(num[t] / den[t]);
}

static double sum_serial(const double *v, int64_t n)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    return s;
}

/* Relative safety margin of the bound test below: far above the rounding of
 * the double distances (~g * 2^-53) and of the square roots. */
#define KM_MARGIN 1e-9

/* Distances from one point to every centroid, d[j] for j < k, with
 * kern_kmeans_assign_ref's arithmetic per (point, centroid): the terms
 * (w_a * diff) * diff added in order of the coordinate a, starting from 0.0.
 * The loop runs over j for each a (centroids transposed: ct (g, k) double),
 * so it vectorises across centroids with the same operations per centroid,
 * hence the same bits; no FMA (the build's C11 mode contracts nothing). */
static inline __attribute__((always_inline)) void km_dists_body(const float *xi, const float *wi,
                                                               int g, const double *ct, int k,
                                                               double *d)
{
    for (int j = 0; j < k; j++) d[j] = 0.0;
    for (int a = 0; a < g; a++) {
        const double xa = (double)xi[a], wa = wi ? (double)wi[a] : 1.0;
        const double *ca = ct + (int64_t)a * k;
#pragma omp simd
        for (int j = 0; j < k; j++) {
            const double diff = xa - ca[j];
            d[j] += wa * diff * diff;
        }
    }
}

static void km_dists(const float *xi, const float *wi, int g, const double *ct, int k, double *d)
{
    km_dists_body(xi, wi, g, ct, k, d);
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void km_dists_avx2(const float *xi, const float *wi, int g,
                                                          const double *ct, int k, double *d)
{
    km_dists_body(xi, wi, g, ct, k, d);
}
#endif

typedef void (*km_dists_fn)(const float *, const float *, int, const double *, int, double *);

static km_dists_fn km_dists_pick(void)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) return km_dists_avx2;
#endif
    return km_dists;
}

/* One point against every centroid: nearest index (ties to the lowest), its
 * distance, and the second smallest distance over the other indices (== best
 * on a tie). d (k) is scratch. */
static void km_scan(km_dists_fn fn, const float *xi, const float *wi, int g, const double *ct,
                    int k, double *d, int32_t *arg, double *best, double *second)
{
    fn(xi, wi, g, ct, k, d);
    double b = DBL_MAX, s2 = DBL_MAX;
    int32_t a = 0;
    for (int j = 0; j < k; j++) {
        const double dj = d[j];
        if (dj < b) {
            s2 = b;
            b = dj;
            a = j;
        } else if (dj < s2) {
            s2 = dj;
        }
    }
    *arg = a;
    *best = b;
    *second = s2;
}

/* The exact Lloyd assignment (kern_kmeans_assign_ref's idx and dist, bit for
 * bit) with Hamerly's bound: lb[i] is a lower bound on the weighted distance
 * (square-root domain) from point i to every centroid but idx[i]. A centroid
 * that moved by shift[j] (L2) moves by at most sw[i] * shift[j] in point i's
 * metric (sw[i] = sqrt(max_a w[i,a])), so lb[i] drops by that much for the
 * largest move among the other centroids. When the distance to the old
 * centroid (recomputed exactly) is below the bound, with a relative margin
 * KM_MARGIN on both sides, that centroid is still the strict nearest one in
 * exact arithmetic and in the reference's rounded distances alike, and the
 * scan over all k centroids is skipped; otherwise the point is scanned in
 * full. full = 1: scan every point (the first assignment). */
static void km_assign(const float *x, const float *w, int64_t n, int g, const float *c, int k,
                         const double *shift, const double *sw, int full, int32_t *idx,
                         double *dist, double *lb, double *ct, double *scratch)
{
    const km_dists_fn fn = km_dists_pick();
    for (int j = 0; j < k; j++)
        for (int a = 0; a < g; a++) ct[(int64_t)a * k + j] = (double)c[(int64_t)j * g + a];
    double m1 = 0.0, m2 = 0.0;
    int j1 = -1;
    for (int j = 0; !full && j < k; j++) {
        if (shift[j] > m1) {
            m2 = m1;
            m1 = shift[j];
            j1 = j;
        } else if (shift[j] > m2) {
            m2 = shift[j];
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * g, *wi = w ? w + i * g : NULL;
        double *dk = scratch + (int64_t)omp_get_thread_num() * k;
        if (!full) {
            const double other = idx[i] == j1 ? m2 : m1;
            const double l = lb[i] - sw[i] * other * (1.0 + KM_MARGIN);
            const double di = wdist(xi, wi, c + (int64_t)idx[i] * g, g);
            if (sqrt(di) * (1.0 + KM_MARGIN) < l * (1.0 - KM_MARGIN)) {
                dist[i] = di;
                lb[i] = l;
                continue;
            }
        }
        double second = 0.0;
        km_scan(fn, xi, wi, g, ct, k, dk, &idx[i], &dist[i], &second);
        lb[i] = sqrt(second);
    }
}

lv_status stage_vq_kmeans(const float *x, const float *w, int64_t n, int g,
                          const stage_vq_kmeans_config *cfg, float *centroids, int32_t *idx,
                          double *hist, int *n_hist)
{
    lv_status st = LV_OK;
    double *dist = NULL, *num = NULL, *den = NULL, *lb = NULL, *sw = NULL, *shift = NULL;
    double *ct = NULL, *scratch = NULL;
    float *cold = NULL;
    if (!x || !cfg || !centroids || !idx || n <= 0 || g <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "kmeans: bad arguments (n=%lld g=%d)", (long long)n, g);
    if (cfg->k <= 0 || cfg->max_iters < 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "kmeans: k=%d max_iters=%d", cfg->k, cfg->max_iters);
    const int k = cfg->k;
    LV_ALLOC(dist, n);
    LV_ALLOC(lb, n);
    LV_ALLOC(sw, n);
    LV_ALLOC(num, (int64_t)k * g);
    LV_ALLOC(den, (int64_t)k * g);
    LV_ALLOC(shift, k);
    LV_ALLOC(cold, (int64_t)k * g);
    LV_ALLOC(ct, (int64_t)k * g);
    LV_ALLOC(scratch, (int64_t)k * omp_get_max_threads());
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        double m = 0.0;
        for (int a = 0; a < g; a++) {
            double wa = w ? (double)w[i * g + a] : 1.0;
            if (wa > m) m = wa;
        }
        sw[i] = sqrt(m);
    }
    lv_rng rng;
    lv_rng_seed(&rng, cfg->seed);
    kmeanspp_seed(x, w, n, g, k, centroids, dist, &rng);
    km_assign(x, w, n, g, centroids, k, NULL, sw, 1, idx, dist, lb, ct, scratch);
    double obj = sum_serial(dist, n);
    int nh = 0;
    if (hist) hist[nh] = obj;
    nh++;
    for (int it = 0; it < cfg->max_iters; it++) {
        memcpy(cold, centroids, sizeof(float) * (size_t)k * (size_t)g);
        kmeans_update(x, w, n, g, k, idx, centroids, num, den);
        for (int j = 0; j < k; j++) {
            double ss = 0.0;
            for (int a = 0; a < g; a++) {
                double dd = (double)centroids[(int64_t)j * g + a] - (double)cold[(int64_t)j * g + a];
                ss += dd * dd;
            }
            shift[j] = sqrt(ss);
        }
        km_assign(x, w, n, g, centroids, k, shift, sw, 0, idx, dist, lb, ct, scratch);
        double prev = obj;
        obj = sum_serial(dist, n);
        if (hist) hist[nh] = obj;
        nh++;
        if (!isfinite(obj)) LV_FAIL(LV_ERR_NUMERIC, "kmeans: objective is %g", obj);
        if (cfg->tol > 0.0 && (prev - obj) <= cfg->tol * prev) break;
    }
    if (n_hist) *n_hist = nh;
done:
    free(scratch);
    free(ct);
    free(cold);
    free(shift);
    free(sw);
    free(lb);
    free(den);
    free(num);
    free(dist);
    return st;
}

/* ---------------------------------------------------------------- VQ init */

/* Per-row scale = RMS of the padded row (so that a problem padded by the caller
 * gives the same result as one padded here); 1 for an all-zero row. */
void stage_vq_row_scales(const stage_qprob *p, float *scales)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p->d_out; r++) {
        const float *wr = p->W + r * p->d_pad; // (d_pad)
        double ss = 0.0;
        for (int64_t j = 0; j < p->d_pad; j++) ss += (double)wr[j] * wr[j];
        double rms = sqrt(ss / (double)p->d_pad);
        scales[r] = rms > 0.0 ? (float)rms : 1.0f;
    }
}

/* Points x = W / s_r and coordinate weights a * diag(H) * s_r^2 of one layer,
 * (d_out * n_groups, g) each, at x / wt. */
static void vq_points(const stage_qprob *p, const float *scales, int use_hessian, double a,
                      float *x, float *wt)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p->d_out; r++) {
        const float s = scales[r];
        for (int64_t j = 0; j < p->d_pad; j++) {
            x[r * p->d_pad + j] = p->W[r * p->d_pad + j] / s;
            double h = use_hessian ? (double)p->H[j * p->d_pad + j] : 1.0;
            if (j >= p->d_in || !(h > 0.0)) h = 0.0; /* padding and dead inputs weigh 0 */
            wt[r * p->d_pad + j] = (float)(a * h * (double)s * (double)s);
        }
    }
}

lv_status stage_vq_init_set(int n, const stage_qprob *p, const double *alpha,
                            const stage_vq_config *cfg, stage_aqlm_layer *L, float *C)
{
    lv_status st = LV_OK;
    float *x = NULL, *wt = NULL;
    int32_t *idx = NULL;
    int64_t n_pts = 0;
    if (n < 1 || !p || !cfg || !L || !C) LV_FAIL(LV_ERR_INVALID_ARG, "vq: bad set arguments");
    for (int i = 0; i < n; i++) {
        LV_TRY(stage_qprob_check_layer(&p[i], &L[i]));
        if (L[i].M != L[0].M || L[i].nbits != L[0].nbits || L[i].g != L[0].g)
            LV_FAIL(LV_ERR_INVALID_ARG, "vq: layers of a shared set differ in M/nbits/g");
        n_pts += p[i].d_out * p[i].n_groups;
    }
    const int g = L[0].g, M = L[0].M, K = 1 << L[0].nbits;
    LV_ALLOC(x, n_pts * g);   // (n_pts, g) residual of the scaled weight vectors
    LV_ALLOC(wt, n_pts * g);  // (n_pts, g) coordinate weights
    LV_ALLOC(idx, n_pts);
    int64_t off = 0;
    for (int i = 0; i < n; i++) {
        stage_vq_row_scales(&p[i], L[i].scales);
        vq_points(&p[i], L[i].scales, cfg->use_hessian, alpha ? alpha[i] : 1.0, x + off * g,
                  wt + off * g);
        off += p[i].d_out * p[i].n_groups;
    }
    stage_vq_kmeans_config kc = {
        .k = K, .max_iters = cfg->kmeans_iters > 0 ? cfg->kmeans_iters : 20, .tol = 1e-6};
    for (int m = 0; m < M; m++) {
        float *cb = C + (int64_t)m * K * g; // (K, g)
        kc.seed = cfg->seed * 0x9E3779B97F4A7C15ull + (uint64_t)m + 1;
        LV_TRY(stage_vq_kmeans(x, wt, n_pts, g, &kc, cb, idx, NULL, NULL));
        off = 0;
        for (int i = 0; i < n; i++) {
            const int64_t nv = p[i].d_out * p[i].n_groups;
            uint16_t *codes = L[i].codes;
#pragma omp parallel for schedule(static)
            for (int64_t v = 0; v < nv; v++) {
                const int64_t gv = off + v;
                codes[v * M + m] = (uint16_t)idx[gv];
                const float *c = cb + (int64_t)idx[gv] * g;
                for (int a = 0; a < g; a++) x[gv * g + a] -= c[a];
            }
            off += nv;
        }
    }
done:
    free(idx);
    free(wt);
    free(x);
    return st;
}

lv_status stage_vq_init_prob(const stage_qprob *p, const stage_vq_config *cfg,
                             stage_aqlm_layer *L)
{
    lv_status st = LV_OK;
    if (!L || !L->codebooks) LV_FAIL(LV_ERR_INVALID_ARG, "quant: layer is not initialised");
    LV_TRY(stage_vq_init_set(1, p, NULL, cfg, L, L->codebooks));
done:
    return st;
}

lv_status stage_vq_run(const float *W, const float *H, int64_t d_out, int64_t d_in,
                       const stage_vq_config *cfg, stage_aqlm_layer *out)
{
    lv_status st = LV_OK;
    stage_qprob p = {0};
    if (!cfg || !out) LV_FAIL(LV_ERR_INVALID_ARG, "vq: cfg and out are required");
    LV_TRY(stage_qprob_init(&p, W, H, d_out, d_in, cfg->group_size));
    LV_TRY(lv_aq_layer_init(out, d_out, d_in, cfg->n_codebooks, cfg->nbits,
                                 cfg->group_size));
    LV_TRY(stage_vq_init_prob(&p, cfg, out));
done:
    stage_qprob_free(&p);
    return st;
}
