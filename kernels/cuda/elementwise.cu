/* elementwise.cu: SwiGLU, row softmax and embedding lookup on the GPU.
 *
 * Versions:
 *   swiglu_kernel1:  grid-stride, out = silu(gate) * up (expf, no fast math).
 *   softmax_kernel1: one 256-thread block per row: max, sum of exp, scale.
 *   embed_kernel1:   grid-stride copy of emb rows; a negative token gives a NaN row
 *                    (the op is not told the vocabulary size).
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check: build/tests/test_kern_cuda (CPU vs CUDA, max diffs). */
#include "kern_cuda.h"

__global__ void swiglu_kernel1(float *out, const float *gate, const float *up, int64_t n)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

__global__ void softmax_kernel1(float *x, int64_t n, int d)
{
    __shared__ float red[32];
    for (int64_t row = blockIdx.x; row < n; row += gridDim.x) {
        float *xr = x + row * d; // (d)
        float mx = -INFINITY;
        for (int j = threadIdx.x; j < d; j += blockDim.x) mx = fmaxf(mx, xr[j]);
        mx = kern_block_max(mx, red);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float e = expf(xr[j] - mx);
            xr[j] = e;
            sum += e;
        }
        sum = kern_block_sum(sum, red);
        const float inv = 1.0f / sum;
        for (int j = threadIdx.x; j < d; j += blockDim.x) xr[j] *= inv;
    }
}

__global__ void embed_kernel1(float *out, const float *emb, const int32_t *tokens, int64_t n,
                              int dim, int vocab)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n * dim;
         i += (int64_t)gridDim.x * blockDim.x) {
        int32_t tok = tokens[i / dim];
        out[i] = tok >= 0 && tok < vocab ? emb[(int64_t)tok * dim + i % dim] : NAN;
    }
}

lv_status kern_swiglu_cuda(float *d_out, const float *d_gate, const float *d_up, int64_t n,
                           cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (n <= 0) goto done;
    swiglu_kernel1<<<kern_cuda_blocks(n, 256), 256, 0, stream>>>(d_out, d_gate, d_up, n);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

lv_status kern_softmax_cuda(float *d_x, int64_t n, int d, cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (n <= 0) goto done;
    softmax_kernel1<<<kern_cuda_blocks(n, 1), 256, 0, stream>>>(d_x, n, d);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

lv_status kern_embed_cuda(float *d_out, const float *d_emb, const int32_t *d_tokens, int64_t n,
                          int dim, cudaStream_t stream)
{
    lv_status st = LV_OK;
    if (n <= 0) goto done;
    embed_kernel1<<<kern_cuda_blocks(n * dim, 256), 256, 0, stream>>>(d_out, d_emb, d_tokens, n,
                                                                       dim, INT32_MAX);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
