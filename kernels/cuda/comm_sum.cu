/* comm_sum.cu: the rank-ordered sum behind comm_allreduce_sum_f32_dev (comm/).
 * NCCL's own all-reduce adds in an order that depends on the ring/tree and the
 * rank count; gathering every rank's buffer and adding them here in rank order
 * gives the floats of the host all-reduce, on any number of ranks. */
#include <cuda_runtime.h>
#include <stdint.h>

__global__ static void sum_ranks(float *out, const float *in, int64_t n, int n_ranks)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float acc = in[i];
        for (int r = 1; r < n_ranks; r++) acc = __fadd_rn(acc, in[(int64_t)r * n + i]);
        out[i] = acc;
    }
}

extern "C" int lv_cuda_sum_ranks(float *out, const float *in, int64_t n, int n_ranks,
                                 void *stream)
{
    if (n <= 0) return (int)cudaSuccess;
    int64_t blocks = (n + 255) / 256;
    if (blocks > 65535 * 8) blocks = 65535 * 8;
    sum_ranks<<<(unsigned)blocks, 256, 0, (cudaStream_t)stream>>>(out, in, n, n_ranks);
    return (int)cudaGetLastError();
}
