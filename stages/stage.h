/* stage.h: the stages of llmvq (calibration, VPTQ init, AQLM search,
 * fine-tuning, PV-tuning, eval). */
#ifndef STAGE_H
#define STAGE_H

#include <stdint.h>

#include "lv.h"
#include "lv_model.h"

/* ---------------- eval: perplexity ----------------
 * Convention (DESIGN.md): the token stream is cut into non-overlapping windows
 * of ctx tokens, each run from position 0 with no state carried over; position
 * p of window k predicts token k*ctx + p + 1, so every token after the first is
 * predicted once; a short last window counts; ppl = exp(mean NLL). */

typedef struct {
    int ctx;            /* window length; <= 0 means the model's seq_len */
    int64_t max_tokens; /* use only the first max_tokens tokens; <= 0 = all */
    int batch;          /* windows per forward call; <= 0 = automatic */
    int progress;       /* print progress with ETA on stderr */
} stage_eval_opts;

typedef struct {
    double nll;         /* mean negative log-likelihood, nats per predicted token */
    double ppl;         /* exp(nll) */
    int64_t n_tokens;   /* tokens used (including the first, unpredicted one) */
    int64_t n_predicted;
    int ctx;
    double wall_s;
    double tokens_per_s;
} stage_eval_result;

lv_status stage_eval_ppl(const lv_model *m, const int32_t *tokens, int64_t n,
                         const stage_eval_opts *opts, stage_eval_result *res);

/* ---------------- generate ---------------- */

typedef struct {
    int steps;          /* total positions including the prompt; <= 0: seq_len */
    float temperature;  /* 0 = greedy */
    float top_p;        /* nucleus; >= 1 or <= 0 disables */
    uint64_t seed;
} stage_gen_opts;

/* Sample from `prompt` tokens (must start with BOS; n_prompt >= 1). Calls emit
 * with each new token (after the prompt) until steps or BOS/EOS is produced.
 * Tokens out: (*out, *n_out) malloc'd, the whole sequence including prompt. */
typedef void (*stage_gen_emit)(void *user, int32_t prev, int32_t token);
lv_status stage_generate(const lv_model *m, const int32_t *prompt, int n_prompt,
                         const stage_gen_opts *opts, stage_gen_emit emit, void *user,
                         int32_t **out, int *n_out);

#endif
