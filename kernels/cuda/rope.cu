/* rope.cu: in-place RoPE on x (B, T, n_heads, head_dim), both pairings.
 *
 * Versions:
 *   rope_kernel1: one thread per (token, head, pair); the angle is computed as
 *                 kern_rope_ref does (float pos * float freq, cosf/sinf, no fast math).
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check: build/tests/test_kern_cuda (CPU vs CUDA, max diffs). */
#include "kern_cuda.h"

__global__ void rope_kernel1(float *x, int64_t n_pairs, int T, int n_heads, int head_dim,
                             int pos0, float theta, int half_style)
{
    const int half = head_dim / 2;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_pairs;
         i += (int64_t)gridDim.x * blockDim.x) {
        int j = (int)(i % half);
        int64_t bth = i / half;           // (token, head) index
        int64_t bt = bth / n_heads;
        float *xh = x + bth * head_dim;   // (head_dim)
        float freq = 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
        float a = (float)(pos0 + (int)(bt % T)) * freq;
        float c = cosf(a), s = sinf(a);
        int lo = half_style ? j : 2 * j, hi = half_style ? j + half : 2 * j + 1;
        float x0 = xh[lo], x1 = xh[hi];
        xh[lo] = x0 * c - x1 * s;
        xh[hi] = x0 * s + x1 * c;
    }
}

lv_status kern_rope_cuda(float *d_x, int B, int T, int n_heads, int head_dim, int pos0,
                         float theta, lv_rope_style style, cudaStream_t stream)
{
    lv_status st = LV_OK;
    int64_t n_pairs = (int64_t)B * T * n_heads * (head_dim / 2);
    if (n_pairs <= 0) goto done;
    rope_kernel1<<<kern_cuda_blocks(n_pairs, 256), 256, 0, stream>>>(
        d_x, n_pairs, T, n_heads, head_dim, pos0, theta, style == LV_ROPE_HALF);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
