/* cmd_eval.c: `llmvq eval` (perplexity) and `llmvq generate` (sampling). */
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "pipe.h"
#include "stage.h"

lv_status pipe_find_tokenizer(const char *model_path, int vocab, char *buf, size_t cap)
{
    lv_status st = LV_OK;
    char dir[4096];
    struct stat sb;
    snprintf(dir, sizeof dir, "%s", model_path);
    if (stat(model_path, &sb) != 0 || !S_ISDIR(sb.st_mode)) {
        char *slash = strrchr(dir, '/');
        if (slash)
            *slash = '\0';
        else
            snprintf(dir, sizeof dir, ".");
    }
    snprintf(buf, cap, "%s/tokenizer.bin", dir);
    if (access(buf, R_OK) == 0) goto done;
    snprintf(buf, cap, "%s/tok%d.bin", dir, vocab);
    if (access(buf, R_OK) == 0) goto done;
    LV_FAIL(LV_ERR_INVALID_ARG,
            "%s: no tokenizer given and none found beside the model (tried tokenizer.bin and "
            "tok%d.bin in %s); pass --tokenizer PATH",
            model_path, vocab, dir);
done:
    return st;
}

static lv_status open_tokenizer(const char *model_path, const char *tok_path, int vocab,
                                io_tokenizer **tok)
{
    lv_status st = LV_OK;
    char found[4200];
    if (!tok_path) {
        LV_TRY(pipe_find_tokenizer(model_path, vocab, found, sizeof found));
        tok_path = found;
    }
    LV_TRY(io_tokenizer_open(tok, tok_path, vocab));
done:
    return st;
}

/* The model at path. A quantized one (.h5, HF AQLM directory) runs straight from its
 * codes (*q holds them; free after the model) unless dequant asks for float weights. */
static lv_status open_model(const char *path, int dequant, lv_model **m, lv_qmodel **q)
{
    lv_status st = LV_OK;
    *q = NULL;
    if (dequant)
        LV_TRY(io_model_open(m, path, IO_MODEL_AUTO));
    else
        LV_TRY(io_model_open_quantized(m, q, path));
    if (*q)
        lv_log("%s: %dx%dg%d quantized linears, multiplied from their codes (--dequant: "
               "float weights)", path, (*q)->M, (*q)->nbits, (*q)->g);
done:
    return st;
}

static void print_eval_json(const char *model, const char *data, const stage_eval_result *r,
                            int from_codes)
{
    cJSON *o = cJSON_CreateObject();
    cJSON_AddStringToObject(o, "model", model);
    cJSON_AddStringToObject(o, "data", data);
    cJSON_AddNumberToObject(o, "ppl", r->ppl);
    cJSON_AddNumberToObject(o, "nll", r->nll);
    cJSON_AddNumberToObject(o, "n_tokens", (double)r->n_tokens);
    cJSON_AddNumberToObject(o, "n_predicted", (double)r->n_predicted);
    cJSON_AddNumberToObject(o, "ctx", r->ctx);
    cJSON_AddNumberToObject(o, "wall_s", r->wall_s);
    cJSON_AddNumberToObject(o, "tokens_per_s", r->tokens_per_s);
    cJSON_AddBoolToObject(o, "from_codes", from_codes);
    cJSON_AddNumberToObject(o, "peak_rss_bytes", (double)lv_peak_rss_bytes());
    char *s = cJSON_PrintUnformatted(o);
    if (s) printf("%s\n", s);
    free(s);
    cJSON_Delete(o);
}

int pipe_cmd_eval(int argc, char **argv)
{
    const char *model_path = NULL, *tok_path = NULL, *data_path = NULL;
    int ctx = 0, json = 0, batch = 0, quiet = 0, dequant = 0;
    int64_t max_tokens = 0;
    const pipe_opt opts[] = {
        {"model", PIPE_OPT_STR, &model_path, "model: llama2.c .bin or HF directory (required)"},
        {"tokenizer", PIPE_OPT_STR, &tok_path,
         "llama2.c tokenizer.bin (default: tokenizer.bin or tok<vocab>.bin beside the model)"},
        {"data", PIPE_OPT_STR, &data_path, "text file, or token file (LVQTOK01) (required)"},
        {"ctx", PIPE_OPT_INT, &ctx, "window length in tokens (default: the model's seq_len)"},
        {"max-tokens", PIPE_OPT_I64, &max_tokens, "use only the first N tokens (default: all)"},
        {"batch", PIPE_OPT_INT, &batch, "windows per forward pass (default: automatic)"},
        {"json", PIPE_OPT_FLAG, &json, "print the result as one JSON object on stdout"},
        {"quiet", PIPE_OPT_FLAG, &quiet, "no progress on stderr"},
        {"dequant", PIPE_OPT_FLAG, &dequant,
         "quantized model: dequantize to float weights (default: multiply from the codes)"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *synopsis = "--model PATH --data PATH [--tokenizer PATH] [--ctx N] [--json]";
    int n_pos = 0;
    int rc = pipe_opts_parse("eval", synopsis, opts, n_opts, argc, argv, NULL, 0, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (!model_path || !data_path) {
        fprintf(stderr, "llmvq eval: --model and --data are required (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (quiet) lv_log_set_quiet(1);

    lv_status st = LV_OK;
    lv_model *m = NULL;
    lv_qmodel *q = NULL;
    io_tokenizer *tok = NULL;
    int32_t *tokens = NULL;
    int64_t n = 0;
    stage_eval_result res = {0};
    LV_TRY(open_model(model_path, dequant, &m, &q));
    lv_log("model %s: dim %d, %d layers, %d/%d heads, vocab %d, seq_len %d", model_path,
           m->cfg.dim, m->cfg.n_layers, m->cfg.n_heads, m->cfg.n_kv_heads, m->cfg.vocab_size,
           m->cfg.seq_len);
    {
        /* A token file needs no tokenizer; text does. */
        char magic[8] = {0};
        FILE *f = fopen(data_path, "rb");
        int is_tok = f && fread(magic, 1, 8, f) == 8 && !memcmp(magic, "LVQTOK01", 8);
        if (f) fclose(f);
        if (!is_tok) LV_TRY(open_tokenizer(model_path, tok_path, m->cfg.vocab_size, &tok));
    }
    LV_TRY(io_data_tokens(data_path, tok, m->cfg.vocab_size, &tokens, &n));
    lv_log("data %s: %lld tokens", data_path, (long long)n);
    stage_eval_opts eo = {.ctx = ctx, .max_tokens = max_tokens, .batch = batch,
                          .progress = !quiet};
    LV_TRY(stage_eval_ppl(m, tokens, n, &eo, &res));
    if (json)
        print_eval_json(model_path, data_path, &res, q != NULL);
    else
        printf("ppl %.4f  (nll %.5f nats/token, %lld tokens, ctx %d, %.1f s, %.0f tokens/s)\n",
               res.ppl, res.nll, (long long)res.n_tokens, res.ctx, res.wall_s,
               res.tokens_per_s);
    lv_log("peak RSS %.1f MiB", (double)lv_peak_rss_bytes() / 1048576.0);
done:
    free(tokens);
    io_tokenizer_free(tok);
    io_model_free(m);
    lv_qmodel_free(q);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("eval");
}

typedef struct {
    const io_tokenizer *tok;
    int64_t n;
} gen_state;

static void gen_emit(void *user, int32_t prev, int32_t token)
{
    gen_state *g = user;
    fputs(io_tokenizer_decode(g->tok, prev, token), stdout);
    fflush(stdout);
    g->n++;
}

int pipe_cmd_generate(int argc, char **argv)
{
    const char *model_path = NULL, *tok_path = NULL, *prompt = "";
    int steps = 256;
    float temperature = 1.0f, top_p = 0.9f;
    int64_t seed = 42;
    int dequant = 0;
    const pipe_opt opts[] = {
        {"model", PIPE_OPT_STR, &model_path, "model: llama2.c .bin or HF directory (required)"},
        {"tokenizer", PIPE_OPT_STR, &tok_path,
         "llama2.c tokenizer.bin (default: tokenizer.bin or tok<vocab>.bin beside the model)"},
        {"prompt", PIPE_OPT_STR, &prompt, "text to start from (default: empty, i.e. BOS only)"},
        {"steps", PIPE_OPT_INT, &steps, "positions to run, prompt included (default 256)"},
        {"temperature", PIPE_OPT_FLOAT, &temperature, "0 = greedy (default 1.0)"},
        {"top-p", PIPE_OPT_FLOAT, &top_p, "nucleus sampling threshold (default 0.9)"},
        {"seed", PIPE_OPT_I64, &seed, "random seed (default 42)"},
        {"dequant", PIPE_OPT_FLAG, &dequant,
         "quantized model: dequantize to float weights (default: multiply from the codes)"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    const char *synopsis = "--model PATH [--prompt TEXT] [--steps N] [--temperature T] "
                           "[--top-p P] [--seed S]";
    int n_pos = 0;
    int rc = pipe_opts_parse("generate", synopsis, opts, n_opts, argc, argv, NULL, 0, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (!model_path) {
        fprintf(stderr, "llmvq generate: --model is required (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (temperature < 0.0f || steps < 1) {
        fprintf(stderr, "llmvq generate: need --temperature >= 0 and --steps >= 1\n");
        return PIPE_EXIT_USAGE;
    }

    lv_status st = LV_OK;
    lv_model *m = NULL;
    lv_qmodel *q = NULL;
    io_tokenizer *tok = NULL;
    int32_t *ptoks = NULL, *out = NULL;
    int64_t n_prompt = 0;
    int n_out = 0;
    LV_TRY(open_model(model_path, dequant, &m, &q));
    LV_TRY(open_tokenizer(model_path, tok_path, m->cfg.vocab_size, &tok));
    LV_TRY(io_tokenizer_encode(tok, prompt, strlen(prompt), 1, 0, &ptoks, &n_prompt));
    if (steps > m->cfg.seq_len) steps = m->cfg.seq_len;
    if (n_prompt >= steps)
        LV_FAIL(LV_ERR_INVALID_ARG, "prompt is %lld tokens, no room within --steps %d",
                (long long)n_prompt, steps);
    /* Echo the prompt as the model sees it, then the continuation. */
    for (int64_t i = 1; i < n_prompt; i++)
        fputs(io_tokenizer_decode(tok, ptoks[i - 1], ptoks[i]), stdout);
    gen_state gs = {.tok = tok, .n = 0};
    stage_gen_opts go = {.steps = steps, .temperature = temperature, .top_p = top_p,
                         .seed = (uint64_t)seed};
    double t0 = lv_now();
    LV_TRY(stage_generate(m, ptoks, (int)n_prompt, &go, gen_emit, &gs, &out, &n_out));
    double dt = lv_now() - t0;
    printf("\n");
    lv_log("%lld tokens in %.2f s (%.1f tokens/s)", (long long)gs.n, dt,
           dt > 0 ? (double)gs.n / dt : 0.0);
done:
    free(out);
    free(ptoks);
    io_tokenizer_free(tok);
    io_model_free(m);
    lv_qmodel_free(q);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("generate");
}
