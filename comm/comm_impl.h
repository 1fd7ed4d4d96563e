/* comm_impl.h: private to comm/. */
#ifndef COMM_IMPL_H
#define COMM_IMPL_H

#include "comm.h"

enum { COMM_TAG_REDUCE = 30001, COMM_TAG_DEV = 30002 };

struct comm_ctx {
    MPI_Comm comm; /* owned duplicate of the caller's communicator */
    int rank, size;
    double timeout_s;
    comm_backend backend;
    void *nccl;    /* ncclComm_t when backend == COMM_BACKEND_NCCL */
    void *stream;  /* cudaStream_t of the NCCL calls (CUDA builds with NCCL) */
};

/* Wait for req until the context's deadline; names `what` and `peer` on failure.
 * peer >= 0: a point-to-point request, withdrawn on timeout; -1: a collective. */
lv_status comm_wait(comm_ctx *c, MPI_Request *req, const char *what, int peer);

#ifdef LLMVQ_HAVE_CUDA
/* kernels/cuda/comm_sum.cu: out[i] = in[i] + in[n + i] + ... + in[(n_ranks-1) n + i],
 * added in rank order (the host all-reduce's order); async on stream (a
 * cudaStream_t). Returns a cudaError_t. */
int lv_cuda_sum_ranks(float *out, const float *in, int64_t n, int n_ranks, void *stream);
#endif

/* Collective: decide NCCL vs MPI (all ranks must have a GPU) and set up NCCL.
 * Implemented in comm_nccl.c (CUDA builds) or comm_nonccl.c. */
lv_status comm_nccl_setup(comm_ctx *c, int allow_nccl);
void comm_nccl_teardown(comm_ctx *c);

#endif
