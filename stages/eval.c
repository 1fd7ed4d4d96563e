/* eval.c: perplexity over a token stream, DESIGN.md's convention (docs/eval.md).
 *
 * Window k holds tokens [k*ctx, min((k+1)*ctx, n)) and runs from position 0 with
 * no state carried over; its position p predicts token k*ctx + p + 1. So the
 * last position of a full window predicts the first token of the next window,
 * every token after the first is predicted exactly once, and only the very last
 * token of the stream has no target. A short last window counts; one of a single
 * token predicts nothing and is not run. Full windows go through the forward in
 * batches of B (same T = ctx); the short last window goes alone. */
#include <math.h>
#include <stdlib.h>

#include "kern.h"
#include "stage.h"

#define EVAL_LOGITS_BUDGET ((size_t)256 << 20) /* bytes of logits per batch (auto B) */
#define EVAL_MAX_AUTO_B 16
#define EVAL_PROGRESS_S 5.0

/* Windows per forward call: as many as fit the logits budget, at most 16. */
static int eval_auto_batch(const lv_model_config *c, int ctx, int64_t n_full)
{
    size_t per = (size_t)ctx * (size_t)c->vocab_size * sizeof(float);
    int64_t b = (int64_t)(EVAL_LOGITS_BUDGET / (per ? per : 1));
    if (b > EVAL_MAX_AUTO_B) b = EVAL_MAX_AUTO_B;
    if (b > n_full) b = n_full;
    return b < 1 ? 1 : (int)b;
}

/* NLL sum of B windows of T tokens starting at window k0 (all windows full
 * when T == ctx; the short last one otherwise, B == 1). */
static lv_status eval_windows(const lv_model *m, kern_fwd_ws *ws, const int32_t *tokens,
                              int64_t n, int ctx, int64_t k0, int B, int T, int32_t *targets,
                              double *nll_sum)
{
    lv_status st = LV_OK;
    const float *logits = NULL;
    const int32_t *in = tokens + k0 * ctx; /* consecutive windows are contiguous */
    for (int b = 0; b < B; b++)
        for (int p = 0; p < T; p++) {
            int64_t idx = (k0 + b) * ctx + p;
            targets[(int64_t)b * T + p] = idx + 1 < n ? tokens[idx + 1] : -1;
        }
    LV_TRY(kern_model_forward(m, in, B, T, ws, &logits));
    double s = kern_xent_sum_ref(logits, targets, (int64_t)B * T, m->cfg.vocab_size);
    if (!isfinite(s))
        LV_FAIL(LV_ERR_NUMERIC, "eval: non-finite loss in windows %lld..%lld", (long long)k0,
                (long long)(k0 + B - 1));
    *nll_sum += s;
done:
    return st;
}

static void eval_progress(double t0, int64_t done_w, int64_t total_w, int64_t tokens_done)
{
    double el = lv_now() - t0;
    double tps = el > 0 ? tokens_done / el : 0;
    double eta = done_w > 0 ? el * (double)(total_w - done_w) / (double)done_w : 0;
    lv_log("eval: %lld/%lld windows, %.0f tokens/s, ETA %.0f s", (long long)done_w,
           (long long)total_w, tps, eta);
}

static lv_status eval_check_args(const lv_model *m, const int32_t *tokens, int64_t n,
                                 int ctx)
{
    lv_status st = LV_OK;
    if (ctx > m->cfg.seq_len)
        LV_FAIL(LV_ERR_INVALID_ARG,
                "eval: ctx %d exceeds the model's seq_len %d (positions beyond it were never "
                "trained); use --ctx %d or less", ctx, m->cfg.seq_len, m->cfg.seq_len);
    if (n < 2)
        LV_FAIL(LV_ERR_INVALID_ARG, "eval: %lld token(s); at least 2 are needed to predict one",
                (long long)n);
    for (int64_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= m->cfg.vocab_size)
            LV_FAIL(LV_ERR_INVALID_ARG, "eval: token %lld has id %d, outside the vocabulary [0, %d)",
                    (long long)i, (int)tokens[i], m->cfg.vocab_size);
done:
    return st;
}

lv_status stage_eval_ppl(const lv_model *m, const int32_t *tokens, int64_t n,
                         const stage_eval_opts *opts, stage_eval_result *res)
{
    lv_status st = LV_OK;
    kern_fwd_ws *ws = NULL;
    int32_t *targets = NULL;
    if (!m || !tokens || !opts || !res) LV_FAIL(LV_ERR_INVALID_ARG, "stage_eval_ppl: NULL argument");
    const double t0 = lv_now();
    if (opts->max_tokens > 0 && opts->max_tokens < n) n = opts->max_tokens;
    int ctx = opts->ctx > 0 ? opts->ctx : m->cfg.seq_len;
    LV_TRY(eval_check_args(m, tokens, n, ctx));

    const int64_t n_full = n / ctx;
    const int tail = (int)(n - n_full * ctx); /* length of the short last window */
    const int64_t n_windows = n_full + (tail > 1);
    int B = opts->batch > 0 ? opts->batch : eval_auto_batch(&m->cfg, ctx, n_full);
    if (B > n_full) B = n_full > 0 ? (int)n_full : 1;
    const int T_ws = n_full > 0 ? ctx : tail;
    LV_TRY(kern_fwd_ws_init(&ws, &m->cfg, B, T_ws, 1));
    LV_ALLOC(targets, (size_t)B * T_ws);

    double nll_sum = 0, last_log = t0;
    int64_t done_w = 0;
    for (int64_t k0 = 0; k0 < n_full; k0 += B) {
        int nb = n_full - k0 < B ? (int)(n_full - k0) : B;
        LV_TRY(eval_windows(m, ws, tokens, n, ctx, k0, nb, ctx, targets, &nll_sum));
        done_w += nb;
        if (opts->progress && lv_now() - last_log >= EVAL_PROGRESS_S) {
            eval_progress(t0, done_w, n_windows, done_w * ctx);
            last_log = lv_now();
        }
    }
    if (tail > 1) {
        LV_TRY(eval_windows(m, ws, tokens, n, ctx, n_full, 1, tail, targets, &nll_sum));
        done_w++;
    }
    if (opts->progress) eval_progress(t0, done_w, n_windows, n);

    res->n_tokens = n;
    res->n_predicted = n - 1;
    res->nll = nll_sum / (double)(n - 1);
    res->ppl = exp(res->nll);
    res->ctx = ctx;
    res->wall_s = lv_now() - t0;
    res->tokens_per_s = res->wall_s > 0 ? (double)n / res->wall_s : 0;
done:
    free(targets);
    kern_fwd_ws_free(ws);
    return st;
}
