/* kern_qmm.h: matrix products straight from additive-codebook codes (AQLM), without
 * dequantizing the whole matrix. For a quantized linear L (lv_quant.h),
 *   What[r, i*g + a] = scales[r] * sum_m codebooks[m, codes[r, i, m], a],
 * they compute y (n, d_out) = x (n, d_in) @ What^T.
 *
 * CPU (kernels/cpu/qmm.c): host pointers, synchronous, OpenMP inside. Three algorithms;
 * kern_aq_gemm picks one from the shape and the ISA (kern_aq_algo_auto). The hot loops of
 * LUT and GATHER exist as portable C and as AVX2 / AVX-512 twins picked at run time
 * (kern_aq_isa below) that perform the same float operations in the same order: all ISAs
 * give the same bits.
 *
 *  LUT (nbits <= 8, g >= 8, d_out >= 4 * 2^nbits; n < 8, or n <= 16 with AVX-512; with
 *    AVX2 only for configs other than 2xBg8 / 1xBg8, see kern_aq_algo_auto). Per
 *    input row b, group i and codebook m a lookup table
 *    LUT[b, e, k] = <x[b, i*g : i*g+g], codebooks[m, k]>,  e = i*M + m   (n*n_groups*M*2^nbits floats)
 *    is built once (M*2^nbits*d_in multiply-adds per input row, over k through a transposed
 *    copy of the codebooks), then each output is ONE sum in order of e:
 *    y[b, r] = scales[r] * (((LUT[b, 0, c[r,0]] + LUT[b, 1, c[r,1]]) + LUT[b, 2, c[r,2]]) + ...)
 *    (c[r, e] the row's codes, flat): M table reads per group of g weights. OpenMP over
 *    tiles of 256 output rows. Portable: 8 rows at a time inside chunks of e whose tables
 *    (16 KiB) stay in L1. AVX-512 (F + BW): 32 rows per register, the codes used as the
 *    index of word permutes over the table of one e held in 16 registers (the fp32 entries
 *    split into high and low 16-bit planes, rebuilt exactly), the codes transposed on the
 *    fly once for the whole batch; no gathers.
 *  GATHER (any nbits, small batch; the 1x16 path, and 2xBg8 / 1xBg8 with AVX2). One row
 *    of W at a time: for one input row and the configs 1xBg8, 2xBg8, 1xBg4 the codebook
 *    vectors are gathered and multiplied straight into 16 lane sums (nothing stored);
 *    otherwise the row is decoded once into a per-thread buffer (d_in floats) and dotted
 *    with every input row, so one decode serves the batch:
 *    y[b, r] = scales[r] * <x[b], sum_m codebooks[m, codes[r, ., m]]>,
 *    both with lane l taking columns j = l mod 16 (the same sums). AVX2, g = 8, M <= 2, any
 *    n: the lanes in two registers, blocks of 4 rows (n = 1), 2 rows x 2 input rows (n = 2)
 *    or 1 row x 4 input rows run together, each codebook vector gathered once per block of
 *    input rows, each x vector once per block of rows. With AVX2 and 1xBg8, B >= 12: when
 *    every codebook value is exactly an fp16 (AQLM checkpoints store fp16 codebooks), the
 *    gathers read an fp16 copy made per call (half the bytes of random reads; same values,
 *    same bits); otherwise the fp32 one.
 *  TILE (batch >= 8 when LUT does not apply, e.g. 1x16 evaluation windows). Tiles of rows
 *    of What (about 4 MiB) are decoded with kern_aq_dequant_ref's arithmetic and multiplied
 *    by one cblas_sgemm each: the matrix is decoded once per call, the FLOPs run at sgemm
 *    speed. The decode is the reference's, so TILE matches kern_aq_gemm_ref to sgemm's
 *    blocking (bit for bit in the tests).
 *
 * Determinism: every output's summation order is fixed by the shape alone (fixed row
 * tiles and lane counts, one sum per row in LUT), so results depend neither on the number
 * of OpenMP threads nor on the ISA. TILE's products are OpenBLAS's sgemm, whose bits can
 * change with OPENBLAS_NUM_THREADS (as kern_matmul_ref's do). LUT and GATHER round
 * differently from kern_aq_gemm_ref: a few ulps of sum_j |x_j * What_rj| per output (the
 * tests bound it by 1e-5 times that sum; measured <= 3.5e-7). No reduced-precision tables.
 *
 * Codes must be < 2^nbits (the caller's invariant, as for kern_aq_dequant_ref; not
 * checked per element). L's arrays are borrowed for the duration of a call.
 * Measurements and the choice of thresholds: docs/kernels-qmm.md. */
#ifndef KERN_QMM_H
#define KERN_QMM_H

#include <stddef.h>
#include <stdint.h>

#include "lv.h"
#include "lv_quant.h"

/* Which algorithm kern_aq_gemm_algo runs (see above). Append-only. */
typedef enum {
    KERN_AQ_AUTO = 0, /* kern_aq_algo_auto(L, n) */
    KERN_AQ_LUT,      /* nbits <= 8 only (LV_ERR_UNSUPPORTED otherwise) */
    KERN_AQ_GATHER,
    KERN_AQ_TILE,
} kern_aq_algo;

/* "auto", "lut", "gather", "tile". */
const char *kern_aq_algo_name(kern_aq_algo a);

/* What KERN_AQ_AUTO runs for this layer and batch (with the ISA of kern_aq_isa_get());
 * a function of the shape and the ISA only, never of timings. In order:
 *  1. AVX-512, LUT applicable (nbits <= 8, g >= 8, d_out >= 4 * 2^nbits), n <= 16: LUT;
 *  2. AVX2 (no AVX-512), g = 8, M <= 2: GATHER for n < 8, and for n = 8 when nbits <= 8;
 *  3. n >= 8: TILE;
 *  4. LUT applicable: LUT; else GATHER. (docs/kernels-qmm.md: the measurements.) */
kern_aq_algo kern_aq_algo_auto(const lv_aq_layer *L, int64_t n);

/* Instruction sets of the LUT and GATHER hot loops. PORTABLE: plain C (the build's
 * baseline ISA). AVX2: the same loops with 8-lane gathers / loads, compiled for AVX2 only
 * in this file and picked at run time (__builtin_cpu_supports); they perform the same
 * float operations in the same order per lane, so both give the same bits (tested).
 * Append-only. */
typedef enum {
    KERN_AQ_ISA_AUTO = 0, /* AVX2 when the CPU has it, else PORTABLE */
    KERN_AQ_ISA_PORTABLE,
    KERN_AQ_ISA_AVX2,
    KERN_AQ_ISA_AVX512,   /* AVX-512 F + BW word permutes for LUT; AVX2 for the rest */
} kern_aq_isa;

/* "auto", "portable", "avx2", "avx512". */
const char *kern_aq_isa_name(kern_aq_isa isa);

/* Process-wide choice for later kern_aq_gemm calls (tests and benchmarks compare the
 * two); not to be called while another thread is inside kern_aq_gemm. LV_ERR_UNSUPPORTED
 * for AVX2 on a CPU or build without it; LV_ERR_INVALID_ARG for an unknown value. */
lv_status kern_aq_isa_set(kern_aq_isa isa);

/* What the next kern_aq_gemm call runs: PORTABLE or AVX2, never AUTO. */
kern_aq_isa kern_aq_isa_get(void);

/* Scratch memory of the fast path, grown on demand and reused across calls (one per
 * thread of the caller; not shared between concurrent calls). After a first call with
 * the largest layer and batch it allocates nothing more. Size, in floats:
 *   LUT:    M*g*2^nbits (transposed codebooks) + n*n_groups*M*2^nbits (tables),
 *           e.g. 1 MiB per input row for 2x8g8 at d_in 4096; with AVX-512 as much again
 *           (the 16-bit planes) + per thread 2*n*256 floats and 64*256 u16;
 *   GATHER: none for n = 1 with 1xBg8, 2xBg8, 1xBg4, nor with AVX2 for 1xBg8, 2xBg8 at
 *           any n (but 2^nbits * 4 floats, the fp16 codebook copy, for 1xBg8, B >= 12
 *           with AVX2: 1 MiB for 1x16g8; with AVX2, codebooks of up to 64 Ki floats not
 *           on a 32-byte boundary are copied to an aligned one: 16 KiB for 2x8g8); else
 *           omp_get_max_threads() * d_in (one decoded row per thread);
 *   TILE:   rows_per_tile * d_in, about 4 MiB (at least 64 rows). */
typedef struct kern_aq_ws kern_aq_ws;
lv_status kern_aq_ws_init(kern_aq_ws **ws);
void kern_aq_ws_free(kern_aq_ws *ws);
/* Bytes the workspace holds now. */
size_t kern_aq_ws_bytes(const kern_aq_ws *ws);

/* Reference: y (n, d_out) = x (n, d_in) @ What^T by kern_aq_dequant_ref into a temporary
 * (d_out, d_in) float matrix and one sgemm (kern_matmul_ref). The oracle of the tests.
 * LV_ERR_NOMEM when the temporary cannot be allocated; LV_ERR_INVALID_ARG on a bad
 * layer or shape. */
lv_status kern_aq_gemm_ref(float *y, const float *x, const lv_aq_layer *L, int64_t n);

/* Fast path: y (n, d_out) = x (n, d_in) @ What^T with algorithm kern_aq_algo_auto(L, n).
 * ws may be NULL (scratch allocated and freed inside the call). y must not overlap x.
 * LV_ERR_NOMEM when scratch cannot be allocated; LV_ERR_INVALID_ARG on a bad layer or
 * shape (n_groups != ceil(d_in / g), nbits outside 1..16, NULL arrays). n == 0: no-op. */
lv_status kern_aq_gemm(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                       kern_aq_ws *ws);

/* kern_aq_gemm with a chosen algorithm (tests and benchmarks run each one). */
lv_status kern_aq_gemm_algo(float *y, const float *x, const lv_aq_layer *L, int64_t n,
                            kern_aq_algo algo, kern_aq_ws *ws);

/* ------------------------------------------------------------------------
 * CUDA (kernels/cuda/qmm.cu): C-callable launchers on device pointers, stream-async.
 * Declared for C code of CUDA builds and for nvcc, as in kern_quant_cuda.h.
 * ---------------------------------------------------------------------- */
#if defined(LLMVQ_HAVE_CUDA) || defined(__CUDACC__)
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The layer's arrays on the device, borrowed: the host lv_aq_layer's shape with
 * device copies of codes (d_out, n_groups, M) uint16, codebooks (M, 2^nbits, g) float
 * and scales (d_out) float (or NULL for 1). */
typedef struct {
    int64_t d_out, d_in, n_groups;
    int M, nbits, g;
    const uint16_t *d_codes;
    const float *d_codebooks;
    const float *d_scales;
} kern_aq_dev_layer;

/* Largest batch the CUDA kernels take (larger: decode tiles and use cuBLAS). */
#define KERN_AQ_CUDA_MAX_BATCH 8

/* Bytes of device scratch kern_aq_gemm_lut_cuda needs for this layer and batch:
 * ceil(n_groups / 64) * n * d_out floats of split-K partial sums. */
size_t kern_aq_gemm_lut_cuda_ws_bytes(const kern_aq_dev_layer *L, int64_t n);

/* d_y (n, d_out) = d_x (n, d_in) @ What^T for nbits <= 8, 1 <= n <= 8: the LUT algorithm
 * with the tables in shared memory. Grid (ceil(d_out / 128), ceil(n_groups / 64)): a
 * block of 128 threads owns 128 output rows (one per thread) and a slice of 64 groups;
 * it builds the LUTs of its slice chunk by chunk in shared memory (n * chunk * M * 2^nbits
 * floats, at most 32 KiB, one entry per thread in turn), then each thread adds the
 * entries its row's codes select. Each slice writes its partial sums to d_ws; a second
 * kernel adds the slices in order and applies the scales. Every output is summed by one
 * thread in a fixed order: deterministic. Needs n * M * 2^nbits * 4 <= 32 KiB (one
 * group's tables), else LV_ERR_UNSUPPORTED; d_ws of kern_aq_gemm_lut_cuda_ws_bytes(L, n)
 * bytes (caller-owned, device). Stream-async; allocates nothing. */
lv_status kern_aq_gemm_lut_cuda(float *d_y, const float *d_x, const kern_aq_dev_layer *L,
                                int64_t n, float *d_ws, size_t ws_bytes, cudaStream_t stream);

/* d_y (n, d_out) = d_x (n, d_in) @ What^T for any nbits (the 1x16 path), 1 <= n <= 8:
 * codebook gather. A warp owns one output row at a time (grid-stride); lane l takes
 * groups l, l+32, ..., gathers sum_m codebooks[m, code] (g floats, read through L1/L2)
 * and multiplies it into the n sums of its lane, so each gathered group serves the whole
 * batch; the lanes are then added in a fixed shuffle tree: deterministic. Stream-async;
 * allocates nothing. */
lv_status kern_aq_gemm_gather_cuda(float *d_y, const float *d_x, const kern_aq_dev_layer *L,
                                   int64_t n, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
#endif /* LLMVQ_HAVE_CUDA || __CUDACC__ */

#endif
