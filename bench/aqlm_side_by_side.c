/* aqlm_side_by_side.c: our stage_aqlm_run on a layer read from .npy files
 * (bench_dump_layers), for comparison with the AQLM reference run on the same
 * files by tools/aqlm_ref/run_ref.py (see tools/aqlm_ref/README.md and
 * docs/aqlm-reference.md).
 *
 *   bench_aqlm_side_by_side W.npy H.npy MxBgG [options]
 *   OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 ./bench_aqlm_side_by_side \
 *       /work/aqlm-data/b0_wq.W.npy /work/aqlm-data/b0_wq.H.npy 1x8g4 --out ours.npy
 *
 * Options (defaults in brackets, chosen to match run_ref.py's mapping):
 *   --rows N         quantize only the first N rows of W, full H [all]
 *   --beam N         beam size [8]
 *   --iters N        max alternations (codebook update + beam search) [10]
 *   --rel-tol X      stop when the relative decrease per alternation < X [0.01]
 *   --adam-steps N   Adam steps per alternation [100]
 *   --lr X           Adam learning rate, units of the RMS-scaled codebooks [1e-3]
 *   --kmeans-iters N residual k-means Lloyd iterations of the init [20]
 *   --lstsq          least-squares codebook update instead of Adam
 *   --seed N         [1]
 *   --out PATH       write the dequantized weight (rows, d_in) as float32 .npy
 *   --time-beam N    after the run, time N more stage_aqlm_beam_search calls on
 *                    the result (each starts from the previous codes; seeds
 *                    seed+1000+i) and one sgemm of the same shape as E H
 *
 * Prints one line: rows, config, bpw, relative error tr(dW H dW^T)/tr(W H W^T)
 * after the init and at the end (stage_aqlm_layer_error: float32 GEMM, double
 * sums), alternations, seconds (all, init, codebook updates, beam search),
 * seconds per row, OpenMP threads and the 1-minute load average at the end.
 * The comparison table uses tools/aqlm_ref/metric.py on --out instead (numpy
 * float64, the same code for both implementations).
 * --time-beam prints a second line: wall and CPU seconds of the fastest call
 * (CPU time is less disturbed by other jobs on a shared machine), candidate
 * scores per CPU second, the sgemm rate, the relative error after the calls
 * and an FNV-1a hash of the final codes (bit-identity checks across builds and
 * thread counts). */
#include <cblas.h>
#include <time.h>

#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_npy.h"
#include "stage.h"

typedef struct {
    const char *w_path, *h_path, *out_path;
    int64_t rows;
    int time_beam;
    stage_aqlm_config cfg;
} sbs_args;

static int sbs_parse(int argc, char **argv, sbs_args *a)
{
    int M = 0, B = 0, g = 0, n = 0;
    memset(a, 0, sizeof *a);
    if (argc < 4) return -1;
    a->w_path = argv[1];
    a->h_path = argv[2];
    if (sscanf(argv[3], "%dx%dg%d%n", &M, &B, &g, &n) != 3 || argv[3][n] != '\0') return -1;
    a->cfg = (stage_aqlm_config){.n_codebooks = M, .nbits = B, .group_size = g,
                                 .beam_size = 8, .max_iters = 10, .rel_tol = 0.01,
                                 .adam_steps = 100, .adam_lr = 1e-3f, .kmeans_iters = 20,
                                 .seed = 1};
    for (int i = 4; i < argc; i++) {
        const char *o = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(o, "--lstsq") == 0) {
            a->cfg.codebook_update = STAGE_AQLM_LSTSQ;
            continue;
        }
        if (!v) return -1;
        i++;
        if (strcmp(o, "--rows") == 0) a->rows = strtoll(v, NULL, 10);
        else if (strcmp(o, "--beam") == 0) a->cfg.beam_size = atoi(v);
        else if (strcmp(o, "--iters") == 0) a->cfg.max_iters = atoi(v);
        else if (strcmp(o, "--rel-tol") == 0) a->cfg.rel_tol = atof(v);
        else if (strcmp(o, "--adam-steps") == 0) a->cfg.adam_steps = atoi(v);
        else if (strcmp(o, "--lr") == 0) a->cfg.adam_lr = (float)atof(v);
        else if (strcmp(o, "--kmeans-iters") == 0) a->cfg.kmeans_iters = atoi(v);
        else if (strcmp(o, "--seed") == 0) a->cfg.seed = strtoull(v, NULL, 10);
        else if (strcmp(o, "--out") == 0) a->out_path = v;
        else if (strcmp(o, "--time-beam") == 0) a->time_beam = atoi(v);
        else return -1;
    }
    return 0;
}

static double sbs_cpu_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* --time-beam: n more beam searches on L, then one (rows, d_in) x (d_in, d_in) sgemm. */
static lv_status sbs_time_beam(const sbs_args *a, const float *W, const float *H, int64_t rows,
                               int64_t d_in, stage_aqlm_layer *L, float *What)
{
    lv_status st = LV_OK;
    float *C = NULL;
    double best_wall = 1e300, best_cpu = 1e300;
    int64_t cand = 0;
    for (int i = 0; i < a->time_beam; i++) {
        int64_t n = 0;
        double t0 = lv_now(), c0 = sbs_cpu_s();
        LV_TRY(stage_aqlm_beam_search(W, H, L, a->cfg.beam_size, a->cfg.seed + 1000 + i, &n));
        double wall = lv_now() - t0, cpu = sbs_cpu_s() - c0;
        if (cpu < best_cpu) best_cpu = cpu, best_wall = wall, cand = n;
    }
    LV_ALLOC(C, rows * d_in);
    double t0 = lv_now(), c0 = sbs_cpu_s();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)d_in, (int)d_in, 1.0f,
                W, (int)d_in, H, (int)d_in, 0.0f, C, (int)d_in);
    double g_wall = lv_now() - t0, g_cpu = sbs_cpu_s() - c0;
    double flop = 2.0 * (double)rows * (double)d_in * (double)d_in;
    LV_TRY(stage_aqlm_dequant(L, What));
    double rel = 0.0;
    LV_TRY(stage_aqlm_layer_error(W, What, H, rows, d_in, &rel));
    uint64_t h = 1469598103934665603ull;
    const int64_t nc = rows * L->n_groups * L->M;
    for (int64_t t = 0; t < nc; t++) h = (h ^ L->codes[t]) * 1099511628211ull;
    printf("beam_call wall_s %.4f cpu_s %.4f cand %lld cand_per_cpu_s %.4g sgemm_gflops_cpu %.2f "
           "sgemm_wall_s %.4f rel_after %.6f codes_fnv %016llx\n",
           best_wall, best_cpu, (long long)cand, (double)cand / best_cpu, flop / g_cpu * 1e-9,
           g_wall, rel, (unsigned long long)h);
done:
    free(C);
    return st;
}

static lv_status sbs_run(const sbs_args *a)
{
    lv_status st = LV_OK;
    float *W = NULL, *H = NULL, *What = NULL;
    int64_t d_out = 0, d_in = 0, hr = 0, hc = 0;
    stage_aqlm_layer L = {0};
    stage_aqlm_stats sx = {0};
    LV_TRY(bench_npy_read(a->w_path, &W, &d_out, &d_in));
    LV_TRY(bench_npy_read(a->h_path, &H, &hr, &hc));
    if (hr != d_in || hc != d_in)
        LV_FAIL(LV_ERR_INVALID_ARG, "sbs: H is %lldx%lld, W has %lld columns", (long long)hr,
                (long long)hc, (long long)d_in);
    const int64_t rows = a->rows > 0 && a->rows < d_out ? a->rows : d_out;
    LV_TRY(stage_aqlm_run(W, H, rows, d_in, &a->cfg, &L, &sx));
    LV_ALLOC(What, rows * d_in);
    LV_TRY(stage_aqlm_dequant(&L, What));
    double rel = 0.0;
    LV_TRY(stage_aqlm_layer_error(W, What, H, rows, d_in, &rel));
    const stage_aqlm_config *c = &a->cfg;
    printf("ours rows %lld d_in %lld %dx%dg%d beam %d bpw %.4f rel_init %.6f rel %.6f iters %d "
           "wall_s %.2f init_s %.2f update_s %.2f beam_s %.2f s_per_row %.4g threads %d "
           "load %.2f\n",
           (long long)rows, (long long)d_in, c->n_codebooks, c->nbits, c->group_size,
           c->beam_size, stage_aqlm_bits_per_weight(&L), sx.rel_err_init, rel, sx.iters,
           sx.wall_s, sx.init_s, sx.update_s, sx.beam_s, sx.wall_s / (double)rows,
           omp_get_max_threads(), bench_loadavg());
    printf("ours rel_err per alternation:");
    for (int i = 0; i < sx.iters && i < STAGE_AQLM_MAX_HIST; i++) printf(" %.6f", sx.rel_err[i]);
    printf("\n");
    if (a->out_path) LV_TRY(bench_npy_write(a->out_path, What, rows, d_in));
    if (a->time_beam > 0) LV_TRY(sbs_time_beam(a, W, H, rows, d_in, &L, What));
done:
    lv_aq_layer_free(&L);
    free(What);
    free(H);
    free(W);
    return st;
}

int main(int argc, char **argv)
{
    sbs_args a;
    if (sbs_parse(argc, argv, &a) != 0) {
        fprintf(stderr,
                "usage: bench_aqlm_side_by_side W.npy H.npy MxBgG [--rows N] [--beam N] "
                "[--iters N] [--rel-tol X] [--adam-steps N] [--lr X] [--kmeans-iters N] "
                "[--lstsq] [--seed N] [--out What.npy] [--time-beam N]\n");
        return 2;
    }
    if (sbs_run(&a) != LV_OK) {
        fprintf(stderr, "bench_aqlm_side_by_side: %s\n", lv_last_error());
        return 1;
    }
    return 0;
}
