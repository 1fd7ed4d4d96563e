/* matmul.cu: out (n, d_out) = x (n, d_in) @ w^T on the GPU.
 *
 * Versions:
 *   cublas: cublasSgemm in FP32 (the handle's default math mode: no TF32), so it
 *           matches kern_matmul_ref to FP32 rounding.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check / benchmark: build/tests/test_kern_cuda (CPU vs CUDA, max diffs), build/bench_forward. */
#include <climits>

#include "kern_cuda.h"

lv_status kern_matmul_cuda(cublasHandle_t h, float *d_y, const float *d_x, const float *d_w,
                           int64_t n, int d_in, int d_out)
{
    lv_status st = LV_OK;
    const float one = 1.0f, zero = 0.0f;
    const int64_t max_rows = INT_MAX / 2;
    int64_t r0 = 0, rows = 0;
    /* Row-major out = x w^T is column-major out^T = w^T(op T of w's column view) x^T. */
    for (r0 = 0; r0 < n; r0 += max_rows) {
        rows = n - r0 < max_rows ? n - r0 : max_rows;
        KERN_CUBLAS_TRY(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, d_out, (int)rows, d_in, &one,
                                    d_w, d_in, d_x + r0 * d_in, d_in, &zero,
                                    d_y + r0 * d_out, d_out));
    }
done:
    return st;
}
