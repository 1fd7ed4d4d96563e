/* kern_impl.h: private to kernels/ (C and CUDA sides); no public header includes it.
 *
 * - kern_backend_base: every backend's impl struct starts with it, so that
 *   lv_backend_free() can release any backend without knowing which it is.
 * - kern_attn_row_ref: the one-query attention row of the KV-cache decoder and
 *   of kern_attention_rowwise_ref, the row-at-a-time twin that tests hold the
 *   GEMM-tiled kern_attention_ref against.
 * - kern_rope_freq_ref: the RoPE frequency as llama2.c run.c computes it (float). */
#ifndef KERN_IMPL_H
#define KERN_IMPL_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
/* The .cu files include the C headers: lv.h's C11 _Noreturn is [[noreturn]] in C++. */
#ifndef _Noreturn
#define _Noreturn [[noreturn]]
#endif
extern "C" {
#endif

#include "kern.h"

typedef struct kern_backend_base {
    /* Releases everything the impl owns, the impl struct included. */
    void (*release)(void *impl);
} kern_backend_base;

/* out (hd) = sum_s softmax_s(q . k_s * scale) v_s over s = 0..n_keys-1.
 * k, v: n_keys rows of hd floats, row stride `stride` floats. att: n_keys scratch.
 * out, q and att must not overlap each other or k/v (restrict in the definition). */
void kern_attn_row_ref(float *out, const float *q, const float *k, const float *v,
                       int n_keys, int64_t stride, int hd, float scale, float *att);

/* kern_attention_ref's semantics and arguments, one kern_attn_row_ref call per
 * (sequence, head, query): the oracle for the tiled version. att needs only
 * (omp threads, T) floats, less than kern_attention_scratch gives. */
void kern_attention_rowwise_ref(float *out, const float *q, const float *k, const float *v,
                                int B, int T, int n_heads, int n_kv_heads, int head_dim,
                                float *att);

/* Frequency of pair j of a head of size hd: theta^(-2j/hd). The angle is then
 * (float)pos * freq, both in float exactly as run.c does it, so our logits track
 * llama2.c's (at pos ~1000 the float angle is off by ~1e-4 rad; we keep that). */
static inline float kern_rope_freq_ref(int j, int hd, float theta)
{
    return 1.0f / powf(theta, (float)(2 * j) / (float)hd);
}

#ifdef __cplusplus
}
#endif

#endif
