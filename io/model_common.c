/* model_common.c: what every model loader and writer shares: config checks,
 * the tensor table, NaN/Inf checks, presets, HF config.json, synthetic models. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

/* ---------------------------------------------------------------- open / free */

lv_status io_model_open(lv_model **out, const char *path, io_model_format fmt)
{
    lv_status st = LV_OK;
    if (!out || !path) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_open: NULL argument");
    *out = NULL;
    if (fmt == IO_MODEL_AUTO) {
        struct stat sb;
        if (stat(path, &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
        fmt = S_ISDIR(sb.st_mode) ? IO_MODEL_HF : IO_MODEL_LLAMA2C;
        if (fmt == IO_MODEL_LLAMA2C) {
            static const unsigned char hdf5_sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
            unsigned char head[8] = {0};
            FILE *f = fopen(path, "rb");
            if (f && fread(head, 1, 8, f) == 8 && !memcmp(head, hdf5_sig, 8)) fmt = IO_MODEL_QH5;
            if (f) fclose(f);
        }
    }
    int aqlm = 0; /* an HF directory may hold an AQLM-quantized model */
    if (fmt == IO_MODEL_HF) LV_TRY(io_hf_is_aqlm(path, &aqlm));
    if (fmt == IO_MODEL_HF && aqlm)
        LV_TRY(io_model_open_hf_aqlm(out, path));
    else if (fmt == IO_MODEL_HF)
        LV_TRY(io_model_open_hf(out, path));
    else if (fmt == IO_MODEL_LLAMA2C)
        LV_TRY(io_model_open_llama2c(out, path));
    else if (fmt == IO_MODEL_QH5)
        LV_TRY(io_model_open_qh5(out, path));
    else
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: unknown model format %d", path, (int)fmt);
done:
    return st;
}

void io_model_free(lv_model *m)
{
    if (!m) return;
    lv_model_storage *s = m->storage;
    if (s) {
        for (int i = 0; i < s->n_maps; i++) io_map_close(&s->maps[i]);
        free(s->maps);
        free(s->arena);
        free(s);
    }
    free(m->layers);
    free(m);
}

lv_status io_model_alloc(lv_model **out, const lv_model_config *cfg)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    *out = NULL;
    LV_ALLOC(m, 1);
    m->cfg = *cfg;
    LV_ALLOC(m->layers, cfg->n_layers);
    LV_ALLOC(m->storage, 1);
    *out = m;
    m = NULL;
done:
    io_model_free(m);
    return st;
}

/* ---------------------------------------------------------------- config */

lv_status io_config_check(const lv_model_config *c, const char *what)
{
    lv_status st = LV_OK;
    const struct {
        const char *name;
        int v, max;
    } f[] = {
        {"dim", c->dim, IO_MAX_DIM},           {"hidden_dim", c->hidden_dim, IO_MAX_DIM},
        {"n_layers", c->n_layers, IO_MAX_LAYERS}, {"n_heads", c->n_heads, IO_MAX_HEADS},
        {"n_kv_heads", c->n_kv_heads, IO_MAX_HEADS}, {"vocab_size", c->vocab_size, IO_MAX_VOCAB},
        {"seq_len", c->seq_len, IO_MAX_SEQ},
    };
    for (size_t i = 0; i < sizeof f / sizeof f[0]; i++)
        if (f[i].v <= 0 || f[i].v > f[i].max)
            LV_FAIL(LV_ERR_FORMAT, "%s: %s = %d is out of range (1..%d)", what, f[i].name, f[i].v,
                    f[i].max);
    if (c->dim % c->n_heads != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: dim %d is not a multiple of n_heads %d", what, c->dim,
                c->n_heads);
    if (c->n_heads % c->n_kv_heads != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: n_heads %d is not a multiple of n_kv_heads %d", what,
                c->n_heads, c->n_kv_heads);
    if ((c->dim / c->n_heads) % 2 != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: head_dim %d (dim / n_heads) is odd; RoPE needs pairs", what,
                c->dim / c->n_heads);
    if (!(c->norm_eps > 0.0f) || !isfinite(c->norm_eps))
        LV_FAIL(LV_ERR_FORMAT, "%s: norm_eps %g must be positive and finite", what,
                (double)c->norm_eps);
    if (!(c->rope_theta > 0.0f) || !isfinite(c->rope_theta))
        LV_FAIL(LV_ERR_FORMAT, "%s: rope_theta %g must be positive and finite", what,
                (double)c->rope_theta);
    if (c->rope != LV_ROPE_INTERLEAVED && c->rope != LV_ROPE_HALF)
        LV_FAIL(LV_ERR_FORMAT, "%s: unknown RoPE style %d", what, (int)c->rope);
done:
    return st;
}

typedef struct {
    const char *name;
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len, tied;
} io_preset;

/* Tied: the llama2.c TinyStories exports share the classifier; LLaMA-2 does not. */
static const io_preset io_presets[] = {
    {"stories260K", 64, 172, 5, 8, 4, 512, 512, 1},
    {"stories15M", 288, 768, 6, 6, 6, 32000, 256, 1},
    {"stories42M", 512, 1376, 8, 8, 8, 32000, 1024, 1},
    {"stories110M", 768, 2048, 12, 12, 12, 32000, 1024, 1},
    {"llama2-7b", 4096, 11008, 32, 32, 32, 32000, 4096, 0},
    {"llama2-13b", 5120, 13824, 40, 40, 40, 32000, 4096, 0},
    {"llama2-70b", 8192, 28672, 80, 64, 8, 32000, 4096, 0},
    {"tiny-bench", 512, 1376, 8, 8, 8, 512, 256, 0},
};

lv_status io_config_preset(lv_model_config *cfg, const char *name)
{
    lv_status st = LV_OK;
    if (!cfg || !name) LV_FAIL(LV_ERR_INVALID_ARG, "io_config_preset: NULL argument");
    for (size_t i = 0; i < sizeof io_presets / sizeof io_presets[0]; i++) {
        const io_preset *p = &io_presets[i];
        if (strcmp(p->name, name) != 0) continue;
        *cfg = (lv_model_config){.dim = p->dim,
                                 .hidden_dim = p->hidden_dim,
                                 .n_layers = p->n_layers,
                                 .n_heads = p->n_heads,
                                 .n_kv_heads = p->n_kv_heads,
                                 .vocab_size = p->vocab_size,
                                 .seq_len = p->seq_len,
                                 .norm_eps = 1e-5f,
                                 .rope_theta = 10000.0f,
                                 .rope = LV_ROPE_INTERLEAVED,
                                 .tied_cls = p->tied};
        goto done;
    }
    char known[256] = "";
    for (size_t i = 0; i < sizeof io_presets / sizeof io_presets[0]; i++) {
        strncat(known, i ? ", " : "", sizeof known - strlen(known) - 1);
        strncat(known, io_presets[i].name, sizeof known - strlen(known) - 1);
    }
    LV_FAIL(LV_ERR_INVALID_ARG, "%s: unknown model preset; known presets: %s", name, known);
done:
    return st;
}

/* An integer field of config.json: *v untouched when absent and not required. */
static lv_status hf_int(const cJSON *root, const char *key, int required, int *v, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) {
        if (required) LV_FAIL(LV_ERR_FORMAT, "%s: missing key \"%s\"", path, key);
        goto done;
    }
    double d = it->valuedouble;
    if (!cJSON_IsNumber(it) || d != floor(d) || d < -2147483648.0 || d > 2147483647.0)
        LV_FAIL(LV_ERR_FORMAT, "%s: \"%s\" must be an integer", path, key);
    *v = (int)d;
done:
    return st;
}

static lv_status hf_float(const cJSON *root, const char *key, float *v, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, key);
    if (!it || cJSON_IsNull(it)) goto done;
    if (!cJSON_IsNumber(it)) LV_FAIL(LV_ERR_FORMAT, "%s: \"%s\" must be a number", path, key);
    *v = (float)it->valuedouble;
done:
    return st;
}

/* Features of HF LLaMA configs that our forward pass does not implement. */
static lv_status hf_reject_unsupported(const cJSON *root, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(root, "model_type");
    if (it && (!cJSON_IsString(it) || strcmp(it->valuestring, "llama") != 0))
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: model_type \"%s\" is not supported (only \"llama\")", path,
                cJSON_IsString(it) ? it->valuestring : "?");
    it = cJSON_GetObjectItemCaseSensitive(root, "hidden_act");
    if (it && (!cJSON_IsString(it) || strcmp(it->valuestring, "silu") != 0))
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: hidden_act \"%s\" is not supported (only \"silu\")", path,
                cJSON_IsString(it) ? it->valuestring : "?");
    it = cJSON_GetObjectItemCaseSensitive(root, "rope_scaling");
    if (it && !cJSON_IsNull(it))
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: rope_scaling is not supported (must be null)", path);
    const char *bias[] = {"attention_bias", "mlp_bias"};
    for (int i = 0; i < 2; i++) {
        it = cJSON_GetObjectItemCaseSensitive(root, bias[i]);
        if (cJSON_IsTrue(it))
            LV_FAIL(LV_ERR_UNSUPPORTED, "%s: %s = true is not supported", path, bias[i]);
    }
done:
    return st;
}

/* Defaults follow HF LlamaConfig where the key is optional. */
static lv_status hf_config_fill(lv_model_config *c, const cJSON *root, const char *path)
{
    lv_status st = LV_OK;
    *c = (lv_model_config){.norm_eps = 1e-6f, .rope_theta = 10000.0f, .seq_len = 2048,
                           .rope = LV_ROPE_HALF};
    LV_TRY(hf_reject_unsupported(root, path));
    LV_TRY(hf_int(root, "hidden_size", 1, &c->dim, path));
    LV_TRY(hf_int(root, "intermediate_size", 1, &c->hidden_dim, path));
    LV_TRY(hf_int(root, "num_hidden_layers", 1, &c->n_layers, path));
    LV_TRY(hf_int(root, "num_attention_heads", 1, &c->n_heads, path));
    LV_TRY(hf_int(root, "vocab_size", 1, &c->vocab_size, path));
    c->n_kv_heads = c->n_heads;
    LV_TRY(hf_int(root, "num_key_value_heads", 0, &c->n_kv_heads, path));
    LV_TRY(hf_int(root, "max_position_embeddings", 0, &c->seq_len, path));
    LV_TRY(hf_float(root, "rms_norm_eps", &c->norm_eps, path));
    LV_TRY(hf_float(root, "rope_theta", &c->rope_theta, path));
    const cJSON *tie = cJSON_GetObjectItemCaseSensitive(root, "tie_word_embeddings");
    if (tie && !cJSON_IsBool(tie) && !cJSON_IsNull(tie))
        LV_FAIL(LV_ERR_FORMAT, "%s: \"tie_word_embeddings\" must be true or false", path);
    c->tied_cls = cJSON_IsTrue(tie) ? 1 : 0;
    int head_dim = 0;
    LV_TRY(hf_int(root, "head_dim", 0, &head_dim, path));
    if (head_dim && c->n_heads > 0 && head_dim * c->n_heads != c->dim)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: head_dim %d != hidden_size / num_attention_heads", path,
                head_dim);
    LV_TRY(io_config_check(c, path));
done:
    return st;
}

lv_status io_config_read_hf(lv_model_config *cfg, const char *config_json_path)
{
    lv_status st = LV_OK;
    char *text = NULL;
    size_t n = 0;
    cJSON *root = NULL;
    if (!cfg || !config_json_path) LV_FAIL(LV_ERR_INVALID_ARG, "io_config_read_hf: NULL argument");
    LV_TRY(io_read_file(config_json_path, &text, &n));
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts(text, n, &end, 0);
    if (!root)
        LV_FAIL(LV_ERR_FORMAT, "%s: invalid JSON near byte %td", config_json_path,
                end ? end - text : (ptrdiff_t)0);
    if (!cJSON_IsObject(root)) LV_FAIL(LV_ERR_FORMAT, "%s: not a JSON object", config_json_path);
    LV_TRY(hf_config_fill(cfg, root, config_json_path));
done:
    cJSON_Delete(root);
    free(text);
    return st;
}

/* ---------------------------------------------------------------- tensor table */

int io_tensor_count(const lv_model_config *c) { return 2 + 9 * c->n_layers + (c->tied_cls ? 0 : 1); }

static const struct {
    io_tensor_kind kind;
    const char *hf, *l2c;
} io_layer_names[9] = {
    {IO_T_ATTN_NORM, "input_layernorm", "rms_att_weight"},
    {IO_T_WQ, "self_attn.q_proj", "wq"},
    {IO_T_WK, "self_attn.k_proj", "wk"},
    {IO_T_WV, "self_attn.v_proj", "wv"},
    {IO_T_WO, "self_attn.o_proj", "wo"},
    {IO_T_FFN_NORM, "post_attention_layernorm", "rms_ffn_weight"},
    {IO_T_W1, "mlp.gate_proj", "w1"},
    {IO_T_W2, "mlp.down_proj", "w2"},
    {IO_T_W3, "mlp.up_proj", "w3"},
};

static void layer_shape(const lv_model_config *c, io_tensor_kind k, int64_t *rows, int64_t *cols)
{
    int64_t d = c->dim, kv = lv_cfg_kv_dim(c), h = c->hidden_dim;
    switch (k) {
    case IO_T_WK:
    case IO_T_WV: *rows = kv, *cols = d; break;
    case IO_T_WQ:
    case IO_T_WO: *rows = d, *cols = d; break;
    case IO_T_W1:
    case IO_T_W3: *rows = h, *cols = d; break;
    case IO_T_W2: *rows = d, *cols = h; break;
    default: *rows = d, *cols = 0; break;
    }
}

void io_tensor_list(const lv_model_config *c, io_tensor_ref *out, io_name_style style)
{
    int hf = style == IO_NAMES_HF, n = 0;
    out[n++] = (io_tensor_ref){.kind = IO_T_EMB, .layer = -1, .rows = c->vocab_size, .cols = c->dim};
    snprintf(out[0].name, sizeof out[0].name, "%s",
             hf ? "model.embed_tokens.weight" : "token_embedding_table");
    for (int l = 0; l < c->n_layers; l++)
        for (int i = 0; i < 9; i++) {
            io_tensor_ref *r = &out[n++];
            *r = (io_tensor_ref){.kind = io_layer_names[i].kind, .layer = l};
            layer_shape(c, r->kind, &r->rows, &r->cols);
            if (hf)
                snprintf(r->name, sizeof r->name, "model.layers.%d.%s.weight", l,
                         io_layer_names[i].hf);
            else
                snprintf(r->name, sizeof r->name, "layers.%d.%s", l, io_layer_names[i].l2c);
        }
    out[n] = (io_tensor_ref){.kind = IO_T_FINAL_NORM, .layer = -1, .rows = c->dim};
    snprintf(out[n].name, sizeof out[n].name, "%s", hf ? "model.norm.weight" : "rms_final_weight");
    n++;
    if (!c->tied_cls) {
        out[n] = (io_tensor_ref){.kind = IO_T_WCLS, .layer = -1, .rows = c->vocab_size,
                                 .cols = c->dim};
        snprintf(out[n].name, sizeof out[n].name, "%s", hf ? "lm_head.weight" : "wcls");
    }
}

const float **io_model_slot(lv_model *m, io_tensor_kind kind, int layer)
{
    lv_layer *L = layer >= 0 ? &m->layers[layer] : NULL;
    switch (kind) {
    case IO_T_EMB: return &m->tok_emb;
    case IO_T_FINAL_NORM: return &m->final_norm;
    case IO_T_WCLS: return &m->wcls;
    case IO_T_ATTN_NORM: return &L->attn_norm;
    case IO_T_WQ: return &L->wq;
    case IO_T_WK: return &L->wk;
    case IO_T_WV: return &L->wv;
    case IO_T_WO: return &L->wo;
    case IO_T_FFN_NORM: return &L->ffn_norm;
    case IO_T_W1: return &L->w1;
    case IO_T_W2: return &L->w2;
    case IO_T_W3: return &L->w3;
    }
    LV_ASSERT(0 && "unknown tensor kind");
    return NULL;
}

const float *io_model_tensor(const lv_model *m, io_tensor_kind kind, int layer)
{
    const lv_layer *L = layer >= 0 ? &m->layers[layer] : NULL;
    switch (kind) {
    case IO_T_EMB: return m->tok_emb;
    case IO_T_FINAL_NORM: return m->final_norm;
    case IO_T_WCLS: return m->wcls;
    case IO_T_ATTN_NORM: return L->attn_norm;
    case IO_T_WQ: return L->wq;
    case IO_T_WK: return L->wk;
    case IO_T_WV: return L->wv;
    case IO_T_WO: return L->wo;
    case IO_T_FFN_NORM: return L->ffn_norm;
    case IO_T_W1: return L->w1;
    case IO_T_W2: return L->w2;
    case IO_T_W3: return L->w3;
    }
    LV_ASSERT(0 && "unknown tensor kind");
    return NULL;
}

/* Index of the first non-finite value, or -1. Parallel over chunks; the
 * minimum keeps the reported index deterministic. */
static int64_t first_nonfinite(const float *x, int64_t n)
{
    int64_t bad = INT64_MAX;
#pragma omp parallel for reduction(min : bad) schedule(static)
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(x[i]) && i < bad) bad = i;
    return bad == INT64_MAX ? -1 : bad;
}

lv_status io_tensor_check_finite(const float *x, int64_t n, const char *path, const char *name)
{
    lv_status st = LV_OK;
    int64_t bad = first_nonfinite(x, n);
    if (bad >= 0)
        LV_FAIL(LV_ERR_NUMERIC, "%s: tensor %s has %s at index %lld", path, name,
                isnan(x[bad]) ? "NaN" : "Inf", (long long)bad);
done:
    return st;
}

lv_status io_model_check_finite(const lv_model *m, const char *path, io_name_style style)
{
    lv_status st = LV_OK;
    io_tensor_ref *refs = NULL;
    int n = io_tensor_count(&m->cfg);
    LV_ALLOC(refs, n);
    io_tensor_list(&m->cfg, refs, style);
    for (int i = 0; i < n; i++)
        LV_TRY(io_tensor_check_finite(io_model_tensor(m, refs[i].kind, refs[i].layer),
                                      io_tensor_numel(&refs[i]), path, refs[i].name));
done:
    free(refs);
    return st;
}

int64_t io_rope_src_row(int64_t r, int hd, int to_half)
{
    int64_t h = r / hd, rem = r % hd, half = hd / 2;
    if (to_half) /* HF row h*hd + c*half + j <- interleaved row h*hd + 2j + c */
        return h * hd + 2 * (rem % half) + rem / half;
    /* interleaved row h*hd + 2j + c <- HF row h*hd + c*half + j */
    return h * hd + (rem % 2) * half + rem / 2;
}

/* ---------------------------------------------------------------- synthetic */

/* Each chunk of IO_SYNTH_CHUNK values has its own RNG stream, so the result
 * does not depend on the number of threads. */
#define IO_SYNTH_CHUNK (1 << 20)

static void synth_fill(float *x, int64_t n, uint64_t seed, float stddev)
{
    int64_t n_chunks = (n + IO_SYNTH_CHUNK - 1) / IO_SYNTH_CHUNK;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; c++) {
        lv_rng r;
        lv_rng_seed(&r, seed ^ (0x9e3779b97f4a7c15ULL * (uint64_t)(c + 1)));
        int64_t end = (c + 1) * IO_SYNTH_CHUNK < n ? (c + 1) * IO_SYNTH_CHUNK : n;
        for (int64_t i = c * IO_SYNTH_CHUNK; i < end; i++) x[i] = stddev * lv_rng_normal(&r);
    }
}

lv_status io_model_synth(lv_model **out, const lv_model_config *cfg, uint64_t seed)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    io_tensor_ref *refs = NULL;
    if (!out || !cfg) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_synth: NULL argument");
    *out = NULL;
    LV_TRY(io_config_check(cfg, "synthetic model"));
    LV_TRY(io_model_alloc(&m, cfg));
    int n = io_tensor_count(cfg);
    LV_ALLOC(refs, n);
    io_tensor_list(cfg, refs, IO_NAMES_LLAMA2C);
    size_t total = 0;
    for (int i = 0; i < n; i++) total += (size_t)io_tensor_numel(&refs[i]);
    m->storage->arena = malloc(total * sizeof(float));
    if (!m->storage->arena)
        LV_FAIL(LV_ERR_NOMEM, "synthetic model: out of memory allocating %zu bytes",
                total * sizeof(float));
    m->storage->arena_floats = total;
    float *p = m->storage->arena;
    lv_rng seeds;
    lv_rng_seed(&seeds, seed);
    for (int i = 0; i < n; i++) {
        int64_t k = io_tensor_numel(&refs[i]);
        uint64_t s = lv_rng_u64(&seeds); /* drawn for every tensor: keeps streams aligned */
        if (refs[i].cols == 0)
            for (int64_t j = 0; j < k; j++) p[j] = 1.0f;
        else
            synth_fill(p, k, s, 0.02f);
        *io_model_slot(m, refs[i].kind, refs[i].layer) = p;
        p += k;
    }
    if (cfg->tied_cls) m->wcls = m->tok_emb;
    *out = m;
    m = NULL;
done:
    free(refs);
    io_model_free(m);
    return st;
}
