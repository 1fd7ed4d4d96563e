/* backend_cpu.c: the CPU reference backend (host memory, synchronous) and
 * lv_backend_free for every backend. Its ops are the _ref functions of kern.h. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "kern_impl.h"

typedef struct {
    kern_backend_base base;
    float *att;     /* attention scratch, grown on demand */
    size_t att_cap; /* floats */
} cpu_impl;

static void cpu_release(void *impl)
{
    cpu_impl *c = impl;
    free(c->att);
    free(c);
}

static lv_status cpu_alloc(lv_backend *be, void **ptr, size_t bytes)
{
    lv_status st = LV_OK;
    if (!ptr) LV_FAIL(LV_ERR_INVALID_ARG, "cpu alloc: ptr is NULL");
    /* 64-byte aligned, size rounded up as aligned_alloc requires */
    *ptr = aligned_alloc(64, ((bytes ? bytes : 1) + 63) & ~(size_t)63);
    if (!*ptr) LV_FAIL(LV_ERR_NOMEM, "cpu alloc: out of memory allocating %zu bytes", bytes);
done:
    return st;
}

static void cpu_free(lv_backend *be, void *ptr) { free(ptr); }

static lv_status cpu_copy(lv_backend *be, void *dst, const void *src, size_t bytes)
{
    if (bytes) memcpy(dst, src, bytes);
    return LV_OK;
}

static lv_status cpu_sync(lv_backend *be) { return LV_OK; }

static lv_status cpu_matmul(lv_backend *be, float *out, const float *x, const float *w,
                            int64_t n, int d_in, int d_out)
{
    lv_status st = LV_OK;
    if (n < 0 || d_in <= 0 || d_out <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "matmul: shape (%lld, %d) -> %d", (long long)n, d_in, d_out);
    kern_matmul_ref(out, x, w, n, d_in, d_out);
done:
    return st;
}

static lv_status cpu_rmsnorm(lv_backend *be, float *out, const float *x, const float *w,
                             int64_t n, int dim, float eps)
{
    kern_rmsnorm_ref(out, x, w, n, dim, eps);
    return LV_OK;
}

static lv_status cpu_rope(lv_backend *be, float *x, int B, int T, int n_heads, int head_dim,
                          int pos0, float theta, lv_rope_style style)
{
    lv_status st = LV_OK;
    if (head_dim % 2 || head_dim > 4096)
        LV_FAIL(LV_ERR_INVALID_ARG, "rope: head_dim %d must be even and <= 4096", head_dim);
    kern_rope_ref(x, B, T, n_heads, head_dim, pos0, theta, style);
done:
    return st;
}

static lv_status cpu_attention(lv_backend *be, float *out, const float *q, const float *k,
                               const float *v, int B, int T, int n_heads, int n_kv_heads,
                               int head_dim)
{
    lv_status st = LV_OK;
    cpu_impl *c = be->impl;
    if (n_kv_heads <= 0 || n_heads % n_kv_heads)
        LV_FAIL(LV_ERR_INVALID_ARG, "attention: %d heads over %d kv heads", n_heads, n_kv_heads);
    size_t need = kern_attention_scratch(T, n_heads, omp_get_max_threads());
    if (need > c->att_cap) {
        free(c->att);
        c->att_cap = 0;
        LV_ALLOC(c->att, need);
        c->att_cap = need;
    }
    kern_attention_ref(out, q, k, v, B, T, n_heads, n_kv_heads, head_dim, c->att);
done:
    return st;
}

static lv_status cpu_swiglu(lv_backend *be, float *out, const float *gate, const float *up,
                            int64_t n)
{
    kern_swiglu_ref(out, gate, up, n);
    return LV_OK;
}

static lv_status cpu_softmax(lv_backend *be, float *x, int64_t n, int d)
{
    kern_softmax_ref(x, n, d);
    return LV_OK;
}

static lv_status cpu_embed(lv_backend *be, float *out, const float *emb, const int32_t *tokens,
                           int64_t n, int dim)
{
    kern_embed_ref(out, emb, tokens, n, dim);
    return LV_OK;
}

static const lv_backend_ops cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .h2d = cpu_copy,
    .d2h = cpu_copy,
    .sync = cpu_sync,
    .matmul = cpu_matmul,
    .rmsnorm = cpu_rmsnorm,
    .rope = cpu_rope,
    .attention = cpu_attention,
    .swiglu = cpu_swiglu,
    .softmax = cpu_softmax,
    .embed = cpu_embed,
};

lv_status lv_backend_cpu_init(lv_backend **be)
{
    lv_status st = LV_OK;
    lv_backend *b = NULL;
    cpu_impl *c = NULL;
    if (!be) LV_FAIL(LV_ERR_INVALID_ARG, "lv_backend_cpu_init: be is NULL");
    *be = NULL;
    LV_ALLOC(b, 1);
    LV_ALLOC(c, 1);
    c->base.release = cpu_release;
    b->ops = &cpu_ops;
    b->impl = c;
    *be = b;
    b = NULL;
    c = NULL;
done:
    free(c);
    free(b);
    return st;
}

void lv_backend_free(lv_backend *be)
{
    if (!be) return;
    kern_backend_base *base = be->impl;
    if (base && base->release) base->release(base);
    free(be);
}
