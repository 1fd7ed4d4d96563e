/* cmd_plan.c: `llmvq plan JOBFILE --ranks N [--json] [--set section.key=value ...]`.
 *
 * A dry run of `llmvq quantize`: the shard map (the same pipe_shard_of that
 * quantize uses), what each rank holds in memory, and the predicted wall time
 * of the quantize phase per rank, from rates MEASURED on this machine at
 * startup (a few seconds of AQLM, forward, Hessian and fine-tuning work on
 * small synthetic shapes) scaled to the job's shapes by simple cost models.
 * The model may be a Hugging Face directory holding only config.json (e.g. a
 * 70B config without its weights): plan reads the config and never the weights.
 * docs/pipeline.md ("Planning"). */
#include <errno.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "job.h"
#include "kern.h"
#include "pipe.h"
#include "pipe_plan.h"
#include "stage.h"

/* ---------------------------------------------------------------- the job */

typedef struct {
    const char *job_path, *model_path, *calib_path, *prop;
    lv_model_config cfg;
    int weights_present; /* 0: config.json alone */
    int64_t n_seq;
    int T;
    stage_aqlm_config acfg;
    int ft_enable;
    stage_ft_config ft;
    int share;          /* quant.share_codebooks: LV_SHARE_* */
    int pv_enable;
    stage_pv_config pv; /* [pvtune], defaults filled in */
    int64_t pv_n;       /* PV-tuning sequences */
} plan_job;

static int is_dir(const char *p)
{
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int file_exists(const char *dir, const char *name)
{
    char buf[4200];
    snprintf(buf, sizeof buf, "%s/%s", dir, name);
    return access(buf, R_OK) == 0;
}

static lv_status plan_read_job(plan_job *p, const job_file *j)
{
    lv_status st = LV_OK;
    int64_t seqlen = 0;
    LV_TRY(job_get_str(j, "model.path", &p->model_path));
    LV_TRY(job_get_str(j, "calibration.data", &p->calib_path));
    LV_TRY(job_get_int(j, "calibration.nsamples", &p->n_seq));
    LV_TRY(job_get_int(j, "calibration.seqlen", &seqlen));
    LV_TRY(job_get_str(j, "quant.propagation", &p->prop));
    {
        const char *share = NULL;
        LV_TRY(job_get_str(j, "quant.share_codebooks", &share));
        p->share = !strcmp(share, "model") ? LV_SHARE_MODEL
                   : !strcmp(share, "type") ? LV_SHARE_TYPE : LV_SHARE_NONE;
    }
    LV_TRY(pipe_job_stage_configs(j, &p->acfg, &p->ft_enable, &p->ft));
    {
        int64_t ns = 0;
        LV_TRY(pipe_job_pv_config(j, &p->pv_enable, &p->pv, &ns));
        p->pv = stage_pv_defaults(&p->pv);
        p->pv_n = ns > 0 ? ns : p->n_seq;
    }

    /* the model's shapes: a HF directory is read through its config.json only
     * (works without weights); anything else is opened (memory-mapped) */
    if (is_dir(p->model_path)) {
        char cj[4200];
        if (snprintf(cj, sizeof cj, "%s/config.json", p->model_path) >= (int)sizeof cj)
            LV_FAIL(LV_ERR_INVALID_ARG, "%s: path too long", p->model_path);
        LV_TRY(io_config_read_hf(&p->cfg, cj));
        p->weights_present = file_exists(p->model_path, "model.safetensors") ||
                             file_exists(p->model_path, "model.safetensors.index.json");
    } else {
        lv_model *m = NULL;
        LV_TRY(io_model_open(&m, p->model_path, IO_MODEL_AUTO));
        p->cfg = m->cfg;
        io_model_free(m);
        p->weights_present = 1;
    }
    p->T = seqlen > 0 ? (int)seqlen : p->cfg.seq_len;
    if (p->T > p->cfg.seq_len)
        LV_FAIL(LV_ERR_INVALID_ARG, "calibration.seqlen %d is beyond the model's seq_len %d", p->T,
                p->cfg.seq_len);
done:
    return st;
}

/* ---------------------------------------------------------------- cost models */

/* Rates of this machine. Every predicted time is a sum of terms
 * (work count) x (seconds per unit), the units named beside each field. */
typedef struct {
    double threads;      /* OpenMP threads the measurement ran with */
    double fwd_flops_s;  /* FP block forward: 2 x MACs of the linears + causal attention */
    double hess_flops_s; /* Hessian accumulation H += x^T x: 2 n d^2 */
    double beam_c1;      /* s per d_out * M * beam * d_pad^2   (H-weighted residual updates) */
    double beam_c2;      /* s per d_out * M * beam * K * d_pad (candidate scores) */
    double init_a;       /* s per d_out * d_pad * M * K * kmeans_iters (k-means) */
    double init_b;       /* s per d_out * d_pad^2 (objective / scale fits) */
    double upd_flops_s;  /* codebook update: (adam_steps + 2) x 2 d_out d_pad^2 per alternation */
    double ft_flops_s;   /* fine-tuning: (3 n_train + n_holdout) x forward FLOPs per epoch */
    double calib_s;      /* how long measuring took */
    double shape_dim;    /* dim of the block the forward / fine-tuning rates were measured on */
} plan_rates;

static const struct {
    const char *name;
    size_t off;
} rate_fields[] = {
    {"threads", offsetof(plan_rates, threads)},
    {"fwd_flops_per_s", offsetof(plan_rates, fwd_flops_s)},
    {"hessian_flops_per_s", offsetof(plan_rates, hess_flops_s)},
    {"aqlm_beam_s_per_row_sq", offsetof(plan_rates, beam_c1)},
    {"aqlm_beam_s_per_candidate", offsetof(plan_rates, beam_c2)},
    {"aqlm_init_s_per_kmeans_unit", offsetof(plan_rates, init_a)},
    {"aqlm_init_s_per_row_sq", offsetof(plan_rates, init_b)},
    {"aqlm_update_flops_per_s", offsetof(plan_rates, upd_flops_s)},
    {"finetune_flops_per_s", offsetof(plan_rates, ft_flops_s)},
    {"measure_s", offsetof(plan_rates, calib_s)},
    {"measured_on_dim", offsetof(plan_rates, shape_dim)},
};
#define N_RATE_FIELDS ((int)(sizeof rate_fields / sizeof rate_fields[0]))

static double *rate_ptr(plan_rates *r, int i) { return (double *)((char *)r + rate_fields[i].off); }

/* Forward FLOPs of one block per token at context T (causal attention). */
static double block_lin_flops_tok(const lv_model_config *c)
{
    double d = c->dim, kv = lv_cfg_kv_dim(c), h = c->hidden_dim;
    return 2.0 * (2.0 * d * d + 2.0 * kv * d + 3.0 * d * h);
}
static double block_fwd_flops(const lv_model_config *c, double n_seq, int T)
{
    double attn = 2.0 * c->dim * (T + 1.0); /* QK^T + AV over the causal half */
    return n_seq * T * (block_lin_flops_tok(c) + attn);
}

/* Predicted seconds of stage_aqlm_run on one (d_out, d_in) layer. */
typedef struct {
    double init, beam, update, total;
} aq_cost;

static aq_cost aqlm_cost(const plan_rates *r, const stage_aqlm_config *a, int iters,
                         double d_out, double d_in)
{
    aq_cost c;
    double g = a->group_size, K = ldexp(1.0, a->nbits), M = a->n_codebooks, B = a->beam_size;
    double dp = ceil(d_in / g) * g;
    double steps = a->codebook_update == STAGE_AQLM_ADAM ? a->adam_steps : 1;
    c.init = d_out * dp * (r->init_a * M * K * a->kmeans_iters + r->init_b * dp);
    c.beam = iters * d_out * M * B * dp * (r->beam_c1 * dp + r->beam_c2 * K);
    c.update = iters * (steps + 2.0) * 2.0 * d_out * dp * dp / r->upd_flops_s;
    c.total = c.init + c.beam + c.update;
    return c;
}

/* t = ca * xa + cb * xb from two measurements; both coefficients >= 0. */
static void fit2(const double xa[2], const double xb[2], const double t[2], double *ca, double *cb)
{
    double det = xa[0] * xb[1] - xa[1] * xb[0];
    *ca = *cb = -1;
    if (fabs(det) > 1e-12 * fabs(xa[0] * xb[1])) {
        *ca = (t[0] * xb[1] - t[1] * xb[0]) / det;
        *cb = (xa[0] * t[1] - xa[1] * t[0]) / det;
    }
    if (*ca < 0 || *cb < 0) { /* noise: put it all on the term that dominates at the larger size */
        int a_dom = xa[1] * (*ca > 0 ? *ca : 1) >= xb[1] * (*cb > 0 ? *cb : 1);
        if (a_dom) {
            *ca = (t[0] + t[1]) / (xa[0] + xa[1]);
            *cb = 0;
        } else {
            *cb = (t[0] + t[1]) / (xb[0] + xb[1]);
            *ca = 0;
        }
    }
}

static void fill_normal(lv_rng *rng, float *x, size_t n, float sd)
{
    for (size_t i = 0; i < n; i++) x[i] = sd * lv_rng_normal(rng);
}

/* AQLM on random d x d layers with a random correlated Hessian, the job's
 * M / g / beam / update rule, one alternation. nbits capped at 8, k-means
 * iterations at 10, Adam steps at 50 (the models above are linear in each). */
static lv_status measure_aqlm(const stage_aqlm_config *job, plan_rates *r)
{
    lv_status st = LV_OK;
    const int dims[2] = {256, 512};
    double xa_b[2], xb_b[2], t_b[2], xa_i[2], xb_i[2], t_i[2], flop_u = 0, t_u = 0;
    float *W = NULL, *H = NULL, *X = NULL;
    lv_aq_layer L;
    memset(&L, 0, sizeof L);
    lv_rng rng;
    lv_rng_seed(&rng, 12345);
    stage_aqlm_config a = *job;
    a.max_iters = 1;
    a.rel_tol = 0;
    a.nbits = a.nbits > 8 ? 8 : a.nbits;
    a.kmeans_iters = a.kmeans_iters > 10 ? 10 : a.kmeans_iters;
    a.adam_steps = a.adam_steps > 50 ? 50 : a.adam_steps;
    if (a.codebook_update == STAGE_AQLM_LSTSQ &&
        (double)a.n_codebooks * ldexp(1.0, a.nbits) * a.group_size > 8192)
        a.codebook_update = STAGE_AQLM_ADAM;
    a.seed = 7;
    a.verbose = 0;
    for (int s = 0; s < 2; s++) {
        const int d = dims[s], n = 2 * d;
        const double g = a.group_size, dp = ceil(d / g) * g, K = ldexp(1.0, a.nbits);
        const double M = a.n_codebooks, B = a.beam_size;
        LV_ALLOC(W, (size_t)d * d);
        LV_ALLOC(H, (size_t)d * d);
        LV_ALLOC(X, (size_t)n * d);
        fill_normal(&rng, W, (size_t)d * d, 0.02f);
        fill_normal(&rng, X, (size_t)n * d, 1.0f);
        for (int i = 0; i < n; i++) /* correlated columns: a common component */
            for (int c = 1; c < d; c++) X[(size_t)i * d + c] += 0.5f * X[(size_t)i * d + c - 1];
        /* H = X^T X / n, in double for symmetry, then to float */
        double *Hd = NULL;
        LV_ALLOC(Hd, (size_t)d * d);
        kern_hessian_accum_ref(Hd, X, n, d);
        for (size_t i = 0; i < (size_t)d * d; i++) H[i] = (float)(Hd[i] / n);
        free(Hd);
        stage_aqlm_stats sx;
        memset(&sx, 0, sizeof sx);
        LV_TRY(stage_aqlm_run(W, H, d, d, &a, &L, &sx));
        int it = sx.iters > 0 ? sx.iters : 1;
        xa_b[s] = it * d * M * B * dp * dp;
        xb_b[s] = it * d * M * B * dp * K;
        t_b[s] = sx.beam_s;
        xa_i[s] = d * dp * M * K * a.kmeans_iters;
        xb_i[s] = d * dp * dp;
        t_i[s] = sx.init_s;
        double steps = a.codebook_update == STAGE_AQLM_ADAM ? a.adam_steps : 1;
        flop_u += it * (steps + 2.0) * 2.0 * d * dp * dp;
        t_u += sx.update_s;
        lv_aq_layer_free(&L);
        free(W);
        free(H);
        free(X);
        W = H = X = NULL;
    }
    fit2(xa_b, xb_b, t_b, &r->beam_c1, &r->beam_c2);
    fit2(xa_i, xb_i, t_i, &r->init_a, &r->init_b);
    r->upd_flops_s = flop_u / (t_u > 1e-6 ? t_u : 1e-6);
done:
    lv_aq_layer_free(&L);
    free(W);
    free(H);
    free(X);
    return st;
}

/* The block shape the forward and fine-tuning rates are measured on: the
 * job's own when it is small (then nothing is extrapolated), else a default
 * small LLaMA block; one layer, T tokens per sequence. */
static lv_model_config cal_config(const plan_job *p, int dim, int hidden, int heads, int T_max,
                                  int *T)
{
    lv_model_config c = p->cfg;
    if (c.dim > 512 || c.hidden_dim > 2048) {
        c.dim = dim;
        c.hidden_dim = hidden;
        c.n_heads = c.n_kv_heads = heads;
    }
    *T = p->T < T_max ? p->T : T_max;
    c.n_layers = 1;
    c.vocab_size = 64;
    c.seq_len = *T;
    c.tied_cls = 1;
    return c;
}

/* FP block forward on a small synthetic model, and Hessian accumulation. */
static lv_status measure_forward(const plan_job *p, plan_rates *r)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    kern_fwd_ws *ws = NULL;
    float *x = NULL;
    double *Hd = NULL;
    const int dh = 512, nh = 2048;
    int T = 0;
    lv_model_config c = cal_config(p, 256, 768, 8, 256, &T);
    const int n_seq = (2048 + T - 1) / T < 2 ? 2 : (2048 + T - 1) / T;
    const int micro = n_seq < 8 ? n_seq : 8;
    lv_rng rng;
    lv_rng_seed(&rng, 99);
    LV_TRY(io_model_synth(&m, &c, 1));
    LV_TRY(kern_fwd_ws_init(&ws, &c, micro, T, 0));
    size_t n = (size_t)n_seq * T * c.dim;
    LV_ALLOC(x, n > (size_t)nh * dh ? n : (size_t)nh * dh);
    double best = 1e30;
    for (int rep = 0; rep < 3; rep++) {
        fill_normal(&rng, x, n, 1.0f);
        double t0 = lv_now();
        LV_TRY(stage_calib_block(m, 0, x, n_seq, T, ws, micro, NULL));
        double t = lv_now() - t0;
        if (t < best) best = t;
    }
    r->fwd_flops_s = block_fwd_flops(&c, n_seq, T) / (best > 1e-6 ? best : 1e-6);
    r->shape_dim = c.dim;
    LV_ALLOC(Hd, (size_t)dh * dh);
    fill_normal(&rng, x, (size_t)nh * dh, 1.0f);
    best = 1e30;
    for (int rep = 0; rep < 2; rep++) {
        double t0 = lv_now();
        kern_hessian_accum_ref(Hd, x, nh, dh);
        double t = lv_now() - t0;
        if (t < best) best = t;
    }
    r->hess_flops_s = 2.0 * nh * (double)dh * dh / (best > 1e-6 ? best : 1e-6);
done:
    free(Hd);
    free(x);
    kern_fwd_ws_free(ws);
    io_model_free(m);
    return st;
}

/* Held-out / training split of stage_finetune_block. */
static void ft_split(int64_t n_seq, double frac, int64_t *n_train, int64_t *n_val)
{
    int64_t h = 0;
    if (n_seq >= 2) {
        h = (int64_t)ceil(frac * (double)n_seq);
        h = h < 1 ? 1 : h > n_seq - 1 ? n_seq - 1 : h;
    }
    *n_train = n_seq - h;
    *n_val = h ? h : n_seq;
}

/* Block fine-tuning (2 epochs, best of 2 runs) on a small random quantized block. */
static lv_status measure_finetune(const plan_job *p, plan_rates *r)
{
    lv_status st = LV_OK;
    lv_qblock b;
    float *xin = NULL, *yfp = NULL;
    int T = 0;
    lv_model_config c = cal_config(p, 128, 384, 4, 256, &T);
    const int64_t n_seq = 1 + ((2048 + T - 1) / T < 2 ? 2 : (2048 + T - 1) / T);
    memset(&b, 0, sizeof b);
    lv_rng rng;
    lv_rng_seed(&rng, 5);
    int nbits = p->acfg.nbits > 12 ? 12 : p->acfg.nbits;
    LV_TRY(lv_qblock_init(&b, &c, p->acfg.n_codebooks, nbits, p->acfg.group_size));
    size_t n = (size_t)n_seq * T * c.dim;
    LV_ALLOC(xin, n);
    LV_ALLOC(yfp, n);
    fill_normal(&rng, xin, n, 1.0f);
    for (size_t i = 0; i < n; i++) yfp[i] = xin[i] + 0.1f * lv_rng_normal(&rng);
    stage_ft_config ft = p->ft;
    ft.max_epochs = 2;
    ft.patience = 1000;
    ft.batch_seqs = ft.batch_seqs > 8 ? 8 : ft.batch_seqs;
    ft.holdout_frac = 0.1;
    ft.verbose = 0;
    ft.seed = 3;
    int64_t ntr, nval;
    ft_split(n_seq, ft.holdout_frac, &ntr, &nval);
    r->ft_flops_s = 0;
    for (int rep = 0; rep < 2; rep++) {
        for (int d = 0; d < c.dim; d++) b.attn_norm[d] = b.ffn_norm[d] = 1.0f;
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &b.lin[k];
            int64_t K = (int64_t)1 << L->nbits, nc = L->d_out * L->n_groups * L->M;
            for (int64_t i = 0; i < nc; i++)
                L->codes[i] = (uint16_t)(lv_rng_u64(&rng) % (uint64_t)K);
            fill_normal(&rng, L->codebooks, (size_t)(L->M * K * L->g), 0.05f);
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = 1.0f;
        }
        stage_ft_stats fs;
        memset(&fs, 0, sizeof fs);
        LV_TRY(stage_finetune_block(&c, &b, xin, yfp, n_seq, T, &ft, &fs));
        int ep = fs.epochs > 0 ? fs.epochs : 1;
        double work = (ep * (3.0 * ntr + nval) + nval) * block_fwd_flops(&c, 1, T);
        double rate = work / (fs.wall_s > 1e-6 ? fs.wall_s : 1e-6);
        if (rate > r->ft_flops_s) r->ft_flops_s = rate;
    }
done:
    lv_qblock_free(&b);
    free(xin);
    free(yfp);
    return st;
}

static lv_status measure_rates(const plan_job *p, plan_rates *r)
{
    lv_status st = LV_OK;
    double t0 = lv_now();
    memset(r, 0, sizeof *r);
    r->threads = omp_get_max_threads();
    LV_TRY(measure_forward(p, r));
    LV_TRY(measure_aqlm(&p->acfg, r));
    LV_TRY(measure_finetune(p, r));
    r->calib_s = lv_now() - t0;
done:
    return st;
}

/* Rates from a JSON file written by `llmvq plan --json` (its "rates" object),
 * e.g. measured on the target nodes. */
static lv_status load_rates(const char *path, plan_rates *r)
{
    lv_status st = LV_OK;
    char *text = NULL;
    size_t n = 0;
    cJSON *root = NULL;
    LV_TRY(io_read_file(path, &text, &n));
    root = cJSON_ParseWithLength(text, n);
    if (!root) LV_FAIL(LV_ERR_FORMAT, "%s: invalid JSON", path);
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(root, "rates");
    if (!o) o = root;
    memset(r, 0, sizeof *r);
    for (int i = 0; i < N_RATE_FIELDS; i++) {
        const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, rate_fields[i].name);
        if (!cJSON_IsNumber(it) || !(it->valuedouble >= 0) || !isfinite(it->valuedouble))
            LV_FAIL(LV_ERR_FORMAT, "%s: rates: \"%s\" missing or not a number >= 0", path,
                    rate_fields[i].name);
        *rate_ptr(r, i) = it->valuedouble;
    }
    if (!(r->fwd_flops_s > 0 && r->hess_flops_s > 0 && r->upd_flops_s > 0 && r->ft_flops_s > 0))
        LV_FAIL(LV_ERR_FORMAT, "%s: rates: a FLOP rate is zero", path);
done:
    cJSON_Delete(root);
    free(text);
    return st;
}

/* ---------------------------------------------------------------- the plan */

typedef struct {
    double fwd, hess, aq_init, aq_beam, aq_update, aqlm, ft, block; /* seconds per block */
} block_cost;

static block_cost predict_block(const plan_job *p, const plan_rates *r)
{
    block_cost b;
    const lv_model_config *c = &p->cfg;
    double N = (double)p->n_seq * p->T;
    memset(&b, 0, sizeof b);
    b.fwd = block_fwd_flops(c, (double)p->n_seq, p->T) / r->fwd_flops_s;
    b.hess = 2.0 * N * (3.0 * c->dim * (double)c->dim + (double)c->hidden_dim * c->hidden_dim) /
             r->hess_flops_s;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        aq_cost a = aqlm_cost(r, &p->acfg, p->acfg.max_iters, (double)o, (double)i);
        b.aq_init += a.init;
        b.aq_beam += a.beam;
        b.aq_update += a.update;
        b.aqlm += a.total;
    }
    if (p->ft_enable) {
        int64_t ntr, nval;
        ft_split(p->n_seq, p->ft.holdout_frac, &ntr, &nval);
        double seq = block_fwd_flops(c, 1, p->T);
        b.ft = (p->ft.max_epochs * (3.0 * ntr + nval) + nval) * seq / r->ft_flops_s;
    }
    /* FP forward with Hessian taps, AQLM x 7, fine-tuning, quantized forward */
    b.block = 2.0 * b.fwd + b.hess + b.aqlm + b.ft;
    return b;
}

/* PV-tuning after the blocks (pvtune.enable), on every rank (data-parallel). */
typedef struct {
    int64_t n_train, n_val, v_steps, p_steps, n_param, n_codes, n_w;
    int ranks_used;          /* min(ranks, micro-batches per V step) */
    double v_step, p_step, eval, total; /* seconds */
    double mem_fp, mem_q, mem_act, mem_logits, mem_opt, mem_p, mem_host; /* bytes per rank */
} pv_cost;

static pv_cost predict_pv(const plan_job *p, const plan_rates *r, int n_ranks)
{
    pv_cost v;
    memset(&v, 0, sizeof v);
    const lv_model_config *c = &p->cfg;
    const stage_pv_config *pc = &p->pv;
    const int kl = pc->loss == STAGE_PV_LOSS_KL, T = p->T;
    ft_split(p->pv_n, pc->holdout_frac, &v.n_train, &v.n_val); /* the same rule as the stage */
    const int64_t bmax = v.n_train < pc->batch_seqs ? v.n_train : pc->batch_seqs;
    const int64_t per_epoch = (v.n_train + bmax - 1) / bmax;
    const int64_t mb = pc->micro_batch < bmax ? pc->micro_batch : bmax;
    const int64_t n_micro = (bmax + mb - 1) / mb;
    v.ranks_used = (int)(n_ranks < n_micro ? n_ranks : n_micro);
    v.v_steps = per_epoch * pc->max_epochs;
    v.p_steps = pc->p_every > 0 ? v.v_steps / pc->p_every : 0;
    /* forward-equivalent FLOPs per sequence (block fine-tuning's rate unit): student forward,
     * block recompute, backward (2x), the teacher's forward for KL; classifier likewise */
    const double F_blk = c->n_layers * block_fwd_flops(c, 1, T);
    const double F_cls = 2.0 * T * (double)c->dim * c->vocab_size;
    const double per_seq = (kl ? 5.0 : 4.0) * F_blk + (kl ? 3.0 : 2.0) * F_cls;
    const double eval_seq = (kl ? 2.0 : 1.0) * (F_blk + F_cls);
    v.v_step = bmax * per_seq / r->ft_flops_s / v.ranks_used;
    const int n_eval = pc->eval_every > 0 ? (int)(v.v_steps / pc->eval_every) : pc->max_epochs;
    v.eval = (1.0 + n_eval) * v.n_val * eval_seq / r->ft_flops_s /
             (n_ranks < (v.n_val + mb - 1) / mb ? n_ranks : (double)((v.n_val + mb - 1) / mb));
    /* quantized model and trainable parameters */
    const double K = ldexp(1.0, p->acfg.nbits), M = p->acfg.n_codebooks, g = p->acfg.group_size;
    const double cb = M * K * g;
    double n_param = c->dim, n_codes = 0, n_w = 0, beam = 0;
    stage_aqlm_config pa = p->acfg;
    pa.beam_size = pc->p_beam;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        n_param += c->n_layers * ((p->share ? 0.0 : cb) + (double)o);
        n_codes += c->n_layers * (double)o * ceil((double)i / g) * M;
        n_w += c->n_layers * (double)o * (double)i;
        beam += c->n_layers * aqlm_cost(r, &pa, 1, (double)o, (double)i).beam;
    }
    n_param += 2.0 * c->n_layers * c->dim + lv_share_slots(p->share) * cb;
    if (pc->train_emb) n_param += (c->tied_cls ? 1.0 : 2.0) * c->vocab_size * c->dim;
    v.n_param = (int64_t)n_param, v.n_codes = (int64_t)n_codes, v.n_w = (int64_t)n_w;
    v.p_step = v.v_step + beam / (n_ranks < c->n_layers * LV_LIN_COUNT ? n_ranks : 1.0);
    v.total = v.v_steps * v.v_step + v.p_steps * v.p_step + v.eval;
    /* host memory per rank: the whole FP model (teacher, every rank), the whole quantized
     * model, block inputs of a micro-batch, logits, optimiser state and gradient items */
    const double n_own = (double)((n_micro + v.ranks_used - 1) / v.ranks_used);
    v.mem_fp = 4.0 * (double)lv_cfg_n_params(c);
    v.mem_q = 2.0 * n_codes + 4.0 * n_param + 4.0 * 2.0 * c->vocab_size * (double)c->dim;
    v.mem_act = 4.0 * mb * T * (double)c->dim * (c->n_layers + 3.0);
    v.mem_logits = 4.0 * mb * T * (double)c->vocab_size * (kl ? 2.0 : 1.0);
    v.mem_opt = 4.0 * n_param * (2.0 + 1.0 + 2.0 + n_own + (n_ranks > 1 ? 1.0 : 0.0)) + 2.0 * n_codes;
    v.mem_p = v.p_steps ? 4.0 * n_w * (1.0 + n_own + (n_ranks > 1 ? 1.0 : 0.0)) + 2.0 * n_codes : 0;
    v.mem_host = v.mem_fp + v.mem_q + v.mem_act + v.mem_logits + v.mem_opt + v.mem_p;
    return v;
}

typedef struct {
    double act, seqs, hess, h32, wq, fwd_ws, qblock, aqlm_ws, ft_ws, transient, weights_own,
        weights_touched, host, gpu;
} rank_mem;

static rank_mem predict_mem(const plan_job *p, int n_blocks, int first, int last, int threads)
{
    rank_mem m;
    const lv_model_config *c = &p->cfg;
    const stage_aqlm_config *a = &p->acfg;
    double d = c->dim, h = c->hidden_dim, kv = lv_cfg_kv_dim(c), T = p->T;
    double nseq = (double)p->n_seq, micro = p->n_seq < 8 ? (double)p->n_seq : 8;
    double dmax = d > h ? d : h, K = ldexp(1.0, a->nbits), lin = 0, max_rc = 0, max_dp = 0;
    double codes = 0, cb = 0, scales = 0;
    memset(&m, 0, sizeof m);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        int64_t o, i;
        lv_lin_shape(c, (lv_lin)k, &o, &i);
        double G = ceil((double)i / a->group_size), dp = G * a->group_size;
        lin += (double)o * i;
        if (o * dp > max_rc) max_rc = o * dp;
        if (dp > max_dp) max_dp = dp;
        codes += 2.0 * o * G * a->n_codebooks;
        cb += 4.0 * a->n_codebooks * K * a->group_size;
        scales += 4.0 * o;
    }
    if (n_blocks > 0) {
        m.act = 3.0 * nseq * T * d * 4;
        m.seqs = nseq * T * 4;
        m.hess = 8.0 * (3.0 * d * d + h * h);
        m.h32 = 4.0 * dmax * dmax;
        m.wq = 4.0 * lin;
        m.fwd_ws = 4.0 * (micro * T * (4 * d + 2 * kv + 2 * h) +
                          (double)kern_attention_scratch(p->T, c->n_heads, threads));
        m.qblock = codes + cb + scales + 8.0 * d;
        /* AQLM on the largest linear: Q, E, EH (+ a padded W copy), codebook norms,
         * per-thread beam scratch, Adam or least-squares state */
        double G = max_dp / a->group_size, N = a->n_codebooks * K * a->group_size;
        m.aqlm_ws = 4.0 * max_rc * 4 + 8.0 * G * a->n_codebooks * K +
                    threads * (16.0 * a->beam_size * max_dp + 8.0 * a->beam_size * K +
                               4.0 * a->beam_size * G * a->n_codebooks) +
                    (a->codebook_update == STAGE_AQLM_LSTSQ ? 8.0 * N * N : 24.0 * N);
        if (p->ft_enable) {
            double B = p->ft.batch_seqs < p->n_seq ? p->ft.batch_seqs : (double)p->n_seq;
            double np = cb / 4 + scales / 4 + 2 * d;
            m.ft_ws = 4.0 * (B * T * (13 * d + 4 * kv + 5 * h) + lin + max_rc) + 16.0 * np +
                      8.0 * B * T * d;
        }
        m.transient = m.aqlm_ws > m.ft_ws ? m.aqlm_ws : m.ft_ws;
        double per_block = 4.0 * (lin + 2 * d);
        m.weights_own = per_block * (last - first);
        m.weights_touched = per_block * last; /* relayed FP blocks + own blocks */
    }
    m.host = m.act + m.seqs + m.hess + m.h32 + m.wq + m.fwd_ws + m.qblock + m.transient +
             m.weights_own;
    /* on a GPU: the block being worked on (FP weights + dequantized copy + the
     * quantized block), its Hessians, the micro-batch forward workspace and the
     * AQLM / fine-tuning workspace; the calibration activations stay on the
     * host (or in run.scratch_dir) and move over in micro-batches */
    if (n_blocks > 0)
        m.gpu = 4.0 * (lin + 2 * d) + m.wq + m.qblock + m.hess + m.h32 + m.fwd_ws + m.transient +
                4.0 * micro * T * d * 3;
    return m;
}

static void fmt_bytes(char *buf, size_t cap, double b)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (b >= 1024 && i < 4) {
        b /= 1024;
        i++;
    }
    snprintf(buf, cap, i ? "%.1f %s" : "%.0f %s", b, u[i]);
}

static void fmt_time(char *buf, size_t cap, double s)
{
    if (s < 120)
        snprintf(buf, cap, "%.1f s", s);
    else if (s < 7200)
        snprintf(buf, cap, "%.1f min", s / 60);
    else if (s < 3 * 86400)
        snprintf(buf, cap, "%.1f h", s / 3600);
    else
        snprintf(buf, cap, "%.1f d", s / 86400);
}

typedef struct {
    int first, last;
    double prefix_s, blocks_s, total_s;
    rank_mem mem;
} rank_plan;

static const char *gpu_line(void)
{
#ifdef LLMVQ_HAVE_CUDA
    return "one block's weights, Hessians and workspaces; the activations stay on the host and "
           "move in micro-batches; an estimate: the quantization stages run on the CPU today";
#else
    return "needed when the stages run on a GPU; this build has no CUDA";
#endif
}

static void print_human(const plan_job *p, const plan_rates *r, int rates_measured,
                        const char *rates_path, int n_ranks, const rank_plan *rp,
                        const block_cost *bc, double total, const pv_cost *pv)
{
    const lv_model_config *c = &p->cfg;
    const stage_aqlm_config *a = &p->acfg;
    char b1[32], b2[32], b3[32], b4[32], b5[32];
    printf("llmvq plan: %s on %d rank%s\n", p->job_path, n_ranks, n_ranks > 1 ? "s" : "");
    printf("model  %s: %d blocks, dim %d, hidden %d, heads %d/%d kv, vocab %d%s\n",
           p->model_path, c->n_layers, c->dim, c->hidden_dim, c->n_heads, c->n_kv_heads,
           c->vocab_size, p->weights_present ? "" : " (config.json only: no weights; plan only)");
    printf("job    %lld x %d calibration tokens, %dx%dg%d beam %d, max_iters %d, %s update "
           "(%d steps), k-means %d iters, fine-tuning %s, propagation %s\n",
           (long long)p->n_seq, p->T, a->n_codebooks, a->nbits, a->group_size, a->beam_size,
           a->max_iters, a->codebook_update == STAGE_AQLM_ADAM ? "adam" : "lstsq", a->adam_steps,
           a->kmeans_iters, p->ft_enable ? "on" : "off", p->prop);
    if (p->ft_enable)
        printf("       fine-tuning up to %d epochs, %d sequences per step\n", p->ft.max_epochs,
               p->ft.batch_seqs);
    if (rates_measured)
        printf("\nrates measured on this machine (%.0f OpenMP threads, %.1f s of synthetic work):\n",
               r->threads, r->calib_s);
    else
        printf("\nrates from %s (%.0f OpenMP threads there):\n", rates_path, r->threads);
    printf("  FP block forward        %8.2f GFLOP/s\n", r->fwd_flops_s * 1e-9);
    printf("  Hessian accumulation    %8.2f GFLOP/s (2 n d^2, d 512)\n", r->hess_flops_s * 1e-9);
    printf("  AQLM beam search        %8.3g ns per d_out*M*beam*d_in^2, %.3g ns per "
           "d_out*M*beam*K*d_in\n", r->beam_c1 * 1e9, r->beam_c2 * 1e9);
    printf("  AQLM init (k-means)     %8.3g ns per d_out*d_in*M*K*iters, %.3g ns per "
           "d_out*d_in^2\n", r->init_a * 1e9, r->init_b * 1e9);
    printf("  AQLM codebook update    %8.2f GFLOP/s ((steps + 2) x 2 d_out d_in^2 per "
           "alternation)\n", r->upd_flops_s * 1e-9);
    printf("  block fine-tuning       %8.2f GFLOP/s ((3 n_train + n_holdout) x forward FLOPs "
           "per epoch)\n", r->ft_flops_s * 1e-9);
    printf("  (AQLM fitted on random 256x256 and 512x512 layers, nbits <= 8, one alternation; "
           "forward and fine-tuning on one block of %s, ~2048 tokens)\n",
           p->cfg.dim > 512 || p->cfg.hidden_dim > 2048 ? "a small default shape (128-256 dim)"
                                                         : "the job's shape");
    fmt_time(b1, sizeof b1, bc->block);
    fmt_time(b2, sizeof b2, 2 * bc->fwd + bc->hess);
    fmt_time(b3, sizeof b3, bc->aqlm);
    fmt_time(b4, sizeof b4, bc->ft);
    fmt_time(b5, sizeof b5, bc->fwd);
    printf("\nper block: %s = forward + Hessians + quantized forward %s, AQLM 7 linears %s",
           b1, b2, b3);
    {
        char i1[32], i2[32], i3[32];
        fmt_time(i1, sizeof i1, bc->aq_init);
        fmt_time(i2, sizeof i2, bc->aq_beam);
        fmt_time(i3, sizeof i3, bc->aq_update);
        printf(" (init %s, beam %s, update %s)", i1, i2, i3);
    }
    printf(", fine-tuning %s\n", b4);
    printf("streaming: the calibration activations flow rank r -> r+1 in chunks of 8 "
           "sequences; a rank relays every chunk through its FP blocks (%s per block), its "
           "first chunk arrives after one chunk has passed the blocks before it\n\n", b5);
    printf("%5s  %-9s %6s %7s  %12s %12s %12s  %10s\n", "rank", "blocks", "count", "first",
           "host memory", "activations", "Hessians", "predicted");
    int idle = 0;
    for (int i = 0; i < n_ranks; i++) {
        const rank_plan *q = &rp[i];
        if (q->first >= q->last) {
            idle++;
            continue;
        }
        char blk[32];
        snprintf(blk, sizeof blk, "%d..%d", q->first, q->last - 1);
        fmt_bytes(b1, sizeof b1, q->mem.host);
        fmt_bytes(b2, sizeof b2, q->mem.act);
        fmt_bytes(b3, sizeof b3, q->mem.hess + q->mem.h32);
        fmt_time(b4, sizeof b4, q->total_s);
        printf("%5d  %-9s %6d %7d  %12s %12s %12s  %10s\n", i, blk, q->last - q->first, q->first,
               b1, b2, b3, b4);
    }
    if (idle) {
        printf("idle ranks (no block): ");
        int first_idle = -1;
        for (int i = 0; i <= n_ranks; i++) {
            int is_idle = i < n_ranks && rp[i].first >= rp[i].last;
            if (is_idle && first_idle < 0) first_idle = i;
            if (!is_idle && first_idle >= 0) {
                if (i - 1 > first_idle) printf("%d..%d ", first_idle, i - 1);
                else printf("%d ", first_idle);
                first_idle = -1;
            }
        }
        printf("\n");
    }
    const rank_mem *m0 = &rp[0].mem;
    for (int i = 0; i < n_ranks; i++)
        if (rp[i].mem.host > m0->host) m0 = &rp[i].mem;
    printf("\nhost memory of the largest rank: ");
    fmt_bytes(b1, sizeof b1, m0->act);
    printf("activations x_in/y_fp/y_q %s, ", b1);
    fmt_bytes(b1, sizeof b1, m0->hess);
    fmt_bytes(b2, sizeof b2, m0->h32);
    printf("Hessians (double) %s + fp32 copy %s, ", b1, b2);
    fmt_bytes(b1, sizeof b1, m0->wq + m0->fwd_ws + m0->qblock);
    printf("dequant scratch + forward workspace + block %s, ", b1);
    fmt_bytes(b1, sizeof b1, m0->transient);
    printf("AQLM / fine-tuning workspace %s, ", b1);
    fmt_bytes(b1, sizeof b1, m0->weights_own);
    printf("FP weights of its blocks (mmap) %s", b1);
    fmt_bytes(b1, sizeof b1, m0->weights_touched);
    printf("; pages touched incl. the FP prefix %s (clean, evictable)\n", b1);
    fmt_bytes(b1, sizeof b1, m0->gpu);
    printf("GPU memory per rank: %s (%s)\n", b1, gpu_line());
    fmt_time(b1, sizeof b1, total);
    printf("\npredicted quantize phase: %s (slowest rank)\n", b1);
    if (pv) {
        char t1[32], t2[32], t3[32], t4[32];
        fmt_time(t1, sizeof t1, pv->v_step);
        fmt_time(t2, sizeof t2, pv->p_step);
        fmt_time(t3, sizeof t3, pv->eval);
        fmt_time(t4, sizeof t4, pv->total);
        printf("\nPV-tuning (pvtune.enable, every rank, data-parallel over %d of %d rank%s: the "
               "micro-batches of a V step): %lld train / %lld held-out sequences of %d tokens, "
               "%lld V steps of %d sequences%s; per V step %s", pv->ranks_used, n_ranks,
               n_ranks > 1 ? "s" : "", (long long)pv->n_train, (long long)pv->n_val, p->T,
               (long long)pv->v_steps, p->pv.batch_seqs,
               pv->p_steps ? "" : ", no P steps", t1);
        if (pv->p_steps) printf(", %lld P steps of %s", (long long)pv->p_steps, t2);
        printf(", held-out evaluations %s: predicted PV-tuning phase %s (upper bound: all "
               "max_epochs)\n", t3, t4);
        fmt_bytes(b1, sizeof b1, pv->mem_host);
        fmt_bytes(b2, sizeof b2, pv->mem_fp);
        fmt_bytes(b3, sizeof b3, pv->mem_q);
        fmt_bytes(b4, sizeof b4, pv->mem_act + pv->mem_logits);
        fmt_bytes(b5, sizeof b5, pv->mem_opt + pv->mem_p);
        printf("PV-tuning host memory per rank: %s = FP teacher model %s (the whole model on "
               "every rank) + quantized model %s + activations and logits of a micro-batch %s "
               "+ Adam, gradients and snapshots%s %s\n", b1, b2, b3, b4,
               pv->p_steps ? ", P-step dL/dWhat" : "", b5);
        fmt_time(b1, sizeof b1, total + pv->total);
        printf("predicted total: %s\n", b1);
    }
    printf("\nassumptions: every rank runs at this machine's measured rates; AQLM runs all "
           "max_iters alternations and fine-tuning all max_epochs (rel_tol and patience can "
           "stop earlier: upper bounds); costs scale with the cost models above (extrapolated "
           "from small shapes); not included: model open and tokenizing, the final assembly, "
           "evaluation (rank 0) and waiting on a shared file system.\n");
    if (!p->weights_present)
        printf("note: %s holds no weights: `llmvq quantize` needs model.safetensors beside "
               "config.json. Weights in f16/bf16 are converted to float32 when opened (in "
               "every rank: %.0f GiB more each).\n", p->model_path,
               4.0 * (double)lv_cfg_n_params(c) / (1024.0 * 1024 * 1024));
}

static lv_status print_json(const plan_job *p, const plan_rates *r, int rates_measured,
                            int n_ranks, const rank_plan *rp, const block_cost *bc, double total,
                            const pv_cost *pv)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject();
    char *s = NULL;
    if (!o) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    const lv_model_config *c = &p->cfg;
    cJSON_AddStringToObject(o, "job", p->job_path);
    cJSON *mo = cJSON_AddObjectToObject(o, "model");
    cJSON_AddStringToObject(mo, "path", p->model_path);
    cJSON_AddBoolToObject(mo, "weights_present", p->weights_present);
    cJSON_AddNumberToObject(mo, "n_layers", c->n_layers);
    cJSON_AddNumberToObject(mo, "dim", c->dim);
    cJSON_AddNumberToObject(mo, "hidden_dim", c->hidden_dim);
    cJSON_AddNumberToObject(mo, "n_heads", c->n_heads);
    cJSON_AddNumberToObject(mo, "n_kv_heads", c->n_kv_heads);
    cJSON_AddNumberToObject(mo, "vocab_size", c->vocab_size);
    cJSON_AddNumberToObject(o, "ranks", n_ranks);
    cJSON_AddNumberToObject(o, "calibration_sequences", (double)p->n_seq);
    cJSON_AddNumberToObject(o, "calibration_seqlen", p->T);
    cJSON *sh = cJSON_AddArrayToObject(o, "shards");
    cJSON *mem = cJSON_AddArrayToObject(o, "memory_bytes");
    cJSON *pred = cJSON_AddArrayToObject(o, "predicted_s");
    cJSON *idle = cJSON_AddArrayToObject(o, "idle_ranks");
    cJSON *ranks = cJSON_AddArrayToObject(o, "rank_detail");
    for (int i = 0; i < n_ranks; i++) {
        const rank_plan *q = &rp[i];
        cJSON *a = cJSON_CreateArray(); /* [first, last] inclusive; [] when idle */
        if (q->first < q->last) {
            cJSON_AddItemToArray(a, cJSON_CreateNumber(q->first));
            cJSON_AddItemToArray(a, cJSON_CreateNumber(q->last - 1));
        }
        cJSON_AddItemToArray(sh, a);
        cJSON_AddItemToArray(mem, cJSON_CreateNumber(q->mem.host));
        cJSON_AddItemToArray(pred, cJSON_CreateNumber(q->total_s));
        if (q->first >= q->last) cJSON_AddItemToArray(idle, cJSON_CreateNumber(i));
        cJSON *d = cJSON_CreateObject();
        cJSON_AddNumberToObject(d, "rank", i);
        cJSON_AddNumberToObject(d, "first_block", q->first);
        cJSON_AddNumberToObject(d, "n_blocks", q->last - q->first);
        cJSON_AddNumberToObject(d, "prefix_s", q->prefix_s);
        cJSON_AddNumberToObject(d, "blocks_s", q->blocks_s);
        cJSON_AddNumberToObject(d, "predicted_s", q->total_s);
        cJSON *mb = cJSON_AddObjectToObject(d, "memory_bytes");
        cJSON_AddNumberToObject(mb, "host_total", q->mem.host);
        cJSON_AddNumberToObject(mb, "activations", q->mem.act);
        cJSON_AddNumberToObject(mb, "calibration_tokens", q->mem.seqs);
        cJSON_AddNumberToObject(mb, "hessians_f64", q->mem.hess);
        cJSON_AddNumberToObject(mb, "hessian_f32", q->mem.h32);
        cJSON_AddNumberToObject(mb, "dequant_scratch", q->mem.wq);
        cJSON_AddNumberToObject(mb, "forward_workspace", q->mem.fwd_ws);
        cJSON_AddNumberToObject(mb, "quantized_block", q->mem.qblock);
        cJSON_AddNumberToObject(mb, "aqlm_workspace", q->mem.aqlm_ws);
        cJSON_AddNumberToObject(mb, "finetune_workspace", q->mem.ft_ws);
        cJSON_AddNumberToObject(mb, "fp_weights_own_blocks", q->mem.weights_own);
        cJSON_AddNumberToObject(mb, "fp_weights_touched", q->mem.weights_touched);
#ifdef LLMVQ_HAVE_CUDA
        cJSON_AddNumberToObject(mb, "gpu", q->mem.gpu);
#else
        cJSON_AddNullToObject(mb, "gpu");
#endif
        cJSON_AddItemToArray(ranks, d);
    }
    cJSON_AddStringToObject(o, "gpu_memory", gpu_line());
    cJSON *b = cJSON_AddObjectToObject(o, "per_block_s");
    cJSON_AddNumberToObject(b, "fp_forward", bc->fwd);
    cJSON_AddNumberToObject(b, "hessians", bc->hess);
    cJSON_AddNumberToObject(b, "aqlm", bc->aqlm);
    cJSON_AddNumberToObject(b, "aqlm_init", bc->aq_init);
    cJSON_AddNumberToObject(b, "aqlm_beam", bc->aq_beam);
    cJSON_AddNumberToObject(b, "aqlm_update", bc->aq_update);
    cJSON_AddNumberToObject(b, "finetune", bc->ft);
    cJSON_AddNumberToObject(b, "total", bc->block);
    cJSON_AddNumberToObject(o, "total_predicted_s", total + (pv ? pv->total : 0.0));
    cJSON_AddNumberToObject(o, "quantize_predicted_s", total);
    if (pv) {
        cJSON *v = cJSON_AddObjectToObject(o, "pvtune");
        cJSON_AddNumberToObject(v, "ranks_used", pv->ranks_used);
        cJSON_AddNumberToObject(v, "train_sequences", (double)pv->n_train);
        cJSON_AddNumberToObject(v, "heldout_sequences", (double)pv->n_val);
        cJSON_AddNumberToObject(v, "v_steps", (double)pv->v_steps);
        cJSON_AddNumberToObject(v, "p_steps", (double)pv->p_steps);
        cJSON_AddNumberToObject(v, "s_per_v_step", pv->v_step);
        cJSON_AddNumberToObject(v, "s_per_p_step", pv->p_steps ? pv->p_step : 0.0);
        cJSON_AddNumberToObject(v, "eval_s", pv->eval);
        cJSON_AddNumberToObject(v, "predicted_s", pv->total);
        cJSON_AddNumberToObject(v, "trainable_parameters", (double)pv->n_param);
        cJSON *m = cJSON_AddObjectToObject(v, "memory_bytes_per_rank");
        cJSON_AddNumberToObject(m, "host_total", pv->mem_host);
        cJSON_AddNumberToObject(m, "fp_teacher", pv->mem_fp);
        cJSON_AddNumberToObject(m, "quantized_model", pv->mem_q);
        cJSON_AddNumberToObject(m, "activations", pv->mem_act);
        cJSON_AddNumberToObject(m, "logits", pv->mem_logits);
        cJSON_AddNumberToObject(m, "optimizer_and_gradients", pv->mem_opt);
        cJSON_AddNumberToObject(m, "p_step", pv->mem_p);
    }
    cJSON *ro = cJSON_AddObjectToObject(o, "rates");
    for (int i = 0; i < N_RATE_FIELDS; i++)
        cJSON_AddNumberToObject(ro, rate_fields[i].name, *rate_ptr((plan_rates *)r, i));
    cJSON_AddBoolToObject(o, "rates_measured", rates_measured);
    cJSON_AddStringToObject(o, "assumptions",
                            "this machine's rates on every rank; AQLM max_iters and fine-tuning "
                            "max_epochs run in full (upper bounds); model open, tokenizing, "
                            "assembly and evaluation not included");
    s = cJSON_Print(o);
    if (!s) LV_FAIL(LV_ERR_NOMEM, "out of memory");
    printf("%s\n", s);
done:
    free(s);
    cJSON_Delete(o);
    return st;
}

int pipe_cmd_plan(int argc, char **argv)
{
    const char *pos[1] = {NULL}, *rates_path = NULL;
    int n_pos = 0, n_ranks = 0, json = 0;
    const pipe_opt opts[] = {
        {"ranks", PIPE_OPT_INT, &n_ranks, "number of MPI ranks to plan for (required, >= 1)"},
        {"json", PIPE_OPT_FLAG, &json, "print one JSON object instead of the table"},
        {"set", PIPE_OPT_STR, NULL, "section.key=value: override a job key (repeatable)"},
        {"rates", PIPE_OPT_STR, &rates_path,
         "FILE: use the rates of an earlier `plan --json` output instead of measuring"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *synopsis = "JOBFILE --ranks N [--json] [--rates FILE] [--set section.key=value ...]";
    const char *sets[64];
    int n_sets = 0, n_rest = 0;
    char *rest[256];
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--set") || !strncmp(argv[i], "--set=", 6)) {
            const char *v = argv[i][5] == '=' ? argv[i] + 6 : (i + 1 < argc ? argv[++i] : NULL);
            if (!v || n_sets == 64) {
                fprintf(stderr, "llmvq plan: --set needs section.key=value (at most 64)\n");
                return PIPE_EXIT_USAGE;
            }
            sets[n_sets++] = v;
        } else if (n_rest < 256) {
            rest[n_rest++] = argv[i];
        } else {
            fprintf(stderr, "llmvq plan: too many arguments\n");
            return PIPE_EXIT_USAGE;
        }
    }
    int rc = pipe_opts_parse("plan", synopsis, opts, n_opts, n_rest, rest, pos, 1, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (n_pos != 1) {
        fprintf(stderr, "llmvq plan: need exactly one JOBFILE (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (n_ranks < 1) {
        fprintf(stderr, "llmvq plan: --ranks N is required and must be >= 1 (got %d)\n",
                n_ranks);
        return PIPE_EXIT_USAGE;
    }
    lv_status st = LV_OK;
    job_file *j = NULL;
    rank_plan *rp = NULL;
    plan_job p;
    plan_rates r;
    memset(&p, 0, sizeof p);
    p.job_path = pos[0];
    LV_TRY(job_load(&j, pos[0]));
    for (int i = 0; i < n_sets; i++) LV_TRY(job_set(j, sets[i]));
    LV_TRY(job_validate(j));
    LV_TRY(plan_read_job(&p, j));
    const int L = p.cfg.n_layers;
    if (n_ranks > L) {
        /* the shard map spreads the idle ranks: rank r is idle when L*r/n == L*(r+1)/n */
        char list[256] = "";
        int n_idle = 0;
        size_t len = 0;
        for (int i = 0; i < n_ranks; i++) {
            int f, l;
            pipe_shard_of(L, i, n_ranks, &f, &l);
            if (f < l) continue;
            if (n_idle++ < 16 && len < sizeof list - 16)
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%d", len ? " " : "", i);
        }
        fprintf(stderr, "llmvq plan: warning: %d ranks for %d blocks: %d ranks get no block and "
                "stay idle: %s%s\n", n_ranks, L, n_idle, list, n_idle > 16 ? " ..." : "");
    }
    if (access(p.calib_path, R_OK) != 0)
        fprintf(stderr, "llmvq plan: warning: %s: cannot read calibration.data: %s\n",
                p.calib_path, strerror(errno));
    if (rates_path) {
        LV_TRY(load_rates(rates_path, &r));
        int Tc = 0;
        lv_model_config cc = cal_config(&p, 256, 768, 8, 256, &Tc);
        if ((int)r.shape_dim != cc.dim)
            fprintf(stderr, "llmvq plan: warning: %s: forward and fine-tuning rates were measured "
                    "on %.0f-dim blocks, this job would measure on %d-dim ones (GEMM efficiency "
                    "depends on the shape)\n", rates_path, r.shape_dim, cc.dim);
    } else
        LV_TRY(measure_rates(&p, &r));
    block_cost bc = predict_block(&p, &r);
    const pv_cost pvc = predict_pv(&p, &r, n_ranks);
    LV_ALLOC(rp, (size_t)n_ranks);
    double total = 0;
    for (int i = 0; i < n_ranks; i++) {
        rank_plan *q = &rp[i];
        pipe_shard_of(L, i, n_ranks, &q->first, &q->last);
        int nb = q->last - q->first;
        /* streaming: the rank waits for the pipeline to fill (one chunk of 8
         * sequences through every block before its shard), then relays every
         * chunk through its own FP blocks while the next rank waits */
        double chunks = ceil((double)p.n_seq / 8.0);
        q->prefix_s = (i < n_ranks - 1 ? nb * bc.fwd : 0) + q->first * bc.fwd / chunks;
        q->blocks_s = nb * bc.block;
        q->total_s = q->prefix_s + q->blocks_s;
        q->mem = predict_mem(&p, nb, q->first, q->last, (int)r.threads);
        if (q->total_s > total) total = q->total_s;
    }
    if (json)
        LV_TRY(print_json(&p, &r, rates_path == NULL, n_ranks, rp, &bc, total,
                          p.pv_enable ? &pvc : NULL));
    else
        print_human(&p, &r, rates_path == NULL, rates_path, n_ranks, rp, &bc, total,
                    p.pv_enable ? &pvc : NULL);
done:
    free(rp);
    job_free(j);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("plan");
}
