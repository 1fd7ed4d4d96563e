/* ops.c: the CPU reference ops of kern.h. Plain C loops + OpenMP; the one GEMM
 * goes to OpenBLAS. Thread counts come from OMP_NUM_THREADS / OPENBLAS_NUM_THREADS. */
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

size_t kern_attention_scratch(int T, int n_heads, int n_threads)
{
    (void)n_heads;
    return (size_t)(n_threads > 0 ? n_threads : 1) * (size_t)(T > 0 ? T : 1);
}

void kern_attention_ref(float *out, const float *q, const float *k, const float *v, int B,
                        int T, int n_heads, int n_kv_heads, int head_dim, float *att)
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
