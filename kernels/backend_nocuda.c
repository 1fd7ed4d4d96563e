/* backend_nocuda.c: the CUDA entry points of kern.h for builds without CUDA
 * (CMake drops this file when the CUDA backend is built). */
#include "kern.h"

lv_status lv_backend_cuda_init(lv_backend **be, int device)
{
    lv_status st = LV_OK;
    if (be) *be = NULL;
    LV_FAIL(LV_ERR_UNSUPPORTED,
            "this llmvq was built without CUDA (configure with -DLLMVQ_CUDA=ON)");
done:
    return st;
}

int lv_cuda_device_count(void) { return 0; }

/* kern_ftcuda.h (the block forward/backward of PV-tuning on the GPU). */
#include "kern_ftcuda.h"

lv_status kern_ftcuda_init(kern_ftcuda **ws, const lv_model_config *cfg, const lv_qblock *b,
                           int B, int T)
{
    lv_status st = LV_OK;
    (void)cfg, (void)b, (void)B, (void)T;
    if (ws) *ws = NULL;
    LV_FAIL(LV_ERR_UNSUPPORTED,
            "this llmvq was built without CUDA (configure with -DLLMVQ_CUDA=ON)");
done:
    return st;
}

void kern_ftcuda_free(kern_ftcuda *ws) { (void)ws; }

lv_status kern_ftcuda_forward(kern_ftcuda *ws, const lv_qblock *b, const float *x, int B, int T,
                              float *y)
{
    lv_status st = LV_OK;
    (void)ws, (void)b, (void)x, (void)B, (void)T, (void)y;
    LV_FAIL(LV_ERR_UNSUPPORTED, "this llmvq was built without CUDA");
done:
    return st;
}

lv_status kern_ftcuda_backward(kern_ftcuda *ws, const lv_qblock *b, const float *dy,
                               int accumulate, float *grad, float *dx, float *const *dW)
{
    lv_status st = LV_OK;
    (void)ws, (void)b, (void)dy, (void)accumulate, (void)grad, (void)dx, (void)dW;
    LV_FAIL(LV_ERR_UNSUPPORTED, "this llmvq was built without CUDA");
done:
    return st;
}
