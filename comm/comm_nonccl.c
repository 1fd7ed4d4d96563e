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
