/* quant_ref.c: CPU reference hot loops of the layer-wise quantizers (VQ init,
 * AQLM): Hessian accumulation, weighted k-means assignment, beam-search
 * candidate scoring, additive-codebook dequantization.
 *
 * Determinism: every output element is produced by exactly one thread and
 * summed in a fixed order, so results do not depend on OMP_NUM_THREADS. */
#include <float.h>
#include <math.h>
#include <omp.h>

#include "kern.h"

void kern_hessian_accum_ref(double *H, const float *x, int64_t n, int d)
{
    LV_ASSERT(H && (x || n == 0) && n >= 0 && d > 0);
    /* Thread owns a contiguous range of H rows and streams over all samples in
     * sample order: row i of x is read contiguously, H[i][*] summed over t in order. */
#pragma omp parallel for schedule(static)
    for (int i = 0; i < d; i++) {
        double *hi = H + (int64_t)i * d; // (d)
        for (int64_t t = 0; t < n; t++) {
            const float *xt = x + t * d; // (d)
            double xi = xt[i];
            if (xi == 0.0) continue;
            for (int j = 0; j < d; j++) hi[j] += xi * (double)xt[j];
        }
    }
}

void kern_kmeans_assign_ref(int32_t *idx, double *dist, const float *x, const float *w,
                            int64_t n, int g, const float *c, int k)
{
    LV_ASSERT(idx && x && c && n >= 0 && g > 0 && k > 0);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * g;               // (g)
        const float *wi = w ? w + i * g : NULL;    // (g)
        double best = DBL_MAX;
        int32_t arg = 0;
        for (int j = 0; j < k; j++) {
            const float *cj = c + (int64_t)j * g; // (g)
            double dj = 0.0;
            for (int a = 0; a < g; a++) {
                double diff = (double)xi[a] - (double)cj[a];
                dj += (wi ? (double)wi[a] : 1.0) * diff * diff;
            }
            if (dj < best) { /* strict: ties go to the lowest index */
                best = dj;
                arg = j;
            }
        }
        idx[i] = arg;
        if (dist) dist[i] = best;
    }
}

void kern_beam_score_ref(double *scores, const double *base, const double *u, const float *cb,
                         const double *cnorm, double s, int nb, int K, int g)
{
    LV_ASSERT(scores && base && u && cb && cnorm && nb > 0 && K > 0 && g > 0);
    const double s2 = s * s;
    for (int b = 0; b < nb; b++) {
        const double *ub = u + (int64_t)b * g;  // (g)
        double *sb = scores + (int64_t)b * K;   // (K)
        for (int k = 0; k < K; k++) {
            const float *ck = cb + (int64_t)k * g; // (g)
            double dot = 0.0;
            for (int a = 0; a < g; a++) dot += (double)ck[a] * ub[a];
            sb[k] = base[b] - 2.0 * s * dot + s2 * cnorm[k];
        }
    }
}

void kern_aq_dequant_ref(float *out, const uint16_t *codes, const float *codebooks,
                         const float *scales, int64_t d_out, int64_t d_in, int64_t n_groups,
                         int M, int K, int g)
{
    LV_ASSERT(out && codes && codebooks && d_out >= 0 && d_in > 0 && M > 0 && K > 0 && g > 0);
    LV_ASSERT(n_groups * g >= d_in && (n_groups - 1) * g < d_in);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < d_out; r++) {
        float *orow = out + r * d_in;                        // (d_in)
        const uint16_t *crow = codes + r * n_groups * M;     // (n_groups, M)
        const float s = scales ? scales[r] : 1.0f;
        for (int64_t i = 0; i < n_groups; i++) {
            int64_t j0 = i * g;
            int len = (int)(d_in - j0 < g ? d_in - j0 : g); /* last group may be cut */
            for (int a = 0; a < len; a++) {
                float acc = 0.0f;
                for (int m = 0; m < M; m++) {
                    const float *cv = codebooks + ((int64_t)m * K + crow[i * M + m]) * g;
                    acc += cv[a];
                }
                orow[j0 + a] = s * acc;
            }
        }
    }
}
