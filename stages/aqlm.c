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
    lv_aq_outliers_add_w(L, What);
done:
    return st;
}

double stage_aqlm_bits_per_weight(const stage_aqlm_layer *L)
{
    if (!L || L->d_out <= 0 || L->d_in <= 0) return 0.0;
    double codes = (double)L->d_out * (double)L->n_groups * L->M * L->nbits;
    double books = (double)L->M * (double)((int64_t)1 << L->nbits) * L->g * 16.0;
    double scales = (double)L->d_out * 16.0;
    return (codes + books + scales + lv_aq_outliers_bits(L)) / ((double)L->d_out * (double)L->d_in);
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

/* Per-thread beam-search scratch, carved from one block (doubles first). The
 * hypotheses are kept as He = H e (e = w - What, the row's residual) in
 * visiting order (see the beam-search section). */
typedef struct {
    double *he_a, *he_b;      /* (B, d_pad) H e of each hypothesis, in visiting order */
    double *e, *he;           /* (d_pad) residual of one hypothesis and H e, natural order */
    double *loss_a, *loss_b;  /* (B) */
    double *u, *base;         /* (B, g), (B) */
    double *delta;            /* (B, g) change of e in the visited group, per new hypothesis */
    double *scores;           /* (B, K) */
    double *top_s;            /* (B) */
    int64_t *top_i;           /* (B) */
    int *moved;               /* (B) new hypotheses whose code changed */
    uint16_t *codes_a, *codes_b; /* (B, n_groups * M) */
    float *hg;                /* (g, d_pad) rows of H of the visited group, visiting order */
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
    AQ_CARVE(he_a, double, B * d_pad);
    AQ_CARVE(he_b, double, B * d_pad);
    AQ_CARVE(e, double, d_pad);
    AQ_CARVE(he, double, d_pad);
    AQ_CARVE(loss_a, double, B);
    AQ_CARVE(loss_b, double, B);
    AQ_CARVE(u, double, (int64_t)B * g);
    AQ_CARVE(base, double, B);
    AQ_CARVE(delta, double, (int64_t)B * g);
    AQ_CARVE(scores, double, B * K);
    AQ_CARVE(top_s, double, B);
    AQ_CARVE(top_i, int64_t, B);
    AQ_CARVE(moved, int, B);
    AQ_CARVE(codes_a, uint16_t, B * gm);
    AQ_CARVE(codes_b, uint16_t, B * gm);
    AQ_CARVE(hg, float, (int64_t)g * d_pad);
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

/* The search keeps, per hypothesis, He = H e (e = w - s q(codes) the row's
 * residual) instead of e: scoring a (group, codebook) step then needs only the
 * g entries of He in that group (O(g^2) per hypothesis, aq_beam_prepare), and
 * a step's cost moves to aq_beam_advance, which adds H[:, group] delta (delta:
 * the g-vector change of e) to the parent's He, an element-wise update that
 * vectorises without reordering any sum. He is stored in the visiting order
 * of the groups (position gi holds group gperm[gi]), so the groups this pass
 * still visits are the suffix from the current one and the update skips the
 * visited ones: half the work on average. The g rows of H it needs are
 * gathered into that order once per group and row (aq_beam_gather), so no
 * permuted copy of H is needed. */
typedef struct {
    const stage_qprob *p;  /* borrowed */
    const int64_t *gperm;  /* (n_groups) borrowed: group visited at each position */
    const float *cbT;      /* (M, g, K) codebooks transposed, so codes vectorise */
} aq_beam_ctx;

/* hg[a, q - pos] = H[i*g + a, orig(q)] for q >= pos = gi*g, orig(gj*g + c) = gperm[gj]*g + c. */
static void aq_beam_gather(const aq_beam_ctx *cx, int64_t gi, float *hg)
{
    const int64_t dp = cx->p->d_pad, G = cx->p->n_groups, i = cx->gperm[gi];
    const int g = cx->p->g;
    for (int a = 0; a < g; a++) {
        const float *hrow = cx->p->H + (i * g + a) * dp; /* (d_pad) */
        float *out = hg + a * dp;                         /* (d_pad - pos) used */
        const int64_t *gp = cx->gperm;
        /* constant sizes for the common g, so the copies inline (no call per group) */
        if (g == 8)
            for (int64_t gj = gi; gj < G; gj++) memcpy(out + (gj - gi) * 8, hrow + gp[gj] * 8, 32);
        else if (g == 4)
            for (int64_t gj = gi; gj < G; gj++) memcpy(out + (gj - gi) * 4, hrow + gp[gj] * 4, 16);
        else
            for (int64_t gj = gi; gj < G; gj++)
                memcpy(out + (gj - gi) * g, hrow + gp[gj] * g, (size_t)g * sizeof(float));
    }
}

/* y[q] = x[q] + sum_{a < nr} R[a*ld + q] d[a], q < n, summed in increasing a for
 * every q: no sum runs across q, so the SIMD width cannot change the result.
 * Rows go eight or four at a time (y stays in double between blocks, so the
 * order is the same as one row at a time); each block's loop has no inner
 * loop, which GCC needs to vectorise it. y may be x. */
static void aq_rows_axpy(double *y, const double *x, const float *R, int64_t ld,
                         const double *d, int nr, int64_t n)
{
    int a = 0;
    for (; a + 8 <= nr; a += 8) {
        const float *r0 = R + a * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        const float *r4 = r3 + ld, *r5 = r4 + ld, *r6 = r5 + ld, *r7 = r6 + ld;
        const double d0 = d[a], d1 = d[a + 1], d2 = d[a + 2], d3 = d[a + 3];
        const double d4 = d[a + 4], d5 = d[a + 5], d6 = d[a + 6], d7 = d[a + 7];
#pragma omp simd
        for (int64_t q = 0; q < n; q++)
            y[q] = x[q] + (double)r0[q] * d0 + (double)r1[q] * d1 + (double)r2[q] * d2 +
                   (double)r3[q] * d3 + (double)r4[q] * d4 + (double)r5[q] * d5 +
                   (double)r6[q] * d6 + (double)r7[q] * d7;
        x = y;
    }
    for (; a + 4 <= nr; a += 4) {
        const float *r0 = R + a * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        const double d0 = d[a], d1 = d[a + 1], d2 = d[a + 2], d3 = d[a + 3];
#pragma omp simd
        for (int64_t q = 0; q < n; q++)
            y[q] = x[q] + (double)r0[q] * d0 + (double)r1[q] * d1 + (double)r2[q] * d2 +
                   (double)r3[q] * d3;
        x = y;
    }
    for (; a < nr; a++) {
        const float *r0 = R + a * ld;
        const double d0 = d[a];
#pragma omp simd
        for (int64_t q = 0; q < n; q++) y[q] = x[q] + (double)r0[q] * d0;
        x = y;
    }
    if (x != y) memcpy(y, x, (size_t)n * sizeof(double)); /* nr == 0 */
}

/* aq_rows_axpy for two outputs at once (y, x, d) and (y2, x2, d2) sharing the
 * rows R, which are then loaded and converted once: per element the same
 * operations in the same order as two aq_rows_axpy calls. */
static void aq_rows_axpy2(double *y, const double *x, const double *d, double *y2,
                          const double *x2, const double *d2, const float *R, int64_t ld,
                          int nr, int64_t n)
{
    int a = 0;
    for (; a + 4 <= nr; a += 4) {
        const float *r0 = R + a * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        const double d0 = d[a], d1 = d[a + 1], dd2 = d[a + 2], d3 = d[a + 3];
        const double e0 = d2[a], e1 = d2[a + 1], e2 = d2[a + 2], e3 = d2[a + 3];
#pragma omp simd
        for (int64_t q = 0; q < n; q++) {
            const double h0 = r0[q], h1 = r1[q], h2 = r2[q], h3 = r3[q];
            y[q] = x[q] + h0 * d0 + h1 * d1 + h2 * dd2 + h3 * d3;
            y2[q] = x2[q] + h0 * e0 + h1 * e1 + h2 * e2 + h3 * e3;
        }
        x = y;
        x2 = y2;
    }
    for (; a < nr; a++) {
        const float *r0 = R + a * ld;
        const double d0 = d[a], e0 = d2[a];
#pragma omp simd
        for (int64_t q = 0; q < n; q++) {
            const double h0 = r0[q];
            y[q] = x[q] + h0 * d0;
            y2[q] = x2[q] + h0 * e0;
        }
        x = y;
        x2 = y2;
    }
    if (x != y) memcpy(y, x, (size_t)n * sizeof(double)); /* nr == 0 */
    if (x2 != y2) memcpy(y2, x2, (size_t)n * sizeof(double));
}

/* e = w - s q(codes) and sc->he = H e (natural order); he_v = the same H e in
 * visiting order (NULL: not wanted). Returns e H e. */
static double aq_row_residual(const aq_beam_ctx *cx, const stage_aqlm_layer *L, int64_t K,
                              const float *wrow, const uint16_t *codes, double s,
                              aq_beam_scratch *sc, double *he_v)
{
    const int64_t dp = cx->p->d_pad, G = cx->p->n_groups;
    const int M = L->M, g = L->g;
    double *e = sc->e, *he = sc->he;
    for (int64_t i = 0; i < G; i++)
        for (int a = 0; a < g; a++) {
            double q = 0.0;
            for (int m = 0; m < M; m++)
                q += L->codebooks[((int64_t)m * K + codes[i * M + m]) * g + a];
            e[i * g + a] = (double)wrow[i * g + a] - s * q;
        }
    memset(he, 0, (size_t)dp * sizeof(double));
    for (int64_t c = 0; c < dp; c += 8) { /* H symmetric: H e = sum_c H[c, :] e_c */
        int nr = dp - c < 8 ? (int)(dp - c) : 8;
        aq_rows_axpy(he, he, cx->p->H + c * dp, dp, e + c, nr, dp);
    }
    double loss = 0.0;
    for (int64_t q = 0; q < dp; q++) loss += e[q] * he[q];
    for (int64_t gi = 0; gi < G && he_v; gi++)
        memcpy(he_v + gi * g, he + cx->gperm[gi] * g, (size_t)g * sizeof(double));
    return loss;
}

/* Keep the B best (score, flat index) candidates, ascending; candidates arrive
 * in increasing index order, so ties keep the lowest index (deterministic).
 * bound: a score that at least B candidates do not exceed (INFINITY if not
 * known); a candidate above it is never among the B best, so skipping it
 * changes nothing. NaN scores are skipped. */
static int aq_top_select(const double *scores, int64_t n, int B, double bound, double *top_s,
                         int64_t *top_i)
{
    int cnt = 0;
    for (int64_t t = 0; t < n; t++) {
        if ((cnt == B || bound < INFINITY) && (t & 7) == 0 && t + 8 <= n) {
            /* skip 8 at once when none can enter (NaN compares false) */
            const double thr = cnt == B ? top_s[B - 1] : INFINITY;
            double in = 0.0; /* a count (exact in any order): GCC vectorises it */
#pragma omp simd reduction(+ : in)
            for (int64_t j = t; j < t + 8; j++)
                in += (scores[j] <= bound) & (scores[j] < thr) ? 1.0 : 0.0;
            if (in == 0.0) {
                t += 7;
                continue;
            }
        }
        double v = scores[t];
        if (!(v <= bound)) continue; /* also NaN */
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

/* u[b] = (H e_b)_i + s H_ii c_a: the H-weighted residual of group i (position
 * gi) with codebook m's current code a removed; base[b] = loss without it. */
static void aq_beam_prepare(const aq_beam_ctx *cx, const float *cb, const double *cn,
                            aq_beam_scratch *sc, int nb, int64_t gi, int64_t i, int m, int M,
                            int64_t gm, double s)
{
    const int64_t dp = cx->p->d_pad, pos = gi * cx->p->g;
    const int g = cx->p->g;
    const float *hii = cx->p->H + (i * g) * dp + i * g; /* (g, g), row stride d_pad */
    for (int b = 0; b < nb; b++) {
        const double *he = sc->he_a + b * dp + pos;
        const int a_code = sc->codes_a[b * gm + i * M + m];
        const float *ca = cb + (int64_t)a_code * g;
        double *ub = sc->u + (int64_t)b * g;
        double cur = 0.0;
        for (int a = 0; a < g; a++) {
            double t2 = 0.0;
            for (int c = 0; c < g; c++) t2 += (double)hii[a * dp + c] * ca[c];
            ub[a] = he[a] + s * t2;
            cur += (double)ca[a] * ub[a];
        }
        sc->base[b] = sc->loss_a[b] - (-2.0 * s * cur + s * s * cn[a_code]);
    }
}

/* kern_beam_score_ref on the transposed codebook cbT (g, K): per score the
 * same operations in the same order (dot from 0.0 in increasing a, then the
 * same expression), so bit-identical to it, but each pass runs over the K
 * codes and vectorises. */
void stage_aq_beam_score(double *scores, const double *base, const double *u, const float *cbT,
                         const double *cnorm, double s, int nb, int64_t K, int g)
{
    const double s2 = s * s;
    for (int b = 0; b < nb; b++) {
        const double *ub = u + (int64_t)b * g; /* (g) */
        double *sb = scores + (int64_t)b * K;  /* (K): the dots, then the scores */
        const double bb = base[b];
        if (g == 4 || g == 8) { /* the usual groups: one pass */
            const float *c0 = cbT, *c1 = c0 + K, *c2 = c1 + K, *c3 = c2 + K;
            const double u0 = ub[0], u1 = ub[1], u2 = ub[2], u3 = ub[3];
            if (g == 4) {
#pragma omp simd
                for (int64_t k = 0; k < K; k++) {
                    double dot = 0.0 + (double)c0[k] * u0 + (double)c1[k] * u1 +
                                 (double)c2[k] * u2 + (double)c3[k] * u3;
                    sb[k] = bb - 2.0 * s * dot + s2 * cnorm[k];
                }
                continue;
            }
            const float *c4 = c3 + K, *c5 = c4 + K, *c6 = c5 + K, *c7 = c6 + K;
            const double u4 = ub[4], u5 = ub[5], u6 = ub[6], u7 = ub[7];
#pragma omp simd
            for (int64_t k = 0; k < K; k++) {
                double dot = 0.0 + (double)c0[k] * u0 + (double)c1[k] * u1 +
                             (double)c2[k] * u2 + (double)c3[k] * u3 + (double)c4[k] * u4 +
                             (double)c5[k] * u5 + (double)c6[k] * u6 + (double)c7[k] * u7;
                sb[k] = bb - 2.0 * s * dot + s2 * cnorm[k];
            }
            continue;
        }
        memset(sb, 0, (size_t)K * sizeof(double));
        int a = 0;
        for (; a + 4 <= g; a += 4) { /* four terms a pass, still added one by one */
            const float *c0 = cbT + a * K, *c1 = c0 + K, *c2 = c1 + K, *c3 = c2 + K;
            const double u0 = ub[a], u1 = ub[a + 1], u2 = ub[a + 2], u3 = ub[a + 3];
#pragma omp simd
            for (int64_t k = 0; k < K; k++)
                sb[k] = sb[k] + (double)c0[k] * u0 + (double)c1[k] * u1 + (double)c2[k] * u2 +
                        (double)c3[k] * u3;
        }
        for (; a < g; a++) {
            const float *c0 = cbT + a * K; /* (K) */
            const double u0 = ub[a];
#pragma omp simd
            for (int64_t k = 0; k < K; k++) sb[k] += (double)c0[k] * u0;
        }
#pragma omp simd
        for (int64_t k = 0; k < K; k++) sb[k] = bb - 2.0 * s * sb[k] + s2 * cnorm[k];
    }
}

/* Build the next beam from the selected candidates (parents in he_a/codes_a).
 * He is brought up to date from position `from` on: the groups this pass
 * still visits. */
static void aq_beam_advance(const aq_beam_ctx *cx, const float *cb, aq_beam_scratch *sc,
                            int nt, int64_t K, int64_t gi, int64_t i, int m, int M, int64_t gm,
                            double s, int64_t from)
{
    const int64_t dp = cx->p->d_pad, pos = gi * cx->p->g, n = dp - from;
    const int g = cx->p->g;
    const float *R = sc->hg + (from - pos); /* (g, n), row stride d_pad */
    int *moved = sc->moved, n_moved = 0;
    for (int t = 0; t < nt; t++) {
        int64_t parent = sc->top_i[t] / K, k = sc->top_i[t] % K;
        uint16_t *cd = sc->codes_b + t * gm;
        memcpy(cd, sc->codes_a + parent * gm, (size_t)gm * sizeof(uint16_t));
        const float *ca = cb + (int64_t)cd[i * M + m] * g, *ck = cb + k * g;
        double *dt = sc->delta + (int64_t)t * g;
        int mv = 0;
        for (int a = 0; a < g; a++) {
            dt[a] = s * ((double)ca[a] - (double)ck[a]); /* e += delta */
            mv |= dt[a] != 0.0;
        }
        if (mv)
            moved[n_moved++] = t;
        else
            memcpy(sc->he_b + t * dp + from, sc->he_a + parent * dp + from,
                   (size_t)n * sizeof(double));
        cd[i * M + m] = (uint16_t)k;
        sc->loss_b[t] = sc->top_s[t];
    }
    /* He of the moved ones, two at a time (register blocking over hypotheses) */
    for (int j = 0; j < n_moved; j += 2) {
        const int t = moved[j];
        const double *x = sc->he_a + (sc->top_i[t] / K) * dp + from;
        double *y = sc->he_b + t * dp + from;
        if (j + 1 < n_moved) {
            const int t2 = moved[j + 1];
            aq_rows_axpy2(y, x, sc->delta + (int64_t)t * g, sc->he_b + t2 * dp + from,
                          sc->he_a + (sc->top_i[t2] / K) * dp + from,
                          sc->delta + (int64_t)t2 * g, R, dp, g, n);
        } else {
            aq_rows_axpy(y, x, R, dp, sc->delta + (int64_t)t * g, g, n);
        }
    }
}

/* Beam search over one row's codes; returns candidate scores computed. */
static int64_t aq_beam_row(const aq_beam_ctx *cx, stage_aqlm_layer *L, const stage_aq_ws *w,
                           aq_beam_scratch *sc, int64_t r, const int *mperm)
{
    const stage_qprob *p = cx->p;
    const int64_t dp = p->d_pad, K = w->K, G = p->n_groups;
    const int M = L->M, B = w->beam_size, g = L->g;
    const int64_t gm = G * M;
    const double s = L->scales[r];
    const float *wrow = p->W + r * dp;
    uint16_t *codes = L->codes + r * gm;
    int64_t n_cand = 0;
    memcpy(sc->codes_a, codes, (size_t)gm * sizeof(uint16_t));
    const double loss0 = aq_row_residual(cx, L, K, wrow, codes, s, sc, sc->he_a);
    sc->loss_a[0] = loss0;
    int nb = 1;
    for (int64_t gi = 0; gi < G; gi++) {
        const int64_t i = cx->gperm[gi];
        aq_beam_gather(cx, gi, sc->hg);
        for (int mi = 0; mi < M; mi++) {
            const int m = mperm[mi];
            const float *cb = L->codebooks + (int64_t)m * K * g;
            const double *cn = w->cnorm + (i * M + m) * K;
            aq_beam_prepare(cx, cb, cn, sc, nb, gi, i, m, M, gm, s);
            stage_aq_beam_score(sc->scores, sc->base, sc->u, cx->cbT + (int64_t)m * g * K, cn, s, nb,
                          K, g);
            n_cand += nb * K;
            /* keeping its code is one candidate per hypothesis: with a full beam
             * the worst of those bounds the B-th best score */
            double bound = INFINITY;
            for (int b = 0; b < nb && nb == B; b++) {
                double v = sc->scores[b * K + sc->codes_a[b * gm + i * M + m]];
                bound = b == 0 || v > bound || !(v == v) ? v : bound;
            }
            if (!(bound == bound)) bound = INFINITY;
            int nt = aq_top_select(sc->scores, nb * K, B, bound, sc->top_s, sc->top_i);
            if (nt == 0) return n_cand; /* all NaN: keep the row's codes */
            /* the last codebook of a group: later steps read only later groups */
            const int64_t from = (mi + 1 < M ? gi : gi + 1) * g;
            aq_beam_advance(cx, cb, sc, nt, K, gi, i, m, M, gm, s, from);
            double *th = sc->he_a; sc->he_a = sc->he_b; sc->he_b = th;
            double *tl = sc->loss_a; sc->loss_a = sc->loss_b; sc->loss_b = tl;
            uint16_t *tc = sc->codes_a; sc->codes_a = sc->codes_b; sc->codes_b = tc;
            nb = nt;
        }
    }
    /* beam 0 is the best; accept it only if its exactly recomputed loss is no worse */
    double final = aq_row_residual(cx, L, K, wrow, sc->codes_a, s, sc, NULL);
    if (final <= loss0) memcpy(codes, sc->codes_a, (size_t)gm * sizeof(uint16_t));
    return n_cand;
}

lv_status stage_aq_beam(const stage_qprob *p, stage_aqlm_layer *L, stage_aq_ws *w, uint64_t seed,
                         int64_t *n_candidates)
{
    lv_status st = LV_OK;
    int64_t *gperm = NULL;
    float *cbT = NULL;
    int mperm[64];
    const int64_t G = p->n_groups, K = w->K;
    const int g = L->g;
    LV_ALLOC(gperm, G);
    LV_ALLOC(cbT, (int64_t)L->M * g * K);
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
    aq_codebook_hnorms(p, L, w->cnorm, K);
    for (int m = 0; m < L->M; m++)
        for (int64_t k = 0; k < K; k++)
            for (int a = 0; a < g; a++)
                cbT[((int64_t)m * g + a) * K + k] = L->codebooks[((int64_t)m * K + k) * g + a];
    const aq_beam_ctx cx = {.p = p, .gperm = gperm, .cbT = cbT};
    int64_t total = 0;
#pragma omp parallel num_threads(w->n_threads) reduction(+ : total)
    {
        int tid = omp_get_thread_num();
        aq_beam_scratch sc;
        aq_beam_carve(&sc, w->beam + (size_t)tid * w->beam_bytes, w->beam_size, p->d_pad, p->g,
                      w->K, G * L->M);
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < p->d_out; r++) total += aq_beam_row(&cx, L, w, &sc, r, mperm);
    }
    if (n_candidates) *n_candidates += total;
done:
    free(cbT);
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
