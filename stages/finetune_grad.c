/* finetune_grad.c: forward and hand-written backward of one quantized LLaMA
 * block, for block fine-tuning (stages/finetune.c) and PV-tuning
 * (stages/pvtune.c, which chains the blocks: any upstream gradient dy in, the
 * gradient w.r.t. the block input and the dequantized weights out).
 *
 * The forward is the op sequence of kern_block_forward (kernels/forward.c) on
 * the dequantized weights, with the activations the backward needs kept in the
 * workspace. The backward is GEMM-based over all B*T rows: for each linear
 * y = x W^T it forms dW = dy^T x (d_out, d_in) and dx = dy W, then takes the
 * chain rule from dW to the codebooks and per-row scales of the AQ layer.
 *
 * Determinism: every float reduction here has a fixed order that does not
 * depend on the thread count (OpenMP loops only split independent outputs;
 * sums over rows run serially inside one thread). */
#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kern.h"
#include "stage.h"

struct stage_ft_ws {
    lv_model_config cfg;
    int B, T;            /* capacity */
    int n_threads;       /* attention scratch is sized for this many OpenMP threads */
    int saved_B;         /* batch of the last forward whose activations are kept (0: none) */
    int64_t n_params;
    int64_t seg_off[STAGE_FT_N_SEGS], seg_len[STAGE_FT_N_SEGS]; /* flat gradient layout */
    float *arena;        /* every float buffer below points into it */
    float *W[LV_LIN_COUNT]; // (d_out, d_in) dequantized weights
    float *dW;      // (max d_out*d_in) gradient of the linear being processed
    double *dC;     // (max M*K*g) codebook gradient accumulator
    /* forward activations, n = B*T rows */
    float *r1, *r2; // (n) inverse RMS of the attention / FFN norm inputs
    float *xa;      // (n, dim) attn_norm(x): input of wq, wk, wv
    float *q;       // (n, dim) after RoPE
    float *k;       // (n, kv_dim) after RoPE
    float *v;       // (n, kv_dim)
    float *ao;      // (n, dim) attention output: input of wo
    float *x1;      // (n, dim) residual stream after attention
    float *xf;      // (n, dim) ffn_norm(x1): input of w1, w3
    float *gate;    // (n, hidden) w1 xf
    float *up;      // (n, hidden) w3 xf
    float *hsw;     // (n, hidden) silu(gate) * up: input of w2
    float *y;       // (n, dim) block output
    /* backward */
    float *dy;      // (n, dim)
    float *dx1;     // (n, dim)
    float *dxn;     // (n, dim) gradient at a norm output (dxf, then dxa)
    float *dao;     // (n, dim)
    float *dq;      // (n, dim)
    float *dk, *dv; // (n, kv_dim)
    float *dg, *du; // (n, hidden)
    float *att;     // forward attention scratch (kern_attention_scratch)
    float *abw;     // (n_threads, 2*T) attention backward scratch
    float *rcos, *rsin; // (T, head_dim/2) RoPE angles of positions 0..T-1
};

static int64_t lin_K(const lv_aq_layer *L) { return (int64_t)1 << L->nbits; }

/* Segment lengths of the flat parameter vector; returns the total. */
static int64_t seg_lengths(const lv_model_config *cfg, const lv_qblock *b, int64_t *len)
{
    int64_t total = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        len[2 * k] = (int64_t)L->M * lin_K(L) * L->g;
        len[2 * k + 1] = L->d_out;
    }
    len[2 * LV_LIN_COUNT] = len[2 * LV_LIN_COUNT + 1] = cfg->dim;
    for (int s = 0; s < STAGE_FT_N_SEGS; s++) total += len[s];
    return total;
}

int64_t stage_ft_param_segments(const lv_model_config *cfg, lv_qblock *b, float **seg,
                                int64_t *len)
{
    int64_t l[STAGE_FT_N_SEGS];
    int64_t total = seg_lengths(cfg, b, l);
    if (len) memcpy(len, l, sizeof l);
    if (seg) {
        for (int k = 0; k < LV_LIN_COUNT; k++)
            seg[2 * k] = b->lin[k].codebooks, seg[2 * k + 1] = b->lin[k].scales;
        seg[2 * LV_LIN_COUNT] = b->attn_norm;
        seg[2 * LV_LIN_COUNT + 1] = b->ffn_norm;
    }
    return total;
}

static lv_status check_cfg(const lv_model_config *c)
{
    lv_status st = LV_OK;
    if (!c) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: model config is NULL");
    if (c->dim <= 0 || c->hidden_dim <= 0 || c->n_heads <= 0 || c->n_kv_heads <= 0 ||
        c->dim % c->n_heads || (c->dim / c->n_heads) % 2 || c->n_heads % c->n_kv_heads ||
        c->dim / c->n_heads > 4096)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "fine-tune: bad block shape (dim %d hidden %d heads %d kv_heads %d)", c->dim,
                c->hidden_dim, c->n_heads, c->n_kv_heads);
done:
    return st;
}

/* b must hold seven AQ linears of cfg's shapes with valid codes. */
static lv_status check_block(const lv_model_config *cfg, const lv_qblock *b)
{
    lv_status st = LV_OK;
    if (!b || !b->attn_norm || !b->ffn_norm) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: block or norms NULL");
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        int64_t o, i;
        lv_lin_shape(cfg, (lv_lin)k, &o, &i);
        if (!L->codes || !L->codebooks || !L->scales || L->d_out != o || L->d_in != i ||
            L->M <= 0 || L->g <= 0 || L->nbits < 1 || L->nbits > 16 ||
            L->n_groups != (i + L->g - 1) / L->g)
            LV_FAIL(LV_ERR_INVALID_ARG,
                    "fine-tune: linear %s is not a %lldx%lld AQ layer of this config",
                    lv_lin_name((lv_lin)k), (long long)o, (long long)i);
        const int64_t nc = L->d_out * L->n_groups * L->M, K = lin_K(L);
        for (int64_t j = 0; j < nc; j++)
            if (L->codes[j] >= K)
                LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: %s code %u at %lld is >= 2^%d",
                        lv_lin_name((lv_lin)k), L->codes[j], (long long)j, L->nbits);
    }
done:
    return st;
}

/* Carve n floats out of the arena, 64-byte aligned (arena == NULL: just count). */
static float *carve(float *arena, size_t *used, size_t n)
{
    float *p = arena ? arena + *used : NULL;
    *used += (n + 15) & ~(size_t)15;
    return p;
}

static void ws_layout(stage_ft_ws *w, const lv_qblock *b, size_t *total)
{
    const lv_model_config *c = &w->cfg;
    const size_t n = (size_t)w->B * (size_t)w->T, dim = (size_t)c->dim;
    const size_t kv = (size_t)lv_cfg_kv_dim(c), hid = (size_t)c->hidden_dim;
    const size_t half = (size_t)lv_cfg_head_dim(c) / 2;
    size_t used = 0, wmax = 0, cmax = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        size_t nw = (size_t)(L->d_out * L->d_in), nc = (size_t)(L->M * lin_K(L) * L->g);
        w->W[k] = carve(w->arena, &used, nw);
        wmax = nw > wmax ? nw : wmax;
        cmax = nc > cmax ? nc : cmax;
    }
    w->dW = carve(w->arena, &used, wmax);
    w->dC = (double *)(void *)carve(w->arena, &used, 2 * cmax);
    w->r1 = carve(w->arena, &used, n);
    w->r2 = carve(w->arena, &used, n);
    float **nd[] = {&w->xa, &w->q, &w->ao, &w->x1, &w->xf, &w->y, &w->dy, &w->dx1, &w->dxn,
                    &w->dao, &w->dq};
    for (size_t i = 0; i < sizeof nd / sizeof nd[0]; i++) *nd[i] = carve(w->arena, &used, n * dim);
    float **nk[] = {&w->k, &w->v, &w->dk, &w->dv};
    for (size_t i = 0; i < sizeof nk / sizeof nk[0]; i++) *nk[i] = carve(w->arena, &used, n * kv);
    float **nh[] = {&w->gate, &w->up, &w->hsw, &w->dg, &w->du};
    for (size_t i = 0; i < sizeof nh / sizeof nh[0]; i++) *nh[i] = carve(w->arena, &used, n * hid);
    w->att = carve(w->arena, &used, kern_attention_scratch(w->T, c->n_heads, w->n_threads));
    w->abw = carve(w->arena, &used, (size_t)w->n_threads * 2 * (size_t)w->T);
    w->rcos = carve(w->arena, &used, (size_t)w->T * half);
    w->rsin = carve(w->arena, &used, (size_t)w->T * half);
    *total = used;
}

lv_status stage_ft_ws_init(stage_ft_ws **ws, const lv_model_config *cfg, const lv_qblock *b,
                           int B, int T)
{
    lv_status st = LV_OK;
    stage_ft_ws *w = NULL;
    size_t total = 0;
    if (!ws) LV_FAIL(LV_ERR_INVALID_ARG, "stage_ft_ws_init: ws is NULL");
    *ws = NULL;
    LV_TRY(check_cfg(cfg));
    LV_TRY(check_block(cfg, b));
    if (B <= 0 || T <= 0 || (int64_t)B * T > INT_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune workspace: batch %d x %d", B, T);
    LV_ALLOC(w, 1);
    w->cfg = *cfg;
    w->B = B;
    w->T = T;
    w->n_threads = omp_get_max_threads();
    w->n_params = seg_lengths(cfg, b, w->seg_len);
    for (int s = 0; s < STAGE_FT_N_SEGS; s++)
        w->seg_off[s] = s ? w->seg_off[s - 1] + w->seg_len[s - 1] : 0;
    ws_layout(w, b, &total);
    LV_ALLOC(w->arena, total);
    ws_layout(w, b, &total);
    /* RoPE angles exactly as kern_rope_ref forms them (float pos * float freq) */
    const int hd = lv_cfg_head_dim(cfg), half = hd / 2;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < half; j++) {
            float freq = 1.0f / powf(cfg->rope_theta, (float)(2 * j) / (float)hd);
            float a = (float)t * freq;
            w->rcos[(size_t)t * half + j] = cosf(a);
            w->rsin[(size_t)t * half + j] = sinf(a);
        }
    *ws = w;
    w = NULL;
done:
    stage_ft_ws_free(w);
    return st;
}

void stage_ft_ws_free(stage_ft_ws *ws)
{
    if (!ws) return;
    free(ws->arena);
    free(ws);
}

static lv_status check_call(const stage_ft_ws *ws, const lv_qblock *b, const float *x, int B,
                            int T)
{
    lv_status st = LV_OK;
    if (!ws || !b || !x) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: NULL workspace, block or input");
    if (B <= 0 || T <= 0 || B > ws->B || T != ws->T)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "fine-tune: batch %d x %d does not fit the workspace (%d x %d; T must match)", B,
                T, ws->B, ws->T);
    if (omp_get_max_threads() > ws->n_threads)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "fine-tune: %d OpenMP threads but the workspace was sized for %d; re-init it",
                omp_get_max_threads(), ws->n_threads);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        if (ws->seg_len[2 * k] != (int64_t)L->M * lin_K(L) * L->g || ws->seg_len[2 * k + 1] != L->d_out)
            LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune: block differs from the one the workspace was made for");
    }
done:
    return st;
}

/* ------------------------------------------------------------------ forward */

// r (n) = 1 / sqrt(mean(x^2) + eps), as kern_rmsnorm_ref forms it
static void inv_rms(float *r, const float *x, int64_t n, int dim, float eps)
{
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim; // (dim)
        double ss = 0.0;
        for (int d = 0; d < dim; d++) ss += (double)xi[d] * xi[d];
        r[i] = (float)(1.0 / sqrt(ss / dim + (double)eps));
    }
}

static void dequant_all(stage_ft_ws *ws, const lv_qblock *b)
{
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &b->lin[k];
        kern_aq_dequant_ref(ws->W[k], L->codes, L->codebooks, L->scales, L->d_out, L->d_in,
                            L->n_groups, L->M, (int)lin_K(L), L->g);
        lv_aq_outliers_add_w(L, ws->W[k]); /* fixed corrections: no gradient taken */
    }
}

/* ws->y (n, dim) = block(x), keeping activations; the op sequence of
 * kern_block_forward_tap, so the outputs are the same floats. */
static void forward(stage_ft_ws *ws, const lv_qblock *b, const float *x, int B, int T)
{
    const lv_model_config *c = &ws->cfg;
    const int64_t n = (int64_t)B * T, nd = n * c->dim;
    const int hd = lv_cfg_head_dim(c), kv = lv_cfg_kv_dim(c), dim = c->dim, hid = c->hidden_dim;
    float *const *W = ws->W;

    inv_rms(ws->r1, x, n, dim, c->norm_eps);
    kern_rmsnorm_ref(ws->xa, x, b->attn_norm, n, dim, c->norm_eps);
    kern_matmul_ref(ws->q, ws->xa, W[LV_LIN_WQ], n, dim, dim);
    kern_matmul_ref(ws->k, ws->xa, W[LV_LIN_WK], n, dim, kv);
    kern_matmul_ref(ws->v, ws->xa, W[LV_LIN_WV], n, dim, kv);
    kern_rope_ref(ws->q, B, T, c->n_heads, hd, 0, c->rope_theta, c->rope);
    kern_rope_ref(ws->k, B, T, c->n_kv_heads, hd, 0, c->rope_theta, c->rope);
    kern_attention_ref(ws->ao, ws->q, ws->k, ws->v, B, T, c->n_heads, c->n_kv_heads, hd, ws->att);
    kern_matmul_ref(ws->x1, ws->ao, W[LV_LIN_WO], n, dim, dim);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nd; i++) ws->x1[i] += x[i];

    inv_rms(ws->r2, ws->x1, n, dim, c->norm_eps);
    kern_rmsnorm_ref(ws->xf, ws->x1, b->ffn_norm, n, dim, c->norm_eps);
    kern_matmul_ref(ws->gate, ws->xf, W[LV_LIN_W1], n, dim, hid);
    kern_matmul_ref(ws->up, ws->xf, W[LV_LIN_W3], n, dim, hid);
    kern_swiglu_ref(ws->hsw, ws->gate, ws->up, n * hid);
    kern_matmul_ref(ws->y, ws->hsw, W[LV_LIN_W2], n, hid, dim);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nd; i++) ws->y[i] += ws->x1[i];
}

lv_status stage_ft_block_forward(stage_ft_ws *ws, const lv_qblock *b, const float *x, int B,
                                 int T, float *y)
{
    lv_status st = LV_OK;
    LV_TRY(check_call(ws, b, x, B, T));
    if (!y) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune forward: y is NULL");
    dequant_all(ws, b);
    forward(ws, b, x, B, T);
    ws->saved_B = B;
    memcpy(y, ws->y, sizeof(float) * (size_t)B * T * ws->cfg.dim);
done:
    return st;
}

lv_status stage_ft_block_forward_save(stage_ft_ws *ws, const lv_qblock *b, const float *x, int B,
                                      int T, float *y)
{
    lv_status st = LV_OK;
    LV_TRY(check_call(ws, b, x, B, T));
    dequant_all(ws, b);
    forward(ws, b, x, B, T);
    ws->saved_B = B;
    if (y) memcpy(y, ws->y, sizeof(float) * (size_t)B * T * ws->cfg.dim);
done:
    return st;
}

/* ----------------------------------------------------------------- backward */

// dW (d_out, d_in) = dout^T (d_out, n) @ in (n, d_in)
static void grad_weight(float *dW, const float *dout, const float *in, int n, int d_out, int d_in)
{
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, d_out, d_in, n, 1.0f, dout, d_out, in,
                d_in, 0.0f, dW, d_in);
}

// din (n, d_in) = beta * din + dout (n, d_out) @ W (d_out, d_in)
static void grad_input(float *din, const float *dout, const float *W, int n, int d_out, int d_in,
                       float beta)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, d_in, d_out, 1.0f, dout, d_out, W,
                d_in, beta, din, d_in);
}

/* Chain rule from dW (d_out, d_in) to the AQ layer's parameters:
 *   dC[m, k, a] = sum over (r, i) with codes[r, i, m] == k of scales[r] * dW[r, i*g + a]
 *   ds[r]       = sum_j dW[r, j] * What[r, j] / scales[r] (the unscaled reconstruction).
 * dC is split over (m, a) pairs, each summing the rows in order: no races and
 * the same result for any thread count. acc: (M*K*g) double scratch.
 * add: 1 adds the float results to dC, ds instead of overwriting them. */
static void aq_chain(const lv_aq_layer *L, const float *dW, double *acc, float *dC, float *ds,
                     int add)
{
    const int64_t K = lin_K(L), ng = L->n_groups, d_in = L->d_in;
    const int M = L->M, g = L->g;
    memset(acc, 0, sizeof(double) * (size_t)(M * K * g));
#pragma omp parallel for schedule(static)
    for (int ma = 0; ma < M * g; ma++) {
        const int m = ma / g, a = ma % g;
        double *am = acc + (int64_t)m * K * g; // (K, g) this codebook
        for (int64_t r = 0; r < L->d_out; r++) {
            const uint16_t *cr = L->codes + r * ng * M; // (n_groups, M)
            const float *wr = dW + r * d_in;            // (d_in)
            const double s = L->scales[r];
            for (int64_t i = 0; i < ng && i * g + a < d_in; i++)
                am[(int64_t)cr[i * M + m] * g + a] += s * wr[i * g + a];
        }
    }
    for (int64_t j = 0; j < M * K * g; j++) dC[j] = add ? dC[j] + (float)acc[j] : (float)acc[j];
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < L->d_out; r++) {
        const uint16_t *cr = L->codes + r * ng * M;
        const float *wr = dW + r * d_in;
        double sum = 0.0;
        for (int64_t i = 0; i < ng; i++) {
            int len = (int)(d_in - i * g < g ? d_in - i * g : g);
            for (int a = 0; a < len; a++) {
                float q = 0.0f;
                for (int m = 0; m < M; m++) q += L->codebooks[((int64_t)m * K + cr[i * M + m]) * g + a];
                sum += (double)wr[i * g + a] * q;
            }
        }
        ds[r] = add ? ds[r] + (float)sum : (float)sum;
    }
}

/* Where a backward puts its results (see stage_ft_block_backward). */
typedef struct {
    float *grad;              /* flat parameter gradient or NULL */
    int add;                  /* 1: add to grad / dW, 0: overwrite them */
    float *const *dW;         /* NULL or (LV_LIN_COUNT) entries (d_out, d_in), each may be NULL */
} bwd_out;

/* Linear k with input `in` (n, d_in) and output gradient dout (n, d_out):
 * parameter gradients into grad's segments of k, dL/dWhat into o->dW[k]. */
static void linear_param_grad(stage_ft_ws *ws, const lv_qblock *b, int k, const float *dout,
                              const float *in, int n, const bwd_out *o)
{
    const lv_aq_layer *L = &b->lin[k];
    grad_weight(ws->dW, dout, in, n, (int)L->d_out, (int)L->d_in);
    if (o->dW && o->dW[k]) {
        float *dst = o->dW[k];
        const int64_t nw = L->d_out * L->d_in;
#pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < nw; j++) dst[j] = o->add ? dst[j] + ws->dW[j] : ws->dW[j];
    }
    if (o->grad)
        aq_chain(L, ws->dW, ws->dC, o->grad + ws->seg_off[2 * k],
                 o->grad + ws->seg_off[2 * k + 1], o->add);
}

/* RMSNorm out = w * r * x backward: dw[j] (when not NULL) = (add ? dw[j] : 0) +
 * sum_i dout[i,j] r_i x[i,j]; dx (when not NULL) += r w dout - r^3/dim x
 * sum_j(w_j dout_j x_j), row by row. */
static void rmsnorm_bwd(const float *x, const float *r, const float *w, const float *dout,
                        int64_t n, int dim, float *dw, int add, float *dx)
{
    if (dw) {
#pragma omp parallel for schedule(static)
        for (int j = 0; j < dim; j++) {
            double s = 0.0;
            for (int64_t i = 0; i < n; i++) s += (double)dout[i * dim + j] * r[i] * x[i * dim + j];
            dw[j] = add ? dw[j] + (float)s : (float)s;
        }
    }
    if (!dx) return;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float *xi = x + i * dim, *di = dout + i * dim; // (dim)
        float *gi = dx + i * dim;
        double dot = 0.0;
        for (int j = 0; j < dim; j++) dot += (double)w[j] * di[j] * xi[j];
        const float ri = r[i], c3 = (float)((double)ri * ri * ri * dot / dim);
        for (int j = 0; j < dim; j++) gi[j] += ri * w[j] * di[j] - c3 * xi[j];
    }
}

/* RoPE backward: the rotation's transpose, in place on dx (n, n_heads, hd). */
static void rope_bwd(const stage_ft_ws *ws, float *dx, int64_t n, int n_heads)
{
    const int hd = lv_cfg_head_dim(&ws->cfg), half = hd / 2, T = ws->T;
    const int style = ws->cfg.rope;
#pragma omp parallel for schedule(static)
    for (int64_t bt = 0; bt < n; bt++) {
        const float *cs = ws->rcos + (bt % T) * half, *sn = ws->rsin + (bt % T) * half;
        for (int h = 0; h < n_heads; h++) {
            float *xh = dx + (bt * n_heads + h) * hd;
            for (int j = 0; j < half; j++) {
                int lo = style == LV_ROPE_HALF ? j : 2 * j;
                int hi = style == LV_ROPE_HALF ? j + half : 2 * j + 1;
                float d0 = xh[lo], d1 = xh[hi];
                xh[lo] = d0 * cs[j] + d1 * sn[j];
                xh[hi] = -d0 * sn[j] + d1 * cs[j];
            }
        }
    }
}

/* Causal GQA attention backward, probabilities recomputed row by row (O(T)
 * scratch per thread instead of a saved (B, H, T, T) tensor). One work item is
 * (sequence, KV head): it owns dk/dv of that head and dq of its query heads. */
static void attention_bwd(stage_ft_ws *ws, int B, int T)
{
    const lv_model_config *c = &ws->cfg;
    const int hd = lv_cfg_head_dim(c), H = c->n_heads, KVH = c->n_kv_heads, grp = H / KVH;
    const int64_t qs = (int64_t)H * hd, kvs = (int64_t)KVH * hd; // row strides
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    {
        float *p = ws->abw + (size_t)omp_get_thread_num() * 2 * T, *dp = p + T; // (T) each
#pragma omp for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < (int64_t)B * KVH; bk++) {
            const int64_t b = bk / KVH;
            const int kh = (int)(bk % KVH);
            const float *K = ws->k + b * T * kvs + kh * hd, *V = ws->v + b * T * kvs + kh * hd;
            float *dK = ws->dk + b * T * kvs + kh * hd, *dV = ws->dv + b * T * kvs + kh * hd;
            for (int t = 0; t < T; t++) {
                memset(dK + t * kvs, 0, sizeof(float) * hd);
                memset(dV + t * kvs, 0, sizeof(float) * hd);
            }
            for (int h = kh * grp; h < (kh + 1) * grp; h++)
                for (int t = 0; t < T; t++) {
                    const int64_t oq = (b * T + t) * qs + (int64_t)h * hd;
                    const float *qt = ws->q + oq, *dot = ws->dao + oq;
                    float *dqt = ws->dq + oq;
                    float mx = -INFINITY, sum = 0.0f, pdp = 0.0f;
                    for (int s = 0; s <= t; s++) {
                        const float *ks = K + s * kvs, *vs = V + s * kvs;
                        float a = 0.0f, e = 0.0f;
#pragma omp simd reduction(+ : a, e)
                        for (int d = 0; d < hd; d++) {
                            a += qt[d] * ks[d];
                            e += dot[d] * vs[d];
                        }
                        p[s] = a * scale;
                        dp[s] = e;
                    }
                    /* simd reductions: a fixed (compile-time) order, shorter chains */
#pragma omp simd reduction(max : mx)
                    for (int s = 0; s <= t; s++) mx = p[s] > mx ? p[s] : mx;
                    for (int s = 0; s <= t; s++) p[s] = expf(p[s] - mx);
#pragma omp simd reduction(+ : sum)
                    for (int s = 0; s <= t; s++) sum += p[s];
                    const float inv = 1.0f / sum;
#pragma omp simd reduction(+ : pdp)
                    for (int s = 0; s <= t; s++) pdp += (p[s] *= inv) * dp[s];
                    for (int d = 0; d < hd; d++) dqt[d] = 0.0f;
                    for (int s = 0; s <= t; s++) {
                        const float dsc = p[s] * (dp[s] - pdp) * scale, ps = p[s];
                        const float *ks = K + s * kvs;
                        float *dks = dK + s * kvs, *dvs = dV + s * kvs;
#pragma omp simd
                        for (int d = 0; d < hd; d++) {
                            dqt[d] += dsc * ks[d];
                            dks[d] += dsc * qt[d];
                            dvs[d] += ps * dot[d];
                        }
                    }
                }
        }
    }
}

/* Backward of the block through the activations forward() left in ws, from
 * the output gradient dy (n, dim); dx (n, dim) (may be NULL) gets dL/dx. */
static void backward(stage_ft_ws *ws, const lv_qblock *b, const float *x, const float *dy, int B,
                     int T, const bwd_out *o, float *dx)
{
    const lv_model_config *c = &ws->cfg;
    const int n = B * T, dim = c->dim, hid = c->hidden_dim, kv = lv_cfg_kv_dim(c);
    const int64_t nd = (int64_t)n * dim, nh = (int64_t)n * hid;
    float *const *W = ws->W;
    float *gn = o->grad ? o->grad + ws->seg_off[2 * LV_LIN_COUNT] : NULL; /* attn, ffn norms */

    // y = x1 + w2 hsw
    linear_param_grad(ws, b, LV_LIN_W2, dy, ws->hsw, n, o);
    grad_input(ws->du, dy, W[LV_LIN_W2], n, dim, hid, 0.0f); /* d hsw, in du */
    // hsw = silu(gate) * up
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < nh; i++) {
        const float gt = ws->gate[i], sg = 1.0f / (1.0f + expf(-gt)), dh = ws->du[i];
        ws->dg[i] = dh * ws->up[i] * sg * (1.0f + gt * (1.0f - sg));
        ws->du[i] = dh * gt * sg;
    }
    linear_param_grad(ws, b, LV_LIN_W1, ws->dg, ws->xf, n, o);
    linear_param_grad(ws, b, LV_LIN_W3, ws->du, ws->xf, n, o);
    grad_input(ws->dxn, ws->dg, W[LV_LIN_W1], n, hid, dim, 0.0f);
    grad_input(ws->dxn, ws->du, W[LV_LIN_W3], n, hid, dim, 1.0f);
    // xf = ffn_norm(x1); x1 also reaches y directly
    memcpy(ws->dx1, dy, sizeof(float) * (size_t)nd);
    rmsnorm_bwd(ws->x1, ws->r2, b->ffn_norm, ws->dxn, n, dim, gn ? gn + dim : NULL, o->add,
                ws->dx1);

    // x1 = x + wo ao
    linear_param_grad(ws, b, LV_LIN_WO, ws->dx1, ws->ao, n, o);
    grad_input(ws->dao, ws->dx1, W[LV_LIN_WO], n, dim, dim, 0.0f);
    attention_bwd(ws, B, T);
    rope_bwd(ws, ws->dq, n, c->n_heads);
    rope_bwd(ws, ws->dk, n, c->n_kv_heads);
    linear_param_grad(ws, b, LV_LIN_WQ, ws->dq, ws->xa, n, o);
    linear_param_grad(ws, b, LV_LIN_WK, ws->dk, ws->xa, n, o);
    linear_param_grad(ws, b, LV_LIN_WV, ws->dv, ws->xa, n, o);
    grad_input(ws->dxn, ws->dq, W[LV_LIN_WQ], n, dim, dim, 0.0f);
    grad_input(ws->dxn, ws->dk, W[LV_LIN_WK], n, kv, dim, 1.0f);
    grad_input(ws->dxn, ws->dv, W[LV_LIN_WV], n, kv, dim, 1.0f);
    // xa = attn_norm(x); x also reaches x1 directly
    if (dx) memcpy(dx, ws->dx1, sizeof(float) * (size_t)nd);
    rmsnorm_bwd(x, ws->r1, b->attn_norm, ws->dxn, n, dim, gn, o->add, dx);
}

lv_status stage_ft_block_grad(stage_ft_ws *ws, const lv_qblock *b, const float *x,
                              const float *y_fp, int B, int T, double *loss, float *grad)
{
    lv_status st = LV_OK;
    LV_TRY(check_call(ws, b, x, B, T));
    if (!y_fp || !loss || !grad) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune grad: NULL y_fp, loss or grad");
    const int64_t nd = (int64_t)B * T * ws->cfg.dim;

    dequant_all(ws, b);
    forward(ws, b, x, B, T);
    ws->saved_B = B;

    // loss = mean (y - y_fp)^2; dy = 2 (y - y_fp) / (n dim). Serial: fixed sum order.
    double sse = 0.0;
    const float gscale = (float)(2.0 / (double)nd);
    for (int64_t i = 0; i < nd; i++) {
        float d = ws->y[i] - y_fp[i];
        sse += (double)d * d;
        ws->dy[i] = gscale * d;
    }
    *loss = sse / (double)nd;
    const bwd_out o = {.grad = grad, .add = 0, .dW = NULL};
    backward(ws, b, x, ws->dy, B, T, &o, NULL);
done:
    return st;
}

lv_status stage_ft_block_backward(stage_ft_ws *ws, const lv_qblock *b, const float *x,
                                  const float *dy, int accumulate, float *grad, float *dx,
                                  float *const *dW)
{
    lv_status st = LV_OK;
    if (!ws || !ws->saved_B)
        LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune backward: no saved forward in the workspace");
    const int B = ws->saved_B, T = ws->T;
    LV_TRY(check_call(ws, b, x, B, T));
    if (!dy) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune backward: dy is NULL");
    if (dx && dx == x) LV_FAIL(LV_ERR_INVALID_ARG, "fine-tune backward: dx must not alias x");
    const bwd_out o = {.grad = grad, .add = accumulate ? 1 : 0, .dW = dW};
    backward(ws, b, x, dy, B, T, &o, dx);
done:
    return st;
}
