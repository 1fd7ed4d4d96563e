/* aqlm.c: AQLM layer-wise quantization (arXiv 2401.06118): additive codebooks,
 * instance-aware beam search over codes minimising tr((W - What) H (W - What)^T),
 * codebook updates by Adam or closed-form least squares, per-row scales.
 *
 * Every step (codebook update, scale refit, beam search) keeps its input when
 * its result would be worse, so the objective never increases. Workspaces are
 * allocated once per public call (stage_aq_ws), never per iteration. Codebook
 * updates work on a stage_aq_set (layers sharing one codebook tensor, weighted);
 * a single layer is the set of one, and stage_aqlm_run is aqlm_shared.c's
 * stage_aqlm_run_shared with n = 1. */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include <cblas.h>

#include "kern.h"
#include "stage_impl.h"

/* LAPACK (shipped inside OpenBLAS): Cholesky solve of a symmetric PD system. */
extern void dposv_(const char *uplo, const int *n, const int *nrhs, double *a, const int *lda,
                   double *b, const int *ldb, int *info);

#define AQ_LSTSQ_MAX_PARAMS 8192
#define AQ_ADAM_BETA2 0.95
#define AQ_ADAM_EPS 1e-10

/* ---------------------------------------------------------------- layer */

lv_status stage_aqlm_dequant(const stage_aqlm_layer *L, float *What)
{
    lv_status st = LV_OK;
    if (!L || !L->codes || !What) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: dequant needs L and What");
    kern_aq_dequant_ref(What, L->codes, L->codebooks, L->scales, L->d_out, L->d_in,
                        L->n_groups, L->M, 1 << L->nbits, L->g);
done:
    return st;
}

double stage_aqlm_bits_per_weight(const stage_aqlm_layer *L)
{
    if (!L || L->d_out <= 0 || L->d_in <= 0) return 0.0;
    double codes = (double)L->d_out * (double)L->n_groups * L->M * L->nbits;
    double books = (double)L->M * (double)((int64_t)1 << L->nbits) * L->g * 16.0;
    double scales = (double)L->d_out * 16.0;
    return (codes + books + scales) / ((double)L->d_out * (double)L->d_in);
}

/* rowdot[r] = sum_j A[r, j] B[r, j] in double; total summed serially. */
static double rows_dot(const float *A, const float *B, int64_t rows, int64_t cols,
                       double *rowdot)
{
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        double acc = 0.0;
        for (int64_t j = 0; j < cols; j++) acc += (double)A[r * cols + j] * B[r * cols + j];
        rowdot[r] = acc;
    }
    double total = 0.0;
    for (int64_t r = 0; r < rows; r++) total += rowdot[r];
    return total;
}

/* C (rows, n) = A (rows, n) @ H (n, n); H symmetric. */
static void gemm_h(float *C, const float *A, const float *H, int64_t rows, int64_t n)
{
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows, (int)n, (int)n, 1.0f, A,
                (int)n, H, (int)n, 0.0f, C, (int)n);
}

lv_status stage_aqlm_layer_error(const float *W, const float *What, const float *H,
                                 int64_t d_out, int64_t d_in, double *rel)
{
    lv_status st = LV_OK;
    float *E = NULL, *EH = NULL;
    double *rowdot = NULL;
    if (!W || !What || !H || !rel || d_out <= 0 || d_in <= 0 || d_out > INT32_MAX / 2 ||
        d_in > INT32_MAX / 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: layer_error bad arguments");
    LV_ALLOC(E, d_out * d_in);
    LV_ALLOC(EH, d_out * d_in);
    LV_ALLOC(rowdot, d_out);
    gemm_h(EH, W, H, d_out, d_in);
    double ref = rows_dot(W, EH, d_out, d_in, rowdot);
    for (int64_t t = 0; t < d_out * d_in; t++) E[t] = W[t] - What[t];
    gemm_h(EH, E, H, d_out, d_in);
    double err = rows_dot(E, EH, d_out, d_in, rowdot);
    if (!(ref > 0.0)) LV_FAIL(LV_ERR_NUMERIC, "aqlm: tr(W H W^T) = %g is not positive", ref);
    *rel = err / ref;
done:
    free(rowdot);
    free(EH);
    free(E);
    return st;
}

/* ---------------------------------------------------------------- workspace */

void stage_aq_ws_free(stage_aq_ws *w)
{
    void *ptrs[] = {w->Q,  w->E,     w->EH,    w->rowdot, w->gC,   w->vC, w->vmC, w->gS,
                    w->vS, w->vmS,   w->bestC, w->bestS,  w->cnorm, w->beam, w->A, w->b};
    for (size_t i = 0; i < sizeof ptrs / sizeof ptrs[0]; i++) free(ptrs[i]);
    memset(w, 0, sizeof *w);
}

/* Per-thread beam-search scratch, carved from one block (doubles first). */
typedef struct {
    double *e_a, *e_b;        /* (B, d_pad) residual w - What of each hypothesis */
    double *loss_a, *loss_b;  /* (B) */
    double *u, *base;         /* (B, g), (B) */
    double *scores;           /* (B, K) */
    double *top_s;            /* (B) */
    int64_t *top_i;           /* (B) */
    uint16_t *codes_a, *codes_b; /* (B, n_groups * M) */
} aq_beam_scratch;

static size_t aq_beam_carve(aq_beam_scratch *s, unsigned char *base, int B, int64_t d_pad,
                            int g, int64_t K, int64_t gm)
{
    size_t off = 0;
#define AQ_CARVE(field, type, count)                                    \
    do {                                                                \
        if (base) s->field = (type *)(void *)(base + off);              \
        off += (((size_t)(count) * sizeof(type)) + 63) / 64 * 64;       \
    } while (0)
    AQ_CARVE(e_a, double, B * d_pad);
    AQ_CARVE(e_b, double, B * d_pad);
    AQ_CARVE(loss_a, double, B);
    AQ_CARVE(loss_b, double, B);
    AQ_CARVE(u, double, (int64_t)B * g);
    AQ_CARVE(base, double, B);
    AQ_CARVE(scores, double, B * K);
    AQ_CARVE(top_s, double, B);
    AQ_CARVE(top_i, int64_t, B);
    AQ_CARVE(codes_a, uint16_t, B * gm);
    AQ_CARVE(codes_b, uint16_t, B * gm);
#undef AQ_CARVE
    return off;
}

lv_status stage_aq_ws_init(stage_aq_ws *w, const stage_qprob *p, const stage_aqlm_layer *L,
                           int need, int beam_size)
{
    lv_status st = LV_OK;
    memset(w, 0, sizeof *w);
    const int64_t rc = p->d_out * p->d_pad;
    w->K = (int64_t)1 << L->nbits;
    w->N = L->M * w->K * L->g;
    LV_ALLOC(w->Q, rc);
    LV_ALLOC(w->E, rc);
    LV_ALLOC(w->EH, rc);
    LV_ALLOC(w->rowdot, p->d_out);
    const int cb_state = !(need & STAGE_AQ_LAYER_ONLY);
    if (cb_state) LV_ALLOC(w->bestC, w->N);
    LV_ALLOC(w->bestS, p->d_out);
    if ((need & STAGE_AQ_NEED_ADAM) && cb_state) {
        LV_ALLOC(w->gC, w->N);
        LV_ALLOC(w->vC, w->N);
        LV_ALLOC(w->vmC, w->N);
    }
    if (need & STAGE_AQ_NEED_ADAM) {
        LV_ALLOC(w->gS, p->d_out);
        LV_ALLOC(w->vS, p->d_out);
        LV_ALLOC(w->vmS, p->d_out);
    }
    if (need & STAGE_AQ_NEED_BEAM) {
        if (beam_size <= 0 || beam_size > 4096)
            LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: beam_size %d out of range 1..4096", beam_size);
        w->beam_size = beam_size;
        w->n_threads = omp_get_max_threads();
        aq_beam_scratch s;
        w->beam_bytes = aq_beam_carve(&s, NULL, beam_size, p->d_pad, L->g, w->K,
                                      p->n_groups * L->M);
        LV_ALLOC(w->cnorm, p->n_groups * L->M * w->K);
        LV_ALLOC(w->beam, w->beam_bytes * (size_t)w->n_threads);
    }
    if (need & STAGE_AQ_NEED_LSTSQ) {
        if (w->N > AQ_LSTSQ_MAX_PARAMS)
            LV_FAIL(LV_ERR_UNSUPPORTED,
                    "aqlm: least-squares codebook update needs M*2^nbits*g <= %d, have %lld; "
                    "use codebook_update = ADAM",
                    AQ_LSTSQ_MAX_PARAMS, (long long)w->N);
        if (cb_state) {
            LV_ALLOC(w->A, w->N * w->N);
            LV_ALLOC(w->b, w->N);
        }
    }
done:
    if (st != LV_OK) stage_aq_ws_free(w);
    return st;
}

/* Q = unscaled reconstruction, E = W - s*Q, EH = E H; returns the objective. */
double stage_aq_eval(const stage_qprob *p, const stage_aqlm_layer *L, stage_aq_ws *w)
{
    const int64_t dp = p->d_pad;
    kern_aq_dequant_ref(w->Q, L->codes, L->codebooks, NULL, p->d_out, dp, p->n_groups, L->M,
                        (int)w->K, L->g);
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p->d_out; r++)
        for (int64_t j = 0; j < dp; j++)
            w->E[r * dp + j] = p->W[r * dp + j] - L->scales[r] * w->Q[r * dp + j];
    gemm_h(w->EH, w->E, p->H, p->d_out, dp);
    return rows_dot(w->E, w->EH, p->d_out, dp, w->rowdot);
}

/* tr(W H W^T), using E/EH as scratch. */
double stage_aq_ref_norm(const stage_qprob *p, stage_aq_ws *w)
{
    gemm_h(w->EH, p->W, p->H, p->d_out, p->d_pad);
    return rows_dot(p->W, w->EH, p->d_out, p->d_pad, w->rowdot);
}

lv_status stage_aqlm_objective(const float *W, const float *H, const stage_aqlm_layer *L,
                               double *obj)
{
    lv_status st = LV_OK;
    stage_qprob p = {0};
    stage_aq_ws w = {0};
    if (!L || !obj) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: objective needs L and obj");
    LV_TRY(stage_qprob_init(&p, W, H, L->d_out, L->d_in, L->g));
    LV_TRY(stage_qprob_check_layer(&p, L));
    LV_TRY(stage_aq_ws_init(&w, &p, L, 0, 0));
    *obj = stage_aq_eval(&p, L, &w);
done:
    stage_aq_ws_free(&w);
    stage_qprob_free(&p);
    return st;
}

/* ---------------------------------------------------------------- scales */

/* s_r = (w_r H q_r^T) / (q_r H q_r^T), each row's exact minimiser; reverted as
 * a whole if the objective rose through rounding. Uses Q/E/EH. */
lv_status stage_aq_update_scales(const stage_qprob *p, stage_aqlm_layer *L, stage_aq_ws *w)
{
    const int64_t dp = p->d_pad;
    double before = stage_aq_eval(p, L, w);
    memcpy(w->bestS, L->scales, (size_t)p->d_out * sizeof(float));
    gemm_h(w->EH, w->Q, p->H, p->d_out, dp); /* EH <- Q H */
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p->d_out; r++) {
        double num = 0.0, den = 0.0;
        for (int64_t j = 0; j < dp; j++) {
            num += (double)p->W[r * dp + j] * w->EH[r * dp + j];
            den += (double)w->Q[r * dp + j] * w->EH[r * dp + j];
        }
        if (den > 0.0 && isfinite(num / den)) L->scales[r] = (float)(num / den);
    }
    double after = stage_aq_eval(p, L, w);
    if (!(after <= before)) memcpy(L->scales, w->bestS, (size_t)p->d_out * sizeof(float));
    return LV_OK;
}

lv_status stage_aqlm_update_scales(const float *W, const float *H, stage_aqlm_layer *L)
{
    lv_status st = LV_OK;
    stage_qprob p = {0};
    stage_aq_ws w = {0};
    if (!L) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: update_scales needs L");
    LV_TRY(stage_qprob_init(&p, W, H, L->d_out, L->d_in, L->g));
    LV_TRY(stage_qprob_check_layer(&p, L));
    LV_TRY(stage_aq_ws_init(&w, &p, L, 0, 0));
    LV_TRY(stage_aq_update_scales(&p, L, &w));
done:
    stage_aq_ws_free(&w);
    stage_qprob_free(&p);
    return st;
}

/* ---------------------------------------------------------------- sets of layers */

double stage_aq_set_eval(stage_aq_set *s)
{
    double obj = 0.0;
    for (int i = 0; i < s->n; i++) {
        double o = stage_aq_eval(&s->p[i], &s->L[i], &s->w[i]);
        obj += s->alpha ? s->alpha[i] * o : o;
    }
    return obj;
}

void stage_aq_set_broadcast(const stage_aq_set *s)
{
    for (int i = 0; i < s->n; i++)
        if (s->L[i].codebooks != s->C)
            memcpy(s->L[i].codebooks, s->C, (size_t)s->N * sizeof(float));
}

/* The set of one layer, its codebook state in its own workspace. */
static void aq_set_single(stage_aq_set *s, const stage_qprob *p, stage_aqlm_layer *L,
                          stage_aq_ws *w)
{
    memset(s, 0, sizeof *s);
    *s = (stage_aq_set){.n = 1, .p = p, .L = L, .w = w, .K = w->K, .N = w->N,
                        .C = L->codebooks, .gC = w->gC, .vC = w->vC, .vmC = w->vmC,
                        .bestC = w->bestC, .A = w->A, .b = w->b};
}

/* ---------------------------------------------------------------- Adam */

/* Gradients of alpha * objective from EH (= E H): dObj/dWhat = -2 E H.
 * gC[m, k, :] += sum over (r, i) with code k of alpha * s_r * G[r, group i]
 * (serial: fixed order, layers in set order); w->gS[r] = alpha * <G[r], Q[r]>. */
static void aq_grads(const stage_qprob *p, const stage_aqlm_layer *L, stage_aq_ws *w,
                     double alpha, double *gC)
{
    const int64_t dp = p->d_pad, G = p->n_groups;
    const int M = L->M, g = L->g;
    for (int64_t r = 0; r < p->d_out; r++) {
        const double s = L->scales[r];
        for (int64_t i = 0; i < G; i++) {
            const float *ehi = w->EH + r * dp + i * g;
            for (int m = 0; m < M; m++) {
                double *gc = gC + ((int64_t)m * w->K + L->codes[(r * G + i) * M + m]) * g;
                for (int a = 0; a < g; a++) gc[a] += alpha * (-2.0 * s * ehi[a]);
            }
        }
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < p->d_out; r++) {
        double acc = 0.0;
        for (int64_t j = 0; j < dp; j++) acc += (double)w->EH[r * dp + j] * w->Q[r * dp + j];
        w->gS[r] = alpha * (-2.0 * acc);
    }
}

/* Adam with beta1 = 0, beta2 = 0.95 and AMSGrad (the AQLM reference settings). */
static void adam_apply(float *x, const double *grad, double *v, double *vmax, int64_t n,
                       double lr, double bc2)
{
    for (int64_t t = 0; t < n; t++) {
        v[t] = AQ_ADAM_BETA2 * v[t] + (1.0 - AQ_ADAM_BETA2) * grad[t] * grad[t];
        if (v[t] > vmax[t]) vmax[t] = v[t];
        x[t] -= (float)(lr * grad[t] / (sqrt(vmax[t] / bc2) + AQ_ADAM_EPS));
    }
}

static void aq_set_save_best(stage_aq_set *s)
{
    memcpy(s->bestC, s->C, (size_t)s->N * sizeof(float));
    for (int i = 0; i < s->n; i++)
        memcpy(s->w[i].bestS, s->L[i].scales, (size_t)s->p[i].d_out * sizeof(float));
}

/* steps Adam updates of the shared codebooks (and every layer's scales unless
 * fixed) on the joint objective; keeps the best parameters seen, the starting
 * ones included. */
static lv_status aq_set_adam(stage_aq_set *s, double lr, int steps, int fix_scales)
{
    double best = DBL_MAX;
    for (int i = 0; i < s->n; i++) {
        double mean_s = 0.0;
        for (int64_t r = 0; r < s->p[i].d_out; r++) mean_s += fabs((double)s->L[i].scales[r]);
        s->w[i].mean_s = mean_s / (double)s->p[i].d_out;
    }
    for (int t = 0; t <= steps; t++) {
        double obj = stage_aq_set_eval(s);
        if (obj < best) {
            best = obj;
            aq_set_save_best(s);
        }
        if (t == steps || !isfinite(obj)) break;
        memset(s->gC, 0, (size_t)s->N * sizeof(double));
        for (int i = 0; i < s->n; i++)
            aq_grads(&s->p[i], &s->L[i], &s->w[i], s->alpha ? s->alpha[i] : 1.0, s->gC);
        s->adam_t++;
        double bc2 = 1.0 - pow(AQ_ADAM_BETA2, (double)s->adam_t);
        adam_apply(s->C, s->gC, s->vC, s->vmC, s->N, lr, bc2);
        stage_aq_set_broadcast(s);
        /* scales live in weight units: step relative to their mean size */
        for (int i = 0; i < s->n && !fix_scales; i++)
            adam_apply(s->L[i].scales, s->w[i].gS, s->w[i].vS, s->w[i].vmS, s->p[i].d_out,
                       lr * s->w[i].mean_s, bc2);
    }
    memcpy(s->C, s->bestC, (size_t)s->N * sizeof(float));
    stage_aq_set_broadcast(s);
    for (int i = 0; i < s->n; i++)
        memcpy(s->L[i].scales, s->w[i].bestS, (size_t)s->p[i].d_out * sizeof(float));
    return best < DBL_MAX ? LV_OK : LV_ERR_NUMERIC;
}

/* ---------------------------------------------------------------- least squares */

/* Adds alpha times the normal equations of one layer's objective in the
 * codebook entries (codes, scales fixed) to A (N, N) and b (N):
 * A[(m,k,a), (m',k',b)] += alpha sum_r s_r^2 sum_{i,j: codes} H[ig+a, jg+b],
 * b[(m,k,a)] += alpha sum_r s_r sum_i (W H)[r, ig+a]. Serial: fixed summation order. */
static void aq_lstsq_accum(const stage_qprob *p, const stage_aqlm_layer *L, stage_aq_ws *w,
                           double alpha, double *A, double *b)
{
    const int64_t dp = p->d_pad, G = p->n_groups, N = w->N;
    const int M = L->M, g = L->g;
    gemm_h(w->EH, p->W, p->H, p->d_out, dp); /* EH <- W H */
    for (int64_t r = 0; r < p->d_out; r++) {
        const double s = alpha * L->scales[r], s2 = s * L->scales[r];
        const uint16_t *cr = L->codes + r * G * M;
        for (int64_t i = 0; i < G; i++)
            for (int m = 0; m < M; m++) {
                int64_t pi = ((int64_t)m * w->K + cr[i * M + m]) * g;
                for (int a = 0; a < g; a++) b[pi + a] += s * w->EH[r * dp + i * g + a];
                for (int64_t j = 0; j < G; j++)
                    for (int m2 = 0; m2 < M; m2++) {
                        int64_t pj = ((int64_t)m2 * w->K + cr[j * M + m2]) * g;
                        for (int a = 0; a < g; a++) {
                            const float *hrow = p->H + (i * g + a) * dp + j * g;
                            double *arow = A + (pi + a) * N + pj;
                            for (int c = 0; c < g; c++) arow[c] += s2 * hrow[c];
                        }
                    }
            }
    }
}

static lv_status aq_set_lstsq(stage_aq_set *s)
{
    lv_status st = LV_OK;
    const int64_t N = s->N;
    if (!s->A || !s->b) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: least squares without workspace");
    double before = stage_aq_set_eval(s);
    memcpy(s->bestC, s->C, (size_t)N * sizeof(float));
    memset(s->A, 0, (size_t)(N * N) * sizeof(double));
    memset(s->b, 0, (size_t)N * sizeof(double));
    for (int i = 0; i < s->n; i++)
        aq_lstsq_accum(&s->p[i], &s->L[i], &s->w[i], s->alpha ? s->alpha[i] : 1.0, s->A, s->b);
    /* Ridge towards the current codebooks: unused entries (zero rows of A) stay
     * put and collinear ones stay solvable; lambda is tiny against the data. */
    double tr = 0.0;
    for (int64_t t = 0; t < N; t++) tr += s->A[t * N + t];
    double lam = 1e-10 * (tr > 0.0 ? tr / (double)N : 1.0) + 1e-300;
    for (int64_t t = 0; t < N; t++) {
        s->A[t * N + t] += lam;
        s->b[t] += lam * (double)s->C[t];
    }
    int n = (int)N, nrhs = 1, info = 0;
    dposv_("L", &n, &nrhs, s->A, &n, s->b, &n, &info);
    if (info != 0) LV_FAIL(LV_ERR_NUMERIC, "aqlm: least-squares solve failed (dposv info %d)", info);
    for (int64_t t = 0; t < N; t++) s->C[t] = (float)s->b[t];
    stage_aq_set_broadcast(s);
    double after = stage_aq_set_eval(s);
    if (!(after <= before)) {
        memcpy(s->C, s->bestC, (size_t)N * sizeof(float));
        stage_aq_set_broadcast(s);
    }
done:
    return st;
}

lv_status stage_aq_set_update_codebooks(stage_aq_set *s, const stage_aqlm_config *cfg)
{
    lv_status st = LV_OK;
    if (cfg->codebook_update == STAGE_AQLM_LSTSQ) {
        LV_TRY(aq_set_lstsq(s));
        /* each layer's refit lowers its own term, so the joint objective too */
        for (int i = 0; i < s->n && !cfg->no_scale_update; i++)
            LV_TRY(stage_aq_update_scales(&s->p[i], &s->L[i], &s->w[i]));
    } else if (cfg->codebook_update == STAGE_AQLM_ADAM) {
        double lr = cfg->adam_lr > 0.0f ? cfg->adam_lr : 1e-3;
        int steps = cfg->adam_steps > 0 ? cfg->adam_steps : 100;
        LV_TRY(aq_set_adam(s, lr, steps, cfg->no_scale_update));
    } else {
        LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: unknown codebook_update %d", (int)cfg->codebook_update);
    }
done:
    return st;
}

lv_status stage_aqlm_update_codebooks(const float *W, const float *H, stage_aqlm_layer *L,
                                      const stage_aqlm_config *cfg)
{
    lv_status st = LV_OK;
    stage_qprob p = {0};
    stage_aq_ws w = {0};
    stage_aq_set set;
    if (!L || !cfg) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: update_codebooks needs L and cfg");
    LV_TRY(stage_qprob_init(&p, W, H, L->d_out, L->d_in, L->g));
    LV_TRY(stage_qprob_check_layer(&p, L));
    int need = cfg->codebook_update == STAGE_AQLM_LSTSQ ? STAGE_AQ_NEED_LSTSQ : STAGE_AQ_NEED_ADAM;
    LV_TRY(stage_aq_ws_init(&w, &p, L, need, 0));
    aq_set_single(&set, &p, L, &w);
    LV_TRY(stage_aq_set_update_codebooks(&set, cfg));
done:
    stage_aq_ws_free(&w);
    stage_qprob_free(&p);
    return st;
}

/* ---------------------------------------------------------------- beam search */

/* cnorm[i, m, k] = c_mk^T H_ii c_mk for every group i (H_ii the g x g block). */
static void aq_codebook_hnorms(const stage_qprob *p, const stage_aqlm_layer *L, double *cnorm,
                               int64_t K)
{
    const int64_t dp = p->d_pad;
    const int M = L->M, g = L->g;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < p->n_groups; i++)
        for (int m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) {
                const float *c = L->codebooks + ((int64_t)m * K + k) * g;
                double acc = 0.0;
                for (int a = 0; a < g; a++) {
                    const float *hrow = p->H + (i * g + a) * dp + i * g;
                    double t = 0.0;
                    for (int b = 0; b < g; b++) t += (double)hrow[b] * c[b];
                    acc += (double)c[a] * t;
                }
                cnorm[(i * M + m) * K + k] = acc;
            }
}

/* e = w - s * q(codes) in double; returns e H e. */
static double aq_row_residual(const stage_qprob *p, const stage_aqlm_layer *L, int64_t K,
                              const float *wrow, const uint16_t *codes, double s, double *e)
{
    const int64_t dp = p->d_pad;
    const int M = L->M, g = L->g;
    for (int64_t i = 0; i < p->n_groups; i++)
        for (int a = 0; a < g; a++) {
            double q = 0.0;
            for (int m = 0; m < M; m++)
                q += L->codebooks[((int64_t)m * K + codes[i * M + m]) * g + a];
            e[i * g + a] = (double)wrow[i * g + a] - s * q;
        }
    double loss = 0.0;
    for (int64_t j = 0; j < dp; j++) {
        const float *hrow = p->H + j * dp;
        double t = 0.0;
        for (int64_t c = 0; c < dp; c++) t += (double)hrow[c] * e[c];
        loss += e[j] * t;
    }
    return loss;
}

/* Keep the nb best (score, flat index) candidates, ascending; candidates arrive
 * in increasing index order, so ties keep the lowest index (deterministic). */
static int aq_top_select(const double *scores, int64_t n, int B, double *top_s, int64_t *top_i)
{
    int cnt = 0;
    for (int64_t t = 0; t < n; t++) {
        double v = scores[t];
        if (!(v == v)) continue; /* NaN */
        if (cnt == B && v >= top_s[B - 1]) continue;
        int pos = cnt < B ? cnt++ : B - 1;
        while (pos > 0 && top_s[pos - 1] > v) {
            top_s[pos] = top_s[pos - 1];
            top_i[pos] = top_i[pos - 1];
            pos--;
        }
        top_s[pos] = v;
        top_i[pos] = t;
    }
    return cnt;
}

/* u[b] = (H e_b)_i + s H_ii c_a: the H-weighted residual of group i with
 * codebook m's current code removed; base[b] = loss without that code. */
static void aq_beam_prepare(const stage_qprob *p, const float *cb, const double *cn,
                            aq_beam_scratch *sc, int nb, int64_t i, int m, int M, int64_t gm,
                            double s)
{
    const int64_t dp = p->d_pad;
    const int g = p->g;
    for (int b = 0; b < nb; b++) {
        const double *e = sc->e_a + b * dp;
        const int a_code = sc->codes_a[b * gm + i * M + m];
        const float *ca = cb + (int64_t)a_code * g;
        double *ub = sc->u + (int64_t)b * g;
        double cur = 0.0;
        for (int a = 0; a < g; a++) {
            const float *hrow = p->H + (i * g + a) * dp;
            double t = 0.0;
            for (int64_t c = 0; c < dp; c++) t += (double)hrow[c] * e[c];
            double t2 = 0.0;
            for (int c = 0; c < g; c++) t2 += (double)hrow[i * g + c] * ca[c];
            ub[a] = t + s * t2;
            cur += (double)ca[a] * ub[a];
        }
        sc->base[b] = sc->loss_a[b] - (-2.0 * s * cur + s * s * cn[a_code]);
    }
}

/* Build the next beam from the selected candidates (parents in e_a/codes_a). */
static void aq_beam_advance(const stage_qprob *p, const float *cb, aq_beam_scratch *sc, int nt,
                            int64_t K, int64_t i, int m, int M, int64_t gm, double s)
{
    const int64_t dp = p->d_pad;
    const int g = p->g;
    for (int t = 0; t < nt; t++) {
        int64_t parent = sc->top_i[t] / K, k = sc->top_i[t] % K;
        uint16_t *cd = sc->codes_b + t * gm;
        double *ed = sc->e_b + t * dp;
        memcpy(cd, sc->codes_a + parent * gm, (size_t)gm * sizeof(uint16_t));
        memcpy(ed, sc->e_a + parent * dp, (size_t)dp * sizeof(double));
        const float *ca = cb + (int64_t)cd[i * M + m] * g, *ck = cb + k * g;
        for (int a = 0; a < g; a++) ed[i * g + a] += s * ((double)ca[a] - (double)ck[a]);
        cd[i * M + m] = (uint16_t)k;
        sc->loss_b[t] = sc->top_s[t];
    }
}

/* Beam search over one row's codes; returns candidate scores computed. */
static int64_t aq_beam_row(const stage_qprob *p, stage_aqlm_layer *L, const stage_aq_ws *w,
                           aq_beam_scratch *sc, int64_t r, const int64_t *gperm,
                           const int *mperm)
{
    const int64_t dp = p->d_pad, K = w->K, G = p->n_groups;
    const int M = L->M, B = w->beam_size;
    const int64_t gm = G * M;
    const double s = L->scales[r];
    const float *wrow = p->W + r * dp;
    uint16_t *codes = L->codes + r * gm;
    int64_t n_cand = 0;
    memcpy(sc->codes_a, codes, (size_t)gm * sizeof(uint16_t));
    const double loss0 = aq_row_residual(p, L, K, wrow, codes, s, sc->e_a);
    sc->loss_a[0] = loss0;
    int nb = 1;
    for (int64_t gi = 0; gi < G; gi++) {
        const int64_t i = gperm[gi];
        for (int mi = 0; mi < M; mi++) {
            const int m = mperm[mi];
            const float *cb = L->codebooks + (int64_t)m * K * L->g;
            const double *cn = w->cnorm + (i * M + m) * K;
            aq_beam_prepare(p, cb, cn, sc, nb, i, m, M, gm, s);
            kern_beam_score_ref(sc->scores, sc->base, sc->u, cb, cn, s, nb, (int)K, L->g);
            n_cand += nb * K;
            int nt = aq_top_select(sc->scores, nb * K, B, sc->top_s, sc->top_i);
            if (nt == 0) return n_cand; /* all NaN: keep the row's codes */
            aq_beam_advance(p, cb, sc, nt, K, i, m, M, gm, s);
            double *te = sc->e_a; sc->e_a = sc->e_b; sc->e_b = te;
            double *tl = sc->loss_a; sc->loss_a = sc->loss_b; sc->loss_b = tl;
            uint16_t *tc = sc->codes_a; sc->codes_a = sc->codes_b; sc->codes_b = tc;
            nb = nt;
        }
    }
    /* beam 0 is the best; accept it only if its exactly recomputed loss is no worse */
    double final = aq_row_residual(p, L, K, wrow, sc->codes_a, s, sc->e_b);
    if (final <= loss0) memcpy(codes, sc->codes_a, (size_t)gm * sizeof(uint16_t));
    return n_cand;
}

lv_status stage_aq_beam(const stage_qprob *p, stage_aqlm_layer *L, stage_aq_ws *w, uint64_t seed,
                         int64_t *n_candidates)
{
    lv_status st = LV_OK;
    int64_t *gperm = NULL;
    int mperm[64];
    const int64_t G = p->n_groups;
    LV_ALLOC(gperm, G);
    /* Visiting order of groups and codebooks: seeded shuffle (AQLM's dim_rng) */
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    for (int64_t i = 0; i < G; i++) gperm[i] = i;
    for (int64_t i = G - 1; i > 0; i--) {
        int64_t j = (int64_t)(lv_rng_u64(&rng) % (uint64_t)(i + 1)), t = gperm[i];
        gperm[i] = gperm[j];
        gperm[j] = t;
    }
    for (int m = 0; m < L->M; m++) mperm[m] = m;
    for (int m = L->M - 1; m > 0; m--) {
        int j = (int)(lv_rng_u64(&rng) % (uint64_t)(m + 1)), t = mperm[m];
        mperm[m] = mperm[j];
        mperm[j] = t;
    }
    aq_codebook_hnorms(p, L, w->cnorm, w->K);
    int64_t total = 0;
#pragma omp parallel num_threads(w->n_threads) reduction(+ : total)
    {
        int tid = omp_get_thread_num();
        aq_beam_scratch sc;
        aq_beam_carve(&sc, w->beam + (size_t)tid * w->beam_bytes, w->beam_size, p->d_pad, p->g,
                      w->K, G * L->M);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < p->d_out; r++) total += aq_beam_row(p, L, w, &sc, r, gperm, mperm);
    }
    if (n_candidates) *n_candidates += total;
done:
    free(gperm);
    return st;
}

lv_status stage_aqlm_beam_search(const float *W, const float *H, stage_aqlm_layer *L,
                                 int beam_size, uint64_t seed, int64_t *n_candidates)
{
    lv_status st = LV_OK;
    stage_qprob p = {0};
    stage_aq_ws w = {0};
    if (!L) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: beam_search needs L");
    LV_TRY(stage_qprob_init(&p, W, H, L->d_out, L->d_in, L->g));
    LV_TRY(stage_qprob_check_layer(&p, L));
    LV_TRY(stage_aq_ws_init(&w, &p, L, STAGE_AQ_NEED_BEAM, beam_size));
    LV_TRY(stage_aq_beam(&p, L, &w, seed, n_candidates));
done:
    stage_aq_ws_free(&w);
    stage_qprob_free(&p);
    return st;
}

/* ---------------------------------------------------------------- the stage */

lv_status stage_aq_check_config(const stage_aqlm_config *cfg)
{
    lv_status st = LV_OK;
    if (!cfg) LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: config is NULL");
    if (cfg->n_codebooks < 1 || cfg->n_codebooks > 64 || cfg->nbits < 1 || cfg->nbits > 16 ||
        cfg->group_size < 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: bad config %dx%dg%d (need 1..64 codebooks, "
                "1..16 bits, group >= 1)", cfg->n_codebooks, cfg->nbits, cfg->group_size);
    if (cfg->max_iters < 0 || cfg->beam_size < 0 || cfg->adam_steps < 0 || cfg->rel_tol < 0.0)
        LV_FAIL(LV_ERR_INVALID_ARG, "aqlm: negative max_iters, beam_size, adam_steps or rel_tol");
done:
    return st;
}

/* One layer is the set of one: stage_aqlm_run_shared (aqlm_shared.c) with
 * n = 1 and weight 1 is exactly the per-matrix algorithm. */
lv_status stage_aqlm_run(const float *W, const float *H, int64_t d_out, int64_t d_in,
                         const stage_aqlm_config *cfg, stage_aqlm_layer *out,
                         stage_aqlm_stats *stats)
{
    return stage_aqlm_run_shared(1, &W, &H, &d_out, &d_in, cfg, out, stats);
}
