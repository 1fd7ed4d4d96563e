/* backend_cuda.cu: the CUDA lv_backend (device memory, one stream, one cuBLAS
 * handle) and lv_cuda_device_count. Callable from C through kern.h.
 *
 * Versions: the ops dispatch to matmul.cu (cuBLAS), rmsnorm.cu, rope.cu,
 * attention.cu and elementwise.cu; each file lists its kernels.
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build --target test_kern_cuda
 * Check: build/tests/test_kern_cuda compares every op with the CPU backend (exits
 * 77 = skipped when there is no usable device; the binary runs without a driver). */
#include <cstdlib>

#include "kern_cuda.h"

typedef struct {
    kern_backend_base base;
    int device;
    cudaStream_t stream;
    cublasHandle_t blas;
} cuda_impl;

static cuda_impl *impl_of(lv_backend *be) { return (cuda_impl *)be->impl; }

static void cuda_release(void *p)
{
    cuda_impl *c = (cuda_impl *)p;
    if (c->blas) cublasDestroy(c->blas);
    if (c->stream) cudaStreamDestroy(c->stream);
    free(c);
}

/* Ops may come from any host thread: make this backend's device current. */
static lv_status cuda_enter(lv_backend *be)
{
    lv_status st = LV_OK;
    KERN_CUDA_TRY(cudaSetDevice(impl_of(be)->device));
done:
    return st;
}

static lv_status cuda_alloc(lv_backend *be, void **ptr, size_t bytes)
{
    lv_status st = LV_OK;
    if (!ptr) LV_FAIL(LV_ERR_INVALID_ARG, "cuda alloc: ptr is NULL");
    *ptr = NULL;
    LV_TRY(cuda_enter(be));
    KERN_CUDA_TRY(cudaMalloc(ptr, bytes ? bytes : 1));
done:
    return st;
}

static void cuda_free(lv_backend *be, void *ptr)
{
    if (ptr && cuda_enter(be) == LV_OK) cudaFree(ptr);
}

/* h2d/d2h are synchronous: the host buffer may be pageable and reused on return. */
static lv_status cuda_copy(lv_backend *be, void *dst, const void *src, size_t bytes,
                           cudaMemcpyKind kind)
{
    lv_status st = LV_OK;
    if (!bytes) goto done;
    LV_TRY(cuda_enter(be));
    KERN_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, kind, impl_of(be)->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_h2d(lv_backend *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy(be, dst, src, bytes, cudaMemcpyHostToDevice);
}

static lv_status cuda_d2h(lv_backend *be, void *dst, const void *src, size_t bytes)
{
    return cuda_copy(be, dst, src, bytes, cudaMemcpyDeviceToHost);
}

static lv_status cuda_sync(lv_backend *be)
{
    lv_status st = LV_OK;
    LV_TRY(cuda_enter(be));
    KERN_CUDA_TRY(cudaStreamSynchronize(impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_matmul(lv_backend *be, float *out, const float *x, const float *w,
                             int64_t n, int d_in, int d_out)
{
    lv_status st = LV_OK;
    if (n < 0 || d_in <= 0 || d_out <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "matmul: shape (%lld, %d) -> %d", (long long)n, d_in, d_out);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_matmul_cuda(impl_of(be)->blas, out, x, w, n, d_in, d_out));
done:
    return st;
}

static lv_status cuda_rmsnorm(lv_backend *be, float *out, const float *x, const float *w,
                              int64_t n, int dim, float eps)
{
    lv_status st = LV_OK;
    if (dim <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "rmsnorm: dim %d", dim);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_rmsnorm_cuda(out, x, w, n, dim, eps, impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_rope(lv_backend *be, float *x, int B, int T, int n_heads, int head_dim,
                           int pos0, float theta, lv_rope_style style)
{
    lv_status st = LV_OK;
    if (head_dim <= 0 || head_dim % 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "rope: head_dim %d must be even", head_dim);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_rope_cuda(x, B, T, n_heads, head_dim, pos0, theta, style, impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_attention(lv_backend *be, float *out, const float *q, const float *k,
                                const float *v, int B, int T, int n_heads, int n_kv_heads,
                                int head_dim)
{
    lv_status st = LV_OK;
    if (n_kv_heads <= 0 || n_heads % n_kv_heads || head_dim <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "attention: %d heads over %d kv heads, head_dim %d", n_heads,
                n_kv_heads, head_dim);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_attention_cuda(out, q, k, v, B, T, n_heads, n_kv_heads, head_dim,
                               impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_swiglu(lv_backend *be, float *out, const float *gate, const float *up,
                             int64_t n)
{
    lv_status st = LV_OK;
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_swiglu_cuda(out, gate, up, n, impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_softmax(lv_backend *be, float *x, int64_t n, int d)
{
    lv_status st = LV_OK;
    if (d <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "softmax: row length %d", d);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_softmax_cuda(x, n, d, impl_of(be)->stream));
done:
    return st;
}

static lv_status cuda_embed(lv_backend *be, float *out, const float *emb, const int32_t *tokens,
                            int64_t n, int dim)
{
    lv_status st = LV_OK;
    if (dim <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "embed: dim %d", dim);
    LV_TRY(cuda_enter(be));
    LV_TRY(kern_embed_cuda(out, emb, tokens, n, dim, impl_of(be)->stream));
done:
    return st;
}

static const lv_backend_ops cuda_ops = {
    /* .name = */ "cuda",
    /* .alloc = */ cuda_alloc,
    /* .free = */ cuda_free,
    /* .h2d = */ cuda_h2d,
    /* .d2h = */ cuda_d2h,
    /* .sync = */ cuda_sync,
    /* .matmul = */ cuda_matmul,
    /* .rmsnorm = */ cuda_rmsnorm,
    /* .rope = */ cuda_rope,
    /* .attention = */ cuda_attention,
    /* .swiglu = */ cuda_swiglu,
    /* .softmax = */ cuda_softmax,
    /* .embed = */ cuda_embed,
};

extern "C" int lv_cuda_device_count(void)
{
    /* Without a driver cudaGetDeviceCount fails (35, insufficient driver) and
     * leaves the count untouched: start from 0. */
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

extern "C" lv_status lv_backend_cuda_init(lv_backend **be, int device)
{
    lv_status st = LV_OK;
    lv_backend *b = NULL;
    cuda_impl *c = NULL;
    int n = 0;
    cudaError_t e = cudaSuccess;
    if (!be) LV_FAIL(LV_ERR_INVALID_ARG, "lv_backend_cuda_init: be is NULL");
    *be = NULL;
    e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        LV_FAIL(LV_ERR_UNSUPPORTED, "no usable CUDA device: cudaGetDeviceCount: %s (%s)",
                cudaGetErrorString(e), cudaGetErrorName(e));
    }
    if (device < 0 || device >= n)
        LV_FAIL(LV_ERR_UNSUPPORTED, "CUDA device %d requested but %d device(s) present", device, n);
    /* LV_ALLOC needs C's implicit void* conversion */
    b = (lv_backend *)calloc(1, sizeof *b);
    c = (cuda_impl *)calloc(1, sizeof *c);
    if (!b || !c) {
        free(c);
        LV_FAIL(LV_ERR_NOMEM, "cuda backend: out of memory");
    }
    c->base.release = cuda_release;
    c->device = device;
    b->ops = &cuda_ops;
    b->impl = c;
    KERN_CUDA_TRY(cudaSetDevice(device));
    KERN_CUDA_TRY(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    KERN_CUBLAS_TRY(cublasCreate(&c->blas));
    KERN_CUBLAS_TRY(cublasSetStream(c->blas, c->stream));
    *be = b;
    b = NULL;
done:
    if (b) { /* failed after the allocations (no lv_backend_free: keeps this
              * library free of a back-reference into llmvq_core's backend_cpu.c) */
        if (b->impl) cuda_release(b->impl);
        free(b);
    }
    return st;
}
