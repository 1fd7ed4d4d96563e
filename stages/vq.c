/* vq.c: VPTQ-style initialisation of a layer: Hessian-weighted k-means of the
 * weight sub-vectors (k-means++ seeding, Lloyd), importance from diag(H),
 * optional residual codebooks; plus the padded problem shared with aqlm.c.
 *
 * Sub-vectors are g consecutive inputs of one output row (the AQLM layout),
 * not VPTQ's column vectors, so the result seeds AQLM directly. */
#include <float.h>
#include <math.h>
#include <stdint.h>
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

static void km_min_range_f32(const float *x, const float *w, int64_t i0, int64_t i1, int g,
                             const float *c, double *mind, float *mthr);
static void km_mthr_set(int g, const double *mind, int64_t i0, int64_t i1, float *mthr);

/* mthr (n): NULL, or the float32 prefilter's thresholds (km_mthr_set) kept in
 * step with mind; then km_min_range_f32 does the update, with the same result. */
static void km_min_update(const float *x, const float *w, int64_t n, int g, const float *c,
                          double *mind, float *mthr)
{
    void (*fn)(const float *, const float *, int64_t, int64_t, int, const float *, double *) =
        km_min_range;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) fn = km_min_range_avx2;
#endif
    const int64_t chunk = 4096;
#pragma omp parallel for schedule(static)
    for (int64_t i0 = 0; i0 < n; i0 += chunk) {
        const int64_t i1 = i0 + chunk < n ? i0 + chunk : n;
        if (mthr)
            km_min_range_f32(x, w, i0, i1, g, c, mind, mthr);
        else
            fn(x, w, i0, i1, g, c, mind);
    }
}

/* k-means++: first centroid uniform, then D^2 sampling under the weighted
 * distance. mind (n) is scratch; mthr (n) is NULL or scratch for the float32
 * prefilter of the D^2 updates (km_min_range_f32). When n <= k every point becomes a centroid
 * (the rest repeat points cyclically), which is already optimal. */
static void kmeanspp_seed(const float *x, const float *w, int64_t n, int g, int k,
                          float *c, double *mind, float *mthr, lv_rng *rng)
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
    if (mthr) km_mthr_set(g, mind, 0, n, mthr);
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
        km_min_update(x, w, n, g, cj, mind, mthr);
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

/* ------------------------------------------- float32 prefilter of a scan */

/* Inputs for which the float32 prefilter below is sound: finite coordinates
 * of magnitude <= KM_F32_MAXV and weights in [0, KM_F32_MAXV], so that no
 * float term or sum can overflow (each term <= 2^30 * 2^62) and every term is
 * nonnegative, which the relative error bound needs. Anything else takes the
 * exact scan of every centroid. */
#define KM_F32_MAXV 1073741824.0 /* 2^30 */

static int km_f32_ok_values(const float *v, int64_t n, int nonneg)
{
    int ok = 1;
#pragma omp parallel for schedule(static) reduction(&& : ok)
    for (int64_t i = 0; i < n; i++) {
        const double a = (double)v[i];
        ok = ok && (nonneg ? (a >= 0.0 && a <= KM_F32_MAXV) : fabs(a) <= KM_F32_MAXV);
    }
    return ok;
}

/* Error bound of the float32 distances f_j against the double ones d_j, the
 * decision values: both approximate the exact sum S_j of g nonnegative terms
 * w_a (x_a - c_a)^2 from float inputs (exact in either format). Each term
 * suffers at most 3 roundings (diff, product, fused or plain add) and the sum
 * at most g - 1 more, in any order, so |f - S| <= gamma_{g+3} S + a_f with
 * u = 2^-24, where a_f covers underflow (<= 3g roundings of at most 2^-150
 * each); likewise for d with u = 2^-53. KM_F32_REL = 2 (g + 4) 2^-24 and
 * KM_F32_ABS = g 2^-140 cover both with room:
 *   lo(f) = f (1 - E) - A <= d <= f (1 + E) + A = hi(f). */
static inline double km_f32_rel(int g) { return 2.0 * (g + 4) * 0x1p-24; }
static inline double km_f32_abs(int g) { return g * 0x1p-140; }

/* The smallest float >= the double t >= 0 (the candidate tests compare
 * floats): one step up from a float below t is the next bit pattern. */
static inline float km_f32_up(double t)
{
    float f = (float)t;
    if ((double)f < t) {
        uint32_t u;
        memcpy(&u, &f, sizeof u);
        u++;
        memcpy(&f, &u, sizeof f);
    }
    return f;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The smallest of the 8 lanes. */
__attribute__((target("avx2,fma"))) static inline float km_hmin8(__m256 v)
{
    __m128 m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    m = _mm_min_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}

/* km_scan's result (the same arg, best and second, bit for bit) via float32
 * distances to all k centroids (8 per AVX2 vector, FMA) and exact double
 * distances (wdist, the same arithmetic as km_dists) only for the candidates
 * j with f_j <= T, T = the smallest float above hi(f2) mapped back through lo,
 * f2 the second smallest float distance: a centroid outside has
 * d_j >= lo(f_j) > hi(f2) >= the exact distances of the two float-nearest
 * centroids, so it is strictly worse than the best and the second over the
 * candidates, and the candidates in index order with km_scan's comparisons
 * give km_scan's answer, ties to the lowest index included.
 * ctf: (g, kp) float, kp = k rounded up to 8 (padding columns are 0);
 * inf0: (8) the accumulator start of the last block (+inf beyond k);
 * f: (2 kp) float scratch: the distances, then the minima of groups of 32. */
__attribute__((target("avx2,fma"))) static void
km_scan_f32(const float *xi, const float *wi, int g, const float *c, const float *ctf, int k,
            int kp, const float *inf0, float *f, int32_t *arg, double *best, double *second)
{
    __m256 xb[64], wb[64];
    for (int a = 0; a < g; a++) {
        xb[a] = _mm256_set1_ps(xi[a]);
        wb[a] = _mm256_set1_ps(wi ? wi[a] : 1.0f);
    }
    const __m256 inf = _mm256_set1_ps(INFINITY);
    __m256 m1 = inf, m2 = inf; /* per lane: smallest and second smallest f */
    int j = 0;
    for (; j + 32 <= k; j += 32) { /* 4 independent FMA chains */
        __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        for (int a = 0; a < g; a++) {
            const float *ca = ctf + (int64_t)a * kp + j;
            const __m256 d0 = _mm256_sub_ps(xb[a], _mm256_loadu_ps(ca));
            const __m256 d1 = _mm256_sub_ps(xb[a], _mm256_loadu_ps(ca + 8));
            const __m256 d2 = _mm256_sub_ps(xb[a], _mm256_loadu_ps(ca + 16));
            const __m256 d3 = _mm256_sub_ps(xb[a], _mm256_loadu_ps(ca + 24));
            s0 = _mm256_fmadd_ps(_mm256_mul_ps(wb[a], d0), d0, s0);
            s1 = _mm256_fmadd_ps(_mm256_mul_ps(wb[a], d1), d1, s1);
            s2 = _mm256_fmadd_ps(_mm256_mul_ps(wb[a], d2), d2, s2);
            s3 = _mm256_fmadd_ps(_mm256_mul_ps(wb[a], d3), d3, s3);
        }
        _mm256_storeu_ps(f + j, s0);
        _mm256_storeu_ps(f + j + 8, s1);
        _mm256_storeu_ps(f + j + 16, s2);
        _mm256_storeu_ps(f + j + 24, s3);
        _mm256_storeu_ps(f + kp + j / 4, _mm256_min_ps(_mm256_min_ps(s0, s1), _mm256_min_ps(s2, s3)));
        const __m256 s[4] = {s0, s1, s2, s3};
        for (int q = 0; q < 4; q++) {
            m2 = _mm256_min_ps(m2, _mm256_max_ps(m1, s[q]));
            m1 = _mm256_min_ps(m1, s[q]);
        }
    }
    for (; j < kp; j += 8) {
        __m256 s0 = j + 8 > k ? _mm256_loadu_ps(inf0) : _mm256_setzero_ps();
        for (int a = 0; a < g; a++) {
            const __m256 d0 = _mm256_sub_ps(xb[a], _mm256_loadu_ps(ctf + (int64_t)a * kp + j));
            s0 = _mm256_fmadd_ps(_mm256_mul_ps(wb[a], d0), d0, s0);
        }
        _mm256_storeu_ps(f + j, s0);
        m2 = _mm256_min_ps(m2, _mm256_max_ps(m1, s0));
        m1 = _mm256_min_ps(m1, s0);
    }
    /* the two smallest f are among the 2 x 8 lane values: f1 the smallest of
     * m1; f2 = f1 when two lanes hold it, else the smallest of m2 and of m1
     * without f1's lane */
    const float f1 = km_hmin8(m1);
    const __m256 eq = _mm256_cmp_ps(m1, _mm256_set1_ps(f1), _CMP_EQ_OQ);
    const float f2 = __builtin_popcount((unsigned)_mm256_movemask_ps(eq)) > 1
                         ? f1
                         : km_hmin8(_mm256_min_ps(m2, _mm256_blendv_ps(m1, inf, eq)));
    const double E = km_f32_rel(g), A = km_f32_abs(g);
    /* f_j > T implies lo(f_j) > hi(f2); 2^-40 absorbs the rounding here */
    const __m256 T = _mm256_set1_ps(
        km_f32_up(((double)f2 * (1.0 + E) + 2.0 * A) / (1.0 - E) * (1.0 + 0x1p-40)));
    double b = DBL_MAX, s2 = DBL_MAX;
    int32_t am = 0;
    for (int jb = 0; jb < kp; jb += 8) {
        /* a group of 32 with no candidate is passed over at once */
        if (jb + 32 <= k && jb % 32 == 0 &&
            !_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(f + kp + jb / 4), T, _CMP_LE_OQ))) {
            jb += 24;
            continue;
        }
        unsigned mask = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(_mm256_loadu_ps(f + jb), T, _CMP_LE_OQ));
        while (mask) {
            const int jj = jb + __builtin_ctz(mask);
            mask &= mask - 1;
            if (jj >= k) break;
            const double dj = wdist(xi, wi, c + (int64_t)jj * g, g);
            if (dj < b) {
                s2 = b;
                b = dj;
                am = jj;
            } else if (dj < s2) {
                s2 = dj;
            }
        }
    }
    *arg = am;
    *best = b;
    *second = s2;
}

/* mthr[i] = a float >= (mind[i] + A) / (1 - E): a point whose float distance
 * f to a new centroid exceeds it has lo(f) > mind[i], so d > mind[i] and
 * km_min_body would leave mind[i] as it is. */
static void km_mthr_set(int g, const double *mind, int64_t i0, int64_t i1, float *mthr)
{
    const double E = km_f32_rel(g), A = km_f32_abs(g);
    for (int64_t i = i0; i < i1; i++)
        mthr[i] = km_f32_up((mind[i] + A) / (1.0 - E) * (1.0 + 0x1p-40));
}

/* Horizontal sums of 8 vectors of 8 floats: lane p of the result is the sum
 * of v[p] (g = 8: one point per vector). */
__attribute__((target("avx2,fma"))) static inline __m256 km_hsum8(const __m256 *v)
{
    const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
    return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20),
                         _mm256_permute2f128_ps(lo, hi, 0x31));
}

/* km_min_body's update of mind (bit for bit) with a float32 prefilter: the
 * float distances of 8 consecutive points to c at a time (their 8 g
 * coordinates are contiguous, so the terms are formed over the flat array
 * against c repeated), then wdist only for the points with f <= mthr[i], the
 * only ones whose mind can drop (km_mthr_set). Requires g <= 64. */
__attribute__((target("avx2,fma"))) static void
km_min_range_f32(const float *x, const float *w, int64_t i0, int64_t i1, int g, const float *c,
                 double *mind, float *mthr)
{
    float crep[8 * 64], t[8 * 64];
    for (int q = 0; q < 8 * g; q++) crep[q] = c[q % g];
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const float *xb = x + i * g, *wb = w ? w + i * g : NULL;
        __m256 v[64];
        for (int q = 0; q < g; q++) { /* 8 g floats: g vectors */
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xb + 8 * q), _mm256_loadu_ps(crep + 8 * q));
            const __m256 wd = wb ? _mm256_mul_ps(_mm256_loadu_ps(wb + 8 * q), d) : d;
            v[q] = _mm256_mul_ps(wd, d);
        }
        __m256 f;
        if (g == 8) {
            f = km_hsum8(v);
        } else if (g == 4) { /* two points per vector: lanes come out as 0 2 4 6 1 3 5 7 */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
            f = _mm256_permutevar8x32_ps(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        } else {
            float fs[8];
            for (int q = 0; q < g; q++) _mm256_storeu_ps(t + 8 * q, v[q]);
            for (int p = 0; p < 8; p++) {
                float sum = 0.0f;
                for (int a = 0; a < g; a++) sum += t[p * g + a];
                fs[p] = sum;
            }
            f = _mm256_loadu_ps(fs);
        }
        unsigned m = (unsigned)_mm256_movemask_ps(
            _mm256_cmp_ps(f, _mm256_loadu_ps(mthr + i), _CMP_LE_OQ));
        while (m) {
            const int64_t ip = i + __builtin_ctz(m);
            m &= m - 1;
            const double d = wdist(x + ip * g, w ? w + ip * g : NULL, c, g);
            if (d < mind[ip]) {
                mind[ip] = d;
                km_mthr_set(g, mind, ip, ip + 1, mthr);
            }
        }
    }
    for (; i < i1; i++) {
        const double d = wdist(x + i * g, w ? w + i * g : NULL, c, g);
        if (d < mind[i]) {
            mind[i] = d;
            km_mthr_set(g, mind, i, i + 1, mthr);
        }
    }
}

static int km_f32_cpu(void)
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int km_f32_cpu(void) { return 0; }
static void km_mthr_set(int g, const double *mind, int64_t i0, int64_t i1, float *mthr)
{
    (void)g, (void)mind, (void)i0, (void)i1, (void)mthr;
}
static void km_min_range_f32(const float *x, const float *w, int64_t i0, int64_t i1, int g,
                             const float *c, double *mind, float *mthr)
{
    (void)mthr;
    km_min_range(x, w, i0, i1, g, c, mind);
}
#endif

/* Scratch of km_assign, sized once per k-means run. */
typedef struct {
    double *ct;      // (g, k) centroids transposed, double
    double *dk;      // (threads, k) distances of km_scan
    float *ctf;      // (g, kp) centroids transposed, float, padding columns 0
    float *fk;       // (threads, 2 kp) scratch of km_scan_f32
    float inf0[8];   // accumulator start of the last block: 0 below k, +inf beyond
    int kp;          // k rounded up to 8
    int f32;         // the points pass km_f32_ok_values and the CPU has AVX2 + FMA
    int f32c;        // f32 and the current centroids pass km_f32_ok_values too
} km_work;

static void km_work_free(km_work *wk)
{
    free(wk->fk);
    free(wk->ctf);
    free(wk->dk);
    free(wk->ct);
    *wk = (km_work){0};
}

/* Scratch for n points (n, g) with weights w (or NULL) and k centroids; the
 * float32 prefilter is on when the CPU and the points allow it. */
static lv_status km_work_init(km_work *wk, const float *x, const float *w, int64_t n, int g, int k)
{
    lv_status st = LV_OK;
    *wk = (km_work){0};
    wk->kp = (k + 7) / 8 * 8;
    LV_ALLOC(wk->ct, (int64_t)k * g);
    LV_ALLOC(wk->dk, (int64_t)k * omp_get_max_threads());
    wk->f32 = g <= 64 && km_f32_cpu() && km_f32_ok_values(x, n * g, 0) &&
              (!w || km_f32_ok_values(w, n * g, 1));
    if (wk->f32) {
        LV_ALLOC(wk->ctf, (int64_t)wk->kp * g);
        LV_ALLOC(wk->fk, (int64_t)2 * wk->kp * omp_get_max_threads());
    }
done:
    if (st != LV_OK) km_work_free(wk);
    return st;
}

/* The centroids c (k, g) into the scans' layouts. */
static void km_work_load(km_work *wk, const float *c, int k, int g)
{
    const int kp = wk->kp;
    for (int j = 0; j < k; j++)
        for (int a = 0; a < g; a++) wk->ct[(int64_t)a * k + j] = (double)c[(int64_t)j * g + a];
    wk->f32c = wk->f32 && km_f32_ok_values(c, (int64_t)k * g, 0);
    if (wk->f32c) {
        for (int a = 0; a < g; a++)
            for (int j = 0; j < kp; j++)
                wk->ctf[(int64_t)a * kp + j] = j < k ? c[(int64_t)j * g + a] : 0.0f;
        for (int q = 0; q < 8; q++) wk->inf0[q] = (kp - 8 + q) < k ? 0.0f : INFINITY;
    }
}

/* km_scan of one point against the loaded centroids, through km_scan_f32
 * when the inputs allow (the same result); thread t's scratch. */
static inline void km_scan_point(const km_work *wk, km_dists_fn fn, const float *xi,
                                 const float *wi, int g, const float *c, int k, int t,
                                 int32_t *arg, double *best, double *second)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (wk->f32c) {
        km_scan_f32(xi, wi, g, c, wk->ctf, k, wk->kp, wk->inf0, wk->fk + (int64_t)t * 2 * wk->kp,
                    arg, best, second);
        return;
    }
#endif
    km_scan(fn, xi, wi, g, wk->ct, k, wk->dk + (int64_t)t * k, arg, best, second);
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
 * full (km_scan_f32 when the inputs allow, else km_scan: the same result).
 * full = 1: scan every point (the first assignment). */
static void km_assign(const float *x, const float *w, int64_t n, int g, const float *c, int k,
                      const double *shift, const double *sw, int full, int32_t *idx,
                      double *dist, double *lb, km_work *wk)
{
    const km_dists_fn fn = km_dists_pick();
    km_work_load(wk, c, k, g);
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
        km_scan_point(wk, fn, xi, wi, g, c, k, omp_get_thread_num(), &idx[i], &dist[i], &second);
        lb[i] = sqrt(second);
    }
}

lv_status stage_vq_kmeans(const float *x, const float *w, int64_t n, int g,
                          const stage_vq_kmeans_config *cfg, float *centroids, int32_t *idx,
                          double *hist, int *n_hist)
{
    lv_status st = LV_OK;
    double *dist = NULL, *num = NULL, *den = NULL, *lb = NULL, *sw = NULL, *shift = NULL;
    km_work wk = {0};
    float *cold = NULL, *mthr = NULL;
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
    LV_TRY(km_work_init(&wk, x, w, n, g, k));
    if (wk.f32) LV_ALLOC(mthr, n);
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
    kmeanspp_seed(x, w, n, g, k, centroids, dist, mthr, &rng);
    km_assign(x, w, n, g, centroids, k, NULL, sw, 1, idx, dist, lb, &wk);
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
        km_assign(x, w, n, g, centroids, k, shift, sw, 0, idx, dist, lb, &wk);
        double prev = obj;
        obj = sum_serial(dist, n);
        if (hist) hist[nh] = obj;
        nh++;
        if (!isfinite(obj)) LV_FAIL(LV_ERR_NUMERIC, "kmeans: objective is %g", obj);
        if (cfg->tol > 0.0 && (prev - obj) <= cfg->tol * prev) break;
    }
    if (n_hist) *n_hist = nh;
done:
    free(mthr);
    km_work_free(&wk);
    free(cold);
    free(shift);
    free(sw);
    free(lb);
    free(den);
    free(num);
    free(dist);
    return st;
}

lv_status stage_vq_kmeans_scan(const float *x, const float *w, int64_t n, int g, const float *c,
                               int k, int32_t *idx, double *dist, double *second)
{
    lv_status st = LV_OK;
    km_work wk = {0};
    if (!x || !c || !idx || !dist || !second || n <= 0 || g <= 0 || k <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "kmeans scan: bad arguments");
    LV_TRY(km_work_init(&wk, x, w, n, g, k));
    km_work_load(&wk, c, k, g);
    const km_dists_fn fn = km_dists_pick();
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++)
        km_scan_point(&wk, fn, x + i * g, w ? w + i * g : NULL, g, c, k, omp_get_thread_num(),
                      &idx[i], &dist[i], &second[i]);
done:
    km_work_free(&wk);
    return st;
}

lv_status stage_vq_kmeans_min_update(const float *x, const float *w, int64_t n, int g,
                                     const float *c, int m, double *mind)
{
    lv_status st = LV_OK;
    km_work wk = {0};
    float *mthr = NULL;
    if (!x || !c || !mind || n <= 0 || g <= 0 || m < 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "kmeans min update: bad arguments");
    LV_TRY(km_work_init(&wk, x, w, n, g, 1));
    if (wk.f32) {
        LV_ALLOC(mthr, n);
        km_mthr_set(g, mind, 0, n, mthr);
    }
    for (int j = 0; j < m; j++) km_min_update(x, w, n, g, c + (int64_t)j * g, mind, mthr);
done:
    free(mthr);
    km_work_free(&wk);
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
