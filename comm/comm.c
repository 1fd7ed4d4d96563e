/* comm.c: MPI side of comm.h. Blocking semantics are built from non-blocking
 * MPI calls polled against a deadline, so a dead peer gives an error instead
 * of a hang. */
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm.h"
#include "comm_impl.h"

#define COMM_CHUNK_BYTES ((size_t)1 << 30) /* largest single MPI message */
#define COMM_REDUCE_CHUNK ((int64_t)1 << 20) /* elements per reduction step */

int comm_rank(const comm_ctx *c) { return c->rank; }
int comm_size(const comm_ctx *c) { return c->size; }
comm_backend comm_get_backend(const comm_ctx *c) { return c->backend; }
double comm_timeout(const comm_ctx *c) { return c->timeout_s; }

void comm_set_timeout(comm_ctx *c, double seconds) { c->timeout_s = seconds > 0 ? seconds : 600; }

lv_status comm_ctx_init(comm_ctx **out, MPI_Comm world, const comm_config *cfg)
{
    lv_status st = LV_OK;
    comm_ctx *c = NULL;
    *out = NULL;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) LV_FAIL(LV_ERR_MPI, "comm_ctx_init: MPI is not initialised");
    LV_ALLOC(c, 1);
    c->comm = MPI_COMM_NULL;
    if (MPI_Comm_dup(world, &c->comm) != MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "comm_ctx_init: MPI_Comm_dup failed");
    MPI_Comm_rank(c->comm, &c->rank);
    MPI_Comm_size(c->comm, &c->size);
    c->timeout_s = cfg && cfg->timeout_s > 0 ? cfg->timeout_s : 600;
    c->backend = COMM_BACKEND_MPI;
    LV_TRY(comm_nccl_setup(c, cfg ? cfg->allow_nccl : 1));
    *out = c;
    c = NULL;
done:
    comm_ctx_free(c);
    return st;
}

void comm_ctx_free(comm_ctx *c)
{
    if (!c) return;
    comm_nccl_teardown(c);
    if (c->comm != MPI_COMM_NULL) MPI_Comm_free(&c->comm);
    free(c);
}

static lv_status wait_req(comm_ctx *c, MPI_Request *req, const char *what, int peer,
                          int cancellable)
{
    lv_status st = LV_OK;
    double deadline = lv_now() + c->timeout_s;
    long sleep_ns = 1000;
    for (;;) {
        int flag = 0;
        MPI_Status status;
        if (MPI_Test(req, &flag, &status) != MPI_SUCCESS)
            LV_FAIL(LV_ERR_MPI, "%s (peer %d): MPI error", what, peer);
        if (flag) break;
        if (lv_now() > deadline) {
            /* Withdraw a point-to-point request so a late message cannot land in a
             * buffer the caller will reuse (collectives cannot be cancelled: MPI
             * would abort on it); main ends the job with MPI_Abort. */
            if (cancellable) {
                MPI_Cancel(req);
                MPI_Request_free(req);
            }
            LV_FAIL(LV_ERR_MPI,
                    "%s (peer %d) timed out after %.3g s: a rank died or stopped answering",
                    what, peer, c->timeout_s);
        }
        struct timespec ts = {0, sleep_ns};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000) sleep_ns *= 2;
    }
done:
    return st;
}

lv_status comm_wait(comm_ctx *c, MPI_Request *req, const char *what, int peer)
{
    return wait_req(c, req, what, peer, peer >= 0);
}

lv_status comm_send(comm_ctx *c, const void *h_buf, size_t bytes, int dst, int tag)
{
    lv_status st = LV_OK;
    const char *p = h_buf;
    do {
        size_t n = bytes < COMM_CHUNK_BYTES ? bytes : COMM_CHUNK_BYTES;
        MPI_Request req;
        if (MPI_Isend(p, (int)n, MPI_BYTE, dst, tag, c->comm, &req) != MPI_SUCCESS)
            LV_FAIL(LV_ERR_MPI, "send to rank %d: MPI_Isend failed", dst);
        LV_TRY(comm_wait(c, &req, "send", dst));
        p += n;
        bytes -= n;
    } while (bytes > 0);
done:
    return st;
}

lv_status comm_recv(comm_ctx *c, void *h_buf, size_t bytes, int src, int tag)
{
    lv_status st = LV_OK;
    char *p = h_buf;
    do {
        size_t n = bytes < COMM_CHUNK_BYTES ? bytes : COMM_CHUNK_BYTES;
        MPI_Request req;
        if (MPI_Irecv(p, (int)n, MPI_BYTE, src, tag, c->comm, &req) != MPI_SUCCESS)
            LV_FAIL(LV_ERR_MPI, "receive from rank %d: MPI_Irecv failed", src);
        LV_TRY(comm_wait(c, &req, "receive", src));
        p += n;
        bytes -= n;
    } while (bytes > 0);
done:
    return st;
}

lv_status comm_try_recv(comm_ctx *c, void *h_buf, size_t bytes, int tag, int *src, int *got)
{
    lv_status st = LV_OK;
    int flag = 0, count = 0;
    MPI_Status ms;
    *got = 0;
    if (bytes > COMM_CHUNK_BYTES)
        LV_FAIL(LV_ERR_INVALID_ARG, "try_recv: %zu bytes is more than one message", bytes);
    if (MPI_Iprobe(MPI_ANY_SOURCE, tag, c->comm, &flag, &ms) != MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "probe for messages (tag %d): MPI_Iprobe failed", tag);
    if (!flag) goto done;
    MPI_Get_count(&ms, MPI_BYTE, &count);
    if ((size_t)count != bytes)
        LV_FAIL(LV_ERR_MPI, "message from rank %d (tag %d) has %d bytes, expected %zu",
                ms.MPI_SOURCE, tag, count, bytes);
    if (MPI_Recv(h_buf, count, MPI_BYTE, ms.MPI_SOURCE, tag, c->comm, MPI_STATUS_IGNORE) !=
        MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "receive from rank %d (tag %d): MPI_Recv failed", ms.MPI_SOURCE, tag);
    *src = ms.MPI_SOURCE;
    *got = 1;
done:
    return st;
}

lv_status comm_bcast(comm_ctx *c, void *h_buf, size_t bytes, int root)
{
    lv_status st = LV_OK;
    char *p = h_buf;
    do {
        size_t n = bytes < COMM_CHUNK_BYTES ? bytes : COMM_CHUNK_BYTES;
        MPI_Request req;
        if (MPI_Ibcast(p, (int)n, MPI_BYTE, root, c->comm, &req) != MPI_SUCCESS)
            LV_FAIL(LV_ERR_MPI, "broadcast from rank %d: MPI_Ibcast failed", root);
        LV_TRY(wait_req(c, &req, "broadcast", root, 0)); /* a collective: not cancellable */
        p += n;
        bytes -= n;
    } while (bytes > 0);
done:
    return st;
}

/* Deterministic sum: rank 0 adds the ranks' chunks in rank order, then
 * broadcasts. Memory: one chunk of scratch on rank 0. */
static lv_status allreduce_sum(comm_ctx *c, void *buf, int64_t n, size_t esize, int is_f64)
{
    lv_status st = LV_OK;
    char *scratch = NULL;
    if (n < 0) LV_FAIL(LV_ERR_INVALID_ARG, "allreduce: negative count %lld", (long long)n);
    if (c->size == 1 || n == 0) goto done;
    if (c->rank == 0) LV_ALLOC(scratch, (size_t)(n < COMM_REDUCE_CHUNK ? n : COMM_REDUCE_CHUNK) * esize);
    for (int64_t off = 0; off < n; off += COMM_REDUCE_CHUNK) {
        int64_t m = n - off < COMM_REDUCE_CHUNK ? n - off : COMM_REDUCE_CHUNK;
        char *chunk = (char *)buf + (size_t)off * esize;
        if (c->rank != 0) {
            LV_TRY(comm_send(c, chunk, (size_t)m * esize, 0, COMM_TAG_REDUCE));
            continue;
        }
        for (int r = 1; r < c->size; r++) {
            LV_TRY(comm_recv(c, scratch, (size_t)m * esize, r, COMM_TAG_REDUCE));
            if (is_f64) {
                double *a = (double *)chunk;
                const double *b = (const double *)scratch;
                for (int64_t i = 0; i < m; i++) a[i] += b[i];
            } else {
                float *a = (float *)chunk;
                const float *b = (const float *)scratch;
                for (int64_t i = 0; i < m; i++) a[i] += b[i];
            }
        }
    }
    LV_TRY(comm_bcast(c, buf, (size_t)n * esize, 0));
done:
    free(scratch);
    return st;
}

lv_status comm_allreduce_sum_f32(comm_ctx *c, float *h_buf, int64_t n)
{
    return allreduce_sum(c, h_buf, n, sizeof(float), 0);
}

lv_status comm_allreduce_sum_f64(comm_ctx *c, double *h_buf, int64_t n)
{
    return allreduce_sum(c, h_buf, n, sizeof(double), 1);
}

lv_status comm_agree_status(comm_ctx *c, lv_status local, lv_status *global, int *bad_rank)
{
    lv_status st = LV_OK;
    int mine = (int)local, worst = 0, who = INT_MAX, lowest = INT_MAX;
    MPI_Request req;
    if (MPI_Iallreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, c->comm, &req) != MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "agree on status: MPI_Iallreduce failed");
    LV_TRY(comm_wait(c, &req, "agree on status", -1));
    /* second round: the lowest rank holding the worst status */
    if (local != LV_OK && mine == worst) who = c->rank;
    if (MPI_Iallreduce(&who, &lowest, 1, MPI_INT, MPI_MIN, c->comm, &req) != MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "agree on status: MPI_Iallreduce failed");
    LV_TRY(comm_wait(c, &req, "agree on status", -1));
    *global = (lv_status)worst;
    if (bad_rank) *bad_rank = worst == LV_OK ? -1 : lowest;
done:
    return st;
}

lv_status comm_agree_flag(comm_ctx *c, int local, int *any)
{
    lv_status st = LV_OK;
    int in = local ? 1 : 0, outv = 0;
    MPI_Request req;
    if (MPI_Iallreduce(&in, &outv, 1, MPI_INT, MPI_MAX, c->comm, &req) != MPI_SUCCESS)
        LV_FAIL(LV_ERR_MPI, "agree on flag: MPI_Iallreduce failed");
    LV_TRY(comm_wait(c, &req, "agree on flag", -1));
    *any = outv;
done:
    return st;
}

lv_status comm_barrier(comm_ctx *c)
{
    lv_status st = LV_OK;
    MPI_Request req;
    if (MPI_Ibarrier(c->comm, &req) != MPI_SUCCESS) LV_FAIL(LV_ERR_MPI, "barrier: MPI_Ibarrier failed");
    LV_TRY(comm_wait(c, &req, "barrier", -1));
done:
    return st;
}
