/* comm_nccl.c: NCCL setup for CUDA builds (nccl-tests pattern: ncclGetUniqueId
 * on rank 0, broadcast over MPI, ncclCommInitRank). NCCL is used only when
 * every rank sees a GPU: one rank without => MPI for all, decided together. */
#include <stdlib.h>
#include <string.h>
#include <time.h>

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
    cudaStream_t stream = NULL;
    if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess)
        LV_FAIL(LV_ERR_CUDA, "NCCL: cannot create the communication stream on device %d", dev);
    c->stream = stream;
    c->nccl = nc;
    nc = NULL;
    c->backend = COMM_BACKEND_NCCL;
done:
    if (nc) ncclCommAbort(nc);
    return st;
}

void comm_nccl_teardown(comm_ctx *c)
{
    if (!c) return;
    if (c->nccl) ncclCommDestroy((ncclComm_t)c->nccl);
    if (c->stream) cudaStreamDestroy((cudaStream_t)c->stream);
    c->nccl = NULL;
    c->stream = NULL;
}

/* ---------------------------------------------------------------- device buffers */

/* After a failed or timed-out NCCL call the communicator cannot be trusted:
 * abort it; later calls fall back to MPI (the job is stopping anyway). */
static void nccl_abort(comm_ctx *c)
{
    if (c->nccl) ncclCommAbort((ncclComm_t)c->nccl);
    c->nccl = NULL;
    c->backend = COMM_BACKEND_MPI;
}

static lv_status nccl_check(comm_ctx *c, ncclResult_t r, const char *what)
{
    lv_status st = LV_OK;
    if (r != ncclSuccess) {
        nccl_abort(c);
        LV_FAIL(LV_ERR_NCCL, "%s: NCCL: %s", what, ncclGetErrorString(r));
    }
done:
    return st;
}

/* Poll the stream until the enqueued NCCL work is done, against the deadline,
 * watching for asynchronous NCCL errors (a peer that died). */
static lv_status nccl_wait(comm_ctx *c, const char *what, int peer)
{
    lv_status st = LV_OK;
    const double deadline = lv_now() + c->timeout_s;
    long sleep_ns = 1000;
    for (;;) {
        cudaError_t e = cudaStreamQuery((cudaStream_t)c->stream);
        if (e == cudaSuccess) break;
        if (e != cudaErrorNotReady) {
            nccl_abort(c);
            LV_FAIL(LV_ERR_CUDA, "%s (peer %d): CUDA: %s", what, peer, cudaGetErrorString(e));
        }
        ncclResult_t ar = ncclSuccess;
        if (ncclCommGetAsyncError((ncclComm_t)c->nccl, &ar) != ncclSuccess || ar != ncclSuccess) {
            nccl_abort(c);
            LV_FAIL(LV_ERR_NCCL, "%s (peer %d): NCCL asynchronous error: %s", what, peer,
                    ncclGetErrorString(ar));
        }
        if (lv_now() > deadline) {
            nccl_abort(c);
            LV_FAIL(LV_ERR_NCCL, "%s (peer %d) timed out after %.3g s: a rank died or stopped "
                    "answering", what, peer, c->timeout_s);
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000) sleep_ns *= 2;
    }
done:
    return st;
}

/* MPI backend in a CUDA build: through a host copy. */
static lv_status stage_alloc(void **h, size_t bytes)
{
    lv_status st = LV_OK;
    *h = malloc(bytes ? bytes : 1);
    if (!*h) LV_FAIL(LV_ERR_NOMEM, "out of memory staging %zu bytes of a device buffer", bytes);
done:
    return st;
}

static lv_status copy(void *dst, const void *src, size_t bytes, enum cudaMemcpyKind kind,
                      const char *what)
{
    lv_status st = LV_OK;
    cudaError_t e = cudaMemcpy(dst, src, bytes, kind);
    if (e != cudaSuccess) LV_FAIL(LV_ERR_CUDA, "%s: staging copy: %s", what, cudaGetErrorString(e));
done:
    return st;
}

lv_status comm_send_dev(comm_ctx *c, const void *d_buf, size_t bytes, int dst)
{
    lv_status st = LV_OK;
    void *h = NULL;
    if (c->backend == COMM_BACKEND_NCCL) {
        LV_TRY(nccl_check(c, ncclSend(d_buf, bytes, ncclChar, dst, (ncclComm_t)c->nccl,
                                      (cudaStream_t)c->stream), "send (device buffer)"));
        LV_TRY(nccl_wait(c, "send (device buffer)", dst));
    } else {
        LV_TRY(stage_alloc(&h, bytes));
        LV_TRY(copy(h, d_buf, bytes, cudaMemcpyDeviceToHost, "send (device buffer)"));
        LV_TRY(comm_send(c, h, bytes, dst, COMM_TAG_DEV));
    }
done:
    free(h);
    return st;
}

lv_status comm_recv_dev(comm_ctx *c, void *d_buf, size_t bytes, int src)
{
    lv_status st = LV_OK;
    void *h = NULL;
    if (c->backend == COMM_BACKEND_NCCL) {
        LV_TRY(nccl_check(c, ncclRecv(d_buf, bytes, ncclChar, src, (ncclComm_t)c->nccl,
                                      (cudaStream_t)c->stream), "receive (device buffer)"));
        LV_TRY(nccl_wait(c, "receive (device buffer)", src));
    } else {
        LV_TRY(stage_alloc(&h, bytes));
        LV_TRY(comm_recv(c, h, bytes, src, COMM_TAG_DEV));
        LV_TRY(copy(d_buf, h, bytes, cudaMemcpyHostToDevice, "receive (device buffer)"));
    }
done:
    free(h);
    return st;
}

lv_status comm_bcast_dev(comm_ctx *c, void *d_buf, size_t bytes, int root)
{
    lv_status st = LV_OK;
    void *h = NULL;
    if (c->backend == COMM_BACKEND_NCCL) {
        LV_TRY(nccl_check(c, ncclBroadcast(d_buf, d_buf, bytes, ncclChar, root,
                                           (ncclComm_t)c->nccl, (cudaStream_t)c->stream),
                          "broadcast (device buffer)"));
        LV_TRY(nccl_wait(c, "broadcast (device buffer)", root));
    } else {
        LV_TRY(stage_alloc(&h, bytes));
        if (c->rank == root)
            LV_TRY(copy(h, d_buf, bytes, cudaMemcpyDeviceToHost, "broadcast (device buffer)"));
        LV_TRY(comm_bcast(c, h, bytes, root));
        if (c->rank != root)
            LV_TRY(copy(d_buf, h, bytes, cudaMemcpyHostToDevice, "broadcast (device buffer)"));
    }
done:
    free(h);
    return st;
}

lv_status comm_allreduce_sum_f32_dev(comm_ctx *c, float *d_buf, int64_t n)
{
    lv_status st = LV_OK;
    void *h = NULL;
    float *gathered = NULL;
    const size_t bytes = sizeof(float) * (size_t)(n > 0 ? n : 0);
    if (n < 0) LV_FAIL(LV_ERR_INVALID_ARG, "all-reduce (device buffer): negative count %lld",
                       (long long)n);
    if (c->backend == COMM_BACKEND_NCCL) {
        cudaError_t e = cudaMalloc((void **)&gathered, bytes * (size_t)c->size + 1);
        if (e != cudaSuccess)
            LV_FAIL(LV_ERR_CUDA, "all-reduce (device buffer): cannot allocate %zu bytes for "
                    "the gathered buffers: %s", bytes * (size_t)c->size, cudaGetErrorString(e));
        LV_TRY(nccl_check(c, ncclAllGather(d_buf, gathered, (size_t)n, ncclFloat,
                                           (ncclComm_t)c->nccl, (cudaStream_t)c->stream),
                          "all-reduce (device buffer)"));
        int ce = lv_cuda_sum_ranks(d_buf, gathered, n, c->size, c->stream);
        if (ce != (int)cudaSuccess)
            LV_FAIL(LV_ERR_CUDA, "all-reduce (device buffer): sum kernel: %s",
                    cudaGetErrorString((cudaError_t)ce));
        LV_TRY(nccl_wait(c, "all-reduce (device buffer)", -1));
    } else {
        LV_TRY(stage_alloc(&h, bytes));
        LV_TRY(copy(h, d_buf, bytes, cudaMemcpyDeviceToHost, "all-reduce (device buffer)"));
        LV_TRY(comm_allreduce_sum_f32(c, h, n));
        LV_TRY(copy(d_buf, h, bytes, cudaMemcpyHostToDevice, "all-reduce (device buffer)"));
    }
done:
    if (gathered) cudaFree(gathered);
    free(h);
    return st;
}
