/* comm_nonccl.c: builds without CUDA use MPI only. */
#include "comm_impl.h"

lv_status comm_nccl_setup(comm_ctx *c, int allow_nccl)
{
    (void)allow_nccl;
    c->backend = COMM_BACKEND_MPI;
    c->nccl = NULL;
    return LV_OK;
}

void comm_nccl_teardown(comm_ctx *c) { (void)c; }

/* No CUDA in this build: there are no device buffers to move. */
static lv_status no_cuda(const char *what)
{
    lv_status st = LV_OK;
    LV_FAIL(LV_ERR_UNSUPPORTED, "%s: device buffers need a CUDA build of llmvq", what);
done:
    return st;
}

lv_status comm_send_dev(comm_ctx *c, const void *d_buf, size_t bytes, int dst)
{
    (void)c, (void)d_buf, (void)bytes, (void)dst;
    return no_cuda("send (device buffer)");
}

lv_status comm_recv_dev(comm_ctx *c, void *d_buf, size_t bytes, int src)
{
    (void)c, (void)d_buf, (void)bytes, (void)src;
    return no_cuda("receive (device buffer)");
}

lv_status comm_bcast_dev(comm_ctx *c, void *d_buf, size_t bytes, int root)
{
    (void)c, (void)d_buf, (void)bytes, (void)root;
    return no_cuda("broadcast (device buffer)");
}

lv_status comm_allreduce_sum_f32_dev(comm_ctx *c, float *d_buf, int64_t n)
{
    (void)c, (void)d_buf, (void)n;
    return no_cuda("all-reduce (device buffer)");
}
