/* test_stage_pvtune.c: PV-tuning (stages/pvtune.c) on stories260K: the
 * full-model gradient against central finite differences of a double-precision
 * reference model (per-linear and shared codebooks, KL and cross-entropy), the
 * forward against kern_model_forward of the dequantized model, a V step
 * lowering the loss of its batch, a P step within its budget lowering its
 * objective, shared copies staying identical, never-worse keep-best and
 * bit-identical reruns.
 *
 * The quantized models are made quickly with stage_aqlm_run (identity Hessian,
 * one alternation): per-linear 2x4g4 and one 1x6g4 codebook shared by all 35
 * linears. Tokens: the start of jobs/demo/tinystories_val_subset.txt. */
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

#include "io.h"
#include "kern.h"
#include "stage.h"
#define PVT_CHECK(x) assert_true(x)
#include "pv_testlib.h"

/* Gradient check tolerance, per parameter class, on max|a - f| / max|f|:
 * f are central differences of the double reference loss with steps h = 1e-3
 * max(|p|, 0.1): truncation O(h^2 f''') ~ 1e-6 relative, rounding ~1e-16/h ~ 1e-13;
 * a is the float gradient: float activations through 5 blocks and float
 * (p_s - p_t) / N carry ~1e-6 relative error (measured max ~1e-5 of the largest
 * gradient). A wrong term is O(1). */
#define GRAD_TOL 1e-3
/* Float loss (sums in double over float logits) against the double reference. */
#define LOSS_RTOL 1e-4

/* ---------------------------------------------------------------- fixtures */

typedef struct {
    lv_model *fp;
    lv_qmodel *qa; /* per-linear codebooks, 2x4g4 */
    lv_qmodel *qs; /* one 1x6g4 codebook shared by all linears */
    lv_qmodel *qt; /* qs with one codebook per linear type (type_shared_copy) */
    int32_t *toks;
    int64_t n_tok;
} fixture;

static fixture F;

/* Groups (row, input group) whose codes differ between a and b. */
static int64_t groups_changed(const lv_qmodel *a, const lv_qmodel *b)
{
    int64_t n = 0;
    for (int l = 0; l < a->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *s = &a->blocks[l].lin[k], *t = &b->blocks[l].lin[k];
            for (int64_t j = 0; j < s->d_out * s->n_groups; j++)
                n += memcmp(s->codes + j * s->M, t->codes + j * s->M, sizeof(uint16_t) * (size_t)s->M) != 0;
        }
    return n;
}

static int setup(void **state)
{
    (void)state;
    char path[4096];
    io_tokenizer *tok = NULL;
    if (io_model_open(&F.fp, demo_path(path, sizeof path, "stories260K.bin"), IO_MODEL_AUTO) != LV_OK ||
        io_tokenizer_open(&tok, demo_path(path, sizeof path, "tok512.bin"), F.fp->cfg.vocab_size) != LV_OK ||
        io_data_tokens(demo_path(path, sizeof path, "tinystories_val_subset.txt"), tok,
                       F.fp->cfg.vocab_size, &F.toks, &F.n_tok) != LV_OK) {
        fprintf(stderr, "setup: %s\n", lv_last_error());
        io_tokenizer_free(tok);
        return -1;
    }
    io_tokenizer_free(tok);
    const double t0 = lv_now();
    quantize(F.fp, &F.qa, 2, 4, 4, 0);
    quantize(F.fp, &F.qs, 1, 6, 4, 1);
    F.qt = type_shared_copy(F.fp, F.qs);
    printf("  setup: stories260K quantized (2x4g4 per linear, 1x6g4 shared) in %.2f s\n",
           lv_now() - t0);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    lv_qmodel_free(F.qa);
    lv_qmodel_free(F.qs);
    lv_qmodel_free(F.qt);
    io_model_free(F.fp);
    free(F.toks);
    return 0;
}

/* ------------------------------------------------- double reference model */

typedef struct {
    const lv_model_config *c;
    double *W[64 * LV_LIN_COUNT]; /* (d_out, d_in) per linear, block-major */
    const float *attn_norm[64], *ffn_norm[64], *final_norm, *emb, *cls;
} ref_model;

static double *ref_dequant(const lv_aq_layer *L)
{
    double *W = malloc(sizeof(double) * (size_t)(L->d_out * L->d_in));
    const int64_t K = (int64_t)1 << L->nbits;
    assert_non_null(W);
    for (int64_t r = 0; r < L->d_out; r++)
        for (int64_t j = 0; j < L->d_in; j++) {
            const int64_t i = j / L->g, a = j % L->g;
            double q = 0;
            for (int m = 0; m < L->M; m++)
                q += L->codebooks[((int64_t)m * K + L->codes[(r * L->n_groups + i) * L->M + m]) * L->g + a];
            W[r * L->d_in + j] = (double)L->scales[r] * q;
        }
    return W;
}

static void ref_from_q(ref_model *m, const lv_qmodel *q)
{
    m->c = &q->cfg;
    for (int l = 0; l < q->cfg.n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++) m->W[l * LV_LIN_COUNT + k] = ref_dequant(&q->blocks[l].lin[k]);
        m->attn_norm[l] = q->blocks[l].attn_norm;
        m->ffn_norm[l] = q->blocks[l].ffn_norm;
    }
    m->final_norm = q->final_norm;
    m->emb = q->tok_emb;
    m->cls = q->cfg.tied_cls ? q->tok_emb : q->wcls;
}

static void ref_from_fp(ref_model *m, const lv_model *fp)
{
    const lv_model_config *c = &fp->cfg;
    m->c = c;
    for (int l = 0; l < c->n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            int64_t o, i;
            lv_lin_shape(c, (lv_lin)k, &o, &i);
            const float *w = lv_layer_weight(&fp->layers[l], (lv_lin)k);
            double *W = malloc(sizeof(double) * (size_t)(o * i));
            assert_non_null(W);
            for (int64_t j = 0; j < o * i; j++) W[j] = w[j];
            m->W[l * LV_LIN_COUNT + k] = W;
        }
        m->attn_norm[l] = fp->layers[l].attn_norm;
        m->ffn_norm[l] = fp->layers[l].ffn_norm;
    }
    m->final_norm = fp->final_norm;
    m->emb = fp->tok_emb;
    m->cls = fp->wcls;
}

static void ref_free(ref_model *m)
{
    for (int i = 0; i < m->c->n_layers * LV_LIN_COUNT; i++) free(m->W[i]);
}

static void ref_rmsnorm(double *o, const double *x, const float *w, int n, double eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const double inv = 1.0 / sqrt(ss / n + eps);
    for (int i = 0; i < n; i++) o[i] = w[i] * inv * x[i];
}

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
            const int lo = style == LV_ROPE_HALF ? j : 2 * j;
            const int hi = style == LV_ROPE_HALF ? j + hd / 2 : 2 * j + 1;
            const double a = pos / pow(theta, 2.0 * j / hd), x0 = v[h * hd + lo], x1 = v[h * hd + hi];
            v[h * hd + lo] = x0 * cos(a) - x1 * sin(a);
            v[h * hd + hi] = x0 * sin(a) + x1 * cos(a);
        }
}

#define RMAX 512 /* largest dim / hidden / vocab of the reference */
#define TMAX 16

/* Log-softmax of the logits of one sequence tok (T) into lp (T, vocab). */
static void ref_seq_logprobs(const ref_model *m, const int32_t *tok, int T, double *lp)
{
    const lv_model_config *c = m->c;
    const int dim = c->dim, hid = c->hidden_dim, kvd = lv_cfg_kv_dim(c), hd = lv_cfg_head_dim(c);
    const int grp = c->n_heads / c->n_kv_heads, V = c->vocab_size;
    assert_true(dim <= RMAX && hid <= RMAX && V <= RMAX && T <= TMAX);
    static double x[TMAX][RMAX], kc[64][TMAX][RMAX], vc[64][TMAX][RMAX];
    double xb[RMAX], q[RMAX], ao[RMAX], tmp[RMAX], h1[RMAX], h3[RMAX], att[TMAX];
    for (int t = 0; t < T; t++)
        for (int i = 0; i < dim; i++) x[t][i] = m->emb[(int64_t)tok[t] * dim + i];
    for (int l = 0; l < c->n_layers; l++) {
        double *const *W = m->W + l * LV_LIN_COUNT;
        for (int t = 0; t < T; t++) { /* causal: position t sees keys 0..t of this layer */
            ref_rmsnorm(xb, x[t], m->attn_norm[l], dim, c->norm_eps);
            ref_matvec(q, xb, W[LV_LIN_WQ], dim, dim);
            ref_matvec(kc[l][t], xb, W[LV_LIN_WK], dim, kvd);
            ref_matvec(vc[l][t], xb, W[LV_LIN_WV], dim, kvd);
            ref_rope(q, c->n_heads, hd, t, c->rope_theta, c->rope);
            ref_rope(kc[l][t], c->n_kv_heads, hd, t, c->rope_theta, c->rope);
            for (int h = 0; h < c->n_heads; h++) {
                const int off = (h / grp) * hd;
                double mx = -INFINITY, sum = 0;
                for (int u = 0; u <= t; u++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += q[h * hd + i] * kc[l][u][off + i];
                    att[u] = d / sqrt((double)hd);
                    mx = att[u] > mx ? att[u] : mx;
                }
                for (int u = 0; u <= t; u++) sum += att[u] = exp(att[u] - mx);
                for (int i = 0; i < hd; i++) {
                    double o = 0;
                    for (int u = 0; u <= t; u++) o += att[u] / sum * vc[l][u][off + i];
                    ao[h * hd + i] = o;
                }
            }
            ref_matvec(tmp, ao, W[LV_LIN_WO], dim, dim);
            for (int i = 0; i < dim; i++) x[t][i] += tmp[i];
            ref_rmsnorm(xb, x[t], m->ffn_norm[l], dim, c->norm_eps);
            ref_matvec(h1, xb, W[LV_LIN_W1], dim, hid);
            ref_matvec(h3, xb, W[LV_LIN_W3], dim, hid);
            for (int i = 0; i < hid; i++) h1[i] = h1[i] / (1.0 + exp(-h1[i])) * h3[i];
            ref_matvec(tmp, h1, W[LV_LIN_W2], hid, dim);
            for (int i = 0; i < dim; i++) x[t][i] += tmp[i];
        }
    }
    for (int t = 0; t < T; t++) {
        ref_rmsnorm(xb, x[t], m->final_norm, dim, c->norm_eps);
        double *z = lp + (int64_t)t * V, mx = -INFINITY, se = 0;
        for (int v = 0; v < V; v++) {
            double s = 0;
            for (int i = 0; i < dim; i++) s += (double)m->cls[(int64_t)v * dim + i] * xb[i];
            z[v] = s;
            mx = s > mx ? s : mx;
        }
        for (int v = 0; v < V; v++) se += exp(z[v] - mx);
        for (int v = 0; v < V; v++) z[v] -= mx + log(se);
    }
}

/* The PV loss of student q on tokens (B, T) in double; lt (B, T, vocab) the
 * teacher's log-probabilities (KL) or NULL (CE). */
static double ref_loss(const lv_qmodel *q, const int32_t *tok, int B, int T, const double *lt)
{
    ref_model m;
    ref_from_q(&m, q);
    const int V = q->cfg.vocab_size;
    double *lp = malloc(sizeof(double) * (size_t)T * V), sum = 0;
    assert_non_null(lp);
    for (int b = 0; b < B; b++) {
        ref_seq_logprobs(&m, tok + b * T, T, lp);
        for (int t = 0; t < T; t++) {
            const double *ls = lp + (int64_t)t * V;
            if (lt) {
                const double *tt = lt + ((int64_t)b * T + t) * V;
                for (int v = 0; v < V; v++) sum += exp(tt[v]) * (tt[v] - ls[v]);
            } else if (t < T - 1) {
                sum -= ls[tok[b * T + t + 1]];
            }
        }
    }
    free(lp);
    ref_free(&m);
    return sum / ((double)B * (lt ? T : T - 1));
}

/* ---------------------------------------------------------------- tests */

/* The parameter classes of the check. */
enum { C_CB, C_SCALE, C_ATTN, C_FFN, C_FINAL, C_EMB, C_N };
static const char *CLASS_NAME[C_N] = {"codebooks", "scales", "attn_norm", "ffn_norm", "final_norm",
                                      "embeddings"};

/* Class of trainable segment s (stage_pv_param_segments order); n_emb: the
 * embedding segments at the end (train_emb). */
static int seg_class(const lv_qmodel *q, int s, int n_seg, int n_emb)
{
    if (s >= n_seg - n_emb) return C_EMB;
    if (s == n_seg - n_emb - 1) return C_FINAL;
    if (q->shared_codebooks) {
        const int slots = lv_share_slots(q->shared_codebooks);
        if (s < slots) return C_CB;
        const int j = (s - slots) % (LV_LIN_COUNT + 2);
        return j < LV_LIN_COUNT ? C_SCALE : j == LV_LIN_COUNT ? C_ATTN : C_FFN;
    }
    const int j = s % STAGE_FT_N_SEGS;
    return j < 2 * LV_LIN_COUNT ? (j % 2 ? C_SCALE : C_CB) : j == 2 * LV_LIN_COUNT ? C_ATTN : C_FFN;
}

/* Perturb parameter i of segment s by delta (all shared codebook copies too). */
static void nudge(lv_qmodel *q, float **seg, int s, int64_t i, float value)
{
    seg[s][i] = value;
    if (q->shared_codebooks && s < lv_share_slots(q->shared_codebooks))
        for (int l = 0; l < q->cfg.n_layers; l++)
            for (int k = 0; k < LV_LIN_COUNT; k++)
                if (lv_share_slot(q->shared_codebooks, k) == s) q->blocks[l].lin[k].codebooks[i] = value;
}

/* Analytic gradient vs central differences of ref_loss on a sample of every
 * class: per segment the 2 largest |gradient| entries and 2 random ones. */
static void grad_check(lv_qmodel *q0, stage_pv_loss loss_kind, int train_emb)
{
    const int B = 2, T = 8;
    lv_qmodel *q = qcopy(F.fp, q0);
    const int32_t *tok = F.toks + 1000;
    stage_pv *pv = NULL;
    stage_pv_config cfg = {.loss = loss_kind, .train_emb = train_emb};
    const int n_emb = train_emb ? (q->cfg.tied_cls ? 1 : 2) : 0;
    assert_int_equal(stage_pv_init(&pv, F.fp, q, 1, T, &cfg), LV_OK); /* micro-batches of 1 */
    int n_seg = 0;
    const int64_t np = stage_pv_param_segments(pv, &n_seg, NULL, NULL);
    float **seg = malloc(sizeof(float *) * (size_t)n_seg), *grad = malloc(sizeof(float) * (size_t)np);
    int64_t *len = malloc(sizeof(int64_t) * (size_t)n_seg);
    assert_true(seg && grad && len);
    stage_pv_param_segments(pv, NULL, seg, len);
    double loss = 0;
    assert_int_equal(stage_pv_grad(pv, tok, B, &loss, grad), LV_OK);

    double *lt = NULL; /* teacher log-probs in double */
    if (loss_kind == STAGE_PV_LOSS_KL) {
        ref_model tm;
        ref_from_fp(&tm, F.fp);
        const int V = F.fp->cfg.vocab_size;
        lt = malloc(sizeof(double) * (size_t)B * T * V);
        assert_non_null(lt);
        for (int b = 0; b < B; b++) ref_seq_logprobs(&tm, tok + b * T, T, lt + (int64_t)b * T * V);
        ref_free(&tm);
    }
    const double loss_ref = ref_loss(q, tok, B, T, lt);
    printf("  %s%s%s: %lld params in %d segments, loss %.9g (double ref %.9g)\n",
           q->shared_codebooks ? "shared " : "", train_emb ? "embeddings + " : "", loss_kind == STAGE_PV_LOSS_KL ? "KL" : "CE",
           (long long)np, n_seg, loss, loss_ref);
    assert_true(fabs(loss - loss_ref) <= LOSS_RTOL * loss_ref);

    double gmax[C_N] = {0}, emax[C_N] = {0}, rmax[C_N] = {0};
    int64_t cnt[C_N] = {0};
    double *fa = malloc(sizeof(double) * 4 * (size_t)n_seg), *ff = malloc(sizeof(double) * 4 * (size_t)n_seg);
    int *fc = malloc(sizeof(int) * 4 * (size_t)n_seg), nf = 0;
    assert_true(fa && ff && fc);
    lv_rng r;
    lv_rng_seed(&r, 99);
    int64_t off = 0;
    for (int s = 0; s < n_seg; off += len[s], s++) {
        int64_t pick[4], top1 = 0, top2 = -1;
        for (int64_t i = 1; i < len[s]; i++)
            if (fabsf(grad[off + i]) > fabsf(grad[off + top1])) top2 = top1, top1 = i;
            else if (top2 < 0 || fabsf(grad[off + i]) > fabsf(grad[off + top2])) top2 = i;
        pick[0] = top1;
        pick[1] = top2 < 0 ? 0 : top2;
        pick[2] = (int64_t)(lv_rng_u64(&r) % (uint64_t)len[s]);
        pick[3] = (int64_t)(lv_rng_u64(&r) % (uint64_t)len[s]);
        if (seg_class(q, s, n_seg, n_emb) == C_EMB) /* an entry of a token in the batch */
            pick[3] = (int64_t)tok[5] * q->cfg.dim + pick[3] % q->cfg.dim;
        for (int p = 0; p < 4; p++) {
            const int64_t i = pick[p];
            const float v0 = seg[s][i], h = 1e-3f * (fabsf(v0) > 0.1f ? fabsf(v0) : 0.1f);
            nudge(q, seg, s, i, v0 + h);
            const double hp = (double)seg[s][i] - v0, lp = ref_loss(q, tok, B, T, lt);
            nudge(q, seg, s, i, v0 - h);
            const double hm = v0 - (double)seg[s][i], lm = ref_loss(q, tok, B, T, lt);
            nudge(q, seg, s, i, v0);
            fa[nf] = grad[off + i];
            ff[nf] = (lp - lm) / (hp + hm);
            fc[nf] = seg_class(q, s, n_seg, n_emb);
            gmax[fc[nf]] = fabs(ff[nf]) > gmax[fc[nf]] ? fabs(ff[nf]) : gmax[fc[nf]];
            cnt[fc[nf]]++;
            nf++;
        }
    }
    for (int j = 0; j < nf; j++) {
        const int cl = fc[j];
        const double e = fabs(fa[j] - ff[j]) / gmax[cl];
        emax[cl] = e > emax[cl] ? e : emax[cl];
        if (fabs(ff[j]) > 1e-2 * gmax[cl]) {
            const double rel = fabs(fa[j] - ff[j]) / fabs(ff[j]);
            rmax[cl] = rel > rmax[cl] ? rel : rmax[cl];
        }
    }
    for (int cl = 0; cl < (train_emb ? C_N : C_EMB); cl++) {
        printf("    %-10s n=%-4lld max|grad|=%.3g  max|err|/max|grad|=%.2e  max rel err "
               "(|g| > 1%% of max)=%.2e\n", CLASS_NAME[cl], (long long)cnt[cl], gmax[cl],
               emax[cl], rmax[cl]);
        assert_true(cnt[cl] > 0 && gmax[cl] > 0);
        assert_true(emax[cl] < GRAD_TOL);
    }
    assert_true(qsame(q, q0)); /* every nudge was put back */
    stage_pv_free(pv);
    lv_qmodel_free(q);
    free(seg);
    free(grad);
    free(len);
    free(lt);
    free(fa);
    free(ff);
    free(fc);
}

static void test_grad_kl(void **state)
{
    (void)state;
    grad_check(F.qa, STAGE_PV_LOSS_KL, 0);
}

static void test_grad_ce(void **state)
{
    (void)state;
    grad_check(F.qa, STAGE_PV_LOSS_CE, 0);
}

static void test_grad_shared(void **state)
{
    (void)state;
    grad_check(F.qs, STAGE_PV_LOSS_KL, 0);
}

/* One codebook per linear type (quant.share_codebooks = type). */
static void test_grad_shared_type(void **state)
{
    (void)state;
    grad_check(F.qt, STAGE_PV_LOSS_KL, 0);
}

/* pvtune.train_embeddings: the tied embedding table's gradient (classifier
 * and input parts) too, per-matrix codebooks with KL and shared with CE. */
static void test_grad_emb(void **state)
{
    (void)state;
    grad_check(F.qa, STAGE_PV_LOSS_KL, 1);
    grad_check(F.qs, STAGE_PV_LOSS_CE, 1);
}

/* The student forward is the dequantized model's kern_model_forward: the
 * PV loss equals the KL computed from kern_model_forward's logits. */
static void test_forward_matches(void **state)
{
    (void)state;
    const int B = 3, T = 16, V = F.fp->cfg.vocab_size;
    const int32_t *tok = F.toks + 5000;
    stage_pv *pv = NULL;
    assert_int_equal(stage_pv_init(&pv, F.fp, F.qa, B, T, NULL), LV_OK);
    double loss = 0;
    assert_int_equal(stage_pv_grad(pv, tok, B, &loss, NULL), LV_OK);
    lv_model *dq = NULL;
    kern_fwd_ws *ws = NULL, *wt = NULL;
    const float *ls = NULL, *lt = NULL;
    assert_int_equal(io_qmodel_to_fp(F.qa, &dq), LV_OK);
    assert_int_equal(kern_fwd_ws_init(&ws, &F.fp->cfg, B, T, 1), LV_OK);
    assert_int_equal(kern_fwd_ws_init(&wt, &F.fp->cfg, B, T, 1), LV_OK);
    assert_int_equal(kern_model_forward(dq, tok, B, T, ws, &ls), LV_OK);
    assert_int_equal(kern_model_forward(F.fp, tok, B, T, wt, &lt), LV_OK);
    double kl = 0;
    for (int64_t i = 0; i < (int64_t)B * T; i++) {
        const float *z = ls + i * V, *zt = lt + i * V;
        double ms = -INFINITY, mt = -INFINITY, ss = 0, st = 0;
        for (int v = 0; v < V; v++) ms = z[v] > ms ? z[v] : ms, mt = zt[v] > mt ? zt[v] : mt;
        for (int v = 0; v < V; v++) ss += exp(z[v] - ms), st += exp(zt[v] - mt);
        for (int v = 0; v < V; v++) {
            const double a = zt[v] - mt - log(st), b = z[v] - ms - log(ss);
            kl += exp(a) * (a - b);
        }
    }
    kl /= (double)B * T;
    printf("  PV loss %.12g, KL from kern_model_forward logits %.12g\n", loss, kl);
    assert_true(fabs(loss - kl) <= 1e-9 * kl);
    kern_fwd_ws_free(ws);
    kern_fwd_ws_free(wt);
    io_model_free(dq);
    stage_pv_free(pv);
}

/* One V step lowers the loss on the batch it used; shared copies stay identical. */
static void test_vstep(void **state)
{
    (void)state;
    const int B = 4, T = 32;
    const int32_t *tok = F.toks + 2000;
    for (int sh = 0; sh < 3; sh++) {
        const lv_qmodel *q0 = sh == 2 ? F.qt : sh ? F.qs : F.qa;
        lv_qmodel *q = qcopy(F.fp, q0);
        stage_pv *pv = NULL;
        stage_pv_config cfg = {.lr = 1e-3f};
        assert_int_equal(stage_pv_init(&pv, F.fp, q, 2, T, &cfg), LV_OK);
        double before = 0, after = 0, again = 0;
        assert_int_equal(stage_pv_vstep(pv, tok, B, &before), LV_OK);
        assert_int_equal(stage_pv_grad(pv, tok, B, &after, NULL), LV_OK);
        assert_int_equal(stage_pv_vstep(pv, tok, B, &again), LV_OK);
        printf("  %s: V step KL %.6f -> %.6f (the next step measured %.6f)\n",
               sh == 2 ? "shared per type" : sh ? "shared" : "per-linear", before, after, again);
        assert_true(after < before);
        assert_memory_equal(&after, &again, sizeof(double)); /* vstep's loss is the loss before */
        assert_int_equal(groups_changed(q, q0), 0);
        if (sh) assert_true(shared_identical(q));
        stage_pv_free(pv);
        lv_qmodel_free(q);
    }
}

/* A P step changes at most its budget of groups (counted independently) and
 * lowers its objective; a negative budget changes nothing; a full H too. */
static void test_pstep(void **state)
{
    (void)state;
    const int B = 2, T = 32;
    const int32_t *tok = F.toks + 3000;
    const lv_model_config *c = &F.fp->cfg;
    /* a random SPD metric per linear: A A^T / n + 0.1 I, shared by shapes */
    float *Hd = malloc(sizeof(float) * (size_t)(c->dim * c->dim));
    float *Hh = malloc(sizeof(float) * (size_t)(c->hidden_dim * c->hidden_dim));
    assert_true(Hd && Hh);
    lv_rng r;
    lv_rng_seed(&r, 3);
    for (int pass = 0; pass < 2; pass++) {
        const int d = pass ? c->hidden_dim : c->dim;
        float *H = pass ? Hh : Hd, *A = malloc(sizeof(float) * (size_t)(d * d));
        assert_non_null(A);
        for (int64_t j = 0; j < (int64_t)d * d; j++) A[j] = lv_rng_normal(&r);
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                double s = 0;
                for (int t = 0; t < d; t++) s += (double)A[i * d + t] * A[j * d + t];
                H[i * d + j] = (float)(s / d + (i == j ? 0.1 : 0.0));
            }
        free(A);
    }
    const float *Hs[64 * LV_LIN_COUNT];
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            Hs[l * LV_LIN_COUNT + k] = k == LV_LIN_W2 ? Hh : Hd;

    struct {
        const char *name;
        const lv_qmodel *q;
        double budget;
        const float *const *H;
        int diag, check;
    } cases[] = {
        {"per-linear, identity H", F.qa, 1e-3, NULL, 0, -1},
        {"shared, identity H", F.qs, 1e-3, NULL, 0, -1},
        {"per-linear, full H", F.qa, 1e-3, Hs, 0, -1},
        {"per-linear, diagonal H", F.qa, 2e-3, Hs, 1, -1},
        {"per-linear, budget < 0", F.qa, -1.0, NULL, 0, -1},
        {"per-linear, checked", F.qa, 2e-3, NULL, 0, 0},
        {"shared, checked", F.qs, 2e-3, NULL, 0, 0},
    };
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        lv_qmodel *q = qcopy(F.fp, cases[ci].q);
        stage_pv *pv = NULL;
        stage_pv_config cfg = {.p_lr = 1.0f, .p_budget = cases[ci].budget, .p_beam = 4,
                               .p_hessians = cases[ci].H, .p_hess_diag = cases[ci].diag,
                               .p_check = cases[ci].check};
        assert_int_equal(stage_pv_init(&pv, F.fp, q, 2, T, &cfg), LV_OK);
        stage_pv_pstats ps;
        assert_int_equal(stage_pv_pstep(pv, tok, B, &ps), LV_OK);
        const int64_t changed = groups_changed(q, cases[ci].q);
        printf("  %-24s %lld of %lld groups changed (budget %lld, %lld proposed, %lld rows put "
               "back, %d halvings), objective %.6g -> %.6g, batch KL %.6f -> %.6f, %.2f s\n",
               cases[ci].name, (long long)changed, (long long)ps.n_groups, (long long)ps.budget,
               (long long)ps.n_proposed, (long long)ps.n_reverted_rows, ps.n_halvings,
               ps.obj_before, ps.obj_after, ps.loss, ps.loss_after, ps.wall_s);
        assert_int_equal(changed, ps.n_changed);
        assert_true(ps.budget == (cases[ci].budget < 0 ? 0 : (int64_t)floor(cases[ci].budget * (double)ps.n_groups)));
        assert_true(changed <= ps.budget);
        assert_true(ps.obj_after <= ps.obj_before);
        if (cases[ci].check < 0) {
            assert_true(isnan(ps.loss_after));
            if (ps.budget > 0) assert_true(changed > 0 && ps.obj_after < ps.obj_before);
            else assert_true(qsame(q, cases[ci].q));
        } else { /* the batch loss, recomputed, did not rise */
            double now = 0;
            assert_int_equal(stage_pv_grad(pv, tok, B, &now, NULL), LV_OK);
            assert_memory_equal(&now, &ps.loss_after, sizeof(double));
            assert_true(ps.loss_after <= ps.loss);
            if (!changed) assert_true(qsame(q, cases[ci].q));
        }
        if (cases[ci].q->shared_codebooks) assert_true(shared_identical(q));
        /* the same step on another copy: the same codes */
        lv_qmodel *q2 = qcopy(F.fp, cases[ci].q);
        stage_pv *pv2 = NULL;
        assert_int_equal(stage_pv_init(&pv2, F.fp, q2, 2, T, &cfg), LV_OK);
        assert_int_equal(stage_pv_pstep(pv2, tok, B, NULL), LV_OK);
        assert_true(qsame(q, q2));
        stage_pv_free(pv2);
        lv_qmodel_free(q2);
        stage_pv_free(pv);
        lv_qmodel_free(q);
    }
    free(Hd);
    free(Hh);
}

/* The driver: improves the held-out loss; same seed twice (at 1 and 2
 * threads) gives bit-identical models and stats; another seed differs; shared
 * copies stay identical. */
static void test_tune_deterministic(void **state)
{
    (void)state;
    const int n_seq = 12, T = 32;
    const int32_t *tok = F.toks + 10000;
    stage_pv_config cfg = {.lr = 1e-3f, .batch_seqs = 4, .micro_batch = 2, .max_epochs = 2,
                           .eval_every = 2, .holdout_frac = 0.25, .p_every = 2,
                           .p_lr = 0.05f, .p_budget = 5e-4, .p_beam = 2, .seed = 7};
    for (int sh = 0; sh < 2; sh++) {
        const lv_qmodel *q0 = sh ? F.qs : F.qa;
        lv_qmodel *a = qcopy(F.fp, q0), *b = qcopy(F.fp, q0), *d = qcopy(F.fp, q0);
        stage_pv_stats sa, sb, sd;
        const int threads = omp_get_max_threads();
        assert_int_equal(stage_pv_tune(F.fp, a, tok, n_seq, T, &cfg, &sa), LV_OK);
        omp_set_num_threads(threads == 1 ? 2 : 1);
        assert_int_equal(stage_pv_tune(F.fp, b, tok, n_seq, T, &cfg, &sb), LV_OK);
        omp_set_num_threads(threads);
        printf("  %s: held-out KL %.6f -> %.6f (best after %lld of %lld V steps, %lld P steps, "
               "%lld groups changed), %.2f s; rerun at %d threads %.6f\n",
               sh ? "shared" : "per-linear", sa.loss_before, sa.loss_after,
               (long long)sa.best_step, (long long)sa.v_steps, (long long)sa.p_steps,
               (long long)sa.codes_changed, sa.wall_s, threads == 1 ? 2 : 1, sb.loss_after);
        assert_int_equal(sa.n_holdout, 3);
        assert_true(sa.loss_after < sa.loss_before);
        assert_true(sa.best_step > 0);
        assert_true(qsame(a, b));
        assert_memory_equal(&sa.loss_after, &sb.loss_after, sizeof(double));
        assert_memory_equal(&sa.train_loss, &sb.train_loss, sizeof(double));
        assert_int_equal(sa.codes_changed, sb.codes_changed);
        if (sh) assert_true(shared_identical(a));
        stage_pv_config other = cfg;
        other.seed = 8;
        assert_int_equal(stage_pv_tune(F.fp, d, tok, n_seq, T, &other, &sd), LV_OK);
        assert_false(qsame(a, d));
        lv_qmodel_free(a);
        lv_qmodel_free(b);
        lv_qmodel_free(d);
    }
}

/* A deep copy of a checkpointed state (the driver's buffers are borrowed). */
typedef struct {
    stage_pv_state st;
    float *m, *v, *bp;
    uint16_t *bc;
    int64_t *perm;
    lv_qmodel *q;      /* the model at that state */
    const lv_model *fp;
    lv_qmodel *live;   /* the model being tuned */
    int64_t at_step;   /* copy the state after this many V steps */
    int64_t stop_at;   /* stop() says yes after this many V steps (0: never) */
    int calls, polls;
} ckpt_copy;

static lv_status ck_save(void *user, const stage_pv_state *s)
{
    ckpt_copy *c = user;
    c->calls++;
    if (s->stats.v_steps != c->at_step) return LV_OK;
    c->st = *s;
    c->m = malloc(sizeof(float) * (size_t)s->n_param);
    c->v = malloc(sizeof(float) * (size_t)s->n_param);
    c->bp = malloc(sizeof(float) * (size_t)s->n_param);
    c->bc = malloc(sizeof(uint16_t) * (size_t)s->n_codes);
    c->perm = malloc(sizeof(int64_t) * (size_t)s->n_train);
    assert_true(c->m && c->v && c->bp && c->bc && c->perm);
    memcpy(c->m, s->m, sizeof(float) * (size_t)s->n_param);
    memcpy(c->v, s->v, sizeof(float) * (size_t)s->n_param);
    memcpy(c->bp, s->best_param, sizeof(float) * (size_t)s->n_param);
    memcpy(c->bc, s->best_codes, sizeof(uint16_t) * (size_t)s->n_codes);
    memcpy(c->perm, s->perm, sizeof(int64_t) * (size_t)s->n_train);
    c->st.m = c->m, c->st.v = c->v, c->st.best_param = c->bp, c->st.best_codes = c->bc;
    c->st.perm = c->perm;
    c->q = qcopy(c->fp, c->live);
    return LV_OK;
}

static int ck_stop(void *user)
{
    ckpt_copy *c = user;
    return c->stop_at > 0 && ++c->polls >= c->stop_at;
}

static void ck_free(ckpt_copy *c)
{
    free(c->m);
    free(c->v);
    free(c->bp);
    free(c->bc);
    free(c->perm);
    lv_qmodel_free(c->q);
}

/* Checkpoint after V step k (mid-epoch, at an epoch end, through a stop
 * request) and resume: bit-identical to the run straight through. */
static void test_resume(void **state)
{
    (void)state;
    const int n_seq = 12, T = 32;
    const int32_t *tok = F.toks + 10000;
    stage_pv_config cfg = {.lr = 1e-3f, .batch_seqs = 3, .micro_batch = 2, .max_epochs = 3,
                           .eval_every = 0, .holdout_frac = 0.25, .p_every = 2,
                           .p_lr = 0.2f, .p_budget = 1e-3, .p_beam = 2, .p_check = -1,
                           .seed = 11};
    for (int sh = 0; sh < 2; sh++) {
        const lv_qmodel *q0 = sh ? F.qs : F.qa;
        lv_qmodel *a = qcopy(F.fp, q0);
        stage_pv_stats sa;
        assert_int_equal(stage_pv_tune(F.fp, a, tok, n_seq, T, &cfg, &sa), LV_OK);
        assert_true(sa.v_steps == 9 && sa.best_step > 0);
        /* 3 V steps per epoch: after step 2 (mid-epoch), 3 (epoch end), 4 via stop() */
        const int64_t at[3] = {2, 3, 4};
        for (int i = 0; i < 3; i++) {
            lv_qmodel *b = qcopy(F.fp, q0);
            ckpt_copy ck = {.fp = F.fp, .live = b, .at_step = at[i], .stop_at = i == 2 ? 4 : 0};
            stage_pv_config c1 = cfg;
            c1.ckpt = ck_save;
            c1.ckpt_user = &ck;
            c1.ckpt_every = i == 2 ? 0 : 1;
            c1.stop = ck_stop;
            stage_pv_stats sb, sc;
            const lv_status st1 = stage_pv_tune(F.fp, b, tok, n_seq, T, &c1, &sb);
            if (i == 2) {
                assert_int_equal(st1, LV_ERR_STOPPED);
                assert_int_equal(ck.calls, 1);
                assert_true(qsame(b, ck.q)); /* q left at the checkpointed state */
            } else {
                assert_int_equal(st1, LV_OK);
                assert_true(qsame(a, b)); /* checkpoints do not change the run */
                assert_int_equal(ck.calls, 9);
            }
            assert_non_null(ck.q);
            stage_pv_config c2 = cfg;
            c2.resume = &ck.st;
            assert_int_equal(stage_pv_tune(F.fp, ck.q, tok, n_seq, T, &c2, &sc), LV_OK);
            assert_true(qsame(a, ck.q));
            assert_memory_equal(&sa.loss_after, &sc.loss_after, sizeof(double));
            assert_memory_equal(&sa.train_loss, &sc.train_loss, sizeof(double));
            assert_int_equal(sa.v_steps, sc.v_steps);
            assert_int_equal(sa.p_steps, sc.p_steps);
            assert_int_equal(sa.best_step, sc.best_step);
            assert_int_equal(sa.codes_changed, sc.codes_changed);
            assert_int_equal(sa.epochs, sc.epochs);
            /* a state that does not fit this run */
            stage_pv_state bad = ck.st;
            bad.n_train = 5;
            c2.resume = &bad;
            lv_qmodel *d = qcopy(F.fp, q0);
            assert_int_equal(stage_pv_tune(F.fp, d, tok, n_seq, T, &c2, NULL), LV_ERR_INVALID_ARG);
            assert_true(qsame(d, q0)); /* untouched */
            lv_qmodel_free(d);
            ck_free(&ck);
            lv_qmodel_free(b);
        }
        printf("  %s: checkpoint after V step 2, 3 (epoch end), 4 (stop request) and resume: "
               "bit-identical (held-out KL %.6f -> %.6f, %lld P steps, %lld groups changed)\n",
               sh ? "shared" : "per-linear", sa.loss_before, sa.loss_after, (long long)sa.p_steps,
               (long long)sa.codes_changed);
        lv_qmodel_free(a);
    }
}

/* A rate that only makes things worse: the model comes back as it was. */
static void test_never_worse(void **state)
{
    (void)state;
    const int n_seq = 6, T = 16;
    const int32_t *tok = F.toks + 20000;
    stage_pv_config cfg = {.lr = 5.0f, .batch_seqs = 2, .micro_batch = 2, .max_epochs = 2,
                           .holdout_frac = 0.34, .p_every = 1, .p_lr = 100.0f, .p_budget = 0.05,
                           .p_beam = 1, .patience = 1};
    lv_qmodel *q = qcopy(F.fp, F.qa);
    stage_pv_stats sx;
    assert_int_equal(stage_pv_tune(F.fp, q, tok, n_seq, T, &cfg, &sx), LV_OK);
    printf("  lr 5, p_lr 100: held-out KL %.4g -> %.4g, best step %lld, %d epochs, %lld V / %lld "
           "P steps%s\n", sx.loss_before, sx.loss_after, (long long)sx.best_step, sx.epochs,
           (long long)sx.v_steps, (long long)sx.p_steps, sx.diverged ? " (diverged)" : "");
    assert_true(sx.loss_after <= sx.loss_before);
    assert_int_equal(sx.best_step, 0);
    assert_true(qsame(q, F.qa));
    lv_qmodel_free(q);
}

static void test_errors(void **state)
{
    (void)state;
    const int T = 8;
    stage_pv *pv = NULL;
    stage_pv_stats sx;
    stage_pv_config bad = {.holdout_frac = 1.0};
    assert_int_equal(stage_pv_init(&pv, NULL, F.qa, 1, T, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_pv_init(&pv, F.fp, F.qa, 0, T, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_pv_init(&pv, F.fp, F.qa, 1, F.fp->cfg.seq_len + 1, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_pv_init(&pv, F.fp, F.qa, 1, T, &bad), LV_ERR_INVALID_ARG);
    stage_pv_config ce = {.loss = STAGE_PV_LOSS_CE};
    assert_int_equal(stage_pv_init(&pv, F.fp, F.qa, 1, 1, &ce), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_pv_tune(F.fp, F.qa, F.toks, 0, T, NULL, &sx), LV_ERR_INVALID_ARG);
    /* another shape */
    lv_model other = *F.fp;
    other.cfg.hidden_dim = 100;
    assert_int_equal(stage_pv_init(&pv, &other, F.qa, 1, T, NULL), LV_ERR_INVALID_ARG);
    printf("  wrong shape: %s\n", lv_last_error());
    /* claims shared codebooks, but the copies differ */
    lv_qmodel *q = qcopy(F.fp, F.qs);
    const float cb5 = q->blocks[3].lin[LV_LIN_W2].codebooks[5];
    q->blocks[3].lin[LV_LIN_W2].codebooks[5] = cb5 + 1.0f;
    assert_int_equal(stage_pv_init(&pv, F.fp, q, 1, T, NULL), LV_ERR_INVALID_ARG);
    printf("  copies differ: %s\n", lv_last_error());
    q->blocks[3].lin[LV_LIN_W2].codebooks[5] = cb5;
    /* one tensor per linear type, claimed as ONE tensor for the model */
    lv_qmodel *qt = qcopy(F.fp, F.qt);
    qt->shared_codebooks = LV_SHARE_MODEL;
    assert_int_equal(stage_pv_init(&pv, F.fp, qt, 1, T, NULL), LV_ERR_INVALID_ARG);
    printf("  per-type tensors claimed as one: %s\n", lv_last_error());
    assert_non_null(strstr(lv_last_error(), "block 0 wk"));
    lv_qmodel_free(qt);
    /* a code out of range */
    const uint16_t c0 = q->blocks[1].lin[LV_LIN_WK].codes[7];
    q->blocks[1].lin[LV_LIN_WK].codes[7] = 64;
    assert_int_equal(stage_pv_init(&pv, F.fp, q, 1, T, NULL), LV_ERR_INVALID_ARG);
    q->blocks[1].lin[LV_LIN_WK].codes[7] = c0;
    /* LoRA adapters (ApiQ): PV-tuning trains What only */
    assert_int_equal(lv_qblock_lora_init(&q->blocks[2], 2), LV_OK);
    assert_int_equal(stage_pv_init(&pv, F.fp, q, 1, T, NULL), LV_ERR_UNSUPPORTED);
    lv_qblock_lora_free(&q->blocks[2]);
    /* tokens outside the vocabulary */
    assert_int_equal(stage_pv_init(&pv, F.fp, q, 1, T, NULL), LV_OK);
    int32_t bad_tok[8] = {1, 2, 3, 4, 5, 6, 7, 512};
    double loss;
    assert_int_equal(stage_pv_grad(pv, bad_tok, 1, &loss, NULL), LV_ERR_INVALID_ARG);
    assert_int_equal(stage_pv_vstep(pv, bad_tok, 1, &loss), LV_ERR_INVALID_ARG);
    assert_true(qsame(q, F.qs));
    stage_pv_free(pv);
    stage_pv_free(NULL);
    lv_qmodel_free(q);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_matches), cmocka_unit_test(test_grad_kl),
        cmocka_unit_test(test_grad_ce),         cmocka_unit_test(test_grad_shared),
        cmocka_unit_test(test_grad_shared_type), cmocka_unit_test(test_grad_emb),
        cmocka_unit_test(test_vstep),           cmocka_unit_test(test_pstep),
        cmocka_unit_test(test_tune_deterministic), cmocka_unit_test(test_resume),
        cmocka_unit_test(test_never_worse),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
