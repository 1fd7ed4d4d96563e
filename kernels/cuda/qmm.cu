/* qmm.cu: products straight from AQLM codes on the GPU (kern_qmm.h), twins of the CPU
 * fast path (kernels/cpu/qmm.c), for decoding-sized batches (n <= 8).
 *
 * Versions:
 *   aq_lut_kernel1<NB>:     nbits <= 8. Split-K LUT GEMV/GEMM: block = 128 output rows x
 *                           64 groups; the block builds the tables of its groups chunk by
 *                           chunk in shared memory (<= 32 KiB), one thread per row adds
 *                           the entries its codes select for NB (>= n) input rows.
 *   aq_lut_reduce_kernel1:  adds the slices' partial sums in slice order, applies scales.
 *   aq_gather_kernel1<NB>:  any nbits (1x16). Warp per output row, lanes over groups,
 *                           codebook vectors gathered through L1/L2 and multiplied into NB
 *                           lane sums; fixed shuffle-tree sum across lanes.
 * Every output is produced by one thread in an order fixed by the shape: deterministic.
 * The kernels use fmaf and another summation order than the CPU, so they agree with it
 * to fp32 rounding, not bit for bit.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build
 * Check: build/tests/test_kern_qmm_cuda (CPU vs CUDA, max diffs; exits 77 without a
 * device). Benchmark on the CPU side: llmvq bench gemv (docs/kernels-qmm.md). */
#include "kern_cuda.h"
#include "kern_qmm.h"

#define QMM_LUT_ROWS 128         /* output rows (= threads) per block */
#define QMM_LUT_SLICE 64         /* groups per split-K slice */
#define QMM_LUT_SMEM_BYTES 32768 /* shared-memory tables per chunk */
#define QMM_GATHER_THREADS 256   /* 8 warps, one output row each */

/* ------------------------------------------------------------------ LUT */

/* part (n_slices, n, d_out): the sums over slice blockIdx.y's groups, rows of blockIdx.x. */
template <int NB>
__global__ void __launch_bounds__(QMM_LUT_ROWS)
    aq_lut_kernel1(float *part, const float *x, const uint16_t *codes, const float *cb,
                   int64_t d_out, int64_t d_in, int64_t G, int M, int K, int g, int n, int chunk)
{
    extern __shared__ float lut[]; // (n, chunk, M, K)
    const int64_t r = (int64_t)blockIdx.x * QMM_LUT_ROWS + threadIdx.x;
    const int64_t s0 = (int64_t)blockIdx.y * QMM_LUT_SLICE;
    const int64_t s1 = s0 + QMM_LUT_SLICE < G ? s0 + QMM_LUT_SLICE : G;
    float acc[NB];
#pragma unroll
    for (int b = 0; b < NB; b++) acc[b] = 0.0f;
    for (int64_t c0 = s0; c0 < s1; c0 += chunk) {
        const int cl = (int)(s1 - c0 < chunk ? s1 - c0 : chunk);
        const int per_b = cl * M * K; /* entries per input row */
        __syncthreads(); /* the previous chunk's tables are no longer read */
        for (int e = threadIdx.x; e < n * per_b; e += blockDim.x) {
            const int b = e / per_b, rem = e % per_b;
            const int i = rem / (M * K), m = (rem / K) % M, k = rem % K;
            const int64_t j0 = (c0 + i) * g;
            const int len = (int)(d_in - j0 < g ? d_in - j0 : g); /* last group may be cut */
            const float *xb = x + b * d_in + j0;                  // (len)
            const float *c = cb + ((int64_t)m * K + k) * g;       // (g)
            float t = 0.0f;
            for (int a = 0; a < len; a++) t = fmaf(xb[a], c[a], t);
            lut[e] = t;
        }
        __syncthreads();
        if (r < d_out) {
            const uint16_t *cr = codes + (r * G + c0) * M; // (cl, M)
            for (int i = 0; i < cl; i++)
                for (int m = 0; m < M; m++) {
                    const float *t = lut + (i * M + m) * K + cr[i * M + m];
#pragma unroll
                    for (int b = 0; b < NB; b++)
                        if (b < n) acc[b] += t[b * per_b];
                }
        }
    }
    if (r < d_out)
#pragma unroll
        for (int b = 0; b < NB; b++)
            if (b < n) part[((int64_t)blockIdx.y * n + b) * d_out + r] = acc[b];
}

/* y (n, d_out) = scales * sum over slices in order of part (n_slices, n, d_out). */
__global__ void aq_lut_reduce_kernel1(float *y, const float *part, const float *scales,
                                      int64_t d_out, int n, int n_slices)
{
    const int64_t total = (int64_t)n * d_out;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total;
         e += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = e % d_out;
        float acc = 0.0f;
        for (int s = 0; s < n_slices; s++) acc += part[(int64_t)s * total + e];
        y[e] = (scales ? scales[r] : 1.0f) * acc;
    }
}

/* ------------------------------------------------------------------ gather */

template <int NB>
__global__ void __launch_bounds__(QMM_GATHER_THREADS)
    aq_gather_kernel1(float *y, const float *x, const uint16_t *codes, const float *cb,
                      const float *scales, int64_t d_out, int64_t d_in, int64_t G, int M, int K,
                      int g, int n)
{
    const int lane = threadIdx.x & 31;
    const int64_t warp = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int64_t n_warps = ((int64_t)gridDim.x * blockDim.x) >> 5;
    for (int64_t r = warp; r < d_out; r += n_warps) { /* warp-uniform */
        float acc[NB];
#pragma unroll
        for (int b = 0; b < NB; b++) acc[b] = 0.0f;
        const uint16_t *cr = codes + r * G * M; // (G, M)
        for (int64_t i = lane; i < G; i += 32) {
            const int64_t j0 = i * g;
            const int len = (int)(d_in - j0 < g ? d_in - j0 : g);
            for (int a = 0; a < len; a++) {
                float w = 0.0f;
                for (int m = 0; m < M; m++) w += __ldg(cb + ((int64_t)m * K + cr[i * M + m]) * g + a);
#pragma unroll
                for (int b = 0; b < NB; b++)
                    if (b < n) acc[b] = fmaf(__ldg(x + b * d_in + j0 + a), w, acc[b]);
            }
        }
#pragma unroll
        for (int b = 0; b < NB; b++)
            for (int o = 16; o > 0; o >>= 1) acc[b] += __shfl_xor_sync(0xffffffffu, acc[b], o);
        if (lane == 0) {
            const float s = scales ? scales[r] : 1.0f;
#pragma unroll
            for (int b = 0; b < NB; b++)
                if (b < n) y[b * d_out + r] = s * acc[b];
        }
    }
}

/* ------------------------------------------------------------------ launchers */

static lv_status check_dev_args(const float *d_y, const float *d_x, const kern_aq_dev_layer *L,
                                int64_t n, const char *fn)
{
    lv_status st = LV_OK;
    if (!L) LV_FAIL(LV_ERR_INVALID_ARG, "%s: layer is NULL", fn);
    if (L->d_out < 0 || L->d_in <= 0 || L->M < 1 || L->nbits < 1 || L->nbits > 16 || L->g < 1 ||
        L->n_groups != (L->d_in + L->g - 1) / L->g)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "%s: bad layer shape d_out %lld d_in %lld n_groups %lld M %d nbits %d g %d", fn,
                (long long)L->d_out, (long long)L->d_in, (long long)L->n_groups, L->M, L->nbits,
                L->g);
    if (n < 0 || (n > 0 && L->d_out > 0 && (!d_y || !d_x || !L->d_codes || !L->d_codebooks)))
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: batch %lld with a NULL device array", fn, (long long)n);
    if (n > KERN_AQ_CUDA_MAX_BATCH)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: batch %lld is over %d (decode tiles and use cuBLAS)", fn,
                (long long)n, KERN_AQ_CUDA_MAX_BATCH);
done:
    return st;
}

static int64_t lut_slices(const kern_aq_dev_layer *L)
{
    return (L->n_groups + QMM_LUT_SLICE - 1) / QMM_LUT_SLICE;
}

extern "C" size_t kern_aq_gemm_lut_cuda_ws_bytes(const kern_aq_dev_layer *L, int64_t n)
{
    if (!L || n <= 0 || L->d_out <= 0 || L->g < 1) return 0;
    return (size_t)lut_slices(L) * (size_t)n * (size_t)L->d_out * sizeof(float);
}

template <int NB>
static void launch_lut(float *d_part, const float *d_x, const kern_aq_dev_layer *L, int n,
                       int chunk, cudaStream_t stream)
{
    const dim3 grid((unsigned)((L->d_out + QMM_LUT_ROWS - 1) / QMM_LUT_ROWS), (unsigned)lut_slices(L));
    const size_t smem = (size_t)n * chunk * L->M * ((size_t)1 << L->nbits) * sizeof(float);
    aq_lut_kernel1<NB><<<grid, QMM_LUT_ROWS, smem, stream>>>(
        d_part, d_x, L->d_codes, L->d_codebooks, L->d_out, L->d_in, L->n_groups, L->M,
        1 << L->nbits, L->g, n, chunk);
}

extern "C" lv_status kern_aq_gemm_lut_cuda(float *d_y, const float *d_x, const kern_aq_dev_layer *L,
                                          int64_t n, float *d_ws, size_t ws_bytes,
                                          cudaStream_t stream)
{
    lv_status st = LV_OK;
    size_t group_bytes = 0, need = 0;
    int64_t chunk = 0;
    LV_TRY(check_dev_args(d_y, d_x, L, n, "kern_aq_gemm_lut_cuda"));
    if (L->nbits > 8)
        LV_FAIL(LV_ERR_UNSUPPORTED, "kern_aq_gemm_lut_cuda: nbits %d > 8 (use the gather kernel)",
                L->nbits);
    if (n == 0 || L->d_out == 0) goto done;
    group_bytes = (size_t)n * L->M * ((size_t)1 << L->nbits) * sizeof(float);
    if (group_bytes > QMM_LUT_SMEM_BYTES)
        LV_FAIL(LV_ERR_UNSUPPORTED,
                "kern_aq_gemm_lut_cuda: one group's tables (%zu bytes for batch %lld, M %d, "
                "nbits %d) exceed %d bytes of shared memory",
                group_bytes, (long long)n, L->M, L->nbits, QMM_LUT_SMEM_BYTES);
    need = kern_aq_gemm_lut_cuda_ws_bytes(L, n);
    if (!d_ws || ws_bytes < need)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_aq_gemm_lut_cuda: workspace of %zu bytes, need %zu",
                ws_bytes, need);
    chunk = (int64_t)(QMM_LUT_SMEM_BYTES / group_bytes);
    if (chunk > QMM_LUT_SLICE) chunk = QMM_LUT_SLICE;
    if (n == 1)
        launch_lut<1>(d_ws, d_x, L, 1, (int)chunk, stream);
    else if (n == 2)
        launch_lut<2>(d_ws, d_x, L, 2, (int)chunk, stream);
    else if (n <= 4)
        launch_lut<4>(d_ws, d_x, L, (int)n, (int)chunk, stream);
    else
        launch_lut<8>(d_ws, d_x, L, (int)n, (int)chunk, stream);
    KERN_CUDA_TRY(cudaGetLastError());
    aq_lut_reduce_kernel1<<<kern_cuda_blocks(n * L->d_out, 256), 256, 0, stream>>>(
        d_y, d_ws, L->d_scales, L->d_out, (int)n, (int)lut_slices(L));
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

template <int NB>
static void launch_gather(float *d_y, const float *d_x, const kern_aq_dev_layer *L, int n,
                          cudaStream_t stream)
{
    /* one warp per row: d_out * 32 threads, grid-stride beyond the cap */
    aq_gather_kernel1<NB><<<kern_cuda_blocks(L->d_out * 32, QMM_GATHER_THREADS),
                            QMM_GATHER_THREADS, 0, stream>>>(
        d_y, d_x, L->d_codes, L->d_codebooks, L->d_scales, L->d_out, L->d_in, L->n_groups, L->M,
        1 << L->nbits, L->g, n);
}

extern "C" lv_status kern_aq_gemm_gather_cuda(float *d_y, const float *d_x,
                                             const kern_aq_dev_layer *L, int64_t n,
                                             cudaStream_t stream)
{
    lv_status st = LV_OK;
    LV_TRY(check_dev_args(d_y, d_x, L, n, "kern_aq_gemm_gather_cuda"));
    if (n == 0 || L->d_out == 0) goto done;
    if (n == 1)
        launch_gather<1>(d_y, d_x, L, 1, stream);
    else if (n == 2)
        launch_gather<2>(d_y, d_x, L, 2, stream);
    else if (n <= 4)
        launch_gather<4>(d_y, d_x, L, (int)n, stream);
    else
        launch_gather<8>(d_y, d_x, L, (int)n, stream);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
