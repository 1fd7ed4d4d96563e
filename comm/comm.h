/* comm.h: communication between the ranks of an llmvq job. One interface over
 * MPI (host buffers) and NCCL (device buffers, when every rank has a GPU and
 * the build has CUDA); the same results either way.
 *
 * Every blocking call has a deadline (comm_ctx_set_timeout): a peer that died
 * or stopped answering makes the call fail with LV_ERR_MPI and a message naming
 * the operation and the peer, never hang. Calls marked collective must be made
 * by every rank of the context in the same order. */
#ifndef COMM_H
#define COMM_H

#include <stddef.h>
#include <stdint.h>

#include <mpi.h>

#include "lv.h"

typedef struct comm_ctx comm_ctx;

typedef enum { COMM_BACKEND_MPI = 0, COMM_BACKEND_NCCL = 1 } comm_backend;

typedef struct {
    int allow_nccl;   /* use NCCL when every rank has a GPU (default 1) */
    double timeout_s; /* deadline of each blocking call; <= 0: 600 s */
} comm_config;

/* Collective over `world` (borrowed; usually MPI_COMM_WORLD, MPI already
 * initialised). Decides MPI vs NCCL together: any rank without a GPU => MPI. */
lv_status comm_ctx_init(comm_ctx **out, MPI_Comm world, const comm_config *cfg);
/* Not collective; NCCL communicators are destroyed (or aborted after an error). */
void comm_ctx_free(comm_ctx *c);

int comm_rank(const comm_ctx *c);
int comm_size(const comm_ctx *c);
comm_backend comm_get_backend(const comm_ctx *c);
void comm_set_timeout(comm_ctx *c, double seconds);
double comm_timeout(const comm_ctx *c);

/* Point to point, host buffers, any size (split into int-sized messages). */
lv_status comm_send(comm_ctx *c, const void *h_buf, size_t bytes, int dst, int tag);
lv_status comm_recv(comm_ctx *c, void *h_buf, size_t bytes, int src, int tag);

/* Non-blocking: when a message with `tag` from any rank is waiting, receive
 * it (exactly `bytes`, at most one MPI message) into h_buf, set *src and
 * *got = 1; otherwise *got = 0 at once. For small status messages. */
lv_status comm_try_recv(comm_ctx *c, void *h_buf, size_t bytes, int tag, int *src, int *got);

/* Collective: bytes from root to all. Host buffers. */
lv_status comm_bcast(comm_ctx *c, void *h_buf, size_t bytes, int root);

/* Collective: element-wise sum over ranks, in place, host buffers. The order of
 * the reduction is fixed (MPI_Reduce to rank 0 in rank order, then broadcast)
 * so that results are bit-identical run to run. */
lv_status comm_allreduce_sum_f32(comm_ctx *c, float *h_buf, int64_t n);
lv_status comm_allreduce_sum_f64(comm_ctx *c, double *h_buf, int64_t n);

/* ---- device (GPU) buffers ----
 * The same operations on CUDA device pointers. With the NCCL backend (every
 * rank has a GPU) they run as NCCL calls on the context's own CUDA stream;
 * otherwise (CUDA build, MPI backend) they are staged through host memory and
 * done by the MPI functions above. Builds without CUDA: LV_ERR_UNSUPPORTED.
 * Every call returns when the data is complete; NCCL completion is polled
 * against the same deadline as MPI, with ncclCommGetAsyncError checked while
 * waiting: on a timeout or an asynchronous NCCL error the communicator is
 * aborted and the call fails with a message naming the operation.
 * Sums are deterministic and identical on both backends: every rank's buffer
 * is gathered and added in rank order (r0 + r1 + r2 ...), as the host
 * all-reduce does, not by NCCL's topology-dependent ring reduction. */
lv_status comm_send_dev(comm_ctx *c, const void *d_buf, size_t bytes, int dst);
lv_status comm_recv_dev(comm_ctx *c, void *d_buf, size_t bytes, int src);
lv_status comm_bcast_dev(comm_ctx *c, void *d_buf, size_t bytes, int root);
lv_status comm_allreduce_sum_f32_dev(comm_ctx *c, float *d_buf, int64_t n);

/* Collective: every rank learns the worst status (largest code) and the lowest
 * rank that reported it. Ends each collective phase (the nccl-tests pattern). */
lv_status comm_agree_status(comm_ctx *c, lv_status local, lv_status *global, int *bad_rank);

/* Collective: 1 on every rank if any rank passed 1 (stop requests). */
lv_status comm_agree_flag(comm_ctx *c, int local, int *any);

lv_status comm_barrier(comm_ctx *c);

#endif
