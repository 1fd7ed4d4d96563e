/* generate.c: sampling with a KV cache (docs/eval.md, "Generation").
 *
 * As llama2.c's generate: token 0 is the prompt's BOS; each step runs the current
 * token at position pos; while prompt tokens remain the next token is forced,
 * afterwards it is sampled. `steps` forward passes at most, so the sequence holds
 * at most steps + 1 tokens. A sampled BOS (1) or EOS (2) ends the run and is
 * neither emitted nor stored.
 *
 * Sampling: temperature 0 is argmax (first maximum on ties). Otherwise
 * softmax(logits / T), then with 0 < top_p < 1 the nucleus: tokens by probability
 * descending (ties: lower id first), cut where the cumulative probability first
 * reaches top_p, one draw of lv_rng_uniform scaled to the kept mass. Tokens with
 * p < (1 - top_p) / (vocab - 1) cannot be in the nucleus (all of them together
 * hold less than 1 - top_p), so they are dropped before the sort. */
#include <math.h>
#include <stdlib.h>

#include "kern.h"
#include "stage.h"

#define GEN_BOS 1
#define GEN_EOS 2

typedef struct {
    float p;
    int32_t id;
} gen_prob;

static int gen_prob_desc(const void *a, const void *b)
{
    const gen_prob *x = a, *y = b;
    if (x->p != y->p) return x->p < y->p ? 1 : -1;
    return (x->id > y->id) - (x->id < y->id);
}

static int32_t gen_argmax(const float *logits, int n)
{
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* probs (n) = softmax(logits / temperature). */
static void gen_softmax(float *probs, const float *logits, int n, float temperature)
{
    float mx = logits[0];
    for (int i = 1; i < n; i++)
        if (logits[i] > mx) mx = logits[i];
    double sum = 0;
    for (int i = 0; i < n; i++) {
        probs[i] = expf((logits[i] - mx) / temperature);
        sum += probs[i];
    }
    for (int i = 0; i < n; i++) probs[i] = (float)(probs[i] / sum);
}

/* Sample from probs (n); cand: scratch of n entries. */
static int32_t gen_sample(const float *probs, int n, float top_p, float u, gen_prob *cand)
{
    if (!(top_p > 0.0f && top_p < 1.0f)) {
        float cdf = 0;
        for (int i = 0; i < n; i++) {
            cdf += probs[i];
            if (u < cdf) return i;
        }
        return n - 1; /* rounding: u beyond the summed mass */
    }
    const float cutoff = n > 1 ? (1.0f - top_p) / (float)(n - 1) : 0.0f;
    int k = 0;
    for (int i = 0; i < n; i++)
        if (probs[i] >= cutoff) cand[k++] = (gen_prob){probs[i], i};
    qsort(cand, (size_t)k, sizeof *cand, gen_prob_desc);
    float cum = 0;
    int last = k - 1;
    for (int i = 0; i < k; i++) {
        cum += cand[i].p;
        if (cum >= top_p) {
            last = i;
            break;
        }
    }
    float r = u * cum, c = 0;
    for (int i = 0; i <= last; i++) {
        c += cand[i].p;
        if (r < c) return cand[i].id;
    }
    return cand[last].id;
}

static lv_status gen_check(const lv_model *m, const int32_t *prompt, int n_prompt,
                           const stage_gen_opts *opts)
{
    lv_status st = LV_OK;
    if (!m || !prompt || !opts) LV_FAIL(LV_ERR_INVALID_ARG, "stage_generate: NULL argument");
    if (n_prompt < 1 || prompt[0] != GEN_BOS)
        LV_FAIL(LV_ERR_INVALID_ARG, "generate: the prompt must start with BOS (%d)", GEN_BOS);
    if (n_prompt > m->cfg.seq_len)
        LV_FAIL(LV_ERR_INVALID_ARG, "generate: prompt of %d tokens exceeds the model's seq_len %d",
                n_prompt, m->cfg.seq_len);
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= m->cfg.vocab_size)
            LV_FAIL(LV_ERR_INVALID_ARG, "generate: prompt token %d has id %d, outside [0, %d)", i,
                    (int)prompt[i], m->cfg.vocab_size);
    if (!(opts->temperature >= 0.0f) || !isfinite(opts->temperature))
        LV_FAIL(LV_ERR_INVALID_ARG, "generate: temperature %g must be >= 0",
                (double)opts->temperature);
done:
    return st;
}

lv_status stage_generate(const lv_model *m, const int32_t *prompt, int n_prompt,
                         const stage_gen_opts *opts, stage_gen_emit emit, void *user,
                         int32_t **out, int *n_out)
{
    lv_status st = LV_OK;
    kern_kv_cache *kv = NULL;
    int32_t *seq = NULL;
    float *probs = NULL;
    gen_prob *cand = NULL;
    if (out) *out = NULL;
    if (n_out) *n_out = 0;
    LV_TRY(gen_check(m, prompt, n_prompt, opts));
    const int vocab = m->cfg.vocab_size;
    int steps = opts->steps > 0 ? opts->steps : m->cfg.seq_len;
    if (steps < n_prompt) steps = n_prompt; /* the prompt always runs to its end */
    if (steps > m->cfg.seq_len) steps = m->cfg.seq_len;
    lv_rng rng;
    lv_rng_seed(&rng, opts->seed);
    LV_TRY(kern_kv_cache_init(&kv, &m->cfg, steps));
    LV_ALLOC(seq, (size_t)steps + 1);
    LV_ALLOC(probs, vocab);
    LV_ALLOC(cand, vocab);
    for (int i = 0; i < n_prompt; i++) seq[i] = prompt[i];
    int n = n_prompt;
    for (int pos = 0; pos < steps; pos++) {
        const float *logits = NULL;
        LV_TRY(kern_decode_step(m, kv, seq[pos], pos, &logits));
        if (pos + 1 < n_prompt) continue; /* next token is forced by the prompt */
        int32_t next;
        if (opts->temperature == 0.0f) {
            next = gen_argmax(logits, vocab);
        } else {
            gen_softmax(probs, logits, vocab, opts->temperature);
            next = gen_sample(probs, vocab, opts->top_p, lv_rng_uniform(&rng), cand);
        }
        if (next == GEN_BOS || next == GEN_EOS) break;
        seq[n++] = next;
        if (emit) emit(user, seq[pos], next);
    }
    if (out) {
        *out = seq;
        seq = NULL;
    }
    if (n_out) *n_out = n;
done:
    free(cand);
    free(probs);
    free(seq);
    kern_kv_cache_free(kv);
    return st;
}
