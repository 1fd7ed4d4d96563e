/* quant.cu: the layer-wise quantization hot loops on the GPU (kern_quant_cuda.h),
 * twins of kernels/cpu/quant_ref.c, bit-identical to it for finite inputs.
 *
 * Versions:
 *   hessian_accum_kernel1:   64x64 tile of H per 256-thread block, 4x4 per thread, X
 *                            staged as double through shared memory 16 samples at a
 *                            time; every H element summed in sample order (FP64 FMA,
 *                            exact products).
 *   kmeans_assign_kernel1<GC>: one thread per point (GC > 0: point in registers,
 *                            g <= GC; GC == 0: any g, point read through L1),
 *                            centroid tiles as double in shared memory.
 *   beam_score_kernel1:      256 codes x 32 (row, beam) pairs per block, g in chunks
 *                            of 8, dot products in registers.
 *   aq_dequant_kernel1:      one thread per weight, grid-stride.
 * The reference rounds every product and every sum; where nvcc would contract them
 * into an FMA (and change the last bit) the kernels use __dmul_rn/__dadd_rn, which
 * are never contracted.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build
 * Check: build/tests/test_kern_quant_cuda (CPU reference vs CUDA, max diffs; exits 77
 * without a device). Benchmark: build/bench_quant_cuda (7B shapes, one JSON line per
 * kernel). */
#include <cfloat>

#include "kern_cuda.h"
#include "kern_quant_cuda.h"

/* ------------------------------------------------------------------ Hessian */

#define HESS_TILE 64 /* H tile edge */
#define HESS_TPE 16  /* threads per tile edge: 16x16 threads */
#define HESS_R (HESS_TILE / HESS_TPE) /* each thread: HESS_R x HESS_R elements */
#define HESS_BT 16   /* samples per shared-memory stage */

/* grid (ceil(d/64), ceil(d/64)): block (x, y) owns H[y*64.., x*64..]. */
__global__ void __launch_bounds__(HESS_TPE * HESS_TPE)
    hessian_accum_kernel1(double *H, const float *x, int64_t n, int d)
{
    __shared__ double xa[HESS_BT][HESS_TILE]; // (samples, H rows of the tile)
    __shared__ double xb[HESS_BT][HESS_TILE]; // (samples, H cols of the tile)
    const int tx = threadIdx.x % HESS_TPE, ty = threadIdx.x / HESS_TPE;
    const int i0 = blockIdx.y * HESS_TILE, j0 = blockIdx.x * HESS_TILE;
    double acc[HESS_R][HESS_R];
    /* Thread (ty, tx) owns rows i0 + ty + 16r and cols j0 + tx + 16c: a half-warp
     * reads 16 consecutive xb doubles and writes 16 consecutive H doubles. */
#pragma unroll
    for (int r = 0; r < HESS_R; r++)
#pragma unroll
        for (int c = 0; c < HESS_R; c++) {
            const int i = i0 + ty + HESS_TPE * r, j = j0 + tx + HESS_TPE * c;
            acc[r][c] = (i < d && j < d) ? H[(int64_t)i * d + j] : 0.0;
        }
    for (int64_t t0 = 0; t0 < n; t0 += HESS_BT) {
        /* The exact sample count (no zero padding): a padded 0*x would add a signed
         * zero the reference never adds. */
        const int bt = n - t0 < HESS_BT ? (int)(n - t0) : HESS_BT;
        for (int e = threadIdx.x; e < HESS_BT * HESS_TILE; e += blockDim.x) {
            const int tt = e / HESS_TILE, col = e % HESS_TILE;
            const int64_t row = (t0 + tt) * d; /* sample t0 + tt, read only if tt < bt */
            xa[tt][col] = (tt < bt && i0 + col < d) ? (double)x[row + i0 + col] : 0.0;
            xb[tt][col] = (tt < bt && j0 + col < d) ? (double)x[row + j0 + col] : 0.0;
        }
        __syncthreads();
        for (int tt = 0; tt < bt; tt++) {
            double a[HESS_R], b[HESS_R];
#pragma unroll
            for (int r = 0; r < HESS_R; r++) {
                a[r] = xa[tt][ty + HESS_TPE * r];
                b[r] = xb[tt][tx + HESS_TPE * r];
            }
#pragma unroll
            for (int r = 0; r < HESS_R; r++)
#pragma unroll
                for (int c = 0; c < HESS_R; c++) acc[r][c] = fma(a[r], b[c], acc[r][c]);
        }
        __syncthreads(); /* the next stage overwrites xa, xb */
    }
#pragma unroll
    for (int r = 0; r < HESS_R; r++)
#pragma unroll
        for (int c = 0; c < HESS_R; c++) {
            const int i = i0 + ty + HESS_TPE * r, j = j0 + tx + HESS_TPE * c;
            if (i < d && j < d) H[(int64_t)i * d + j] = acc[r][c];
        }
}

extern "C" lv_status kern_hessian_accum_cuda(double *d_H, const float *d_x, int64_t n, int d,
                                             cudaStream_t stream)
{
    lv_status st = LV_OK;
    const int tiles = (d + HESS_TILE - 1) / HESS_TILE;
    if (!d_H || (!d_x && n > 0) || n < 0 || d <= 0 || tiles > 65535)
        LV_FAIL(LV_ERR_INVALID_ARG, "hessian_accum_cuda: H %p x %p n %lld d %d", (void *)d_H,
                (const void *)d_x, (long long)n, d);
    if (n == 0) goto done;
    hessian_accum_kernel1<<<dim3(tiles, tiles), HESS_TPE * HESS_TPE, 0, stream>>>(d_H, d_x, n,
                                                                                  d);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

/* ------------------------------------------------------------------ k-means assignment */

#define KM_THREADS 128     /* points per block */
#define KM_TILE_DBL 2048   /* centroid tile: 16 KiB of doubles */
#define KM_MAX_G KM_TILE_DBL /* at least one centroid per tile */

/* One point's distance to centroid cj (g doubles in shared memory), in the
 * reference's order: dj += (w * diff) * diff, every operation rounded. */
template <int GC>
__device__ inline double kmeans_dist(const double *xr, const double *wr, const float *xi,
                                     const float *wi, const double *cj, int g)
{
    double dj = 0.0;
    if constexpr (GC > 0) {
#pragma unroll
        for (int a = 0; a < GC; a++)
            if (a < g) {
                const double diff = __dsub_rn(xr[a], cj[a]);
                dj = __dadd_rn(dj, __dmul_rn(__dmul_rn(wr[a], diff), diff));
            }
    } else {
        for (int a = 0; a < g; a++) {
            const double diff = __dsub_rn((double)xi[a], cj[a]);
            const double wa = wi ? (double)wi[a] : 1.0;
            dj = __dadd_rn(dj, __dmul_rn(__dmul_rn(wa, diff), diff));
        }
    }
    return dj;
}

/* Grid-stride over blocks of KM_THREADS points; every thread of a block walks the
 * same centroid tiles (the syncs need the whole block). */
template <int GC>
__global__ void __launch_bounds__(KM_THREADS)
    kmeans_assign_kernel1(int32_t *idx, double *dist, const float *x, const float *w, int64_t n,
                          int g, const float *c, int k)
{
    __shared__ double cs[KM_TILE_DBL]; // (tile, g) centroids as double
    const int tile = KM_TILE_DBL / g;
    for (int64_t p0 = (int64_t)blockIdx.x * KM_THREADS; p0 < n;
         p0 += (int64_t)gridDim.x * KM_THREADS) {
        const int64_t i = p0 + threadIdx.x;
        const bool live = i < n;
        const float *xi = x + (live ? i : 0) * g;                // (g)
        const float *wi = w ? w + (live ? i : 0) * g : nullptr;  // (g)
        double xr[GC > 0 ? GC : 1], wr[GC > 0 ? GC : 1];
#pragma unroll
        for (int a = 0; a < (GC > 0 ? GC : 1); a++) {
            xr[a] = (GC > 0 && a < g) ? (double)xi[a] : 0.0;
            wr[a] = (GC > 0 && a < g && wi) ? (double)wi[a] : 1.0;
        }
        double best = DBL_MAX;
        int32_t arg = 0;
        for (int j0 = 0; j0 < k; j0 += tile) {
            const int nt = k - j0 < tile ? k - j0 : tile;
            __syncthreads(); /* the previous tile is no longer read */
            for (int e = threadIdx.x; e < nt * g; e += KM_THREADS)
                cs[e] = (double)c[(int64_t)j0 * g + e];
            __syncthreads();
            if (!live) continue;
            for (int jj = 0; jj < nt; jj++) {
                const double dj = kmeans_dist<GC>(xr, wr, xi, wi, cs + jj * g, g);
                if (dj < best) { /* strict, ascending j: ties to the lowest index */
                    best = dj;
                    arg = j0 + jj;
                }
            }
        }
        if (live) {
            idx[i] = arg;
            if (dist) dist[i] = best;
        }
    }
}

template <int GC>
static void kmeans_launch(int32_t *d_idx, double *d_dist, const float *d_x, const float *d_w,
                          int64_t n, int g, const float *d_c, int k, cudaStream_t stream)
{
    kmeans_assign_kernel1<GC><<<kern_cuda_blocks(n, KM_THREADS), KM_THREADS, 0, stream>>>(
        d_idx, d_dist, d_x, d_w, n, g, d_c, k);
}

extern "C" lv_status kern_kmeans_assign_cuda(int32_t *d_idx, double *d_dist, const float *d_x,
                                             const float *d_w, int64_t n, int g,
                                             const float *d_c, int k, cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (!d_idx || (!d_x && n > 0) || !d_c || n < 0 || g <= 0 || g > KM_MAX_G || k <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "kmeans_assign_cuda: n %lld g %d (max %d) k %d", (long long)n,
                g, KM_MAX_G, k);
    if (n == 0) goto done;
    if (g <= 4)
        kmeans_launch<4>(d_idx, d_dist, d_x, d_w, n, g, d_c, k, stream);
    else if (g <= 8)
        kmeans_launch<8>(d_idx, d_dist, d_x, d_w, n, g, d_c, k, stream);
    else if (g <= 16)
        kmeans_launch<16>(d_idx, d_dist, d_x, d_w, n, g, d_c, k, stream);
    else if (g <= 32)
        kmeans_launch<32>(d_idx, d_dist, d_x, d_w, n, g, d_c, k, stream);
    else
        kmeans_launch<0>(d_idx, d_dist, d_x, d_w, n, g, d_c, k, stream);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

/* ------------------------------------------------------------------ beam scoring */

#define BS_CODES 256 /* codes k per block, one per thread */
#define BS_PAIRS 32  /* (row, beam) pairs per block */
#define BS_CHUNK 8   /* elements of g staged per step */
#define BS_MAX_K (65535 * BS_CODES)

/* grid (ceil(pairs / 32), ceil(K / 256)). Pair p = r*nb + b is row r's beam b. */
__global__ void __launch_bounds__(BS_CODES)
    beam_score_kernel1(double *scores, const double *base, const double *u, const double *s,
                       const float *cb, const double *cnorm, int64_t n_pairs, int nb, int K,
                       int g)
{
    __shared__ double us[BS_PAIRS][BS_CHUNK]; // this chunk of the pairs' u
    const int64_t p0 = (int64_t)blockIdx.x * BS_PAIRS;
    const int np = n_pairs - p0 < BS_PAIRS ? (int)(n_pairs - p0) : BS_PAIRS;
    const int64_t k = (int64_t)blockIdx.y * BS_CODES + threadIdx.x;
    const bool live = k < K;
    const float *ck = cb + (live ? k : 0) * g; // (g)
    double dot[BS_PAIRS];
#pragma unroll
    for (int p = 0; p < BS_PAIRS; p++) dot[p] = 0.0;
    /* Chunks in ascending a and pairs independent: each dot[p] is summed over a in
     * the reference's order. */
    for (int a0 = 0; a0 < g; a0 += BS_CHUNK) {
        const int na = g - a0 < BS_CHUNK ? g - a0 : BS_CHUNK;
        __syncthreads(); /* the previous chunk is no longer read */
        for (int e = threadIdx.x; e < BS_PAIRS * BS_CHUNK; e += BS_CODES) {
            const int p = e / BS_CHUNK, a = e % BS_CHUNK;
            us[p][a] = (p < np && a < na) ? u[(p0 + p) * g + a0 + a] : 0.0;
        }
        __syncthreads();
        double c[BS_CHUNK];
#pragma unroll
        for (int a = 0; a < BS_CHUNK; a++) c[a] = (live && a < na) ? (double)ck[a0 + a] : 0.0;
#pragma unroll
        for (int p = 0; p < BS_PAIRS; p++)
#pragma unroll
            for (int a = 0; a < BS_CHUNK; a++)
                if (a < na) dot[p] = __dadd_rn(dot[p], __dmul_rn(c[a], us[p][a]));
    }
    if (!live) return;
    const double cn = cnorm[k];
    /* base - (2 s) dot + (s s) cnorm, left to right as the reference's expression */
#pragma unroll
    for (int p = 0; p < BS_PAIRS; p++)
        if (p < np) {
            const int64_t pair = p0 + p;
            const double sr = s[pair / nb];
            scores[pair * K + k] = __dadd_rn(__dsub_rn(base[pair], __dmul_rn(2.0 * sr, dot[p])),
                                             __dmul_rn(__dmul_rn(sr, sr), cn));
        }
}

extern "C" lv_status kern_beam_score_batch_cuda(double *d_scores, const double *d_base,
                                                const double *d_u, const double *d_s,
                                                const float *d_cb, const double *d_cnorm,
                                                int64_t rows, int nb, int K, int g,
                                                cudaStream_t stream)
{
    lv_status st = LV_OK;
    const int64_t n_pairs = rows * (int64_t)(nb > 0 ? nb : 0);
    const int64_t pair_blocks = (n_pairs + BS_PAIRS - 1) / BS_PAIRS;
    if (!d_scores || !d_base || !d_u || !d_s || !d_cb || !d_cnorm || rows < 0 || nb <= 0 ||
        K <= 0 || K > BS_MAX_K || g <= 0 || pair_blocks > INT32_MAX)
        LV_FAIL(LV_ERR_INVALID_ARG, "beam_score_batch_cuda: rows %lld nb %d K %d (max %d) g %d",
                (long long)rows, nb, K, BS_MAX_K, g);
    if (rows == 0) goto done;
    beam_score_kernel1<<<dim3((unsigned)pair_blocks, (K + BS_CODES - 1) / BS_CODES), BS_CODES, 0,
                         stream>>>(d_scores, d_base, d_u, d_s, d_cb, d_cnorm, n_pairs, nb, K, g);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

/* ------------------------------------------------------------------ dequantization */

__global__ void aq_dequant_kernel1(float *w, const uint16_t *codes, const float *codebooks,
                                   const float *scales, int64_t n_rows, int64_t d_in,
                                   int64_t n_groups, int M, int K, int g)
{
    const int64_t total = n_rows * d_in;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e / d_in, j = e % d_in, i = j / g;
        const int a = (int)(j % g);
        const uint16_t *cri = codes + (r * n_groups + i) * M; // (M)
        /* Only adds then one multiply: nothing for nvcc to contract. */
        float acc = 0.0f;
        for (int m = 0; m < M; m++) acc += codebooks[((int64_t)m * K + cri[m]) * g + a];
        w[e] = (scales ? scales[r] : 1.0f) * acc;
    }
}

extern "C" lv_status kern_aq_dequant_cuda(float *d_w, const uint16_t *d_codes,
                                          const float *d_codebooks, const float *d_scales,
                                          int64_t n_rows, int64_t d_in, int64_t n_groups, int M,
                                          int K, int g, cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (!d_w || !d_codes || !d_codebooks || n_rows < 0 || d_in <= 0 || M <= 0 || K <= 0 ||
        g <= 0 || n_groups * g < d_in || (n_groups - 1) * g >= d_in)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "aq_dequant_cuda: rows %lld d_in %lld n_groups %lld M %d K %d g %d",
                (long long)n_rows, (long long)d_in, (long long)n_groups, M, K, g);
    if (n_rows == 0) goto done;
    aq_dequant_kernel1<<<kern_cuda_blocks(n_rows * d_in, 256), 256, 0, stream>>>(
        d_w, d_codes, d_codebooks, d_scales, n_rows, d_in, n_groups, M, K, g);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
