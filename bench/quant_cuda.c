/* quant_cuda.c (bench_quant_cuda): the CUDA quantization kernels (kern_quant_cuda.h)
 * against the CPU reference (kernels/cpu/quant_ref.c) at LLaMA-7B shapes, one JSON
 * line per kernel on stdout (notes on stderr).
 *
 *   bench_quant_cuda [--scale F] [--iters N]
 *
 * Shapes at --scale 1 (a 4096x4096 linear, AQLM 1x16 with g = 8, beam 8):
 *   hessian_accum  X (8192, 4096) -> H (4096, 4096)
 *   kmeans_assign  2097152 points (4096*4096/8) of g = 8, k = 65536, weighted
 *   beam_score     4096 rows x 8 beams x 65536 codes, g = 8; the GPU gets 256-row
 *                  batches (1 GiB of scores each), all 16 of them timed together
 *   aq_dequant     (4096, 4096), M = 2, K = 65536, g = 8, scaled
 * --scale F (0 < F <= 1) multiplies the dimensions that grow with the model (d, samples,
 * points, rows); K, g and beams stay.
 *
 * The GPU runs the whole problem: best of --iters after one warm-up, CUDA events on one
 * stream. The CPU reference (OpenMP threads: OMP_NUM_THREADS) runs the whole problem
 * where that is cheap (dequant) and a leading slice otherwise (hessian: 1/8 of the
 * samples, kmeans: 16384 points, beam: 32 rows, in parallel over rows as stage_aq_beam
 * does), timed once and scaled linearly: "cpu_ms" is that whole-problem estimate and
 * "cpu_frac" the fraction actually run. Before timing, the GPU result on that slice is
 * compared with the CPU's: "max_abs_diff" (0 expected, the kernels are bit-identical).
 * Exits 77 without a usable CUDA device or in a CPU-only build. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kern_quant_cuda.h"

#ifdef LLMVQ_HAVE_CUDA
#include <math.h>
#include <omp.h>

#define BQ_CUDA(expr)                                                                   \
    do {                                                                                \
        cudaError_t bq_e_ = (expr);                                                     \
        if (bq_e_ != cudaSuccess)                                                       \
            LV_FAIL(LV_ERR_CUDA, "%s: %s", #expr, cudaGetErrorString(bq_e_));           \
    } while (0)

typedef struct {
    double scale;
    int iters;
    cudaStream_t stream;
    char device[256];
} bq_opts;

/* One measurement, printed as a JSON line. */
typedef struct {
    const char *kernel;
    char shape[160];
    double gpu_ms, cpu_ms, cpu_frac;
    double work;          /* FLOPs or bytes of the whole problem */
    const char *rate_unit; /* "GFLOP/s" or "GB/s" */
    double max_abs_diff;
    int64_t checked;      /* elements compared */
} bq_result;

static int64_t bq_scaled(int64_t v, double scale)
{
    int64_t s = (int64_t)llround((double)v * scale);
    return s < 1 ? 1 : s;
}

static void bq_fill(lv_rng *r, float *x, int64_t n, float scale, float shift)
{
    for (int64_t i = 0; i < n; i++) x[i] = lv_rng_normal(r) * scale + shift;
}

static double bq_max_diff_d(const double *a, const double *b, int64_t n)
{
    double m = 0.0;
    for (int64_t i = 0; i < n; i++) {
        double d = fabs(a[i] - b[i]);
        if (d > m || d != d) m = d;
    }
    return m;
}

static void bq_print(const bq_opts *o, const bq_result *r)
{
    const double rate = r->work / (r->gpu_ms * 1e-3) * 1e-9;
    printf("{\"bench\": \"quant_cuda\", \"kernel\": \"%s\", \"shape\": \"%s\", "
           "\"device\": \"%s\", \"gpu_ms\": %.4g, \"cpu_ms\": %.4g, \"cpu_frac\": %.4g, "
           "\"cpu_threads\": %d, \"speedup\": %.4g, \"gpu_rate\": %.4g, \"rate_unit\": \"%s\", "
           "\"max_abs_diff\": %.3g, \"checked\": %lld, \"iters\": %d}\n",
           r->kernel, r->shape, o->device, r->gpu_ms, r->cpu_ms, r->cpu_frac,
           omp_get_max_threads(), r->cpu_ms / r->gpu_ms, rate, r->rate_unit, r->max_abs_diff,
           (long long)r->checked, o->iters);
    fflush(stdout);
}

/* Best of o->iters timed calls of f(ctx) after one warm-up, in ms. */
typedef lv_status (*bq_launch)(void *ctx, cudaStream_t stream);

static lv_status bq_time_gpu(const bq_opts *o, bq_launch f, void *ctx, double *best_ms)
{
    lv_status st = LV_OK;
    cudaEvent_t e0 = NULL, e1 = NULL;
    *best_ms = INFINITY;
    BQ_CUDA(cudaEventCreate(&e0));
    BQ_CUDA(cudaEventCreate(&e1));
    for (int it = -1; it < o->iters; it++) {
        float ms = 0.0f;
        BQ_CUDA(cudaEventRecord(e0, o->stream));
        LV_TRY(f(ctx, o->stream));
        BQ_CUDA(cudaEventRecord(e1, o->stream));
        BQ_CUDA(cudaEventSynchronize(e1));
        BQ_CUDA(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 0 && ms < *best_ms) *best_ms = ms;
    }
done:
    if (e1) cudaEventDestroy(e1);
    if (e0) cudaEventDestroy(e0);
    return st;
}

/* ------------------------------------------------------------------ Hessian */

typedef struct {
    double *d_H;
    const float *d_x;
    int64_t n;
    int d;
} bq_hess;

static lv_status bq_hess_launch(void *ctx, cudaStream_t stream)
{
    bq_hess *h = ctx;
    return kern_hessian_accum_cuda(h->d_H, h->d_x, h->n, h->d, stream);
}

static lv_status bench_hessian(const bq_opts *o)
{
    lv_status st = LV_OK;
    const int64_t n = bq_scaled(8192, o->scale), n_cpu = n / 8 > 0 ? n / 8 : 1;
    const int d = (int)bq_scaled(4096, o->scale);
    const size_t hb = (size_t)d * d * sizeof(double);
    float *x = NULL, *d_x = NULL;
    double *h_cpu = NULL, *h_gpu = NULL, *d_H = NULL;
    bq_result r = {.kernel = "hessian_accum", .rate_unit = "GFLOP/s"};
    lv_rng rng;
    lv_rng_seed(&rng, 1);
    LV_ALLOC(x, n * d);
    LV_ALLOC(h_cpu, (int64_t)d * d);
    LV_ALLOC(h_gpu, (int64_t)d * d);
    bq_fill(&rng, x, n * d, 1.0f, 0.0f);
    BQ_CUDA(cudaMalloc((void **)&d_x, (size_t)n * d * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_H, hb));
    BQ_CUDA(cudaMemcpy(d_x, x, (size_t)n * d * sizeof(float), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemset(d_H, 0, hb));

    double t0 = lv_now();
    kern_hessian_accum_ref(h_cpu, x, n_cpu, d);
    const double cpu_s = lv_now() - t0;
    LV_TRY(kern_hessian_accum_cuda(d_H, d_x, n_cpu, d, o->stream));
    BQ_CUDA(cudaStreamSynchronize(o->stream));
    BQ_CUDA(cudaMemcpy(h_gpu, d_H, hb, cudaMemcpyDeviceToHost));
    r.max_abs_diff = bq_max_diff_d(h_gpu, h_cpu, (int64_t)d * d);
    r.checked = (int64_t)d * d;

    bq_hess ctx = {d_H, d_x, n, d};
    LV_TRY(bq_time_gpu(o, bq_hess_launch, &ctx, &r.gpu_ms));
    r.cpu_frac = (double)n_cpu / (double)n;
    r.cpu_ms = cpu_s * 1e3 / r.cpu_frac;
    r.work = 2.0 * (double)n * d * d;
    snprintf(r.shape, sizeof r.shape, "n=%lld d=%d", (long long)n, d);
    bq_print(o, &r);
done:
    cudaFree(d_H), cudaFree(d_x);
    free(h_gpu), free(h_cpu), free(x);
    return st;
}

/* ------------------------------------------------------------------ k-means */

typedef struct {
    int32_t *d_idx;
    double *d_dist;
    const float *d_x, *d_w, *d_c;
    int64_t n;
    int g, k;
} bq_km;

static lv_status bq_km_launch(void *ctx, cudaStream_t stream)
{
    bq_km *c = ctx;
    return kern_kmeans_assign_cuda(c->d_idx, c->d_dist, c->d_x, c->d_w, c->n, c->g, c->d_c, c->k,
                                   stream);
}

static lv_status bench_kmeans(const bq_opts *o)
{
    lv_status st = LV_OK;
    const int g = 8, k = 65536;
    const int64_t n = bq_scaled(4096 * 4096 / 8, o->scale), n_cpu = n < 16384 ? n : 16384;
    float *x = NULL, *w = NULL, *c = NULL, *d_x = NULL, *d_w = NULL, *d_c = NULL;
    int32_t *idx_cpu = NULL, *idx_gpu = NULL, *d_idx = NULL;
    double *dist_cpu = NULL, *dist_gpu = NULL, *d_dist = NULL;
    bq_result r = {.kernel = "kmeans_assign", .rate_unit = "GFLOP/s"};
    lv_rng rng;
    lv_rng_seed(&rng, 2);
    LV_ALLOC(x, n * g);
    LV_ALLOC(w, n * g);
    LV_ALLOC(c, (int64_t)k * g);
    LV_ALLOC(idx_cpu, n_cpu);
    LV_ALLOC(idx_gpu, n_cpu);
    LV_ALLOC(dist_cpu, n_cpu);
    LV_ALLOC(dist_gpu, n_cpu);
    bq_fill(&rng, x, n * g, 1.0f, 0.0f);
    bq_fill(&rng, c, (int64_t)k * g, 1.0f, 0.0f);
    for (int64_t t = 0; t < n * g; t++) w[t] = 0.1f + lv_rng_uniform(&rng);
    BQ_CUDA(cudaMalloc((void **)&d_x, (size_t)n * g * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_w, (size_t)n * g * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_c, (size_t)k * g * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_idx, (size_t)n * sizeof(int32_t)));
    BQ_CUDA(cudaMalloc((void **)&d_dist, (size_t)n * sizeof(double)));
    BQ_CUDA(cudaMemcpy(d_x, x, (size_t)n * g * sizeof(float), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_w, w, (size_t)n * g * sizeof(float), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_c, c, (size_t)k * g * sizeof(float), cudaMemcpyHostToDevice));

    double t0 = lv_now();
    kern_kmeans_assign_ref(idx_cpu, dist_cpu, x, w, n_cpu, g, c, k);
    const double cpu_s = lv_now() - t0;
    LV_TRY(kern_kmeans_assign_cuda(d_idx, d_dist, d_x, d_w, n_cpu, g, d_c, k, o->stream));
    BQ_CUDA(cudaStreamSynchronize(o->stream));
    BQ_CUDA(cudaMemcpy(idx_gpu, d_idx, (size_t)n_cpu * sizeof(int32_t), cudaMemcpyDeviceToHost));
    BQ_CUDA(cudaMemcpy(dist_gpu, d_dist, (size_t)n_cpu * sizeof(double), cudaMemcpyDeviceToHost));
    r.max_abs_diff = bq_max_diff_d(dist_gpu, dist_cpu, n_cpu);
    r.checked = n_cpu;
    int64_t idx_diff = 0;
    for (int64_t i = 0; i < n_cpu; i++) idx_diff += idx_gpu[i] != idx_cpu[i];
    if (idx_diff)
        fprintf(stderr, "bench_quant_cuda: kmeans: %lld of %lld indices differ from the CPU\n",
                (long long)idx_diff, (long long)n_cpu);

    bq_km ctx = {d_idx, d_dist, d_x, d_w, d_c, n, g, k};
    LV_TRY(bq_time_gpu(o, bq_km_launch, &ctx, &r.gpu_ms));
    r.cpu_frac = (double)n_cpu / (double)n;
    r.cpu_ms = cpu_s * 1e3 / r.cpu_frac;
    r.work = 4.0 * (double)n * k * g; /* sub, mul, mul, add per element */
    snprintf(r.shape, sizeof r.shape, "n=%lld g=%d k=%d weighted", (long long)n, g, k);
    bq_print(o, &r);
done:
    cudaFree(d_dist), cudaFree(d_idx), cudaFree(d_c), cudaFree(d_w), cudaFree(d_x);
    free(dist_gpu), free(dist_cpu), free(idx_gpu), free(idx_cpu), free(c), free(w), free(x);
    return st;
}

/* ------------------------------------------------------------------ beam scoring */

#define BQ_BEAM_BATCH 256 /* rows per GPU call: 256 x 8 x 65536 doubles = 1 GiB */

typedef struct {
    double *d_scores;
    const double *d_base, *d_u, *d_s, *d_cnorm;
    const float *d_cb;
    int64_t rows;
    int nb, K, g;
} bq_beam;

/* All rows, BQ_BEAM_BATCH at a time into the same score buffer (as a caller would,
 * consuming each batch before the next). */
static lv_status bq_beam_launch(void *ctx, cudaStream_t stream)
{
    lv_status st = LV_OK;
    bq_beam *b = ctx;
    for (int64_t r0 = 0; r0 < b->rows; r0 += BQ_BEAM_BATCH) {
        int64_t nr = b->rows - r0 < BQ_BEAM_BATCH ? b->rows - r0 : BQ_BEAM_BATCH;
        LV_TRY(kern_beam_score_batch_cuda(b->d_scores, b->d_base + r0 * b->nb,
                                          b->d_u + r0 * b->nb * b->g, b->d_s + r0, b->d_cb,
                                          b->d_cnorm, nr, b->nb, b->K, b->g, stream));
    }
done:
    return st;
}

static lv_status bench_beam(const bq_opts *o)
{
    lv_status st = LV_OK;
    const int nb = 8, K = 65536, g = 8;
    const int64_t rows = bq_scaled(4096, o->scale), r_cpu = rows < 32 ? rows : 32;
    const int64_t batch = rows < BQ_BEAM_BATCH ? rows : BQ_BEAM_BATCH, per_row = (int64_t)nb * K;
    double *base = NULL, *u = NULL, *s = NULL, *cnorm = NULL, *sc_cpu = NULL, *sc_gpu = NULL;
    double *d_base = NULL, *d_u = NULL, *d_s = NULL, *d_cnorm = NULL, *d_sc = NULL;
    float *cb = NULL, *d_cb = NULL;
    bq_result r = {.kernel = "beam_score", .rate_unit = "GFLOP/s"};
    lv_rng rng;
    lv_rng_seed(&rng, 3);
    LV_ALLOC(base, rows * nb);
    LV_ALLOC(u, rows * nb * g);
    LV_ALLOC(s, rows);
    LV_ALLOC(cnorm, K);
    LV_ALLOC(cb, (int64_t)K * g);
    LV_ALLOC(sc_cpu, r_cpu * per_row);
    LV_ALLOC(sc_gpu, r_cpu * per_row);
    for (int64_t t = 0; t < rows * nb; t++) base[t] = 10.0 + lv_rng_normal(&rng);
    for (int64_t t = 0; t < rows * nb * g; t++) u[t] = lv_rng_normal(&rng);
    for (int64_t t = 0; t < rows; t++) s[t] = 0.5 + lv_rng_uniform(&rng);
    for (int t = 0; t < K; t++) cnorm[t] = 1.0 + lv_rng_uniform(&rng);
    bq_fill(&rng, cb, (int64_t)K * g, 0.1f, 0.0f);
    BQ_CUDA(cudaMalloc((void **)&d_base, (size_t)(rows * nb) * sizeof(double)));
    BQ_CUDA(cudaMalloc((void **)&d_u, (size_t)(rows * nb * g) * sizeof(double)));
    BQ_CUDA(cudaMalloc((void **)&d_s, (size_t)rows * sizeof(double)));
    BQ_CUDA(cudaMalloc((void **)&d_cnorm, (size_t)K * sizeof(double)));
    BQ_CUDA(cudaMalloc((void **)&d_cb, (size_t)K * g * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_sc, (size_t)(batch * per_row) * sizeof(double)));
    BQ_CUDA(cudaMemcpy(d_base, base, (size_t)(rows * nb) * sizeof(double), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_u, u, (size_t)(rows * nb * g) * sizeof(double), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_s, s, (size_t)rows * sizeof(double), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_cnorm, cnorm, (size_t)K * sizeof(double), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_cb, cb, (size_t)K * g * sizeof(float), cudaMemcpyHostToDevice));

    double t0 = lv_now();
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < r_cpu; i++)
        kern_beam_score_ref(sc_cpu + i * per_row, base + i * nb, u + i * nb * g, cb, cnorm, s[i],
                            nb, K, g);
    const double cpu_s = lv_now() - t0;
    LV_TRY(kern_beam_score_batch_cuda(d_sc, d_base, d_u, d_s, d_cb, d_cnorm, r_cpu, nb, K, g,
                                      o->stream));
    BQ_CUDA(cudaStreamSynchronize(o->stream));
    BQ_CUDA(cudaMemcpy(sc_gpu, d_sc, (size_t)(r_cpu * per_row) * sizeof(double),
                       cudaMemcpyDeviceToHost));
    r.max_abs_diff = bq_max_diff_d(sc_gpu, sc_cpu, r_cpu * per_row);
    r.checked = r_cpu * per_row;

    bq_beam ctx = {d_sc, d_base, d_u, d_s, d_cnorm, d_cb, rows, nb, K, g};
    LV_TRY(bq_time_gpu(o, bq_beam_launch, &ctx, &r.gpu_ms));
    r.cpu_frac = (double)r_cpu / (double)rows;
    r.cpu_ms = cpu_s * 1e3 / r.cpu_frac;
    r.work = (double)rows * per_row * (2.0 * g + 5.0); /* g mul+add, then 5 ops */
    snprintf(r.shape, sizeof r.shape, "rows=%lld nb=%d K=%d g=%d batch=%lld", (long long)rows, nb,
             K, g, (long long)batch);
    bq_print(o, &r);
done:
    cudaFree(d_sc), cudaFree(d_cb), cudaFree(d_cnorm), cudaFree(d_s), cudaFree(d_u),
        cudaFree(d_base);
    free(sc_gpu), free(sc_cpu), free(cb), free(cnorm), free(s), free(u), free(base);
    return st;
}

/* ------------------------------------------------------------------ dequantization */

typedef struct {
    float *d_w;
    const uint16_t *d_codes;
    const float *d_cbs, *d_scales;
    int64_t rows, d_in, n_groups;
    int M, K, g;
} bq_dq;

static lv_status bq_dq_launch(void *ctx, cudaStream_t stream)
{
    bq_dq *q = ctx;
    return kern_aq_dequant_cuda(q->d_w, q->d_codes, q->d_cbs, q->d_scales, q->rows, q->d_in,
                                q->n_groups, q->M, q->K, q->g, stream);
}

static lv_status bench_dequant(const bq_opts *o)
{
    lv_status st = LV_OK;
    const int M = 2, K = 65536, g = 8;
    const int64_t rows = bq_scaled(4096, o->scale), d_in = bq_scaled(4096, o->scale);
    const int64_t G = (d_in + g - 1) / g, n_codes = rows * G * M, n_w = rows * d_in;
    uint16_t *codes = NULL, *d_codes = NULL;
    float *cbs = NULL, *scales = NULL, *w_cpu = NULL, *w_gpu = NULL;
    float *d_cbs = NULL, *d_scales = NULL, *d_w = NULL;
    bq_result r = {.kernel = "aq_dequant", .rate_unit = "GB/s"};
    lv_rng rng;
    lv_rng_seed(&rng, 4);
    LV_ALLOC(codes, n_codes);
    LV_ALLOC(cbs, (int64_t)M * K * g);
    LV_ALLOC(scales, rows);
    LV_ALLOC(w_cpu, n_w);
    LV_ALLOC(w_gpu, n_w);
    for (int64_t t = 0; t < n_codes; t++) codes[t] = (uint16_t)(lv_rng_u64(&rng) % (uint64_t)K);
    bq_fill(&rng, cbs, (int64_t)M * K * g, 0.3f, 0.0f);
    bq_fill(&rng, scales, rows, 0.2f, 1.0f);
    BQ_CUDA(cudaMalloc((void **)&d_codes, (size_t)n_codes * sizeof(uint16_t)));
    BQ_CUDA(cudaMalloc((void **)&d_cbs, (size_t)M * K * g * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_scales, (size_t)rows * sizeof(float)));
    BQ_CUDA(cudaMalloc((void **)&d_w, (size_t)n_w * sizeof(float)));
    BQ_CUDA(cudaMemcpy(d_codes, codes, (size_t)n_codes * sizeof(uint16_t), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_cbs, cbs, (size_t)M * K * g * sizeof(float), cudaMemcpyHostToDevice));
    BQ_CUDA(cudaMemcpy(d_scales, scales, (size_t)rows * sizeof(float), cudaMemcpyHostToDevice));

    double t0 = lv_now();
    kern_aq_dequant_ref(w_cpu, codes, cbs, scales, rows, d_in, G, M, K, g);
    const double cpu_s = lv_now() - t0;
    bq_dq ctx = {d_w, d_codes, d_cbs, d_scales, rows, d_in, G, M, K, g};
    LV_TRY(bq_dq_launch(&ctx, o->stream));
    BQ_CUDA(cudaStreamSynchronize(o->stream));
    BQ_CUDA(cudaMemcpy(w_gpu, d_w, (size_t)n_w * sizeof(float), cudaMemcpyDeviceToHost));
    r.max_abs_diff = 0.0;
    for (int64_t t = 0; t < n_w; t++) {
        double d = fabs((double)w_gpu[t] - (double)w_cpu[t]);
        if (d > r.max_abs_diff || d != d) r.max_abs_diff = d;
    }
    r.checked = n_w;

    LV_TRY(bq_time_gpu(o, bq_dq_launch, &ctx, &r.gpu_ms));
    r.cpu_frac = 1.0;
    r.cpu_ms = cpu_s * 1e3;
    /* bytes that must move: the weights written, the codes and scales read */
    r.work = (double)n_w * sizeof(float) + (double)n_codes * sizeof(uint16_t) +
             (double)rows * sizeof(float);
    snprintf(r.shape, sizeof r.shape, "%lldx%lld M=%d K=%d g=%d", (long long)rows,
             (long long)d_in, M, K, g);
    bq_print(o, &r);
done:
    cudaFree(d_w), cudaFree(d_scales), cudaFree(d_cbs), cudaFree(d_codes);
    free(w_gpu), free(w_cpu), free(scales), free(cbs), free(codes);
    return st;
}

static lv_status run(bq_opts *o)
{
    lv_status st = LV_OK;
    struct cudaDeviceProp prop;
    BQ_CUDA(cudaSetDevice(0));
    BQ_CUDA(cudaGetDeviceProperties(&prop, 0));
    snprintf(o->device, sizeof o->device, "%s", prop.name);
    BQ_CUDA(cudaStreamCreateWithFlags(&o->stream, cudaStreamNonBlocking));
    fprintf(stderr, "bench_quant_cuda: %s, scale %g, best of %d, CPU threads %d\n", o->device,
            o->scale, o->iters, omp_get_max_threads());
    LV_TRY(bench_hessian(o));
    LV_TRY(bench_kmeans(o));
    LV_TRY(bench_beam(o));
    LV_TRY(bench_dequant(o));
done:
    if (o->stream) cudaStreamDestroy(o->stream);
    return st;
}
#endif /* LLMVQ_HAVE_CUDA */

int main(int argc, char **argv)
{
    double scale = 1.0;
    int iters = 3;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--scale")) {
            scale = atof(argv[++i]);
        } else if (i + 1 < argc && !strcmp(argv[i], "--iters")) {
            iters = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: bench_quant_cuda [--scale F (0 < F <= 1)] [--iters N]\n");
            return 2;
        }
    }
    if (!(scale > 0.0 && scale <= 1.0) || iters <= 0) {
        fprintf(stderr, "bench_quant_cuda: need 0 < --scale <= 1 and --iters > 0\n");
        return 2;
    }
    if (!kern_quant_cuda_available()) {
        printf("SKIP: bench_quant_cuda needs a CUDA build and a CUDA device "
               "(lv_cuda_device_count() == %d)\n",
               lv_cuda_device_count());
        return 77;
    }
#ifdef LLMVQ_HAVE_CUDA
    bq_opts o = {.scale = scale, .iters = iters};
    lv_status st = run(&o);
    if (st != LV_OK) {
        fprintf(stderr, "bench_quant_cuda: %s\n", lv_last_error());
        return 1;
    }
#endif
    return 0;
}
