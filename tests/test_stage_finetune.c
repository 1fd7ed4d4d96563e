/* test_stage_finetune.c: block fine-tuning (stages/finetune.c, finetune_grad.c):
 * analytic gradients against central finite differences of a double-precision
 * reference block, the training forward against kern_block_forward, fine-tuning
 * lowering the held-out error without ever returning a worse block, and
 * bit-identical reruns. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <math.h>
#include <omp.h>

#include "kern.h"
#include "stage.h"

/* Gradient check tolerance. The analytic gradient is computed in float
 * (cblas_sgemm, float activations): over these tiny sums its error is ~1e-7 of
 * the largest gradient (measured). The finite differences are of the double
 * reference loss with steps of 1e-3 (relative), truncation error O(h^2) ~ 1e-6.
 * A wrong term in the backward gives O(1) errors. Errors are normalized by the
 * largest |gradient| of the parameter class, so entries near zero do not blow up. */
#define GRAD_TOL 1e-4
/* The training forward runs kern_block_forward's ops: the same floats in fact. */
#define FWD_RTOL 1e-5

/* ---------------------------------------------------------------- helpers */

static lv_model_config tiny_cfg(int hidden, lv_rope_style rope)
{
    return (lv_model_config){.dim = 16, .hidden_dim = hidden, .n_layers = 1, .n_heads = 4,
                             .n_kv_heads = 2, .vocab_size = 32, .seq_len = 64,
                             .norm_eps = 1e-5f, .rope_theta = 10000.0f, .rope = rope};
}

/* A block with random codes, codebooks, scales ~ 1/sqrt(d_in) and norms ~ 1. */
static void random_block(lv_rng *r, const lv_model_config *c, lv_qblock *b, int M, int nbits,
                         int g)
{
    assert_int_equal(lv_qblock_init(b, c, M, nbits, g), LV_OK);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        lv_aq_layer *L = &b->lin[k];
        const int64_t K = (int64_t)1 << nbits;
        for (int64_t t = 0; t < M * K * g; t++) L->codebooks[t] = lv_rng_normal(r) / sqrtf((float)M);
        for (int64_t t = 0; t < L->d_out * L->n_groups * M; t++)
            L->codes[t] = (uint16_t)(lv_rng_u64(r) % (uint64_t)K);
        for (int64_t t = 0; t < L->d_out; t++)
            L->scales[t] = (0.7f + 0.6f * lv_rng_uniform(r)) / sqrtf((float)L->d_in);
    }
    for (int j = 0; j < c->dim; j++) {
        b->attn_norm[j] = 1.0f + 0.2f * lv_rng_normal(r);
        b->ffn_norm[j] = 1.0f + 0.2f * lv_rng_normal(r);
    }
}

static void block_copy(const lv_model_config *c, const lv_qblock *src, lv_qblock *dst)
{
    const lv_aq_layer *L0 = &src->lin[0];
    assert_int_equal(lv_qblock_init(dst, c, L0->M, L0->nbits, L0->g), LV_OK);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *s = &src->lin[k];
        lv_aq_layer *d = &dst->lin[k];
        memcpy(d->codes, s->codes, sizeof(uint16_t) * (size_t)(s->d_out * s->n_groups * s->M));
        memcpy(d->codebooks, s->codebooks, sizeof(float) * (size_t)(s->M * ((int64_t)1 << s->nbits) * s->g));
        memcpy(d->scales, s->scales, sizeof(float) * (size_t)s->d_out);
    }
    memcpy(dst->attn_norm, src->attn_norm, sizeof(float) * (size_t)c->dim);
    memcpy(dst->ffn_norm, src->ffn_norm, sizeof(float) * (size_t)c->dim);
}

/* 1 when every trainable parameter of a and b has the same bits. */
static int block_same(const lv_model_config *c, lv_qblock *a, lv_qblock *b)
{
    float *sa[STAGE_FT_N_SEGS], *sb[STAGE_FT_N_SEGS];
    int64_t len[STAGE_FT_N_SEGS];
    stage_ft_param_segments(c, a, sa, len);
    stage_ft_param_segments(c, b, sb, NULL);
    for (int s = 0; s < STAGE_FT_N_SEGS; s++)
        if (memcmp(sa[s], sb[s], sizeof(float) * (size_t)len[s])) return 0;
    return 1;
}

static float *randn(lv_rng *r, int64_t n, float scale)
{
    float *x = malloc(sizeof(float) * (size_t)n);
    assert_non_null(x);
    for (int64_t i = 0; i < n; i++) x[i] = scale * lv_rng_normal(r);
    return x;
}

/* A one-layer lv_model over float weights: the dequantized block b. w (the 7
 * matrices) and layer are caller storage. */
static void dequant_model(const lv_model_config *c, const lv_qblock *b, float *w, lv_layer *layer,
                          lv_model *m)
{
    const float **slot[LV_LIN_COUNT] = {&layer->wq, &layer->wk, &layer->wv, &layer->wo,
                                        &layer->w1, &layer->w2, &layer->w3};
    *layer = (lv_layer){0}; /* no quantized linears (lv_layer.aq) */
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        assert_int_equal(stage_aqlm_dequant(&b->lin[k], w), LV_OK);
        *slot[k] = w;
        w += b->lin[k].d_out * b->lin[k].d_in;
    }
    layer->attn_norm = b->attn_norm;
    layer->ffn_norm = b->ffn_norm;
    *m = (lv_model){.cfg = *c, .layers = layer};
}

static int64_t block_weights(const lv_model_config *c)
{
    int64_t n = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        n += o * i;
    }
    return n;
}

/* y (n_seq, T, dim) = kern_block_forward of the dequantized b on x. */
static void fp_outputs(const lv_model_config *c, const lv_qblock *b, const float *x, float *y,
                       int64_t n_seq, int T)
{
    float *w = malloc(sizeof(float) * (size_t)block_weights(c));
    lv_layer layer;
    lv_model m;
    kern_fwd_ws *ws = NULL;
    assert_non_null(w);
    dequant_model(c, b, w, &layer, &m);
    memcpy(y, x, sizeof(float) * (size_t)(n_seq * T * c->dim));
    assert_int_equal(kern_fwd_ws_init(&ws, c, 4, T, 0), LV_OK);
    assert_int_equal(stage_calib_block(&m, 0, y, n_seq, T, ws, 4, NULL), LV_OK);
    kern_fwd_ws_free(ws);
    free(w);
}

/* ------------------------------------------------- double reference block */

/* Dequantized weight (d_out, d_in) of L in double. */
static double *dq_double(const lv_aq_layer *L)
{
    double *W = malloc(sizeof(double) * (size_t)(L->d_out * L->d_in));
    const int64_t K = (int64_t)1 << L->nbits;
    assert_non_null(W);
    for (int64_t r = 0; r < L->d_out; r++)
        for (int64_t j = 0; j < L->d_in; j++) {
            int64_t i = j / L->g, a = j % L->g;
            double q = 0;
            for (int m = 0; m < L->M; m++)
                q += L->codebooks[((int64_t)m * K + L->codes[(r * L->n_groups + i) * L->M + m]) * L->g + a];
            W[r * L->d_in + j] = (double)L->scales[r] * q;
        }
    return W;
}

static void ref_rmsnorm(double *o, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * inv * x[i];
}

// o (d) = W (d, n) x (n)
static void ref_matvec(double *o, const double *x, const double *W, int n, int d)
{
    for (int i = 0; i < d; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) s += W[(int64_t)i * n + j] * x[j];
        o[i] = s;
    }
}

static void ref_rope(double *v, int n_heads, int hd, int pos, double theta, lv_rope_style style)
{
    for (int h = 0; h < n_heads; h++)
        for (int j = 0; j < hd / 2; j++) {
            int lo = style == LV_ROPE_HALF ? j : 2 * j, hi = style == LV_ROPE_HALF ? j + hd / 2 : 2 * j + 1;
            double a = pos / pow(theta, 2.0 * j / hd), x0 = v[h * hd + lo], x1 = v[h * hd + hi];
            v[h * hd + lo] = x0 * cos(a) - x1 * sin(a);
            v[h * hd + hi] = x0 * sin(a) + x1 * cos(a);
        }
}

#define RMAX 64 /* largest dim / hidden / T of the reference */

/* Mean squared error of the block on x (B, T, dim) against y_fp, all in double;
 * y (optional) gets the outputs. */
static double ref_loss(const lv_model_config *c, const lv_qblock *b, const float *x,
                       const float *y_fp, int B, int T, double *y)
{
    const int dim = c->dim, hid = c->hidden_dim, kvd = lv_cfg_kv_dim(c), hd = lv_cfg_head_dim(c);
    const int grp = c->n_heads / c->n_kv_heads;
    assert_true(dim <= RMAX && hid <= RMAX && T <= RMAX);
    double *W[LV_LIN_COUNT];
    for (int k = 0; k < LV_LIN_COUNT; k++) W[k] = dq_double(&b->lin[k]);
    double xb[RMAX], q[RMAX], ao[RMAX], tmp[RMAX], h1[RMAX], h3[RMAX], att[RMAX];
    double kc[RMAX * RMAX], vc[RMAX * RMAX]; // (T, kv_dim)
    double sse = 0;
    for (int s = 0; s < B; s++)
        for (int t = 0; t < T; t++) {
            double xr[RMAX];
            const float *xi = x + ((int64_t)s * T + t) * dim;
            for (int i = 0; i < dim; i++) xr[i] = xi[i];
            ref_rmsnorm(xb, xr, b->attn_norm, dim, c->norm_eps);
            ref_matvec(q, xb, W[LV_LIN_WQ], dim, dim);
            ref_matvec(kc + t * kvd, xb, W[LV_LIN_WK], dim, kvd);
            ref_matvec(vc + t * kvd, xb, W[LV_LIN_WV], dim, kvd);
            ref_rope(q, c->n_heads, hd, t, c->rope_theta, c->rope);
            ref_rope(kc + t * kvd, c->n_kv_heads, hd, t, c->rope_theta, c->rope);
            for (int h = 0; h < c->n_heads; h++) {
                int off = (h / grp) * hd;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= t; u++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += q[h * hd + i] * kc[u * kvd + off + i];
                    att[u] = d / sqrt((double)hd);
                    mx = att[u] > mx ? att[u] : mx;
                }
                for (int u = 0; u <= t; u++) sum += att[u] = exp(att[u] - mx);
                for (int i = 0; i < hd; i++) {
                    double o = 0;
                    for (int u = 0; u <= t; u++) o += att[u] / sum * vc[u * kvd + off + i];
                    ao[h * hd + i] = o;
                }
            }
            ref_matvec(tmp, ao, W[LV_LIN_WO], dim, dim);
            for (int i = 0; i < dim; i++) xr[i] += tmp[i];
            ref_rmsnorm(xb, xr, b->ffn_norm, dim, c->norm_eps);
            ref_matvec(h1, xb, W[LV_LIN_W1], dim, hid);
            ref_matvec(h3, xb, W[LV_LIN_W3], dim, hid);
            for (int i = 0; i < hid; i++) h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
            ref_matvec(tmp, h1, W[LV_LIN_W2], hid, dim);
            for (int i = 0; i < dim; i++) {
                double yi = xr[i] + tmp[i];
                int64_t at = ((int64_t)s * T + t) * dim + i;
                if (y) y[at] = yi;
                if (y_fp) sse += (yi - y_fp[at]) * (yi - y_fp[at]);
            }
        }
    for (int k = 0; k < LV_LIN_COUNT; k++) free(W[k]);
    return sse / ((double)B * T * dim);
}

/* ---------------------------------------------------------------- tests */

/* Analytic gradient of one tiny block against central differences, per
 * parameter class: codebooks, scales, norm weights. */
static void grad_check(lv_rope_style rope, int hidden, int g)
{
    const int B = 2, T = 6, M = 2, nbits = 3;
    const lv_model_config c = tiny_cfg(hidden, rope);
    lv_rng r;
    lv_rng_seed(&r, 1234 + (uint64_t)rope);
    lv_qblock b, target;
    random_block(&r, &c, &b, M, nbits, g);
    random_block(&r, &c, &target, M, nbits, g);
    const int64_t nx = (int64_t)B * T * c.dim;
    float *x = randn(&r, nx, 1.0f), *y_fp = malloc(sizeof(float) * (size_t)nx);
    assert_non_null(y_fp);
    /* targets: another block's outputs, so that the residuals are O(1) */
    fp_outputs(&c, &target, x, y_fp, B, T);

    stage_ft_ws *ws = NULL;
    assert_int_equal(stage_ft_ws_init(&ws, &c, &b, B, T), LV_OK);
    float *seg[STAGE_FT_N_SEGS];
    int64_t len[STAGE_FT_N_SEGS];
    const int64_t np = stage_ft_param_segments(&c, &b, seg, len);
    float *grad = malloc(sizeof(float) * (size_t)np);
    double *fd = malloc(sizeof(double) * (size_t)np);
    assert_true(grad && fd);
    double loss = 0;
    assert_int_equal(stage_ft_block_grad(ws, &b, x, y_fp, B, T, &loss, grad), LV_OK);
    double loss_ref = ref_loss(&c, &b, x, y_fp, B, T, NULL);
    printf("  rope %s hidden %d g %d: %lld params, loss %.9g (double ref %.9g)\n",
           rope == LV_ROPE_HALF ? "half" : "interleaved", hidden, g, (long long)np, loss, loss_ref);
    assert_true(fabs(loss - loss_ref) <= 1e-5 * loss_ref);

    for (int s = 0, off = 0; s < STAGE_FT_N_SEGS; off += (int)len[s], s++)
        for (int64_t i = 0; i < len[s]; i++) {
            float v0 = seg[s][i];
            float h = 1e-3f * (fabsf(v0) > 0.1f ? fabsf(v0) : 0.1f);
            seg[s][i] = v0 + h;
            double hp = (double)seg[s][i] - v0, lp = ref_loss(&c, &b, x, y_fp, B, T, NULL);
            seg[s][i] = v0 - h;
            double hm = v0 - (double)seg[s][i], lm = ref_loss(&c, &b, x, y_fp, B, T, NULL);
            seg[s][i] = v0;
            fd[off + i] = (lp - lm) / (hp + hm);
        }

    /* classes: 0 codebooks (even segments < 14), 1 scales (odd < 14), 2 norms */
    const char *names[3] = {"codebooks", "scales", "norm weights"};
    for (int cls = 0; cls < 3; cls++) {
        double gmax = 0, emax = 0, rel_max = 0;
        int64_t n = 0;
        for (int pass = 0; pass < 2; pass++)
            for (int s = 0, off = 0; s < STAGE_FT_N_SEGS; off += (int)len[s], s++) {
                int sc = s >= 2 * LV_LIN_COUNT ? 2 : s % 2;
                if (sc != cls) continue;
                for (int64_t i = 0; i < len[s]; i++) {
                    double a = grad[off + i], f = fd[off + i];
                    if (pass == 0) {
                        gmax = fabs(f) > gmax ? fabs(f) : gmax;
                        n++;
                        continue;
                    }
                    double e = fabs(a - f) / gmax;
                    emax = e > emax ? e : emax;
                    if (fabs(f) > 1e-2 * gmax) {
                        double rel = fabs(a - f) / fabs(f);
                        rel_max = rel > rel_max ? rel : rel_max;
                    }
                }
            }
        printf("    %-13s n=%-4lld max|grad|=%.3g  max|err|/max|grad|=%.2e  max rel err "
               "(|g| > 1%% of max)=%.2e\n",
               names[cls], (long long)n, gmax, emax, rel_max);
        assert_true(gmax > 0);
        assert_true(emax < GRAD_TOL);
    }
    stage_ft_ws_free(ws);
    lv_qblock_free(&b);
    lv_qblock_free(&target);
    free(x);
    free(y_fp);
    free(grad);
    free(fd);
}

static void test_grad_interleaved(void **state)
{
    (void)state;
    grad_check(LV_ROPE_INTERLEAVED, 22, 4); /* hidden 22: w2's last group of 4 is cut to 2 */
}

static void test_grad_half(void **state)
{
    (void)state;
    grad_check(LV_ROPE_HALF, 24, 5); /* g 5: every linear has a cut last group */
}

/* The training forward equals kern_block_forward on the dequantized weights,
 * and the double reference (which the gradient check relies on) agrees. */
static void test_forward_matches(void **state)
{
    (void)state;
    for (int rope = 0; rope < 2; rope++) {
        const int B = 3, T = 7;
        const lv_model_config c = tiny_cfg(22, (lv_rope_style)rope);
        lv_rng r;
        lv_rng_seed(&r, 77);
        lv_qblock b;
        random_block(&r, &c, &b, 2, 3, 4);
        const int64_t nx = (int64_t)B * T * c.dim;
        float *x = randn(&r, nx, 1.0f), *y = malloc(sizeof(float) * (size_t)nx);
        float *y_kern = malloc(sizeof(float) * (size_t)nx);
        double *y_ref = malloc(sizeof(double) * (size_t)nx);
        assert_true(y && y_kern && y_ref);
        stage_ft_ws *ws = NULL;
        assert_int_equal(stage_ft_ws_init(&ws, &c, &b, 4, T), LV_OK);
        assert_int_equal(stage_ft_block_forward(ws, &b, x, B, T, y), LV_OK);
        fp_outputs(&c, &b, x, y_kern, B, T);
        ref_loss(&c, &b, x, NULL, B, T, y_ref);
        double max_rel = 0, max_ref = 0;
        for (int64_t i = 0; i < nx; i++) {
            double den = fabs((double)y_kern[i]) > 1e-3 ? fabs((double)y_kern[i]) : 1e-3;
            double e = fabs((double)y[i] - y_kern[i]) / den;
            double er = fabs(y_ref[i] - y_kern[i]) / den;
            max_rel = e > max_rel ? e : max_rel;
            max_ref = er > max_ref ? er : max_ref;
        }
        printf("  rope %d: training forward vs kern_block_forward max rel %.2e, double ref vs "
               "kern %.2e\n", rope, max_rel, max_ref);
        assert_true(max_rel <= FWD_RTOL);
        assert_true(max_ref <= 1e-4);
        stage_ft_ws_free(ws);
        lv_qblock_free(&b);
        free(x);
        free(y);
        free(y_kern);
        free(y_ref);
    }
}

/* A fine-tuning problem: targets from a "good" block, the block to tune is it
 * with codebooks, scales and norms perturbed. */
typedef struct {
    lv_model_config c;
    lv_qblock good, start;
    float *x, *y_fp;
    int64_t n_seq;
    int T;
} ft_problem;

static void problem_init(ft_problem *p, uint64_t seed)
{
    p->c = (lv_model_config){.dim = 32, .hidden_dim = 48, .n_layers = 1, .n_heads = 4,
                             .n_kv_heads = 2, .vocab_size = 32, .seq_len = 64,
                             .norm_eps = 1e-5f, .rope_theta = 10000.0f, .rope = LV_ROPE_HALF};
    p->n_seq = 24;
    p->T = 8;
    lv_rng r;
    lv_rng_seed(&r, seed);
    random_block(&r, &p->c, &p->good, 1, 4, 4);
    block_copy(&p->c, &p->good, &p->start);
    float *seg[STAGE_FT_N_SEGS];
    int64_t len[STAGE_FT_N_SEGS];
    stage_ft_param_segments(&p->c, &p->start, seg, len);
    for (int s = 0; s < STAGE_FT_N_SEGS; s++)
        for (int64_t i = 0; i < len[s]; i++)
            seg[s][i] *= 1.0f + (s % 2 == 0 && s < 2 * LV_LIN_COUNT ? 0.2f : 0.05f) * lv_rng_normal(&r);
    const int64_t nx = p->n_seq * p->T * p->c.dim;
    p->x = randn(&r, nx, 1.0f);
    p->y_fp = malloc(sizeof(float) * (size_t)nx);
    assert_non_null(p->y_fp);
    fp_outputs(&p->c, &p->good, p->x, p->y_fp, p->n_seq, p->T);
}

static void problem_free(ft_problem *p)
{
    lv_qblock_free(&p->good);
    lv_qblock_free(&p->start);
    free(p->x);
    free(p->y_fp);
}

/* Held-out relative MSE of b, recomputed independently of the fine-tuner. */
static double heldout_rel(const ft_problem *p, const lv_qblock *b, int64_t n_hold)
{
    const int64_t row = (int64_t)p->T * p->c.dim, n0 = p->n_seq - n_hold;
    float *y = malloc(sizeof(float) * (size_t)(n_hold * row));
    assert_non_null(y);
    fp_outputs(&p->c, b, p->x + n0 * row, y, n_hold, p->T);
    double num = 0, den = 0;
    for (int64_t i = 0; i < n_hold * row; i++) {
        double d = (double)y[i] - p->y_fp[n0 * row + i];
        num += d * d;
        den += (double)p->y_fp[n0 * row + i] * p->y_fp[n0 * row + i];
    }
    free(y);
    return num / den;
}

static void test_finetune_improves(void **state)
{
    (void)state;
    ft_problem p;
    problem_init(&p, 5);
    lv_qblock b;
    block_copy(&p.c, &p.start, &b);
    stage_ft_config ft = {.lr = 3e-3f, .max_epochs = 40, .batch_seqs = 4, .patience = 5,
                          .holdout_frac = 0.2, .seed = 9};
    stage_ft_stats sx;
    assert_int_equal(stage_finetune_block(&p.c, &b, p.x, p.y_fp, p.n_seq, p.T, &ft, &sx), LV_OK);
    printf("  held-out rel MSE %.4g -> %.4g in %d epochs (%lld steps, best %d, train %lld / "
           "held-out %lld), %.2f s\n",
           sx.mse_before, sx.mse_after, sx.epochs, (long long)sx.steps, sx.best_epoch,
           (long long)sx.n_train, (long long)sx.n_holdout, sx.wall_s);
    assert_int_equal(sx.n_holdout, 5); /* ceil(0.2 * 24) */
    assert_true(sx.mse_after < 0.3 * sx.mse_before);
    double before = heldout_rel(&p, &p.start, sx.n_holdout);
    double after = heldout_rel(&p, &b, sx.n_holdout);
    printf("  recomputed: %.4g -> %.4g\n", before, after);
    assert_true(fabs(before - sx.mse_before) <= 1e-4 * sx.mse_before);
    assert_true(fabs(after - sx.mse_after) <= 1e-4 * sx.mse_after);
    /* the codes are never touched */
    for (int k = 0; k < LV_LIN_COUNT; k++)
        assert_memory_equal(b.lin[k].codes, p.start.lin[k].codes,
                            sizeof(uint16_t) * (size_t)(b.lin[k].d_out * b.lin[k].n_groups * b.lin[k].M));

    /* frozen norms stay bit-identical */
    lv_qblock bf;
    block_copy(&p.c, &p.start, &bf);
    ft.freeze_norms = 1;
    ft.max_epochs = 3;
    assert_int_equal(stage_finetune_block(&p.c, &bf, p.x, p.y_fp, p.n_seq, p.T, &ft, &sx), LV_OK);
    assert_memory_equal(bf.attn_norm, p.start.attn_norm, sizeof(float) * (size_t)p.c.dim);
    assert_memory_equal(bf.ffn_norm, p.start.ffn_norm, sizeof(float) * (size_t)p.c.dim);
    assert_true(sx.mse_after < sx.mse_before);
    lv_qblock_free(&bf);
    lv_qblock_free(&b);
    problem_free(&p);
}

/* A learning rate that only makes things worse: the block comes back unchanged. */
static void test_never_worse(void **state)
{
    (void)state;
    ft_problem p;
    problem_init(&p, 6);
    lv_qblock b;
    block_copy(&p.c, &p.good, &b); /* already optimal: nothing can improve it */
    stage_ft_config ft = {.lr = 0.5f, .max_epochs = 4, .batch_seqs = 4, .patience = 2, .seed = 1};
    stage_ft_stats sx;
    assert_int_equal(stage_finetune_block(&p.c, &b, p.x, p.y_fp, p.n_seq, p.T, &ft, &sx), LV_OK);
    printf("  from the optimum with lr 0.5: %.3g -> %.3g, best epoch %d, %d epochs%s\n",
           sx.mse_before, sx.mse_after, sx.best_epoch, sx.epochs, sx.diverged ? " (diverged)" : "");
    assert_int_equal(sx.best_epoch, 0);
    assert_true(sx.epochs <= 2); /* patience (or stopped by divergence) */
    assert_true(sx.mse_after == sx.mse_before);
    assert_true(block_same(&p.c, &b, &p.good));

    /* from a perturbed start with a too-large rate: never worse than the start */
    lv_qblock b2;
    block_copy(&p.c, &p.start, &b2);
    ft.lr = 5.0f;
    assert_int_equal(stage_finetune_block(&p.c, &b2, p.x, p.y_fp, p.n_seq, p.T, &ft, &sx), LV_OK);
    printf("  perturbed start with lr 5: %.3g -> %.3g, best epoch %d\n", sx.mse_before,
           sx.mse_after, sx.best_epoch);
    assert_true(sx.mse_after <= sx.mse_before);
    if (sx.best_epoch == 0) assert_true(block_same(&p.c, &b2, &p.start));
    lv_qblock_free(&b2);
    lv_qblock_free(&b);
    problem_free(&p);
}

/* Same inputs + seed: bit-identical blocks and stats, also at another thread count. */
static void test_deterministic(void **state)
{
    (void)state;
    ft_problem p;
    problem_init(&p, 7);
    lv_qblock b1, b2;
    block_copy(&p.c, &p.start, &b1);
    block_copy(&p.c, &p.start, &b2);
    stage_ft_config ft = {.lr = 3e-3f, .max_epochs = 4, .batch_seqs = 4, .seed = 3};
    stage_ft_stats s1, s2;
    const int threads = omp_get_max_threads();
    assert_int_equal(stage_finetune_block(&p.c, &b1, p.x, p.y_fp, p.n_seq, p.T, &ft, &s1), LV_OK);
    omp_set_num_threads(threads == 1 ? 2 : 1);
    assert_int_equal(stage_finetune_block(&p.c, &b2, p.x, p.y_fp, p.n_seq, p.T, &ft, &s2), LV_OK);
    omp_set_num_threads(threads);
    printf("  two runs (%d and %d threads): %.9g / %.9g\n", threads, threads == 1 ? 2 : 1,
           s1.mse_after, s2.mse_after);
    assert_true(s1.best_epoch > 0);
    assert_true(block_same(&p.c, &b1, &b2));
    assert_memory_equal(&s1.mse_after, &s2.mse_after, sizeof(double));
    assert_memory_equal(&s1.train_loss, &s2.train_loss, sizeof(double));
    /* another seed visits the sequences in another order */
    lv_qblock b3;
    block_copy(&p.c, &p.start, &b3);
    ft.seed = 4;
    assert_int_equal(stage_finetune_block(&p.c, &b3, p.x, p.y_fp, p.n_seq, p.T, &ft, &s2), LV_OK);
    assert_false(block_same(&p.c, &b1, &b3));
    lv_qblock_free(&b1);
    lv_qblock_free(&b2);
    lv_qblock_free(&b3);
    problem_free(&p);
}

static void test_errors(void **state)
{
    (void)state;
    ft_problem p;
    problem_init(&p, 8);
    stage_ft_stats sx;
    stage_ft_config bad = {.holdout_frac = 1.0};
    assert_int_equal(stage_finetune_block(&p.c, &p.start, NULL, p.y_fp, p.n_seq, p.T, NULL, &sx),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(stage_finetune_block(&p.c, &p.start, p.x, p.y_fp, 0, p.T, NULL, &sx),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(stage_finetune_block(&p.c, &p.start, p.x, p.y_fp, p.n_seq, p.T, &bad, &sx),
                     LV_ERR_INVALID_ARG);
    /* a block of another config */
    lv_model_config other = p.c;
    other.hidden_dim = 40;
    assert_int_equal(stage_finetune_block(&other, &p.start, p.x, p.y_fp, p.n_seq, p.T, NULL, &sx),
                     LV_ERR_INVALID_ARG);
    printf("  wrong shape: %s\n", lv_last_error());
    /* an out-of-range code */
    p.start.lin[LV_LIN_WV].codes[3] = 999;
    assert_int_equal(stage_finetune_block(&p.c, &p.start, p.x, p.y_fp, p.n_seq, p.T, NULL, &sx),
                     LV_ERR_INVALID_ARG);
    p.start.lin[LV_LIN_WV].codes[3] = 0;
    /* one sequence: trained on and used for the early stop; defaults elsewhere */
    stage_ft_config one = {.lr = 3e-3f, .max_epochs = 2};
    assert_int_equal(stage_finetune_block(&p.c, &p.start, p.x, p.y_fp, 1, p.T, &one, &sx), LV_OK);
    assert_int_equal(sx.n_holdout, 0);
    assert_int_equal(sx.n_train, 1);
    assert_true(sx.mse_after <= sx.mse_before);
    problem_free(&p);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_matches), cmocka_unit_test(test_grad_interleaved),
        cmocka_unit_test(test_grad_half),       cmocka_unit_test(test_finetune_improves),
        cmocka_unit_test(test_never_worse),     cmocka_unit_test(test_deterministic),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
