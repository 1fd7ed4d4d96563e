/* test_comm_dev.c: comm/'s device-buffer calls under mpirun (2 ranks), on the
 * NCCL backend and on the MPI backend (staged through the host), against the
 * host calls on the same data: the all-reduce must give the same bits as the
 * host all-reduce on either backend; point to point and broadcast move the
 * bytes exactly. Exits 77 (skipped) in builds without CUDA or when a rank has
 * no GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "kern.h"

#ifdef LLMVQ_HAVE_CUDA
#include <cuda_runtime_api.h>

static int g_fail = 0;
static int g_rank = 0;
#define CHECK(cond)                                                                   \
    do {                                                                              \
        if (!(cond)) {                                                                \
            fprintf(stderr, "rank %d: CHECK failed at %s:%d: %s\n%s\n", g_rank,      \
                    __FILE__, __LINE__, #cond, lv_last_error());                      \
            g_fail++;                                                                 \
        }                                                                             \
    } while (0)

static void fill(float *h, int64_t n, int rank)
{
    lv_rng r;
    lv_rng_seed(&r, 1234 + (uint64_t)rank);
    for (int64_t i = 0; i < n; i++) h[i] = lv_rng_normal(&r) * (float)(1 + (i % 7));
}

static void run(comm_ctx *c, const char *name)
{
    const int r = comm_rank(c), n_r = comm_size(c);
    const int64_t n = 1000003;
    const size_t bytes = sizeof(float) * (size_t)n;
    float *h = malloc(bytes), *ref = malloc(bytes), *back = malloc(bytes), *d = NULL;
    CHECK(h && ref && back && cudaMalloc((void **)&d, bytes) == cudaSuccess);
    /* all-reduce: device result == host result, bit for bit */
    fill(h, n, r);
    memcpy(ref, h, bytes);
    CHECK(comm_allreduce_sum_f32(c, ref, n) == LV_OK);
    CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    double t0 = lv_now();
    CHECK(comm_allreduce_sum_f32_dev(c, d, n) == LV_OK);
    double t1 = lv_now();
    CHECK(cudaMemcpy(back, d, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    CHECK(memcmp(back, ref, bytes) == 0);
    /* ring of sends on device buffers */
    fill(h, n, 100 + r);
    CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    const int to = (r + 1) % n_r, from = (r + n_r - 1) % n_r;
    if (r % 2 == 0) {
        CHECK(comm_send_dev(c, d, bytes, to) == LV_OK);
        CHECK(comm_recv_dev(c, d, bytes, from) == LV_OK);
    } else {
        float *d2 = NULL;
        CHECK(cudaMalloc((void **)&d2, bytes) == cudaSuccess);
        CHECK(comm_recv_dev(c, d2, bytes, from) == LV_OK);
        CHECK(comm_send_dev(c, d, bytes, to) == LV_OK);
        CHECK(cudaMemcpy(d, d2, bytes, cudaMemcpyDeviceToDevice) == cudaSuccess);
        cudaFree(d2);
    }
    CHECK(cudaMemcpy(back, d, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    fill(ref, n, 100 + from);
    CHECK(memcmp(back, ref, bytes) == 0);
    /* broadcast from the last rank */
    fill(h, n, 200 + r);
    CHECK(cudaMemcpy(d, h, bytes, cudaMemcpyHostToDevice) == cudaSuccess);
    CHECK(comm_bcast_dev(c, d, bytes, n_r - 1) == LV_OK);
    CHECK(cudaMemcpy(back, d, bytes, cudaMemcpyDeviceToHost) == cudaSuccess);
    fill(ref, n, 200 + n_r - 1);
    CHECK(memcmp(back, ref, bytes) == 0);
    if (r == 0)
        printf("%s backend (%s): all-reduce of %lld floats on %d ranks bit-identical to the host "
               "all-reduce, %.2f ms; send/recv ring and broadcast exact\n", name,
               comm_get_backend(c) == COMM_BACKEND_NCCL ? "NCCL" : "MPI, staged",
               (long long)n, n_r, 1e3 * (t1 - t0));
    cudaFree(d);
    free(h);
    free(ref);
    free(back);
}
#endif

int main(void)
{
    MPI_Init(NULL, NULL);
    int rc = 0;
#ifdef LLMVQ_HAVE_CUDA
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    comm_ctx *nccl = NULL, *mpi = NULL;
    comm_config a = {.allow_nccl = 1, .timeout_s = 60}, b = {.allow_nccl = 0, .timeout_s = 60};
    int any_without = 0;
    MPI_Allreduce(&(int){lv_cuda_device_count() == 0}, &any_without, 1, MPI_INT, MPI_MAX,
                  MPI_COMM_WORLD);
    if (any_without) {
        if (g_rank == 0) printf("skipped: a rank has no usable CUDA device\n");
        MPI_Finalize();
        return 77;
    }
    CHECK(comm_ctx_init(&nccl, MPI_COMM_WORLD, &a) == LV_OK);
    CHECK(comm_ctx_init(&mpi, MPI_COMM_WORLD, &b) == LV_OK);
    if (nccl) run(nccl, "allow_nccl=1");
    if (mpi) run(mpi, "allow_nccl=0");
    comm_ctx_free(nccl);
    comm_ctx_free(mpi);
    int fails = 0;
    MPI_Allreduce(&g_fail, &fails, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    rc = fails ? 1 : 0;
#else
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) printf("skipped: this build has no CUDA (device buffers need it)\n");
    rc = 77;
#endif
    MPI_Finalize();
    return rc;
}
