/* kern_ftcuda.h: the CUDA twin of the quantized-block forward and backward of
 * stages/finetune_grad.c (stage_ft_block_forward_save / stage_ft_block_backward),
 * for PV-tuning on a GPU (pvtune.device = cuda). Implemented in
 * kernels/cuda/block_grad.cu; without CUDA (kernels/backend_nocuda.c) every call
 * is LV_ERR_UNSUPPORTED.
 *
 * Host pointers in and out (the workspace holds the device copies): the block's
 * codes, codebooks, scales, outlier corrections and norms are uploaded by each
 * forward, x is kept on the device for the backward. Same contract as the CPU
 * functions: grad in stage_ft_param_segments order (the 7 linears' codebooks and
 * scales, then attn_norm and ffn_norm), dW[k] = dL/dWhat of linear k, dx =
 * dL/dx; accumulate 1 adds to grad and dW, 0 overwrites; any output may be NULL.
 *
 * Numerics: the same op sequence as the CPU; the GEMMs are cuBLAS FP32 (no TF32),
 * the reductions run in a fixed order (no atomics): deterministic on a given GPU,
 * equal to the CPU to fp32 rounding (tests/test_ft_grad_cuda.c states the
 * tolerances). The codebook gradient sums each entry's rows in (row, group)
 * order in double, as the CPU does. Memory: the CPU workspace's activations plus
 * 2 B n_heads T^2 floats (attention probabilities and their gradient). */
#ifndef KERN_FTCUDA_H
#define KERN_FTCUDA_H

#include "lv.h"
#include "lv_model.h"
#include "lv_quant.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kern_ftcuda kern_ftcuda;

/* Workspace on the current CUDA device for batches of up to B sequences of T
 * tokens of blocks shaped like b (its linears' M, nbits, g and d_out, d_in). */
lv_status kern_ftcuda_init(kern_ftcuda **ws, const lv_model_config *cfg, const lv_qblock *b,
                           int B, int T);
void kern_ftcuda_free(kern_ftcuda *ws);

/* y (B, T, dim) = block b applied to x (B, T, dim) (y may be NULL); the
 * activations stay on the device for kern_ftcuda_backward. */
lv_status kern_ftcuda_forward(kern_ftcuda *ws, const lv_qblock *b, const float *x, int B, int T,
                              float *y);

/* Backward of the last forward from dy (B, T, dim); b unchanged since. */
lv_status kern_ftcuda_backward(kern_ftcuda *ws, const lv_qblock *b, const float *dy,
                               int accumulate, float *grad, float *dx, float *const *dW);

#ifdef __cplusplus
}
#endif

#endif
