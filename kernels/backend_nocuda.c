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
