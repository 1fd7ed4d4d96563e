/* ops.c: the CPU reference ops of kern.h. Plain C loops + OpenMP; matmul and the
 * two products of attention go to OpenBLAS sgemm. Thread counts come from
 * OMP_NUM_THREADS / OPENBLAS_NUM_THREADS. */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kern.h"
#include "kern_impl.h"

void kern_matmul_ref(float *out, const float *x, const float *w, int64_t n, int d_in,
                     int d_out)
{
    LV_ASSERT(n >= 0 && d_in > 0 && d_out > 0);
    /* cblas takes int row counts: feed very tall x in slices. */
    const int64_t max_rows = INT_MAX / 2;
    for (int64_t r0 = 0; r0 < n; r0 += max_rows) {
        int64_t rows = n - r0 < max_rows ? n - r0 : max_rows;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)rows, d_out, d_in, 1.0f,
                    x + r0 * d_in, d_in, w, d_in, 0.0f, out + r0 * d_out, d_out);
    }
}

void kern_rmsnorm_ref(float *out, const float *x, const float *w, int64_t n, int dim,
                      float eps)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim; // (dim)
        float *oi = out + i * dim;     // (dim)
        double ss = 0.0;
        for (int d = 0; d < dim; d++) ss += (double)xi[d] * xi[d];
        float inv = (float)(1.0 / sqrt(ss / dim + (double)eps));
        for (int d = 0; d < dim; d++) oi[d] = w[d] * (inv * xi[d]);
    }
}

/* Rotate one head: pair p is (x[lo(p)], x[hi(p)]). Both styles share the formula,
 * so a HALF head is bit-identical to the permuted INTERLEAVED one. */
static void rope_head(float *x, int hd, const float *cs, const float *sn, lv_rope_style style)
{
    int half = hd / 2;
    for (int j = 0; j < half; j++) {
        int lo = style == LV_ROPE_HALF ? j : 2 * j;
        int hi = style == LV_ROPE_HALF ? j + half : 2 * j + 1;
        float x0 = x[lo], x1 = x[hi];
        x[lo] = x0 * cs[j] - x1 * sn[j];
        x[hi] = x0 * sn[j] + x1 * cs[j];
    }
}

void kern_rope_ref(float *x, int B, int T, int n_heads, int head_dim, int pos0, float theta,
                   lv_rope_style style)
{
    LV_ASSERT(head_dim % 2 == 0 && head_dim <= 4096);
    int half = head_dim / 2;
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < (int64_t)B * T; bt++) {
        float cs[2048], sn[2048]; // (head_dim/2) cos/sin, shared by all heads of the token
        float pos = (float)(pos0 + (int)(bt % T));
        for (int j = 0; j < half; j++) {
            float a = pos * kern_rope_freq_ref(j, head_dim, theta);
            cs[j] = cosf(a);
            sn[j] = sinf(a);
        }
        float *xt = x + bt * n_heads * head_dim; // (n_heads, head_dim)
        for (int h = 0; h < n_heads; h++) rope_head(xt + h * head_dim, head_dim, cs, sn, style);
    }
}

/* Four keys per step in both loops: the q loads and the out[] loads/stores are
 * shared by four keys (the loops are memory-op bound); omp simd fixes a
 * vectorizable summation order without -ffast-math. */
void kern_attn_row_ref(float *restrict out, const float *restrict q, const float *k,
                       const float *v, int n_keys, int64_t stride, int hd, float scale,
                       float *restrict att)
{
    float mx = -INFINITY;
    int s = 0;
    for (; s + 4 <= n_keys; s += 4) {
        const float *k0 = k + s * stride, *k1 = k0 + stride, *k2 = k1 + stride, *k3 = k2 + stride;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int d = 0; d < hd; d++) {
            a0 += q[d] * k0[d];
            a1 += q[d] * k1[d];
            a2 += q[d] * k2[d];
            a3 += q[d] * k3[d];
        }
        att[s] = a0 * scale, att[s + 1] = a1 * scale;
        att[s + 2] = a2 * scale, att[s + 3] = a3 * scale;
    }
    for (; s < n_keys; s++) {
        const float *ks = k + s * stride;
        float a = 0.0f;
#pragma omp simd reduction(+ : a)
        for (int d = 0; d < hd; d++) a += q[d] * ks[d];
        att[s] = a * scale;
    }
    for (s = 0; s < n_keys; s++) mx = att[s] > mx ? att[s] : mx;
    float sum = 0.0f;
    for (s = 0; s < n_keys; s++) {
        att[s] = expf(att[s] - mx);
        sum += att[s];
    }
    const float inv = 1.0f / sum;
    for (int d = 0; d < hd; d++) out[d] = 0.0f;
    for (s = 0; s + 4 <= n_keys; s += 4) {
        const float *v0 = v + s * stride, *v1 = v0 + stride, *v2 = v1 + stride, *v3 = v2 + stride;
        const float p0 = att[s] * inv, p1 = att[s + 1] * inv;
        const float p2 = att[s + 2] * inv, p3 = att[s + 3] * inv;
#pragma omp simd
        for (int d = 0; d < hd; d++) out[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
    }
    for (; s < n_keys; s++) {
        const float *vs = v + s * stride;
        const float p = att[s] * inv;
#pragma omp simd
        for (int d = 0; d < hd; d++) out[d] += p * vs[d];
    }
}

/* ---- batched causal attention ----
 * kern_attention_ref runs per (sequence, kv head, tile of ATTN_TILE queries): for
 * each query head of the group, S = scale * Q K^T (tile, keys up to the tile's last
 * position) by sgemm, a causal row softmax in place (masked keys zeroed), then
 * O = P V by sgemm and O rows scaled by 1/sum. Q, K, V and O are read and written
 * in place through sgemm's leading dimensions; the only scratch is the S tile.
 * kern_attention_rowwise_ref, one query row at a time, is its oracle. */

enum { ATTN_TILE = 64 }; /* query rows per tile: sgemm's m */

/* OpenBLAS (pthreads build) hands a GEMM with m*n*k above 65536 *
 * GEMM_MULTITHREAD_THRESHOLD to its own thread pool, which serialises concurrent
 * callers; our sgemm calls run inside an OpenMP loop, so each stays below that. */
#ifndef OPENBLAS_GEMM_MULTITHREAD_THRESHOLD
#define OPENBLAS_GEMM_MULTITHREAD_THRESHOLD 4
#endif
static const int64_t attn_gemm_mnk_max = 65536 * (int64_t)OPENBLAS_GEMM_MULTITHREAD_THRESHOLD;

/* Floats of one thread's scratch: S (rows, T) and 1/sum (rows), rows <= ATTN_TILE. */
static size_t attn_thread_scratch(int T)
{
    size_t t = (size_t)(T > 0 ? T : 1), rows = t < ATTN_TILE ? t : ATTN_TILE;
    return rows * t + rows;
}

size_t kern_attention_scratch(int T, int n_heads, int n_threads)
{
    (void)n_heads;
    return (size_t)(n_threads > 0 ? n_threads : 1) * attn_thread_scratch(T);
}

void kern_attention_rowwise_ref(float *out, const float *q, const float *k, const float *v,
                                int B, int T, int n_heads, int n_kv_heads, int head_dim,
                                float *att)
{
    LV_ASSERT(n_kv_heads > 0 && n_heads % n_kv_heads == 0);
    const int group = n_heads / n_kv_heads;
    const int64_t qs = (int64_t)n_heads * head_dim;     // q/out row stride
    const int64_t kvs = (int64_t)n_kv_heads * head_dim; // k/v row stride
    const float scale = 1.0f / sqrtf((float)head_dim);
#pragma omp parallel
    {
        float *att_t = att + (size_t)omp_get_thread_num() * T; // (T) this thread's scores
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < (int64_t)B * n_heads; bh++) {
            int64_t b = bh / n_heads;
            int h = (int)(bh % n_heads);
            int64_t off_kv = b * T * kvs + (int64_t)(h / group) * head_dim;
            for (int t = 0; t < T; t++) {
                int64_t off_q = (b * T + t) * qs + (int64_t)h * head_dim;
                kern_attn_row_ref(out + off_q, q + off_q, k + off_kv, v + off_kv, t + 1, kvs,
                                  head_dim, scale, att_t);
            }
        }
    }
}

/* exp(x) for x in [-87, 0] in plain float arithmetic, so that a row loop
 * vectorizes (glibc's expf does not without -ffast-math). x = n ln2 + r with
 * |r| <= ln2/2 (ln2 split hi + lo so n*ln2_hi is exact), exp(r) by its degree-7
 * Taylor polynomial (truncation < 6e-9 relative), times 2^n built in the exponent
 * bits (n >= -126 keeps it a normal float): at most 1.22 ulp from exp, checked
 * over every float in [-87, 0] (glibc expf: 0.5). */
static inline float attn_exp(float x)
{
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504f + magic;
    float n = t - magic;
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { float f; uint32_t u; } bits; /* C11 type punning */
    bits.f = t;
    bits.u = (bits.u - 0x4B400000u + 127u) << 23; /* low bits of t are n: 2^n */
    return p * bits.f;
}

/* s (n): s[0..n_valid) <- exp(s - max), s[n_valid..n) <- 0 (causal mask).
 * Returns 1/sum; the sum is in float like kern_attn_row_ref's. Scores more than
 * 87 below the max are taken as 87 below (exp 1.6e-38 instead of ~0 next to the
 * max's 1); NaN stays NaN. The clamp is a loop of its own: fused with the exp,
 * GCC -O2 no longer vectorizes it. */
static float attn_softmax_row(float *restrict s, int n_valid, int n)
{
    float m8[8], mx = -INFINITY, sum = 0.0f;
    int j = 0;
    for (int u = 0; u < 8; u++) m8[u] = -INFINITY;
    for (; j + 8 <= n_valid; j += 8) /* 8 lanes in registers (omp simd's went to memory) */
        for (int u = 0; u < 8; u++) m8[u] = s[j + u] > m8[u] ? s[j + u] : m8[u];
    for (int u = 0; u < 8; u++) mx = m8[u] > mx ? m8[u] : mx;
    for (; j < n_valid; j++) mx = s[j] > mx ? s[j] : mx;
#pragma omp simd
    for (j = 0; j < n_valid; j++) {
        float x = s[j] - mx;
        s[j] = x < -87.0f ? -87.0f : x;
    }
#pragma omp simd reduction(+ : sum)
    for (j = 0; j < n_valid; j++) {
        s[j] = attn_exp(s[j]);
        sum += s[j];
    }
    for (j = n_valid; j < n; j++) s[j] = 0.0f;
    return 1.0f / sum;
}

typedef struct {
    const float *q, *k, *v; // (B, T, n_heads*hd), (B, T, kvs), (B, T, kvs)
    float *out;             // (B, T, n_heads*hd)
    int T, hd, group;
    int64_t qs, kvs;        // row strides of q/out and k/v
    int rows, kc;           // tile rows; keys per sgemm call (the OpenBLAS bound)
    float scale;
} attn_plan;

/* Query head h of sequence b, query rows t0..t0+m-1 against keys 0..t0+m-1.
 * S (m, n) and inv (m) are this thread's scratch. */
static void attn_tile(const attn_plan *p, int64_t b, int h, int t0, int m, float *S,
                      float *inv)
{
    const int n = t0 + m, hd = p->hd;
    const float *qh = p->q + (b * p->T + t0) * p->qs + (int64_t)h * hd;         // (m, hd)
    const float *kh = p->k + b * p->T * p->kvs + (int64_t)(h / p->group) * hd; // (n, hd)
    const float *vh = p->v + b * p->T * p->kvs + (int64_t)(h / p->group) * hd; // (n, hd)
    float *oh = p->out + (b * p->T + t0) * p->qs + (int64_t)h * hd;             // (m, hd)
    /* beta = 1 on zeroed S and O: OpenBLAS's beta = 0 pass clears C with scalar
     * stores, several times slower than memset. */
    memset(S, 0, (size_t)m * (size_t)n * sizeof(float));
    for (int c0 = 0; c0 < n; c0 += p->kc) {
        int nc = n - c0 < p->kc ? n - c0 : p->kc;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, nc, hd, p->scale, qh,
                    (int)p->qs, kh + c0 * p->kvs, (int)p->kvs, 1.0f, S + c0, n);
    }
    for (int i = 0; i < m; i++) inv[i] = attn_softmax_row(S + (int64_t)i * n, t0 + i + 1, n);
    for (int i = 0; i < m; i++) memset(oh + (int64_t)i * p->qs, 0, (size_t)hd * sizeof(float));
    for (int c0 = 0; c0 < n; c0 += p->kc) {
        int nc = n - c0 < p->kc ? n - c0 : p->kc;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, hd, nc, 1.0f, S + c0, n,
                    vh + c0 * p->kvs, (int)p->kvs, 1.0f, oh, (int)p->qs);
    }
    for (int i = 0; i < m; i++)
        for (int d = 0; d < hd; d++) oh[(int64_t)i * p->qs + d] *= inv[i];
}

void kern_attention_ref(float *out, const float *q, const float *k, const float *v, int B,
                        int T, int n_heads, int n_kv_heads, int head_dim, float *att)
{
    LV_ASSERT(n_kv_heads > 0 && n_heads % n_kv_heads == 0 && head_dim > 0);
    LV_ASSERT((int64_t)n_heads * head_dim <= INT_MAX); /* sgemm's leading dimensions */
    if (B <= 0 || T <= 0) return;
    attn_plan p = {.q = q, .k = k, .v = v, .out = out, .T = T, .hd = head_dim,
                   .group = n_heads / n_kv_heads, .qs = (int64_t)n_heads * head_dim,
                   .kvs = (int64_t)n_kv_heads * head_dim,
                   .scale = 1.0f / sqrtf((float)head_dim)};
    /* Tile rows and keys per call keep m*n*k under the bound with >= 32 keys a call. */
    int64_t rows = attn_gemm_mnk_max / (32 * (int64_t)head_dim);
    rows = rows < 1 ? 1 : rows > ATTN_TILE ? ATTN_TILE : rows;
    p.rows = (int)(rows < T ? rows : T);
    int64_t kc = attn_gemm_mnk_max / ((int64_t)p.rows * head_dim);
    p.kc = (int)(kc < 1 ? 1 : kc < T ? kc : T);
    const int n_tiles = (T + p.rows - 1) / p.rows;
    const size_t per_thread = attn_thread_scratch(T);
    const int64_t n_bk = (int64_t)B * n_kv_heads;
#pragma omp parallel
    {
        float *S = att + (size_t)omp_get_thread_num() * per_thread; // (rows, T)
        float *inv = S + (size_t)p.rows * T;                         // (rows)
        /* Work items (tile, sequence, kv head), the longest (last) tiles first. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < (int64_t)n_tiles * n_bk; w++) {
            int t0 = (n_tiles - 1 - (int)(w / n_bk)) * p.rows;
            int64_t b = (w % n_bk) / n_kv_heads;
            int kvh = (int)(w % n_kv_heads);
            int m = T - t0 < p.rows ? T - t0 : p.rows;
            for (int h = kvh * p.group; h < (kvh + 1) * p.group; h++)
                attn_tile(&p, b, h, t0, m, S, inv);
        }
    }
}

void kern_swiglu_ref(float *out, const float *gate, const float *up, int64_t n)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        out[i] = g / (1.0f + expf(-g)) * up[i];
    }
}

void kern_softmax_ref(float *x, int64_t n, int d)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float *xi = x + i * d; // (d)
        float mx = -INFINITY;
        for (int j = 0; j < d; j++) mx = xi[j] > mx ? xi[j] : mx;
        double sum = 0.0;
        for (int j = 0; j < d; j++) {
            xi[j] = expf(xi[j] - mx);
            sum += xi[j];
        }
        float inv = (float)(1.0 / sum);
        for (int j = 0; j < d; j++) xi[j] *= inv;
    }
}

double kern_xent_sum_ref(const float *logits, const int32_t *targets, int64_t n, int vocab)
{
    double total = 0.0;
#pragma omp parallel for schedule(static) reduction(+ : total)
    for (int64_t i = 0; i < n; i++) {
        if (targets[i] < 0) continue;
        LV_ASSERT(targets[i] < vocab);
        const float *li = logits + i * vocab; // (vocab)
        double mx = -INFINITY;
        for (int j = 0; j < vocab; j++) mx = li[j] > mx ? li[j] : mx;
        double sum = 0.0;
        for (int j = 0; j < vocab; j++) sum += exp((double)li[j] - mx);
        total += mx + log(sum) - (double)li[targets[i]];
    }
    return total;
}

void kern_embed_ref(float *out, const float *emb, const int32_t *tokens, int64_t n, int dim)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        LV_ASSERT(tokens[i] >= 0);
        memcpy(out + i * dim, emb + (int64_t)tokens[i] * dim, (size_t)dim * sizeof(float));
    }
}
