/* qmm_ceiling.c: how fast can a 2x8g8 product from codes be on this CPU at
 * batch 1, against OpenBLAS sgemv of the same-shape fp32 matrix in the same run?
 *
 * It times the two inner loops every "straight from the codes" kernel is built
 * on, stripped of everything else (no table build, no scales, no tails, codes
 * already in the most convenient layout), so their times are lower bounds for
 * the LUT and GATHER algorithms of kernels/cpu/qmm.c:
 *   lookup: y[r] += T[e][c[r, e]] over the E = 2 * cols / 8 codes of a row, one
 *           byte code each, 8 rows interleaved, the two codes of a group added
 *           first (2 table reads and 2 float adds per group), tables of 16
 *           elements (16 KiB) at a time so that they stay in L1;
 *   gather: y[r] = sum over groups of x_g . (C0[c0] + C1[c1]) with 8-float
 *           codebook vectors (AVX2 where the CPU has it, else the same in C),
 *           4 rows interleaved, u16 codes as the layer stores them.
 * Both are bound by loads and float adds per code, not by memory: at 2 bits per
 * weight the codes of a 4096 x 4096 layer are 4 MiB against sgemv's 64 MiB.
 * speedup_ceiling = sgemv / the faster loop is what no kernel of these two
 * kinds beats on this machine (docs/kernels-qmm.md, issue 6's 4x target).
 *
 * Usage: bench_qmm_ceiling [rows cols reps] (default 4096 4096 30); threads from
 * OMP_NUM_THREADS (OpenBLAS follows OPENBLAS_NUM_THREADS). One JSON line. */
#include <cblas.h>
#include <omp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lv.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CEIL_X86 1
#else
#define CEIL_X86 0
#endif

#define K 256    /* entries per codebook (8 bits) */
#define CHUNK 16 /* table elements per L1 chunk */
#define RT 256   /* rows per work item */

typedef struct {
    int64_t R, C, E, G;
    uint8_t *c8;   /* (R, E) */
    uint16_t *c16; /* (R, E) */
    float *lut;    /* (E, K) */
    float *cb;     /* (2, K, 8) */
    float *x, *y;
} ceil_data;

static void lookup_loop(const ceil_data *d)
{
    const int64_t R = d->R, E = d->E;
#pragma omp parallel for schedule(static)
    for (int64_t r0 = 0; r0 < R; r0 += RT) {
        float acc[RT];
        memset(acc, 0, sizeof acc);
        for (int64_t e0 = 0; e0 < E; e0 += CHUNK)
            for (int64_t r = 0; r + 8 <= RT && r0 + r + 8 <= R; r += 8) {
                const uint8_t *c = d->c8 + (r0 + r) * E;
                float a[8];
                for (int j = 0; j < 8; j++) a[j] = acc[r + j];
                for (int64_t e = e0; e < e0 + CHUNK && e + 8 <= E; e += 8) {
                    const float *T = d->lut + e * K;
                    uint64_t w[8];
#pragma GCC unroll 8
                    for (int j = 0; j < 8; j++) memcpy(&w[j], c + j * E + e, 8);
#pragma GCC unroll 4
                    for (int k = 0; k < 8; k += 2)
#pragma GCC unroll 8
                        for (int j = 0; j < 8; j++) {
                            a[j] += T[k * K + (w[j] & 255)] + T[(k + 1) * K + ((w[j] >> 8) & 255)];
                            w[j] >>= 16;
                        }
                }
                for (int j = 0; j < 8; j++) acc[r + j] = a[j];
            }
        const int64_t n = R - r0 < RT ? R - r0 : RT;
        memcpy(d->y + r0, acc, sizeof(float) * (size_t)n);
    }
}

#if CEIL_X86
__attribute__((target("avx2"))) static void gather_loop_avx2(const ceil_data *d)
{
    const int64_t R = d->R, E = d->E, G = d->G;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R - 3; r += 4) {
        const uint16_t *c = d->c16 + r * E;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t i = 0; i < G; i++) {
            const __m256 xv = _mm256_loadu_ps(d->x + i * 8);
#define CEIL_ROW(acc, j)                                                                    \
    do {                                                                                    \
        uint32_t w;                                                                         \
        memcpy(&w, c + (j) * E + 2 * i, 4);                                                 \
        const __m256 v = _mm256_add_ps(_mm256_loadu_ps(d->cb + (w & 65535) * 8),           \
                                       _mm256_loadu_ps(d->cb + (K + (w >> 16)) * 8));      \
        acc = _mm256_add_ps(acc, _mm256_mul_ps(xv, v));                                     \
    } while (0)
            CEIL_ROW(a0, 0);
            CEIL_ROW(a1, 1);
            CEIL_ROW(a2, 2);
            CEIL_ROW(a3, 3);
#undef CEIL_ROW
        }
        float t[32];
        _mm256_storeu_ps(t, a0), _mm256_storeu_ps(t + 8, a1);
        _mm256_storeu_ps(t + 16, a2), _mm256_storeu_ps(t + 24, a3);
        for (int j = 0; j < 4; j++) {
            float s = 0;
            for (int l = 0; l < 8; l++) s += t[j * 8 + l];
            d->y[r + j] = s;
        }
    }
}
#endif

static void gather_loop_c(const ceil_data *d)
{
    const int64_t R = d->R, E = d->E, G = d->G;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const uint16_t *c = d->c16 + r * E;
        float a[8] = {0};
        for (int64_t i = 0; i < G; i++) {
            const float *p = d->cb + (int64_t)c[2 * i] * 8, *q = d->cb + (K + (int64_t)c[2 * i + 1]) * 8;
            for (int l = 0; l < 8; l++) a[l] += d->x[i * 8 + l] * (p[l] + q[l]);
        }
        float s = 0;
        for (int l = 0; l < 8; l++) s += a[l];
        d->y[r] = s;
    }
}

static void gather_loop(const ceil_data *d)
{
#if CEIL_X86
    if (__builtin_cpu_supports("avx2")) {
        gather_loop_avx2(d);
        return;
    }
#endif
    gather_loop_c(d);
}

static int cmp_d(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    const int64_t R = argc > 1 ? atoll(argv[1]) : 4096, C = argc > 2 ? atoll(argv[2]) : 4096;
    const int reps = argc > 3 ? atoi(argv[3]) : 30;
    if (R < 8 || C < 64 || C % 64 || reps < 3 || reps > 1000) {
        fprintf(stderr, "bench_qmm_ceiling: need rows >= 8, cols a multiple of 64, 3 <= reps <= 1000\n");
        return 2;
    }
    ceil_data d = {.R = R, .C = C, .G = C / 8, .E = C / 4};
    float *W = malloc(sizeof(float) * (size_t)(R * C)), *yf = malloc(sizeof(float) * (size_t)R);
    double *t = malloc(sizeof(double) * (size_t)reps);
    d.c8 = malloc((size_t)(R * d.E));
    d.c16 = malloc(sizeof(uint16_t) * (size_t)(R * d.E));
    d.lut = malloc(sizeof(float) * (size_t)(d.E * K));
    d.cb = malloc(sizeof(float) * 2 * K * 8);
    d.x = malloc(sizeof(float) * (size_t)C);
    d.y = malloc(sizeof(float) * (size_t)R);
    if (!W || !yf || !t || !d.c8 || !d.c16 || !d.lut || !d.cb || !d.x || !d.y) {
        fprintf(stderr, "bench_qmm_ceiling: out of memory for %lld x %lld\n", (long long)R, (long long)C);
        return 1;
    }
    lv_rng rng;
    lv_rng_seed(&rng, 1);
    for (int64_t i = 0; i < R * C; i++) W[i] = (float)lv_rng_uniform(&rng) - 0.5f;
    for (int64_t i = 0; i < C; i++) d.x[i] = (float)lv_rng_uniform(&rng) - 0.5f;
    for (int64_t i = 0; i < d.E * K; i++) d.lut[i] = (float)lv_rng_uniform(&rng) - 0.5f;
    for (int64_t i = 0; i < 2 * K * 8; i++) d.cb[i] = (float)lv_rng_uniform(&rng) - 0.5f;
    for (int64_t i = 0; i < R * d.E; i++) d.c16[i] = d.c8[i] = (uint8_t)(lv_rng_u64(&rng) & 255);

    double ms[3];
    for (int which = 0; which < 3; which++) {
        for (int k = 0; k < reps; k++) {
            const double t0 = lv_now();
            if (which == 0)
                cblas_sgemv(CblasRowMajor, CblasNoTrans, (int)R, (int)C, 1.0f, W, (int)C, d.x, 1, 0.0f, yf, 1);
            else if (which == 1)
                lookup_loop(&d);
            else
                gather_loop(&d);
            t[k] = lv_now() - t0;
        }
        qsort(t, (size_t)reps, sizeof t[0], cmp_d);
        ms[which] = 1e3 * t[reps / 2];
    }
    const double best = ms[1] < ms[2] ? ms[1] : ms[2];
    printf("{\"rows\":%lld,\"cols\":%lld,\"config\":\"2x8g8\",\"batch\":1,\"threads\":%d,"
           "\"ms_fp32\":%.4f,\"ms_lookup_loop\":%.4f,\"ms_gather_loop\":%.4f,"
           "\"gbps_fp32\":%.2f,\"lookups_per_ns\":%.3f,\"speedup_lookup\":%.3f,"
           "\"speedup_gather\":%.3f,\"speedup_ceiling\":%.3f}\n",
           (long long)R, (long long)C, omp_get_max_threads(), ms[0], ms[1], ms[2],
           4.0 * (double)(R * C) / (ms[0] * 1e6), (double)(R * d.E) / (ms[1] * 1e6),
           ms[0] / ms[1], ms[0] / ms[2], ms[0] / best);
    free(W);
    free(yf);
    free(t);
    free(d.c8);
    free(d.c16);
    free(d.lut);
    free(d.cb);
    free(d.x);
    free(d.y);
    return 0;
}
