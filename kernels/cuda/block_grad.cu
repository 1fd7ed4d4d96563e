/* block_grad.cu: forward and backward of one quantized LLaMA block on the GPU
 * (kern_ftcuda.h), the twin of stages/finetune_grad.c for PV-tuning.
 *
 * Versions:
 *   ft_add_outliers1: W[r, idx[j]] += R[r, j], one thread per correction.
 *   ft_inv_rms1:      one 128-thread block per row, double partial sums, fixed tree.
 *   ft_add1, ft_copy1: grid-stride residual add / copy.
 *   ft_swiglu_bwd1:   grid-stride, the CPU's formulas.
 *   ft_norm_dw1:      one thread per column, rows summed in order in double.
 *   ft_norm_dx1:      one 128-thread block per row (double dot, fixed tree).
 *   ft_rope_bwd1:     one thread per (token, head, pair): the transposed rotation with
 *                     the forward's angles (float pos * float freq, cosf/sinf).
 *   ft_attn_rows1:    one 128-thread block per (sequence, head, query t): scores,
 *                     softmax, dP and dS = P (dP - <P, dP>) scale for s <= t into
 *                     (B, H, T, T) buffers, then dq[t] = sum_s dS[s] k_s.
 *   ft_attn_kv1:      one thread per (sequence, kv head, key s, d): dk, dv summed over
 *                     the group's heads and t >= s in order.
 *   ft_chain_dc2:     one thread per codebook entry (m, k, a) over its own list of the
 *                     (r, group i) whose code m is k, in (r, i) order (a stable host
 *                     counting sort made when the block is uploaded), summed in double
 *                     as the CPU: O(codes * g) work in all, where ft_chain_dc1 (every
 *                     entry scanning every code, O(2^B) times more: ~1 s per 4096-wide
 *                     2x8g8 linear) was.
 *   ft_chain_ds1:     one thread per row: <dW[r], Q[r]> in the CPU's order.
 * No atomics; every output is produced by one thread in a fixed order, so results
 * are deterministic on a given GPU. GEMMs: cuBLAS FP32 (default math mode).
 * Build: cmake -S . -B build -DLLMVQ_CUDA=ON && cmake --build build
 * Check: build/tests/test_ft_grad_cuda (CPU vs CUDA on stories260K blocks; exits 77
 * without a device). */
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kern_cuda.h"
#include "kern_ftcuda.h"
#include "kern_quant_cuda.h"

#define FT_NSEG (2 * LV_LIN_COUNT + 2)
#define FT_RED 128 /* threads of the row-reduction kernels (a power of two) */

struct kern_ftcuda {
    lv_model_config cfg;
    int B, T, saved_B;
    cudaStream_t stream;
    cublasHandle_t blas;
    int64_t seg_off[FT_NSEG];
    int64_t d_out[LV_LIN_COUNT], d_in[LV_LIN_COUNT], ng[LV_LIN_COUNT], ncb[LV_LIN_COUNT];
    int M[LV_LIN_COUNT], K[LV_LIN_COUNT], g[LV_LIN_COUNT], outl_cap[LV_LIN_COUNT];
    uint16_t *codes[LV_LIN_COUNT];
    float *cb[LV_LIN_COUNT], *sc[LV_LIN_COUNT], *W[LV_LIN_COUNT], *ow[LV_LIN_COUNT];
    int32_t *oidx[LV_LIN_COUNT];
    int32_t *cidx[LV_LIN_COUNT], *coff[LV_LIN_COUNT]; /* device: (r, i) per (m, code), starts */
    int32_t *h_cidx[LV_LIN_COUNT], *h_coff[LV_LIN_COUNT]; /* host: the same, sorted here */
    float *norm_a, *norm_f, *dnw;                      /* (dim), (dim), (2 dim) */
    float *x, *r1, *r2, *xa, *q, *k, *v, *ao, *x1, *xf, *gate, *up, *hsw, *y;
    float *dy, *dx1, *dxn, *dao, *dq, *dk, *dv, *dg, *du, *dxo, *dW, *ds;
    float *P, *dS;                                     /* (B, H, T, T) */
    double *dC;                                        /* (max M K g) */
    double *h_dc;                                      /* host staging */
    float *h_f;                                        /* host staging (max d_out d_in) */
};

/* ------------------------------------------------------------------ kernels */

#define FT_GRID_STRIDE(i, n)                                                     \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n);    \
         i += (int64_t)gridDim.x * blockDim.x)

__global__ void ft_add_outliers1(float *W, const int32_t *idx, const float *R, int64_t d_out,
                                 int64_t d_in, int n)
{
    FT_GRID_STRIDE(t, d_out * n) W[(t / n) * d_in + idx[t % n]] += R[t];
}

/* A double sum over the block (blockDim.x == FT_RED), fixed tree; every thread gets it. */
__device__ double ft_block_dsum(double v, double *sh)
{
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int o = FT_RED / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

__global__ void ft_inv_rms1(float *r, const float *x, int64_t n, int dim, float eps)
{
    __shared__ double sh[FT_RED];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const float *xi = x + i * dim;
        double s = 0.0;
        for (int d = threadIdx.x; d < dim; d += blockDim.x) s += (double)xi[d] * xi[d];
        s = ft_block_dsum(s, sh);
        if (threadIdx.x == 0) r[i] = (float)(1.0 / sqrt(s / dim + (double)eps));
    }
}

__global__ void ft_add1(float *y, const float *x, int64_t n) { FT_GRID_STRIDE(i, n) y[i] += x[i]; }

__global__ void ft_swiglu_bwd1(float *dg, float *du, const float *gate, const float *up, int64_t n)
{
    FT_GRID_STRIDE(i, n)
    {
        const float gt = gate[i], sg = 1.0f / (1.0f + expf(-gt)), dh = du[i];
        dg[i] = __fmul_rn(__fmul_rn(__fmul_rn(dh, up[i]), sg),
                          __fadd_rn(1.0f, __fmul_rn(gt, __fsub_rn(1.0f, sg))));
        du[i] = __fmul_rn(__fmul_rn(dh, gt), sg);
    }
}

/* dw[j] = sum_i dout[i, j] r_i x[i, j] (rows in order, double). */
__global__ void ft_norm_dw1(float *dw, const float *x, const float *r, const float *dout,
                            int64_t n, int dim)
{
    FT_GRID_STRIDE(j, (int64_t)dim)
    {
        double s = 0.0;
        for (int64_t i = 0; i < n; i++) s += (double)dout[i * dim + j] * r[i] * x[i * dim + j];
        dw[j] = (float)s;
    }
}

/* dx[i] += r w dout - r^3 / dim x <w dout, x>, one block per row. */
__global__ void ft_norm_dx1(float *dx, const float *x, const float *r, const float *w,
                            const float *dout, int64_t n, int dim)
{
    __shared__ double sh[FT_RED];
    for (int64_t i = blockIdx.x; i < n; i += gridDim.x) {
        const float *xi = x + i * dim, *di = dout + i * dim;
        double dot = 0.0;
        for (int j = threadIdx.x; j < dim; j += blockDim.x) dot += (double)w[j] * di[j] * xi[j];
        dot = ft_block_dsum(dot, sh);
        const float ri = r[i], c3 = (float)((double)ri * ri * ri * dot / dim);
        for (int j = threadIdx.x; j < dim; j += blockDim.x)
            dx[i * dim + j] += __fsub_rn(__fmul_rn(__fmul_rn(ri, w[j]), di[j]), __fmul_rn(c3, xi[j]));
    }
}

__global__ void ft_rope_bwd1(float *x, int64_t n_pairs, int T, int n_heads, int head_dim,
                             float theta, int half_style)
{
    const int half = head_dim / 2;
    FT_GRID_STRIDE(i, n_pairs)
    {
        const int j = (int)(i % half);
        const int64_t bth = i / half, bt = bth / n_heads;
        float *xh = x + bth * head_dim;
        const float freq = 1.0f / powf(theta, (float)(2 * j) / (float)head_dim);
        const float a = (float)(int)(bt % T) * freq;
        const float c = cosf(a), s = sinf(a);
        const int lo = half_style ? j : 2 * j, hi = half_style ? j + half : 2 * j + 1;
        const float d0 = xh[lo], d1 = xh[hi];
        xh[lo] = __fadd_rn(__fmul_rn(d0, c), __fmul_rn(d1, s));
        xh[hi] = __fadd_rn(__fmul_rn(-d0, s), __fmul_rn(d1, c));
    }
}

__global__ void ft_attn_rows1(float *P, float *dS, float *dq, const float *q, const float *k,
                              const float *v, const float *dao, int B, int T, int H, int KVH,
                              int hd, float scale)
{
    __shared__ float red[32];
    const int grp = H / KVH;
    const int64_t qs = (int64_t)H * hd, kvs = (int64_t)KVH * hd;
    for (int64_t row = blockIdx.x; row < (int64_t)B * H * T; row += gridDim.x) {
        const int64_t b = row / ((int64_t)H * T);
        const int h = (int)((row / T) % H), t = (int)(row % T), kh = h / grp;
        const float *qt = q + (b * T + t) * qs + (int64_t)h * hd;
        const float *dot = dao + (b * T + t) * qs + (int64_t)h * hd;
        const float *K = k + b * T * kvs + (int64_t)kh * hd, *V = v + b * T * kvs + (int64_t)kh * hd;
        float *Pr = P + row * T, *Dr = dS + row * T;
        float mx = -INFINITY;
        for (int s = threadIdx.x; s <= t; s += blockDim.x) {
            float a = 0.0f, e = 0.0f;
            for (int d = 0; d < hd; d++) {
                a = __fadd_rn(a, __fmul_rn(qt[d], K[s * kvs + d]));
                e = __fadd_rn(e, __fmul_rn(dot[d], V[s * kvs + d]));
            }
            Pr[s] = a * scale;
            Dr[s] = e;
            mx = fmaxf(mx, Pr[s]);
        }
        mx = kern_block_max(mx, red);
        float sum = 0.0f;
        for (int s = threadIdx.x; s <= t; s += blockDim.x) {
            Pr[s] = expf(Pr[s] - mx);
            sum += Pr[s];
        }
        sum = kern_block_sum(sum, red);
        const float inv = 1.0f / sum;
        float pdp = 0.0f;
        for (int s = threadIdx.x; s <= t; s += blockDim.x) {
            Pr[s] *= inv;
            pdp += Pr[s] * Dr[s];
        }
        pdp = kern_block_sum(pdp, red);
        for (int s = threadIdx.x; s < T; s += blockDim.x) {
            if (s <= t) {
                Dr[s] = __fmul_rn(__fmul_rn(Pr[s], __fsub_rn(Dr[s], pdp)), scale);
            } else {
                Pr[s] = 0.0f;
                Dr[s] = 0.0f;
            }
        }
        __syncthreads(); /* Dr of every s is read below */
        float *dqt = dq + (b * T + t) * qs + (int64_t)h * hd;
        for (int d = threadIdx.x; d < hd; d += blockDim.x) {
            float acc = 0.0f;
            for (int s = 0; s <= t; s++) acc = __fadd_rn(acc, __fmul_rn(Dr[s], K[s * kvs + d]));
            dqt[d] = acc;
        }
        __syncthreads();
    }
}

__global__ void ft_attn_kv1(float *dk, float *dv, const float *P, const float *dS, const float *q,
                            const float *dao, int B, int T, int H, int KVH, int hd)
{
    const int grp = H / KVH;
    const int64_t qs = (int64_t)H * hd, kvs = (int64_t)KVH * hd;
    FT_GRID_STRIDE(i, (int64_t)B * KVH * T * hd)
    {
        const int d = (int)(i % hd), s = (int)((i / hd) % T), kh = (int)((i / ((int64_t)hd * T)) % KVH);
        const int64_t b = i / ((int64_t)hd * T * KVH);
        float ak = 0.0f, av = 0.0f;
        for (int h = kh * grp; h < (kh + 1) * grp; h++)
            for (int t = s; t < T; t++) {
                const int64_t row = (b * H + h) * T + t, o = (b * T + t) * qs + (int64_t)h * hd + d;
                ak = __fadd_rn(ak, __fmul_rn(dS[row * T + s], q[o]));
                av = __fadd_rn(av, __fmul_rn(P[row * T + s], dao[o]));
            }
        dk[(b * T + s) * kvs + (int64_t)kh * hd + d] = ak;
        dv[(b * T + s) * kvs + (int64_t)kh * hd + d] = av;
    }
}

__global__ void ft_chain_dc2(double *acc, const float *dW, const float *scales,
                             const int32_t *cidx, const int32_t *coff, int64_t d_in, int64_t ng,
                             int64_t MK, int g)
{
    FT_GRID_STRIDE(e, MK * g)
    {
        const int64_t mk = e / g;
        const int a = (int)(e % g);
        double s = 0.0;
        for (int32_t p = coff[mk]; p < coff[mk + 1]; p++) {
            const int64_t ri = cidx[p], r = ri / ng, j = (ri % ng) * g + a;
            if (j < d_in) s += (double)scales[r] * (double)dW[r * d_in + j];
        }
        acc[e] = s;
    }
}

__global__ void ft_chain_ds1(float *ds, const float *dW, const uint16_t *codes, const float *cb,
                             int64_t d_out, int64_t d_in, int64_t ng, int M, int K, int g)
{
    FT_GRID_STRIDE(r, d_out)
    {
        const uint16_t *cr = codes + r * ng * M;
        double sum = 0.0;
        for (int64_t i = 0; i < ng; i++) {
            const int len = (int)(d_in - i * g < g ? d_in - i * g : g);
            for (int a = 0; a < len; a++) {
                float qv = 0.0f;
                for (int m = 0; m < M; m++)
                    qv = __fadd_rn(qv, cb[((int64_t)m * K + cr[i * M + m]) * g + a]);
                sum += (double)dW[r * d_in + i * g + a] * qv;
            }
        }
        ds[r] = (float)sum;
    }
}

/* ------------------------------------------------------------------ host side */

static void ft_release(kern_ftcuda *w)
{
    void *dev[] = {w->norm_a, w->norm_f, w->dnw, w->x,   w->r1,  w->r2,  w->xa,  w->q,   w->k,
                   w->v,      w->ao,     w->x1,  w->xf,  w->gate, w->up, w->hsw, w->y,   w->dy,
                   w->dx1,    w->dxn,    w->dao, w->dq,  w->dk,  w->dv,  w->dg,  w->du,  w->dxo,
                   w->dW,     w->ds,     w->P,   w->dS,  w->dC};
    for (size_t i = 0; i < sizeof dev / sizeof dev[0]; i++)
        if (dev[i]) cudaFree(dev[i]);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        void *p[] = {w->codes[k], w->cb[k], w->sc[k], w->W[k], w->ow[k], w->oidx[k],
                     w->cidx[k], w->coff[k]};
        for (size_t i = 0; i < sizeof p / sizeof p[0]; i++)
            if (p[i]) cudaFree(p[i]);
        free(w->h_cidx[k]);
        free(w->h_coff[k]);
    }
    if (w->blas) cublasDestroy(w->blas);
    if (w->stream) cudaStreamDestroy(w->stream);
    free(w->h_dc);
    free(w->h_f);
    free(w);
}

extern "C" void kern_ftcuda_free(kern_ftcuda *ws)
{
    if (ws) ft_release(ws);
}

static lv_status ft_dalloc(float **p, size_t n)
{
    lv_status st = LV_OK;
    KERN_CUDA_TRY(cudaMalloc((void **)p, (n ? n : 1) * sizeof(float)));
done:
    return st;
}

extern "C" lv_status kern_ftcuda_init(kern_ftcuda **ws, const lv_model_config *cfg,
                                      const lv_qblock *b, int B, int T)
{
    lv_status st = LV_OK;
    kern_ftcuda *w = NULL;
    int n_dev = 0;
    size_t n = 0, dim = 0, kv = 0, hid = 0, wmax = 0, cmax = 0, omax = 0;
    int64_t off = 0;
    if (!ws || !cfg || !b || B <= 0 || T <= 0 || (int64_t)B * T > INT32_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_init: bad arguments (batch %d x %d)", B, T);
    *ws = NULL;
    if (cfg->dim <= 0 || cfg->n_heads <= 0 || cfg->n_kv_heads <= 0 || cfg->dim % cfg->n_heads ||
        cfg->n_heads % cfg->n_kv_heads || (cfg->dim / cfg->n_heads) % 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_init: bad block shape (dim %d, heads %d / %d)",
                cfg->dim, cfg->n_heads, cfg->n_kv_heads);
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev < 1)
        LV_FAIL(LV_ERR_UNSUPPORTED, "kern_ftcuda_init: no CUDA device");
    w = (kern_ftcuda *)calloc(1, sizeof *w);
    if (!w) LV_FAIL(LV_ERR_NOMEM, "kern_ftcuda_init: out of memory");
    w->cfg = *cfg;
    w->B = B;
    w->T = T;
    KERN_CUDA_TRY(cudaStreamCreate(&w->stream));
    KERN_CUBLAS_TRY(cublasCreate(&w->blas));
    KERN_CUBLAS_TRY(cublasSetStream(w->blas, w->stream));
    KERN_CUBLAS_TRY(cublasSetMathMode(w->blas, CUBLAS_DEFAULT_MATH));
    n = (size_t)B * (size_t)T;
    dim = (size_t)cfg->dim;
    kv = (size_t)(cfg->dim / cfg->n_heads) * (size_t)cfg->n_kv_heads;
    hid = (size_t)cfg->hidden_dim;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        int64_t o = 0, i = 0;
        lv_lin_shape(cfg, (lv_lin)k, &o, &i);
        if (L->d_out != o || L->d_in != i || L->M < 1 || L->g < 1 || L->nbits < 1 ||
            L->nbits > 16 || L->n_groups != (i + L->g - 1) / L->g)
            LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_init: linear %s is not a %lldx%lld AQ layer",
                    lv_lin_name((lv_lin)k), (long long)o, (long long)i);
        w->d_out[k] = o, w->d_in[k] = i, w->ng[k] = L->n_groups;
        w->M[k] = L->M, w->K[k] = 1 << L->nbits, w->g[k] = L->g;
        w->ncb[k] = (int64_t)L->M * w->K[k] * L->g;
        w->seg_off[2 * k] = off;
        off += w->ncb[k];
        w->seg_off[2 * k + 1] = off;
        off += o;
        const int64_t nc = o * L->n_groups * L->M, mk1 = (int64_t)L->M * w->K[k] + 1;
        if (nc > INT32_MAX)
            LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_init: linear %s has %lld codes (at most "
                    "2^31 - 1 per linear)", lv_lin_name((lv_lin)k), (long long)nc);
        KERN_CUDA_TRY(cudaMalloc((void **)&w->codes[k], sizeof(uint16_t) * (size_t)nc));
        KERN_CUDA_TRY(cudaMalloc((void **)&w->cidx[k], sizeof(int32_t) * (size_t)nc));
        KERN_CUDA_TRY(cudaMalloc((void **)&w->coff[k], sizeof(int32_t) * (size_t)mk1));
        w->h_cidx[k] = (int32_t *)malloc(sizeof(int32_t) * (size_t)nc);
        w->h_coff[k] = (int32_t *)malloc(sizeof(int32_t) * (size_t)mk1);
        if (!w->h_cidx[k] || !w->h_coff[k]) LV_FAIL(LV_ERR_NOMEM, "kern_ftcuda_init: out of memory");
        LV_TRY(ft_dalloc(&w->cb[k], (size_t)w->ncb[k]));
        LV_TRY(ft_dalloc(&w->sc[k], (size_t)o));
        LV_TRY(ft_dalloc(&w->W[k], (size_t)(o * i)));
        wmax = (size_t)(o * i) > wmax ? (size_t)(o * i) : wmax;
        cmax = (size_t)w->ncb[k] > cmax ? (size_t)w->ncb[k] : cmax;
        omax = (size_t)o > omax ? (size_t)o : omax;
    }
    w->seg_off[2 * LV_LIN_COUNT] = off;
    w->seg_off[2 * LV_LIN_COUNT + 1] = off + (int64_t)dim;
    LV_TRY(ft_dalloc(&w->norm_a, dim));
    LV_TRY(ft_dalloc(&w->norm_f, dim));
    LV_TRY(ft_dalloc(&w->dnw, 2 * dim));
    {
        float **nd[] = {&w->x, &w->xa, &w->q, &w->ao, &w->x1, &w->xf, &w->y, &w->dy, &w->dx1,
                        &w->dxn, &w->dao, &w->dq, &w->dxo};
        for (size_t i = 0; i < sizeof nd / sizeof nd[0]; i++) LV_TRY(ft_dalloc(nd[i], n * dim));
        float **nk[] = {&w->k, &w->v, &w->dk, &w->dv};
        for (size_t i = 0; i < sizeof nk / sizeof nk[0]; i++) LV_TRY(ft_dalloc(nk[i], n * kv));
        float **nh[] = {&w->gate, &w->up, &w->hsw, &w->dg, &w->du};
        for (size_t i = 0; i < sizeof nh / sizeof nh[0]; i++) LV_TRY(ft_dalloc(nh[i], n * hid));
    }
    LV_TRY(ft_dalloc(&w->r1, n));
    LV_TRY(ft_dalloc(&w->r2, n));
    LV_TRY(ft_dalloc(&w->dW, wmax));
    LV_TRY(ft_dalloc(&w->ds, omax));
    LV_TRY(ft_dalloc(&w->P, n * (size_t)cfg->n_heads * (size_t)T));
    LV_TRY(ft_dalloc(&w->dS, n * (size_t)cfg->n_heads * (size_t)T));
    KERN_CUDA_TRY(cudaMalloc((void **)&w->dC, sizeof(double) * cmax));
    w->h_dc = (double *)malloc(sizeof(double) * cmax);
    w->h_f = (float *)malloc(sizeof(float) * (wmax > 2 * dim ? wmax : 2 * dim));
    if (!w->h_dc || !w->h_f) LV_FAIL(LV_ERR_NOMEM, "kern_ftcuda_init: out of memory");
    *ws = w;
    w = NULL;
done:
    if (w) ft_release(w);
    return st;
}

static lv_status ft_up(void *d, const void *h, size_t bytes, cudaStream_t s)
{
    lv_status st = LV_OK;
    KERN_CUDA_TRY(cudaMemcpyAsync(d, h, bytes, cudaMemcpyHostToDevice, s));
done:
    return st;
}

/* dst (host) = src or dst += src, n floats downloaded from the device. */
static lv_status ft_down_f(kern_ftcuda *w, float *dst, const float *d_src, int64_t n, int add)
{
    lv_status st = LV_OK;
    KERN_CUDA_TRY(cudaMemcpyAsync(w->h_f, d_src, sizeof(float) * (size_t)n, cudaMemcpyDeviceToHost,
                                  w->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(w->stream));
    for (int64_t i = 0; i < n; i++) dst[i] = add ? dst[i] + w->h_f[i] : w->h_f[i];
done:
    return st;
}

/* Row-major y (n, d_out) = x (n, d_in) @ W^T through kern_matmul_cuda's convention. */
static lv_status ft_gemm_fwd(kern_ftcuda *w, float *y, const float *x, const float *W, int n,
                             int d_in, int d_out)
{
    return kern_matmul_cuda(w->blas, y, x, W, n, d_in, d_out);
}

/* Row-major dW (d_out, d_in) = dout^T (d_out, n) @ in (n, d_in). */
static lv_status ft_gemm_dw(kern_ftcuda *w, float *dW, const float *dout, const float *in, int n,
                            int d_out, int d_in)
{
    lv_status st = LV_OK;
    const float one = 1.0f, zero = 0.0f;
    KERN_CUBLAS_TRY(cublasSgemm(w->blas, CUBLAS_OP_N, CUBLAS_OP_T, d_in, d_out, n, &one, in, d_in,
                                dout, d_out, &zero, dW, d_in));
done:
    return st;
}

/* Row-major din (n, d_in) = beta din + dout (n, d_out) @ W (d_out, d_in). */
static lv_status ft_gemm_dx(kern_ftcuda *w, float *din, const float *dout, const float *W, int n,
                            int d_out, int d_in, float beta)
{
    lv_status st = LV_OK;
    const float one = 1.0f;
    KERN_CUBLAS_TRY(cublasSgemm(w->blas, CUBLAS_OP_N, CUBLAS_OP_N, d_in, n, d_out, &one, W, d_in,
                                dout, d_out, &beta, din, d_in));
done:
    return st;
}

static lv_status ft_check(const kern_ftcuda *w, const lv_qblock *b)
{
    lv_status st = LV_OK;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        if (L->d_out != w->d_out[k] || L->d_in != w->d_in[k] || L->M != w->M[k] ||
            (1 << L->nbits) != w->K[k] || L->g != w->g[k] || !L->codes || !L->codebooks ||
            !L->scales || L->n_outl < 0 || (L->n_outl > 0 && (!L->outl_idx || !L->outl_w)))
            LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda: block linear %s differs from the one the "
                    "workspace was made for", lv_lin_name((lv_lin)k));
    }
    if (!b->attn_norm || !b->ffn_norm) LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda: block norms NULL");
done:
    return st;
}

/* The (row, group) pairs ri = r * ng + i of linear k grouped by (codebook m, code)
 * into h_cidx, group (m, c) at h_coff[m K + c] .. h_coff[m K + c + 1]: a stable
 * counting sort, so each group lists its pairs in (r, i) order (the CPU's summation
 * order for the codebook gradient); then uploaded. */
static lv_status ft_sort_codes(kern_ftcuda *w, int k, const uint16_t *codes)
{
    lv_status st = LV_OK;
    const int M = w->M[k];
    const int64_t K = w->K[k], nri = w->d_out[k] * w->ng[k];
    int32_t *off = w->h_coff[k], *idx = w->h_cidx[k];
    memset(off, 0, sizeof(int32_t) * (size_t)(M * K + 1));
    for (int64_t ri = 0; ri < nri; ri++)
        for (int m = 0; m < M; m++) off[(int64_t)m * K + codes[ri * M + m] + 1]++;
    for (int64_t e = 0; e < M * K; e++) off[e + 1] += off[e];
    for (int64_t ri = 0; ri < nri; ri++) /* off[e] runs from group e's start to its end */
        for (int m = 0; m < M; m++) idx[off[(int64_t)m * K + codes[ri * M + m]]++] = (int32_t)ri;
    for (int64_t e = M * K; e > 0; e--) off[e] = off[e - 1]; /* ends -> starts */
    off[0] = 0;
    LV_TRY(ft_up(w->cidx[k], idx, sizeof(int32_t) * (size_t)(nri * M), w->stream));
    LV_TRY(ft_up(w->coff[k], off, sizeof(int32_t) * (size_t)(M * K + 1), w->stream));
done:
    return st;
}

/* Upload the block's parameters and dequantize its 7 linears on the device. */
static lv_status ft_upload_block(kern_ftcuda *w, const lv_qblock *b)
{
    lv_status st = LV_OK;
    const size_t dim = (size_t)w->cfg.dim;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        const int64_t nc = w->d_out[k] * w->ng[k] * w->M[k];
        LV_TRY(ft_up(w->codes[k], L->codes, sizeof(uint16_t) * (size_t)nc, w->stream));
        LV_TRY(ft_sort_codes(w, k, L->codes));
        LV_TRY(ft_up(w->cb[k], L->codebooks, sizeof(float) * (size_t)w->ncb[k], w->stream));
        LV_TRY(ft_up(w->sc[k], L->scales, sizeof(float) * (size_t)w->d_out[k], w->stream));
        LV_TRY(kern_aq_dequant_cuda(w->W[k], w->codes[k], w->cb[k], w->sc[k], w->d_out[k],
                                    w->d_in[k], w->ng[k], w->M[k], w->K[k], w->g[k], w->stream));
        if (L->n_outl > 0) {
            if (L->n_outl > w->outl_cap[k]) {
                KERN_CUDA_TRY(cudaStreamSynchronize(w->stream));
                if (w->ow[k]) cudaFree(w->ow[k]);
                if (w->oidx[k]) cudaFree(w->oidx[k]);
                w->ow[k] = NULL;
                w->oidx[k] = NULL;
                w->outl_cap[k] = 0;
                LV_TRY(ft_dalloc(&w->ow[k], (size_t)(w->d_out[k] * L->n_outl)));
                KERN_CUDA_TRY(cudaMalloc((void **)&w->oidx[k], sizeof(int32_t) * (size_t)L->n_outl));
                w->outl_cap[k] = L->n_outl;
            }
            LV_TRY(ft_up(w->ow[k], L->outl_w, sizeof(float) * (size_t)(w->d_out[k] * L->n_outl),
                         w->stream));
            LV_TRY(ft_up(w->oidx[k], L->outl_idx, sizeof(int32_t) * (size_t)L->n_outl, w->stream));
            ft_add_outliers1<<<kern_cuda_blocks(w->d_out[k] * L->n_outl, 256), 256, 0, w->stream>>>(
                w->W[k], w->oidx[k], w->ow[k], w->d_out[k], w->d_in[k], L->n_outl);
            KERN_CUDA_TRY(cudaGetLastError());
        }
    }
    LV_TRY(ft_up(w->norm_a, b->attn_norm, sizeof(float) * dim, w->stream));
    LV_TRY(ft_up(w->norm_f, b->ffn_norm, sizeof(float) * dim, w->stream));
done:
    return st;
}

extern "C" lv_status kern_ftcuda_forward(kern_ftcuda *w, const lv_qblock *b, const float *x,
                                         int B, int T, float *y)
{
    lv_status st = LV_OK;
    const lv_model_config *c = w ? &w->cfg : NULL;
    int n = 0, dim = 0, kv = 0, hid = 0, hd = 0;
    int64_t nd = 0;
    unsigned rows = 0;
    if (!w || !b || !x || B <= 0 || B > w->B || T != w->T)
        LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_forward: batch %d x %d does not fit the "
                "workspace (%d x %d; T must match)", B, T, w ? w->B : 0, w ? w->T : 0);
    LV_TRY(ft_check(w, b));
    n = B * T, dim = c->dim, hid = c->hidden_dim, hd = c->dim / c->n_heads;
    kv = hd * c->n_kv_heads;
    nd = (int64_t)n * dim;
    rows = (unsigned)(n < 65535 ? n : 65535);
    w->saved_B = 0;
    LV_TRY(ft_upload_block(w, b));
    LV_TRY(ft_up(w->x, x, sizeof(float) * (size_t)nd, w->stream));
    ft_inv_rms1<<<rows, FT_RED, 0, w->stream>>>(w->r1, w->x, n, dim, c->norm_eps);
    KERN_CUDA_TRY(cudaGetLastError());
    LV_TRY(kern_rmsnorm_cuda(w->xa, w->x, w->norm_a, n, dim, c->norm_eps, w->stream));
    LV_TRY(ft_gemm_fwd(w, w->q, w->xa, w->W[LV_LIN_WQ], n, dim, dim));
    LV_TRY(ft_gemm_fwd(w, w->k, w->xa, w->W[LV_LIN_WK], n, dim, kv));
    LV_TRY(ft_gemm_fwd(w, w->v, w->xa, w->W[LV_LIN_WV], n, dim, kv));
    LV_TRY(kern_rope_cuda(w->q, B, T, c->n_heads, hd, 0, c->rope_theta, c->rope, w->stream));
    LV_TRY(kern_rope_cuda(w->k, B, T, c->n_kv_heads, hd, 0, c->rope_theta, c->rope, w->stream));
    LV_TRY(kern_attention_cuda(w->ao, w->q, w->k, w->v, B, T, c->n_heads, c->n_kv_heads, hd,
                               w->stream));
    LV_TRY(ft_gemm_fwd(w, w->x1, w->ao, w->W[LV_LIN_WO], n, dim, dim));
    ft_add1<<<kern_cuda_blocks(nd, 256), 256, 0, w->stream>>>(w->x1, w->x, nd);
    KERN_CUDA_TRY(cudaGetLastError());
    ft_inv_rms1<<<rows, FT_RED, 0, w->stream>>>(w->r2, w->x1, n, dim, c->norm_eps);
    KERN_CUDA_TRY(cudaGetLastError());
    LV_TRY(kern_rmsnorm_cuda(w->xf, w->x1, w->norm_f, n, dim, c->norm_eps, w->stream));
    LV_TRY(ft_gemm_fwd(w, w->gate, w->xf, w->W[LV_LIN_W1], n, dim, hid));
    LV_TRY(ft_gemm_fwd(w, w->up, w->xf, w->W[LV_LIN_W3], n, dim, hid));
    LV_TRY(kern_swiglu_cuda(w->hsw, w->gate, w->up, (int64_t)n * hid, w->stream));
    LV_TRY(ft_gemm_fwd(w, w->y, w->hsw, w->W[LV_LIN_W2], n, hid, dim));
    ft_add1<<<kern_cuda_blocks(nd, 256), 256, 0, w->stream>>>(w->y, w->x1, nd);
    KERN_CUDA_TRY(cudaGetLastError());
    if (y) {
        KERN_CUDA_TRY(cudaMemcpyAsync(y, w->y, sizeof(float) * (size_t)nd, cudaMemcpyDeviceToHost,
                                      w->stream));
    }
    KERN_CUDA_TRY(cudaStreamSynchronize(w->stream));
    w->saved_B = B;
done:
    return st;
}

/* Linear k's parameter gradients from dout (n, d_out) and its input (n, d_in). */
static lv_status ft_lin_grad(kern_ftcuda *w, int k, const float *dout, const float *in, int n,
                             float *grad, int add, float *const *dW)
{
    lv_status st = LV_OK;
    const int64_t o = w->d_out[k], i = w->d_in[k];
    LV_TRY(ft_gemm_dw(w, w->dW, dout, in, n, (int)o, (int)i));
    if (dW && dW[k]) LV_TRY(ft_down_f(w, dW[k], w->dW, o * i, add));
    if (grad) {
        float *gc = grad + w->seg_off[2 * k], *gs = grad + w->seg_off[2 * k + 1];
        ft_chain_dc2<<<kern_cuda_blocks(w->ncb[k], 128), 128, 0, w->stream>>>(
            w->dC, w->dW, w->sc[k], w->cidx[k], w->coff[k], i, w->ng[k],
            (int64_t)w->M[k] * w->K[k], w->g[k]);
        KERN_CUDA_TRY(cudaGetLastError());
        ft_chain_ds1<<<kern_cuda_blocks(o, 128), 128, 0, w->stream>>>(
            w->ds, w->dW, w->codes[k], w->cb[k], o, i, w->ng[k], w->M[k], w->K[k], w->g[k]);
        KERN_CUDA_TRY(cudaGetLastError());
        KERN_CUDA_TRY(cudaMemcpyAsync(w->h_dc, w->dC, sizeof(double) * (size_t)w->ncb[k],
                                      cudaMemcpyDeviceToHost, w->stream));
        KERN_CUDA_TRY(cudaStreamSynchronize(w->stream));
        for (int64_t j = 0; j < w->ncb[k]; j++)
            gc[j] = add ? gc[j] + (float)w->h_dc[j] : (float)w->h_dc[j];
        LV_TRY(ft_down_f(w, gs, w->ds, o, add));
    }
done:
    return st;
}

static lv_status ft_norm_bwd(kern_ftcuda *w, const float *x, const float *r, const float *nw,
                             const float *dout, int n, float *dw_host, int add, float *dx_dev)
{
    lv_status st = LV_OK;
    const int dim = w->cfg.dim;
    const unsigned rows = (unsigned)(n < 65535 ? n : 65535);
    if (dw_host) {
        ft_norm_dw1<<<kern_cuda_blocks(dim, 128), 128, 0, w->stream>>>(w->dnw, x, r, dout, n, dim);
        KERN_CUDA_TRY(cudaGetLastError());
        LV_TRY(ft_down_f(w, dw_host, w->dnw, dim, add));
    }
    if (dx_dev) {
        ft_norm_dx1<<<rows, FT_RED, 0, w->stream>>>(dx_dev, x, r, nw, dout, n, dim);
        KERN_CUDA_TRY(cudaGetLastError());
    }
done:
    return st;
}

static lv_status ft_rope_bwd(kern_ftcuda *w, float *d, int B, int heads)
{
    lv_status st = LV_OK;
    const int hd = w->cfg.dim / w->cfg.n_heads;
    const int64_t np = (int64_t)B * w->T * heads * (hd / 2);
    ft_rope_bwd1<<<kern_cuda_blocks(np, 256), 256, 0, w->stream>>>(
        d, np, w->T, heads, hd, w->cfg.rope_theta, w->cfg.rope == LV_ROPE_HALF);
    KERN_CUDA_TRY(cudaGetLastError());
done:
    return st;
}

extern "C" lv_status kern_ftcuda_backward(kern_ftcuda *w, const lv_qblock *b, const float *dy,
                                          int accumulate, float *grad, float *dx,
                                          float *const *dW)
{
    lv_status st = LV_OK;
    const lv_model_config *c = w ? &w->cfg : NULL;
    int B = 0, T = 0, n = 0, dim = 0, hid = 0, kv = 0, hd = 0, add = accumulate ? 1 : 0;
    int64_t nd = 0, nh = 0;
    float *gn = NULL;
    if (!w || !w->saved_B) LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_backward: no saved forward");
    if (!b || !dy) LV_FAIL(LV_ERR_INVALID_ARG, "kern_ftcuda_backward: NULL block or dy");
    LV_TRY(ft_check(w, b));
    B = w->saved_B, T = w->T, n = B * T, dim = c->dim, hid = c->hidden_dim;
    hd = c->dim / c->n_heads, kv = hd * c->n_kv_heads;
    nd = (int64_t)n * dim, nh = (int64_t)n * hid;
    gn = grad ? grad + w->seg_off[2 * LV_LIN_COUNT] : NULL;
    LV_TRY(ft_up(w->dy, dy, sizeof(float) * (size_t)nd, w->stream));
    /* y = x1 + w2 hsw */
    LV_TRY(ft_lin_grad(w, LV_LIN_W2, w->dy, w->hsw, n, grad, add, dW));
    LV_TRY(ft_gemm_dx(w, w->du, w->dy, w->W[LV_LIN_W2], n, dim, hid, 0.0f));
    ft_swiglu_bwd1<<<kern_cuda_blocks(nh, 256), 256, 0, w->stream>>>(w->dg, w->du, w->gate, w->up, nh);
    KERN_CUDA_TRY(cudaGetLastError());
    LV_TRY(ft_lin_grad(w, LV_LIN_W1, w->dg, w->xf, n, grad, add, dW));
    LV_TRY(ft_lin_grad(w, LV_LIN_W3, w->du, w->xf, n, grad, add, dW));
    LV_TRY(ft_gemm_dx(w, w->dxn, w->dg, w->W[LV_LIN_W1], n, hid, dim, 0.0f));
    LV_TRY(ft_gemm_dx(w, w->dxn, w->du, w->W[LV_LIN_W3], n, hid, dim, 1.0f));
    /* xf = ffn_norm(x1); x1 also reaches y directly */
    KERN_CUDA_TRY(cudaMemcpyAsync(w->dx1, w->dy, sizeof(float) * (size_t)nd,
                                  cudaMemcpyDeviceToDevice, w->stream));
    LV_TRY(ft_norm_bwd(w, w->x1, w->r2, w->norm_f, w->dxn, n, gn ? gn + dim : NULL, add, w->dx1));
    /* x1 = x + wo ao */
    LV_TRY(ft_lin_grad(w, LV_LIN_WO, w->dx1, w->ao, n, grad, add, dW));
    LV_TRY(ft_gemm_dx(w, w->dao, w->dx1, w->W[LV_LIN_WO], n, dim, dim, 0.0f));
    ft_attn_rows1<<<(unsigned)((int64_t)B * c->n_heads * T < 65535 * 8 ? (int64_t)B * c->n_heads * T
                                                                          : 65535 * 8),
                    128, 0, w->stream>>>(w->P, w->dS, w->dq, w->q, w->k, w->v, w->dao, B, T,
                                         c->n_heads, c->n_kv_heads, hd, 1.0f / sqrtf((float)hd));
    KERN_CUDA_TRY(cudaGetLastError());
    ft_attn_kv1<<<kern_cuda_blocks((int64_t)B * c->n_kv_heads * T * hd, 128), 128, 0, w->stream>>>(
        w->dk, w->dv, w->P, w->dS, w->q, w->dao, B, T, c->n_heads, c->n_kv_heads, hd);
    KERN_CUDA_TRY(cudaGetLastError());
    LV_TRY(ft_rope_bwd(w, w->dq, B, c->n_heads));
    LV_TRY(ft_rope_bwd(w, w->dk, B, c->n_kv_heads));
    LV_TRY(ft_lin_grad(w, LV_LIN_WQ, w->dq, w->xa, n, grad, add, dW));
    LV_TRY(ft_lin_grad(w, LV_LIN_WK, w->dk, w->xa, n, grad, add, dW));
    LV_TRY(ft_lin_grad(w, LV_LIN_WV, w->dv, w->xa, n, grad, add, dW));
    LV_TRY(ft_gemm_dx(w, w->dxn, w->dq, w->W[LV_LIN_WQ], n, dim, dim, 0.0f));
    LV_TRY(ft_gemm_dx(w, w->dxn, w->dk, w->W[LV_LIN_WK], n, kv, dim, 1.0f));
    LV_TRY(ft_gemm_dx(w, w->dxn, w->dv, w->W[LV_LIN_WV], n, kv, dim, 1.0f));
    /* xa = attn_norm(x); x also reaches x1 directly */
    KERN_CUDA_TRY(cudaMemcpyAsync(w->dxo, w->dx1, sizeof(float) * (size_t)nd,
                                  cudaMemcpyDeviceToDevice, w->stream));
    LV_TRY(ft_norm_bwd(w, w->x, w->r1, w->norm_a, w->dxn, n, gn, add, dx ? w->dxo : NULL));
    if (dx) {
        KERN_CUDA_TRY(cudaMemcpyAsync(dx, w->dxo, sizeof(float) * (size_t)nd,
                                      cudaMemcpyDeviceToHost, w->stream));
    }
    KERN_CUDA_TRY(cudaStreamSynchronize(w->stream));
done:
    return st;
}
