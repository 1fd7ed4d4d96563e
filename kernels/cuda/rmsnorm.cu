/* rmsnorm.cu: out (n, dim) = x / sqrt(mean(x^2) + eps) * w, row by row.
 *
 * Versions:
 *   rmsnorm_kernel1: one 256-thread block per row (grid-stride over rows), block
 *                    reduction of the sum of squares in float.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check: build/tests/test_kern_cuda (CPU vs CUDA, max diffs). */
#include "kern_cuda.h"

__global__ void rmsnorm_kernel1(float *out, const float *x, const float *w, int64_t n, int dim,
                                float eps)
{
    __shared__ float shm[32];
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        const float *xr = x + row * dim; // (dim)
        float *outr = out + row * dim;   // (dim)
        float ss = 0.0f;
        for (int d = threadIdx.x; d < dim; d += blockDim.x) ss += xr[d] * xr[d];
        ss = kern_block_sum(ss, shm);
        float inv = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int d = threadIdx.x; d < dim; d += blockDim.x) outr[d] = w[d] * (inv * xr[d]);
        __syncthreads(); /* out may alias x: finish reading this row before the next */
    }
}

lv_status kern_rmsnorm_cuda(float *d_out, const float *d_x, const float *d_w, int64_t n, int dim,
                            float eps, cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (n <= 0) goto done;
    rmsnorm_kernel1<<<kern_cuda_blocks(n, 1), 256, 0, stream>>>(d_out, d_x, d_w, n, dim, eps);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
