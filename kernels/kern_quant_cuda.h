/* kern_quant_cuda.h: CUDA twins of the layer-wise quantization hot loops of kern.h
 * ("Layer-wise quantization numerics", kernels/cpu/quant_ref.c), implemented in
 * kernels/cuda/quant.cu.
 *
 * Contract shared by every function below:
 *  - all array arguments are device pointers (d_ prefix), borrowed from the caller;
 *    nothing is allocated (no workspace, no hidden copies);
 *  - stream-async: the work is enqueued on `stream` and the call returns; synchronize
 *    the stream before reading results on the host;
 *  - bad shapes or NULL pointers: LV_ERR_INVALID_ARG, nothing enqueued; a launch
 *    failure: LV_ERR_CUDA with CUDA's message in lv_last_error(); an empty problem
 *    (n or rows == 0) enqueues nothing and returns LV_OK;
 *  - numerics: each kernel performs the reference's floating-point operations in the
 *    reference's order (explicit round-to-nearest intrinsics wherever nvcc would
 *    otherwise fuse a product and a sum into an FMA), each output produced by one
 *    thread, no atomics and no split reductions. For finite inputs the results are
 *    bit-identical to the _ref functions, and to themselves on every run. This
 *    assumes the reference is compiled without FP contraction, GCC's default under
 *    -std=c11 (the build's C standard).
 *
 * See docs/kernels-cuda-quant.md for the kernels' design, the test and the bench. */
#ifndef KERN_QUANT_CUDA_H
#define KERN_QUANT_CUDA_H

#include <stdint.h>

#include "kern.h"

/* 1 when this build has the CUDA kernels below and a CUDA device is usable, else 0.
 * Exists in every build: CPU-only builds answer 0 (lv_cuda_device_count's twin in
 * kernels/backend_nocuda.c). */
static inline int kern_quant_cuda_available(void) { return lv_cuda_device_count() > 0; }

/* Declared for C code of CUDA builds and for nvcc (kernels/cuda/ is compiled without
 * LLMVQ_HAVE_CUDA, which llmvq_core exports to its users). */
#if defined(LLMVQ_HAVE_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* H (d, d) double += X^T X for d_x (n, d) float, both row-major: kern_hessian_accum_ref.
 * A 256-thread block owns a 64x64 tile of H, each thread a 4x4 patch whose elements
 * start from their current H value and add the samples' products in sample order
 * (float*float is exact in double, so an FMA rounds exactly like the reference's
 * add). Both triangles are computed (twice a symmetric update's flops; keeps the
 * reference's semantics for any H). X is staged through 16 KiB of shared memory
 * and read ceil(d/64) times per tile row. Accumulating in batches of samples equals
 * one pass. Cost 2*n*d^2 FP64 FMAs. d <= 4194240. */
lv_status kern_hessian_accum_cuda(double *d_H, const float *d_x, int64_t n, int d,
                                  cudaStream_t stream);

/* Weighted k-means assignment, kern_kmeans_assign_ref on the GPU:
 *   d_idx[i] = argmin_j sum_a w[i,a] (x[i,a] - c[j,a])^2, ties to the lowest j;
 *   d_dist[i] = that minimum (double), skipped when d_dist is NULL.
 * d_x (n, g) float, d_w (n, g) float or NULL for unit weights, d_c (k, g) float,
 * d_idx (n) int32, d_dist (n) double. One thread per point (held in registers for
 * g <= 32, read through L1 above); centroids staged as double through a 16 KiB
 * shared tile in ascending j. Distances use the reference's double operations
 * without FMA: dist is bit-identical and idx equal, exact ties included.
 * Cost 4*n*k*g FP64 ops. 0 < g <= 2048, k > 0. */
lv_status kern_kmeans_assign_cuda(int32_t *d_idx, double *d_dist, const float *d_x,
                                  const float *d_w, int64_t n, int g, const float *d_c, int k,
                                  cudaStream_t stream);

/* Beam-search candidate scores for one (input group, codebook) step of `rows`
 * independent rows at once. Row r is exactly
 *   kern_beam_score_ref(scores + r*nb*K, base + r*nb, u + r*nb*g, cb, cnorm, s[r], nb, K, g):
 *   scores[r, b, k] = base[r, b] - 2 s[r] <cb[k], u[r, b]> + s[r]^2 cnorm[k].
 * d_scores (rows, nb, K) double; d_base (rows, nb) double; d_u (rows, nb, g) double;
 * d_s (rows) double, the rows' scales; d_cb (K, g) float and d_cnorm (K) double are
 * shared by all rows (stage_aq_beam visits groups and codebooks in the same order for
 * every row). A row with fewer live beams pads them with base = NaN: their scores are
 * NaN, which the top-B selection skips. Memory: the output is rows*nb*K*8 bytes
 * (4 MiB per row at nb 8, K 65536): call in row batches that fit. A block scores 256
 * codes for 32 (row, beam) pairs, g in chunks of 8 with the 32 dot products in
 * registers (any g); scores are written once, coalesced along k. Bit-identical to the
 * reference (each product and sum rounded separately, as there).
 * 0 < K <= 16776960 (codes are uint16: K <= 65536 in the pipeline), nb > 0, g > 0. */
lv_status kern_beam_score_batch_cuda(double *d_scores, const double *d_base, const double *d_u,
                                     const double *d_s, const float *d_cb,
                                     const double *d_cnorm, int64_t rows, int nb, int K, int g,
                                     cudaStream_t stream);

/* Additive-codebook dequantization, kern_aq_dequant_ref on the GPU:
 *   w[r, i*g + a] = scales[r] * sum_m codebooks[m, codes[r, i, m], a]  (i*g + a < d_in;
 *   the last group is cut when g does not divide d_in).
 * d_w (n_rows, d_in) float (the layer's (d_out, d_in) weight), d_codes
 * (n_rows, n_groups, M) uint16, d_codebooks (M, K, g) float, d_scales (n_rows) float or
 * NULL for 1. One thread per weight, grid-stride; the float sum over m in order then
 * one multiply, as the reference: bit-identical. Codes are not range-checked on the
 * device (< K is the caller's invariant, as for the reference).
 * n_groups = ceil(d_in / g). */
lv_status kern_aq_dequant_cuda(float *d_w, const uint16_t *d_codes, const float *d_codebooks,
                               const float *d_scales, int64_t n_rows, int64_t d_in,
                               int64_t n_groups, int M, int K, int g, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* LLMVQ_HAVE_CUDA || __CUDACC__ */

#endif
