/* attention.cu: causal attention with GQA, scale 1/sqrt(head_dim).
 * q (B, T, n_heads*hd), k, v (B, T, n_kv_heads*hd) -> out (B, T, n_heads*hd).
 *
 * Versions:
 *   attention_kernel1: simple and correct, not fast. One 128-thread block per
 *                      (b, head, query t): scores for keys 0..t in shared memory,
 *                      block max/sum reductions, then out[d] = sum_s p_s v_s[d] with
 *                      threads over d. Shared memory: (hd + T) floats.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check: build/tests/test_kern_cuda (CPU vs CUDA, max diffs). */
#include "kern_cuda.h"

__global__ void attention_kernel1(float *out, const float *q, const float *k, const float *v,
                                  int T, int n_heads, int n_kv_heads, int hd, float scale)
{
    extern __shared__ float smem[];
    __shared__ float red[32];
    float *qs = smem;       // (hd) this query
    float *att = smem + hd; // (T) scores, then probabilities
    const int64_t idx = blockIdx.x; // (b, h, t), t fastest
    const int t = (int)(idx % T);
    const int h = (int)((idx / T) % n_heads);
    const int64_t b = idx / ((int64_t)T * n_heads);
    const int64_t qstride = (int64_t)n_heads * hd, kvstride = (int64_t)n_kv_heads * hd;
    const float *qrow = q + (b * T + t) * qstride + (int64_t)h * hd;
    const int64_t kv_off = b * T * kvstride + (int64_t)(h / (n_heads / n_kv_heads)) * hd;

    for (int d = threadIdx.x; d < hd; d += blockDim.x) qs[d] = qrow[d];
    __syncthreads();
    float mx = -INFINITY;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        const float *ks = k + kv_off + s * kvstride;
        float dot = 0.0f;
        for (int d = 0; d < hd; d++) dot += qs[d] * ks[d];
        att[s] = dot * scale;
        mx = fmaxf(mx, att[s]);
    }
    mx = kern_block_max(mx, red);
    float sum = 0.0f;
    for (int s = threadIdx.x; s <= t; s += blockDim.x) {
        att[s] = expf(att[s] - mx);
        sum += att[s];
    }
    sum = kern_block_sum(sum, red); /* its __syncthreads also publishes att[] */
    const float inv = 1.0f / sum;
    float *orow = out + (b * T + t) * qstride + (int64_t)h * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        const float *vd = v + kv_off + d;
        float acc = 0.0f;
        for (int s = 0; s <= t; s++) acc += att[s] * vd[s * kvstride];
        orow[d] = acc * inv;
    }
}

lv_status kern_attention_cuda(float *d_out, const float *d_q, const float *d_k, const float *d_v,
                              int B, int T, int n_heads, int n_kv_heads, int head_dim,
                              cudaStream_t stream)
{
    lv_status st = LV_OK;
    int64_t n_blocks = (int64_t)B * n_heads * T;
    size_t shm = (size_t)(head_dim + T) * sizeof(float);
    int dev = 0, shm_max = 0;
    if (n_blocks <= 0) goto done;
    if (n_blocks > INT32_MAX)
        LV_FAIL(LV_ERR_UNSUPPORTED, "attention: %lld (b, head, t) blocks is over the grid limit",
                (long long)n_blocks);
    if (shm + 32 * sizeof(float) > 48 * 1024) {
        /* above the default 48 KiB (static red[32] included): opt in, up to what
         * the device allows */
        KERN_CUDA_TRY(cudaGetDevice(&dev));
        KERN_CUDA_TRY(cudaDeviceGetAttribute(&shm_max, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
        if (shm + 32 * sizeof(float) > (size_t)shm_max)
            LV_FAIL(LV_ERR_UNSUPPORTED,
                    "attention_kernel1: T=%d needs %zu bytes of shared memory, device has %d",
                    T, shm, shm_max);
        KERN_CUDA_TRY(cudaFuncSetAttribute(attention_kernel1,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shm));
    }
    attention_kernel1<<<(unsigned)n_blocks, 128, shm, stream>>>(
        d_out, d_q, d_k, d_v, T, n_heads, n_kv_heads, head_dim, 1.0f / sqrtf((float)head_dim));
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}
