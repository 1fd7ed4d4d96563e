/* kern_cuda.h: private to kernels/cuda/ (C++ only). The CUDA launchers behind the
 * CUDA lv_backend, and the error macros that turn CUDA/cuBLAS codes into lv_status.
 * All pointers are device pointers; every launcher is stream-async on `stream`. */
#ifndef KERN_CUDA_H
#define KERN_CUDA_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "kern_impl.h"

/* Inside a function with `lv_status st` and a `done:` label (locals declared
 * before the first use: C++ forbids jumping over initializations). */
#define KERN_CUDA_TRY(expr)                                                        \
    do {                                                                           \
        cudaError_t kern_e_ = (expr);                                              \
        if (kern_e_ != cudaSuccess)                                                \
            LV_FAIL(LV_ERR_CUDA, "%s: %s (%s)", #expr, cudaGetErrorString(kern_e_), \
                    cudaGetErrorName(kern_e_));                                    \
    } while (0)

#define KERN_CUBLAS_TRY(expr)                                                      \
    do {                                                                           \
        cublasStatus_t kern_s_ = (expr);                                           \
        if (kern_s_ != CUBLAS_STATUS_SUCCESS)                                      \
            LV_FAIL(LV_ERR_CUDA, "%s: %s", #expr, cublasGetStatusString(kern_s_));  \
    } while (0)

/* Blocks for a grid over n items, capped so the kernels' grid-stride loops cover the rest. */
static inline unsigned kern_cuda_blocks(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 65535 * 8 ? 65535 * 8 : b));
}

/* ---- block reductions (blockDim.x a multiple of 32, <= 1024; shm: 32 floats).
 * Every thread of the block gets the result. */
__device__ inline float kern_warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ inline float kern_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ inline float kern_block_sum(float v, float *shm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = kern_warp_sum(v);
    __syncthreads(); /* shm may still be read by a previous reduction */
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    return kern_warp_sum(lane < n_warps ? shm[lane] : 0.0f);
}

__device__ inline float kern_block_max(float v, float *shm)
{
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    v = kern_warp_max(v);
    __syncthreads();
    if (lane == 0) shm[warp] = v;
    __syncthreads();
    return kern_warp_max(lane < n_warps ? shm[lane] : -INFINITY);
}

/* d_y (n, d_out) = d_x (n, d_in) @ d_w^T, d_w (d_out, d_in): cuBLAS sgemm (FP32, no TF32). */
lv_status kern_matmul_cuda(cublasHandle_t h, float *d_y, const float *d_x, const float *d_w,
                           int64_t n, int d_in, int d_out);
lv_status kern_rmsnorm_cuda(float *d_out, const float *d_x, const float *d_w, int64_t n, int dim,
                            float eps, cudaStream_t stream);
lv_status kern_rope_cuda(float *d_x, int B, int T, int n_heads, int head_dim, int pos0,
                         float theta, lv_rope_style style, cudaStream_t stream);
lv_status kern_attention_cuda(float *d_out, const float *d_q, const float *d_k, const float *d_v,
                              int B, int T, int n_heads, int n_kv_heads, int head_dim,
                              cudaStream_t stream);
lv_status kern_swiglu_cuda(float *d_out, const float *d_gate, const float *d_up, int64_t n,
                           cudaStream_t stream);
lv_status kern_softmax_cuda(float *d_x, int64_t n, int d, cudaStream_t stream);
lv_status kern_embed_cuda(float *d_out, const float *d_emb, const int32_t *d_tokens, int64_t n,
                          int dim, cudaStream_t stream);

#endif
