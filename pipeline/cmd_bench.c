/* cmd_bench.c: `llmvq bench gemv`: the quantized product straight from codes
 * (kern_aq_gemm, kern_qmm.h) against OpenBLAS on the dequantized matrix of the same
 * shape, in the same run, with the machine's memory bandwidth measured beside them.
 *
 * The matrix is quantized by random codes and codebooks (timing only: no AQLM run).
 * Repetitions are cold by default, as in a real forward pass where every layer's weights
 * come from DRAM: they cycle through copies of the matrix (quantized and fp32 alike)
 * totalling at least 1 GiB per kind, so no copy is still cached when its turn comes
 * (sweeping a flush buffer is not enough: the last-level cache keeps re-used lines
 * against a scan). --warm uses one copy. Reported times are medians over --reps. */
#include <cblas.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "kern.h"
#include "kern_qmm.h"
#include "pipe.h"

#define BENCH_RING_BYTES ((double)(1 << 30)) /* fp32 copies of the matrix cycled through */
#define BENCH_MAX_COPIES 64
#define BENCH_BW_BYTES ((size_t)512 << 20)     /* bandwidth probe: a read of this many bytes */

typedef struct {
    int64_t rows, cols, batch;
    int M, nbits, g, threads, reps, warm, fp16_cb;
    kern_aq_algo algo;
    const char *config;
} bench_gemv_args;

/* The copies that the repetitions cycle through. */
typedef struct {
    int n;
    lv_aq_layer q[BENCH_MAX_COPIES];
    float *w[BENCH_MAX_COPIES]; /* (rows, cols) each: the dequantized q */
} bench_ring;

typedef struct {
    double ms_quant, ms_fp32, ms_quant_min, ms_fp32_min;
    double bytes_quant, bytes_fp32, mem_bw_gbps, max_rel_diff;
    kern_aq_algo algo; /* what ran */
    size_t ws_bytes;
    int copies;        /* of the matrix, cycled through */
} bench_gemv_result;

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Sum of buf (n floats, a multiple of 4096) read once by all threads: 32 partial sums in
 * registers (unrolled; a vectorized loop over them kept them in memory) so the loop is
 * bound by the memory system, not by an add chain or store forwarding. */
static double sweep(const float *buf, size_t n)
{
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (size_t c = 0; c < n / 4096; c++) {
        float acc[32] = {0};
        const float *p = buf + c * 4096;
        for (int j = 0; j < 4096; j += 32)
#pragma GCC unroll 32
            for (int l = 0; l < 32; l++) acc[l] += p[j + l];
        for (int l = 0; l < 32; l++) total += acc[l];
    }
    return total;
}

/* "MxBgG", e.g. "2x8g8": M codebooks of 2^B entries over groups of G. */
static int parse_config(const char *s, int *M, int *nbits, int *g)
{
    int used = 0;
    if (!s || sscanf(s, "%dx%dg%d%n", M, nbits, g, &used) != 3 || s[used] != '\0') return -1;
    return (*M >= 1 && *M <= 64 && *nbits >= 1 && *nbits <= 16 && *g >= 1 && *g <= 4096) ? 0 : -1;
}

static void ring_free(bench_ring *R)
{
    for (int k = 0; k < R->n; k++) {
        lv_aq_layer_free(&R->q[k]);
        free(R->w[k]);
    }
    R->n = 0;
}

/* A random layer (uniform codes, N(0, 0.05) codebooks, scales near 1), its dequantized
 * twin, and copies of both (see the top of the file). */
static lv_status ring_init(const bench_gemv_args *a, bench_ring *R)
{
    lv_status st = LV_OK;
    const double fp32_bytes = 4.0 * (double)a->rows * (double)a->cols;
    int n = a->warm ? 1 : (int)ceil(BENCH_RING_BYTES / fp32_bytes);
    n = n < 2 && !a->warm ? 2 : n > BENCH_MAX_COPIES ? BENCH_MAX_COPIES : n;
    lv_rng r;
    lv_rng_seed(&r, 1234);
    const int64_t K = (int64_t)1 << a->nbits;
    for (R->n = 0; R->n < n; R->n++) {
        lv_aq_layer *L = &R->q[R->n], *L0 = &R->q[0];
        R->w[R->n] = NULL;
        LV_TRY(lv_aq_layer_init(L, a->rows, a->cols, a->M, a->nbits, a->g));
        LV_ALLOC(R->w[R->n], (size_t)a->rows * (size_t)a->cols);
        const int64_t n_codes = a->rows * L->n_groups * a->M, n_cb = a->M * K * a->g;
        if (R->n > 0) {
            memcpy(L->codes, L0->codes, sizeof(uint16_t) * (size_t)n_codes);
            memcpy(L->codebooks, L0->codebooks, sizeof(float) * (size_t)n_cb);
            memcpy(L->scales, L0->scales, sizeof(float) * (size_t)a->rows);
            memcpy(R->w[R->n], R->w[0], sizeof(float) * (size_t)(a->rows * a->cols));
            continue;
        }
        for (int64_t t = 0; t < n_codes; t++) L->codes[t] = (uint16_t)(lv_rng_u64(&r) % (uint64_t)K);
        for (int64_t t = 0; t < n_cb; t++) L->codebooks[t] = 0.05f * lv_rng_normal(&r);
        if (a->fp16_cb)
            for (int64_t t = 0; t < n_cb; t++) L->codebooks[t] = lv_round_f16(L->codebooks[t]);
        for (int64_t t = 0; t < a->rows; t++) L->scales[t] = 1.0f + 0.1f * lv_rng_normal(&r);
        kern_aq_dequant_ref(R->w[0], L->codes, L->codebooks, L->scales, a->rows, a->cols,
                            L->n_groups, a->M, (int)K, a->g);
    }
done:
    if (st != LV_OK) {
        if (R->n < BENCH_MAX_COPIES) R->n++; /* the copy that failed half-way */
        ring_free(R);
    }
    return st;
}

/* y (batch, rows) = x @ w^T by OpenBLAS: sgemv for one row, sgemm otherwise. */
static void fp32_product(float *y, const float *x, const float *w, const bench_gemv_args *a)
{
    if (a->batch == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)a->rows, (int)a->cols, 1.0f, w,
                    (int)a->cols, x, 1, 0.0f, y, 1);
    else
        kern_matmul_ref(y, x, w, a->batch, (int)a->cols, (int)a->rows);
}

/* *ms = time of one product, quantized (q = 1) or fp32, on copy c of the ring. */
static lv_status run_once(const bench_gemv_args *a, int q, float *y, const float *x,
                          const bench_ring *R, int c, kern_aq_ws *ws, double *ms)
{
    lv_status st = LV_OK;
    double t0 = lv_now();
    if (q)
        LV_TRY(kern_aq_gemm_algo(y, x, &R->q[c], a->batch, a->algo, ws));
    else
        fp32_product(y, x, R->w[c], a);
    *ms = (lv_now() - t0) * 1e3;
done:
    return st;
}

/* Median and min of reps timings of both products, interleaved (quantized, fp32,
 * quantized, ...) so that both see the same machine: this one is shared. The ring's
 * first pass is untimed (page faults, scratch growth). */
static lv_status time_products(const bench_gemv_args *a, float *yq, float *yf, const float *x,
                               const bench_ring *R, kern_aq_ws *ws, bench_gemv_result *res)
{
    lv_status st = LV_OK;
    double *tq = NULL, *tf = NULL, ms = 0.0;
    LV_ALLOC(tq, a->reps);
    LV_ALLOC(tf, a->reps);
    const int warmup = R->n > 2 ? R->n : 2;
    for (int k = -warmup; k < a->reps; k++) {
        const int c = (k + warmup) % R->n;
        LV_TRY(run_once(a, 1, yq, x, R, c, ws, &ms));
        if (k >= 0) tq[k] = ms;
        LV_TRY(run_once(a, 0, yf, x, R, (c + R->n / 2) % R->n, ws, &ms));
        if (k >= 0) tf[k] = ms;
    }
    res->ms_quant_min = tq[0], res->ms_fp32_min = tf[0];
    for (int k = 1; k < a->reps; k++) {
        res->ms_quant_min = tq[k] < res->ms_quant_min ? tq[k] : res->ms_quant_min;
        res->ms_fp32_min = tf[k] < res->ms_fp32_min ? tf[k] : res->ms_fp32_min;
    }
    res->ms_quant = median(tq, a->reps);
    res->ms_fp32 = median(tf, a->reps);
done:
    free(tf);
    free(tq);
    return st;
}

static lv_status bench_gemv_run(const bench_gemv_args *a, bench_gemv_result *res)
{
    lv_status st = LV_OK;
    bench_ring *R = NULL;
    kern_aq_ws *ws = NULL;
    float *x = NULL, *yq = NULL, *yf = NULL, *big = NULL;
    LV_ALLOC(R, 1);
    LV_TRY(ring_init(a, R));
    const lv_aq_layer *L = &R->q[0];
    LV_ALLOC(x, a->batch * a->cols);
    LV_ALLOC(yq, a->batch * a->rows);
    LV_ALLOC(yf, a->batch * a->rows);
    LV_ALLOC(big, BENCH_BW_BYTES / sizeof(float)); /* zero pages until touched below */
    for (size_t t = 0; t < BENCH_BW_BYTES / sizeof(float); t++) big[t] = (float)(t & 255);
    lv_rng r;
    lv_rng_seed(&r, 99);
    for (int64_t t = 0; t < a->batch * a->cols; t++) x[t] = lv_rng_normal(&r);
    LV_TRY(kern_aq_ws_init(&ws));

    res->algo = a->algo == KERN_AQ_AUTO ? kern_aq_algo_auto(L, a->batch) : a->algo;
    res->copies = R->n;
    LV_TRY(time_products(a, yq, yf, x, R, ws, res));
    res->ws_bytes = kern_aq_ws_bytes(ws);
    double num = 0.0, den = 0.0;
    for (int64_t t = 0; t < a->batch * a->rows; t++) {
        double d = (double)yq[t] - yf[t];
        num = d * d > num ? d * d : num;
        den = (double)yf[t] * yf[t] > den ? (double)yf[t] * yf[t] : den;
    }
    res->max_rel_diff = den > 0 ? sqrt(num / den) : 0.0; /* max|diff| / max|y| */

    double bw[5];
    for (int k = 0; k < 5; k++) {
        double t0 = lv_now();
        volatile double sink = sweep(big, BENCH_BW_BYTES / sizeof(float));
        (void)sink;
        bw[k] = (double)BENCH_BW_BYTES / (lv_now() - t0) / 1e9;
    }
    res->mem_bw_gbps = median(bw, 5);
    const double xy = 4.0 * (double)a->batch * (double)(a->rows + a->cols);
    res->bytes_quant = 2.0 * (double)(a->rows * L->n_groups * a->M) +
                       4.0 * (double)a->M * (double)((int64_t)1 << a->nbits) * a->g +
                       4.0 * (double)a->rows + xy;
    res->bytes_fp32 = 4.0 * (double)a->rows * (double)a->cols + xy;
done:
    free(big), free(yf), free(yq), free(x);
    kern_aq_ws_free(ws);
    if (R) ring_free(R);
    free(R);
    return st;
}

static void print_gemv(const bench_gemv_args *a, const bench_gemv_result *r, int json)
{
    const double gq = r->bytes_quant / (r->ms_quant * 1e6), gf = r->bytes_fp32 / (r->ms_fp32 * 1e6);
    if (!json) {
        printf("gemv %lldx%lld %s batch %lld, %d thread%s, %s (%d cop%s), median of %d\n",
               (long long)a->rows, (long long)a->cols, a->config, (long long)a->batch, a->threads,
               a->threads == 1 ? "" : "s", a->warm ? "warm" : "cold", r->copies,
               r->copies == 1 ? "y" : "ies", a->reps);
        printf("  quantized (%-6s %s) %9.3f ms  (min %.3f)  %7.2f GB/s  %.1f MiB moved\n",
               kern_aq_algo_name(r->algo), kern_aq_isa_name(kern_aq_isa_get()), r->ms_quant,
               r->ms_quant_min, gq, r->bytes_quant / 1048576.0);
        printf("  fp32 %-13s %9.3f ms  (min %.3f)  %7.2f GB/s  %.1f MiB moved\n",
               a->batch == 1 ? "(sgemv)" : "(sgemm)", r->ms_fp32, r->ms_fp32_min, gf,
               r->bytes_fp32 / 1048576.0);
        printf("  speedup %.2fx   memory bandwidth %.2f GB/s   max|diff|/max|y| %.2g   "
               "scratch %.2f MiB\n",
               r->ms_fp32 / r->ms_quant, r->mem_bw_gbps, r->max_rel_diff,
               (double)r->ws_bytes / 1048576.0);
        return;
    }
    cJSON *o = cJSON_CreateObject();
    cJSON_AddNumberToObject(o, "rows", (double)a->rows);
    cJSON_AddNumberToObject(o, "cols", (double)a->cols);
    cJSON_AddStringToObject(o, "config", a->config);
    cJSON_AddNumberToObject(o, "batch", (double)a->batch);
    cJSON_AddNumberToObject(o, "threads", a->threads);
    cJSON_AddStringToObject(o, "algo", kern_aq_algo_name(r->algo));
    cJSON_AddStringToObject(o, "isa", kern_aq_isa_name(kern_aq_isa_get()));
    cJSON_AddStringToObject(o, "cache", a->warm ? "warm" : "cold");
    cJSON_AddBoolToObject(o, "fp16_codebooks", a->fp16_cb);
    cJSON_AddNumberToObject(o, "copies", r->copies);
    cJSON_AddNumberToObject(o, "reps", a->reps);
    cJSON_AddNumberToObject(o, "ms_quant", r->ms_quant);
    cJSON_AddNumberToObject(o, "ms_fp32", r->ms_fp32);
    cJSON_AddNumberToObject(o, "ms_quant_min", r->ms_quant_min);
    cJSON_AddNumberToObject(o, "ms_fp32_min", r->ms_fp32_min);
    cJSON_AddNumberToObject(o, "speedup", r->ms_fp32 / r->ms_quant);
    cJSON_AddNumberToObject(o, "gbps_quant", gq);
    cJSON_AddNumberToObject(o, "gbps_fp32", gf);
    cJSON_AddNumberToObject(o, "mem_bw_gbps", r->mem_bw_gbps);
    cJSON_AddNumberToObject(o, "bytes_quant", r->bytes_quant);
    cJSON_AddNumberToObject(o, "bytes_fp32", r->bytes_fp32);
    cJSON_AddNumberToObject(o, "max_rel_diff", r->max_rel_diff);
    cJSON_AddNumberToObject(o, "ws_bytes", (double)r->ws_bytes);
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}

static int parse_algo(const char *s, kern_aq_algo *out)
{
    const kern_aq_algo all[] = {KERN_AQ_AUTO, KERN_AQ_LUT, KERN_AQ_GATHER, KERN_AQ_TILE};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        if (!strcmp(s, kern_aq_algo_name(all[k]))) {
            *out = all[k];
            return 0;
        }
    return -1;
}

int pipe_cmd_bench(int argc, char **argv)
{
    bench_gemv_args a = {.rows = 4096, .cols = 4096, .batch = 1, .config = "2x8g8",
                         .threads = omp_get_max_threads(), .reps = 20};
    const char *algo = "auto", *isa = "auto";
    int json = 0;
    const pipe_opt opts[] = {
        {"rows", PIPE_OPT_I64, &a.rows, "output features of the matrix (default 4096)"},
        {"cols", PIPE_OPT_I64, &a.cols, "input features (default 4096)"},
        {"config", PIPE_OPT_STR, &a.config, "quantization MxBgG: M codebooks of 2^B, groups of G (default 2x8g8)"},
        {"batch", PIPE_OPT_I64, &a.batch, "input rows (default 1: a GEMV)"},
        {"threads", PIPE_OPT_INT, &a.threads, "OpenMP and OpenBLAS threads (default: OMP_NUM_THREADS or all cores)"},
        {"reps", PIPE_OPT_INT, &a.reps, "timed repetitions, median reported (default 20)"},
        {"algo", PIPE_OPT_STR, &algo, "auto, lut, gather or tile (default auto)"},
        {"isa", PIPE_OPT_STR, &isa, "hot loops of the quantized kernels: auto, portable, avx2, avx512 (default auto)"},
        {"fp16-codebooks", PIPE_OPT_FLAG, &a.fp16_cb, "codebook values rounded to fp16, as in AQLM checkpoints"},
        {"warm", PIPE_OPT_FLAG, &a.warm, "one copy of the matrix: repetitions may hit the caches"},
        {"json", PIPE_OPT_FLAG, &json, "print one JSON object on stdout"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *synopsis = "gemv --rows R --cols C --config MxBgG --batch N [--threads T] "
                           "[--reps K] [--json]";
    const char *pos[1];
    int n_pos = 0;
    int rc = pipe_opts_parse("bench", synopsis, opts, n_opts, argc, argv, pos, 1, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (n_pos != 1 || strcmp(pos[0], "gemv")) {
        fprintf(stderr, "llmvq bench: name a benchmark: 'llmvq bench gemv ...' (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (parse_config(a.config, &a.M, &a.nbits, &a.g)) {
        fprintf(stderr, "llmvq bench: --config '%s' is not MxBgG with 1 <= B <= 16 (e.g. 2x8g8)\n",
                a.config);
        return PIPE_EXIT_USAGE;
    }
    if (a.rows < 1 || a.rows > (1 << 24) || a.cols < 1 || a.cols > (1 << 24) || a.batch < 1 ||
        a.batch > 4096 || a.threads < 1 || a.threads > 1024 || a.reps < 1 || a.reps > 100000) {
        fprintf(stderr, "llmvq bench: need 1 <= --rows, --cols <= 2^24, 1 <= --batch <= 4096, "
                        "--threads >= 1, --reps >= 1\n");
        return PIPE_EXIT_USAGE;
    }
    if (parse_algo(algo, &a.algo) || (a.algo == KERN_AQ_LUT && a.nbits > 8)) {
        fprintf(stderr, "llmvq bench: --algo must be auto, lut (nbits <= 8), gather or tile, "
                        "not '%s'\n", algo);
        return PIPE_EXIT_USAGE;
    }
    omp_set_num_threads(a.threads);
    openblas_set_num_threads(a.threads);

    lv_status st = LV_OK;
    bench_gemv_result res = {0};
    const kern_aq_isa isas[] = {KERN_AQ_ISA_AUTO, KERN_AQ_ISA_PORTABLE, KERN_AQ_ISA_AVX2,
                                KERN_AQ_ISA_AVX512};
    size_t k_isa = 0;
    while (k_isa < 4 && strcmp(isa, kern_aq_isa_name(isas[k_isa]))) k_isa++;
    if (k_isa == 4) {
        fprintf(stderr, "llmvq bench: --isa must be auto, portable, avx2 or avx512, not '%s'\n",
                isa);
        return PIPE_EXIT_USAGE;
    }
    LV_TRY(kern_aq_isa_set(isas[k_isa]));
    LV_TRY(bench_gemv_run(&a, &res));
    print_gemv(&a, &res, json);
done:
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("bench");
}
