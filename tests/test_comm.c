/* test_comm.c: comm/ under mpirun with 1, 2 and 3 ranks: point to point of
 * large messages, broadcast, deterministic all-reduce, agreement on status and
 * flags, and a receive from a silent peer that times out instead of hanging. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "comm.h"
#include "kern.h"

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

static void test_p2p_and_bcast(comm_ctx *c)
{
    int r = comm_rank(c), n = comm_size(c);
    const size_t len = 3u << 20; /* 3 MiB */
    unsigned char *buf = malloc(len);
    /* ring: each rank sends a rank-specific pattern to the next */
    if (n > 1) {
        int to = (r + 1) % n, from = (r + n - 1) % n;
        for (size_t i = 0; i < len; i++) buf[i] = (unsigned char)(i * 7 + r);
        if (r % 2 == 0) {
            CHECK(comm_send(c, buf, len, to, 5) == LV_OK);
            CHECK(comm_recv(c, buf, len, from, 5) == LV_OK);
        } else {
            unsigned char *tmp = malloc(len);
            CHECK(comm_recv(c, tmp, len, from, 5) == LV_OK);
            CHECK(comm_send(c, buf, len, to, 5) == LV_OK);
            memcpy(buf, tmp, len);
            free(tmp);
        }
        int bad = 0;
        for (size_t i = 0; i < len; i++) bad += buf[i] != (unsigned char)(i * 7 + from);
        CHECK(bad == 0);
    }
    for (size_t i = 0; i < len; i++) buf[i] = r == n - 1 ? (unsigned char)(i ^ 0x5a) : 0;
    CHECK(comm_bcast(c, buf, len, n - 1) == LV_OK);
    int bad = 0;
    for (size_t i = 0; i < len; i++) bad += buf[i] != (unsigned char)(i ^ 0x5a);
    CHECK(bad == 0);
    free(buf);
}

static void test_allreduce(comm_ctx *c)
{
    int r = comm_rank(c), n = comm_size(c);
    const int64_t m = (1 << 20) + 333; /* more than one reduction chunk */
    float *a = malloc(sizeof(float) * (size_t)m), *b = malloc(sizeof(float) * (size_t)m);
    double *d = malloc(sizeof(double) * (size_t)m);
    lv_rng rng;
    for (int pass = 0; pass < 2; pass++) {
        lv_rng_seed(&rng, 100 + (uint64_t)r);
        for (int64_t i = 0; i < m; i++) {
            a[i] = lv_rng_normal(&rng) * 1e3f;
            d[i] = (double)i * (r + 1);
        }
        CHECK(comm_allreduce_sum_f32(c, a, m) == LV_OK);
        CHECK(comm_allreduce_sum_f64(c, d, m) == LV_OK);
        if (pass == 0) memcpy(b, a, sizeof(float) * (size_t)m);
    }
    /* bit-identical across repetitions, and equal to the sum in rank order */
    CHECK(memcmp(a, b, sizeof(float) * (size_t)m) == 0);
    int bad = 0;
    for (int64_t i = 0; i < m; i++) bad += d[i] != (double)i * n * (n + 1) / 2;
    CHECK(bad == 0);
    /* exact rank-order reference for the first elements */
    float ref[16] = {0};
    for (int k = 0; k < n; k++) {
        lv_rng_seed(&rng, 100 + (uint64_t)k);
        for (int i = 0; i < 16; i++) {
            float v = lv_rng_normal(&rng) * 1e3f;
            ref[i] = k == 0 ? v : ref[i] + v;
        }
    }
    CHECK(memcmp(ref, a, sizeof ref) == 0);
    free(a);
    free(b);
    free(d);
}

static void test_agree(comm_ctx *c)
{
    int r = comm_rank(c), n = comm_size(c);
    lv_status g = LV_OK;
    int who = -2, any = -1;
    CHECK(comm_agree_status(c, LV_OK, &g, &who) == LV_OK);
    CHECK(g == LV_OK && who == -1);
    lv_status mine = (r == n - 1) ? LV_ERR_IO : (r == 0 && n > 2 ? LV_ERR_FORMAT : LV_OK);
    CHECK(comm_agree_status(c, mine, &g, &who) == LV_OK);
    if (n > 2) {
        CHECK(g == LV_ERR_FORMAT && who == 0); /* LV_ERR_FORMAT > LV_ERR_IO */
    } else {
        CHECK(g == LV_ERR_IO && who == n - 1);
    }
    CHECK(comm_agree_flag(c, r == n - 1, &any) == LV_OK);
    CHECK(any == 1);
    CHECK(comm_agree_flag(c, 0, &any) == LV_OK);
    CHECK(any == 0);
    CHECK(comm_barrier(c) == LV_OK);
}

static void test_timeout(comm_ctx *c)
{
    int r = comm_rank(c), n = comm_size(c);
    if (n < 2) return;
    if (r == 0) {
        int v = 0;
        comm_set_timeout(c, 0.5);
        double t0 = lv_now();
        lv_status st = comm_recv(c, &v, sizeof v, 1, 77); /* rank 1 never sends tag 77 */
        double dt = lv_now() - t0;
        CHECK(st == LV_ERR_MPI);
        CHECK(strstr(lv_last_error(), "timed out") != NULL);
        CHECK(dt >= 0.5 && dt < 5.0);
        comm_set_timeout(c, 60);
    }
    CHECK(comm_barrier(c) == LV_OK);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    comm_ctx *c = NULL;
    comm_config cfg = {.allow_nccl = 1, .timeout_s = 60};
    if (comm_ctx_init(&c, MPI_COMM_WORLD, &cfg) != LV_OK) {
        fprintf(stderr, "comm_ctx_init: %s\n", lv_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    g_rank = comm_rank(c);
    lv_error_set_rank(g_rank);
    if (lv_cuda_device_count() == 0) CHECK(comm_get_backend(c) == COMM_BACKEND_MPI);
    test_p2p_and_bcast(c);
    test_allreduce(c);
    test_agree(c);
    test_timeout(c);
    int total = 0;
    MPI_Allreduce(&g_fail, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (g_rank == 0) printf("test_comm: %d ranks, %d failures\n", comm_size(c), total);
    comm_ctx_free(c);
    MPI_Finalize();
    return total ? 1 : 0;
}
