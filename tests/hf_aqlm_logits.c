/* hf_aqlm_logits.c: test helper for tests/scripts/hf_aqlm_transformers.sh
 * (not installed, not a test by itself).
 *
 *   hf_aqlm_logits synth --from MODEL --M M --nbits B --g G --seed S --out model.h5
 *       a quantized model with MODEL's embeddings and norms and random codes
 *       (the first codes of every linear are 0, 2^(B-1)-1, 2^(B-1), 2^B-1: the
 *       edges of aqlm's signed storage), random codebooks and scales.
 *   hf_aqlm_logits logits --model PATH --tokenizer TOK --prompts FILE
 *                         --tokens OUT.json --logits OUT.f32
 *       encodes each non-empty line of FILE (BOS + text, at most seq_len
 *       tokens), runs llmvq's forward pass on each alone and writes the token
 *       ids ({"vocab": V, "prompts": [[ids], ...]}) and the logits (float32
 *       little-endian, (sum of prompt lengths, V) row-major). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "kern.h"

static const char *arg(int argc, char **argv, const char *name)
{
    for (int i = 0; i + 1 < argc; i++)
        if (!strcmp(argv[i], name)) return argv[i + 1];
    return NULL;
}

static lv_status synth(const char *from, int M, int nbits, int g, uint64_t seed, const char *out)
{
    lv_status st = LV_OK;
    lv_model *fp = NULL;
    lv_qmodel *q = NULL;
    lv_rng r;
    LV_TRY(io_model_open(&fp, from, IO_MODEL_AUTO));
    LV_TRY(lv_qmodel_init(&q, fp, M, nbits, g));
    lv_rng_seed(&r, seed);
    const uint32_t K = 1u << nbits;
    const uint16_t edge[4] = {0, (uint16_t)(K / 2 - 1), (uint16_t)(K / 2), (uint16_t)(K - 1)};
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &q->blocks[l].lin[k];
            int64_t nc = L->d_out * L->n_groups * L->M, nb = (int64_t)L->M * K * L->g;
            for (int64_t i = 0; i < nc; i++)
                L->codes[i] = i < 4 ? edge[i] : (uint16_t)(lv_rng_u64(&r) % K);
            for (int64_t i = 0; i < nb; i++) L->codebooks[i] = 0.5f * lv_rng_normal(&r) / (float)M;
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = 0.05f + 0.1f * lv_rng_uniform(&r);
        }
    LV_TRY(io_qmodel_write(q, out));
done:
    lv_qmodel_free(q);
    io_model_free(fp);
    return st;
}

static lv_status write_tokens(const char *path, int V, int32_t **ids, const int64_t *n, int np)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *arr = cJSON_AddArrayToObject(o, "prompts");
    char *s = NULL;
    FILE *f = NULL;
    cJSON_AddNumberToObject(o, "vocab", V);
    for (int p = 0; p < np; p++) {
        cJSON *a = cJSON_CreateArray();
        for (int64_t i = 0; i < n[p]; i++) cJSON_AddItemToArray(a, cJSON_CreateNumber(ids[p][i]));
        cJSON_AddItemToArray(arr, a);
    }
    if (!(s = cJSON_PrintUnformatted(o))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    if (!(f = fopen(path, "w")) || fputs(s, f) < 0) LV_FAIL(LV_ERR_IO, "%s: cannot write", path);
done:
    if (f && fclose(f) != 0 && st == LV_OK) st = LV_ERR_IO;
    cJSON_free(s);
    cJSON_Delete(o);
    return st;
}

static lv_status logits(const char *model, const char *tokp, const char *prompts,
                        const char *tok_out, const char *logit_out)
{
    enum { MAX_PROMPTS = 64 };
    lv_status st = LV_OK;
    lv_model *m = NULL;
    io_tokenizer *tok = NULL;
    kern_fwd_ws *ws = NULL;
    char *text = NULL;
    size_t len = 0;
    int32_t *ids[MAX_PROMPTS] = {0};
    int64_t n[MAX_PROMPTS] = {0};
    int np = 0;
    FILE *f = NULL;
    LV_TRY(io_model_open(&m, model, IO_MODEL_AUTO));
    LV_TRY(io_tokenizer_open(&tok, tokp, m->cfg.vocab_size));
    LV_TRY(io_read_file(prompts, &text, &len));
    for (char *line = strtok(text, "\n"); line && np < MAX_PROMPTS; line = strtok(NULL, "\n")) {
        if (!*line) continue;
        LV_TRY(io_tokenizer_encode(tok, line, strlen(line), 1, 0, &ids[np], &n[np]));
        if (n[np] > m->cfg.seq_len) n[np] = m->cfg.seq_len;
        np++;
    }
    if (!np) LV_FAIL(LV_ERR_INVALID_ARG, "%s: no prompts", prompts);
    LV_TRY(write_tokens(tok_out, m->cfg.vocab_size, ids, n, np));
    if (!(f = fopen(logit_out, "wb"))) LV_FAIL(LV_ERR_IO, "%s: cannot create", logit_out);
    for (int p = 0; p < np; p++) {
        const float *lg = NULL;
        LV_TRY(kern_fwd_ws_init(&ws, &m->cfg, 1, (int)n[p], 1));
        LV_TRY(kern_model_forward(m, ids[p], 1, (int)n[p], ws, &lg));
        size_t k = (size_t)n[p] * (size_t)m->cfg.vocab_size;
        if (fwrite(lg, sizeof(float), k, f) != k) LV_FAIL(LV_ERR_IO, "%s: write failed", logit_out);
        kern_fwd_ws_free(ws);
        ws = NULL;
    }
    fprintf(stderr, "hf_aqlm_logits: %d prompts of %lld..%lld tokens from %s\n", np,
            (long long)n[0], (long long)n[np - 1], model);
done:
    if (f && fclose(f) != 0 && st == LV_OK) st = LV_ERR_IO;
    kern_fwd_ws_free(ws);
    for (int p = 0; p < np; p++) free(ids[p]);
    free(text);
    io_tokenizer_free(tok);
    io_model_free(m);
    return st;
}

int main(int argc, char **argv)
{
    lv_status st = LV_ERR_INVALID_ARG;
    if (argc >= 2 && !strcmp(argv[1], "synth")) {
        const char *from = arg(argc, argv, "--from"), *out = arg(argc, argv, "--out");
        const char *M = arg(argc, argv, "--M"), *B = arg(argc, argv, "--nbits"),
                   *g = arg(argc, argv, "--g"), *seed = arg(argc, argv, "--seed");
        if (from && out && M && B && g)
            st = synth(from, atoi(M), atoi(B), atoi(g), seed ? strtoull(seed, NULL, 10) : 1, out);
    } else if (argc >= 2 && !strcmp(argv[1], "logits")) {
        const char *model = arg(argc, argv, "--model"), *tok = arg(argc, argv, "--tokenizer"),
                   *pr = arg(argc, argv, "--prompts"), *to = arg(argc, argv, "--tokens"),
                   *lo = arg(argc, argv, "--logits");
        if (model && tok && pr && to && lo) st = logits(model, tok, pr, to, lo);
    }
    if (st == LV_ERR_INVALID_ARG && !lv_last_error()[0]) {
        fprintf(stderr, "usage: hf_aqlm_logits synth|logits ... (see the comment in "
                        "tests/hf_aqlm_logits.c)\n");
        return 2;
    }
    if (st != LV_OK) fprintf(stderr, "hf_aqlm_logits: %s\n", lv_last_error());
    return st == LV_OK ? 0 : 1;
}
