/* comm_nccl.c: NCCL setup for CUDA builds (nccl-tests pattern: ncclGetUniqueId
 * on rank 0, broadcast over MPI, ncclCommInitRank). NCCL is used only when
 * every rank sees a GPU: one rank without => MPI for all, decided together. */
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "comm_impl.h"
#include "kern.h"

static int local_rank(MPI_Comm comm)
{
    MPI_Comm node;
    int r = 0;
    if (MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
        return 0;
    MPI_Comm_rank(node, &r);
    MPI_Comm_free(&node);
    return r;
}

lv_status comm_nccl_setup(comm_ctx *c, int allow_nccl)
{
    lv_status st = LV_OK, global = LV_OK;
    ncclComm_t nc = NULL;
    int n_dev = lv_cuda_device_count();
    int all_gpu = 0;
    c->backend = COMM_BACKEND_MPI;
    c->nccl = NULL;
    /* agree_flag computes "any"; "all have a GPU" = not any lacks one */
    int any_without = 0;
    LV_TRY(comm_agree_flag(c, !(allow_nccl && n_dev > 0), &any_without));
    all_gpu = !any_without;
    if (!all_gpu) goto done;

    ncclUniqueId id;
    lv_status local = LV_OK;
    if (c->rank == 0 && ncclGetUniqueId(&id) != ncclSuccess) local = LV_ERR_NCCL;
    LV_TRY(comm_agree_status(c, local, &global, NULL));
    if (global != LV_OK) LV_FAIL(LV_ERR_NCCL, "NCCL: ncclGetUniqueId failed on rank 0");
    LV_TRY(comm_bcast(c, &id, sizeof id, 0));
    int dev = local_rank(c->comm) % n_dev;
    local = LV_OK;
    ncclResult_t nr = ncclSuccess;
    if (cudaSetDevice(dev) != cudaSuccess) {
        local = LV_ERR_CUDA;
    } else {
        nr = ncclCommInitRank(&nc, c->size, id, c->rank);
        if (nr != ncclSuccess) local = LV_ERR_NCCL;
    }
    LV_TRY(comm_agree_status(c, local, &global, NULL));
    if (global != LV_OK)
        LV_FAIL(LV_ERR_NCCL, "NCCL: communicator setup failed (this rank: device %d, %s)", dev,
                nr != ncclSuccess ? ncclGetErrorString(nr) : "ok");
    c->nccl = nc;
    nc = NULL;
    c->backend = COMM_BACKEND_NCCL;
done:
    if (nc) ncclCommAbort(nc);
    return st;
}

void comm_nccl_teardown(comm_ctx *c)
{
    if (!c || !c->nccl) return;
    ncclCommDestroy((ncclComm_t)c->nccl);
    c->nccl = NULL;
}
