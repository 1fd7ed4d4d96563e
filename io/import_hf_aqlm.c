/* import_hf_aqlm.c: reading a Hugging Face AQLM directory (ours or the AQLM
 * authors' checkpoints) into a quantized model (docs/formats-hf-aqlm.md).
 *
 * Everything is checked before use: the quantization config, every tensor's
 * dtype and shape against config.json, every code against 2^nbits, every
 * float for finiteness; errors name the file and the tensor. q/k stay in HF's
 * rotate-half row order (cfg.rope = LV_ROPE_HALF), as io_model_open_hf keeps them. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

/* The safetensors files of a directory, mapped and parsed. */
typedef struct {
    char **files; /* (n) paths, owned */
    io_map *maps; /* (n) */
    io_st_header *hdr; /* (n) */
    int n;
} hfa_files;

static void files_free(hfa_files *s)
{
    for (int i = 0; i < s->n; i++) {
        free(s->files[i]);
        if (s->maps) io_map_close(&s->maps[i]);
        if (s->hdr) io_st_header_free(&s->hdr[i]);
    }
    free(s->files);
    free(s->maps);
    free(s->hdr);
    *s = (hfa_files){0};
}

static lv_status files_add(hfa_files *s, const char *dir, const char *name, const char *origin)
{
    lv_status st = LV_OK;
    char path[4200];
    if (!*name || strchr(name, '/') || !strcmp(name, "..") || !strcmp(name, "."))
        LV_FAIL(LV_ERR_FORMAT, "%s: shard name \"%.200s\" must be a plain file name", origin, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    for (int i = 0; i < s->n; i++)
        if (!strcmp(s->files[i], path)) goto done;
    char **f = realloc(s->files, (size_t)(s->n + 1) * sizeof *f);
    if (!f) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", origin);
    s->files = f;
    if (!(s->files[s->n] = strdup(path))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", origin);
    s->n++;
done:
    return st;
}

/* model.safetensors, or every shard named in model.safetensors.index.json. */
static lv_status files_open(hfa_files *s, const char *dir)
{
    lv_status st = LV_OK;
    char index[4200], *text = NULL;
    size_t len = 0;
    cJSON *root = NULL;
    struct stat sb;
    snprintf(index, sizeof index, "%s/model.safetensors.index.json", dir);
    if (stat(index, &sb) != 0) {
        LV_TRY(files_add(s, dir, "model.safetensors", dir));
    } else {
        LV_TRY(io_read_file(index, &text, &len));
        root = cJSON_ParseWithLength(text, len);
        const cJSON *wm = cJSON_GetObjectItemCaseSensitive(root, "weight_map"), *e;
        if (!cJSON_IsObject(wm)) LV_FAIL(LV_ERR_FORMAT, "%s: no \"weight_map\" object", index);
        cJSON_ArrayForEach(e, wm)
        {
            if (!cJSON_IsString(e))
                LV_FAIL(LV_ERR_FORMAT, "%s: weight_map entry %.200s is not a file name", index,
                        e->string);
            LV_TRY(files_add(s, dir, e->valuestring, index));
        }
        if (s->n == 0) LV_FAIL(LV_ERR_FORMAT, "%s: weight_map is empty", index);
    }
    LV_ALLOC(s->maps, s->n);
    LV_ALLOC(s->hdr, s->n);
    for (int i = 0; i < s->n; i++) {
        LV_TRY(io_map_open(&s->maps[i], s->files[i]));
        LV_TRY(io_st_parse(&s->hdr[i], s->maps[i].data, s->maps[i].size, s->files[i]));
    }
done:
    cJSON_Delete(root);
    free(text);
    return st;
}

/* Tensor `name` in whichever file holds it; NULL *t when absent. */
static void files_find(const hfa_files *s, const char *name, const io_st_tensor **t, int *file)
{
    *t = NULL;
    for (int i = 0; i < s->n && !*t; i++)
        if ((*t = io_st_find(&s->hdr[i], name))) *file = i;
}

/* "(a, b, c)" of a shape. */
static void shape_str(char *buf, size_t cap, const int64_t *shape, int ndim)
{
    size_t k = (size_t)snprintf(buf, cap, "(");
    for (int i = 0; i < ndim && k < cap; i++)
        k += (size_t)snprintf(buf + k, cap - k, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (k < cap) snprintf(buf + k, cap - k, ")");
}

/* Finds `name` and checks its shape; *t and *file on success. */
static lv_status get_tensor(const hfa_files *s, const char *dir, const char *name, int ndim,
                            const int64_t *shape, const io_st_tensor **t, int *file)
{
    lv_status st = LV_OK;
    files_find(s, name, t, file);
    if (!*t) LV_FAIL(LV_ERR_FORMAT, "%s: missing tensor %s", s->n == 1 ? s->files[0] : dir, name);
    int same = (*t)->ndim == ndim;
    for (int i = 0; same && i < ndim; i++) same = (*t)->shape[i] == shape[i];
    if (!same) {
        char got[160], want[160];
        shape_str(got, sizeof got, (*t)->shape, (*t)->ndim);
        shape_str(want, sizeof want, shape, ndim);
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has shape %s, config.json implies %s",
                s->files[*file], name, got, want);
    }
done:
    return st;
}

/* A float tensor (F32/F16/BF16) of the given shape into dst, checked finite. */
static lv_status read_float(const hfa_files *s, const char *dir, const char *name, int ndim,
                            const int64_t *shape, float *dst)
{
    lv_status st = LV_OK;
    const io_st_tensor *t;
    int f = 0;
    LV_TRY(get_tensor(s, dir, name, ndim, shape, &t, &f));
    if (t->dtype == IO_DT_OTHER)
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has dtype %s; expected F16, BF16 or F32",
                s->files[f], name, t->dtype_name);
    LV_TRY(io_st_to_f32(t, s->maps[f].data, dst, s->files[f]));
    LV_TRY(io_tensor_check_finite(dst, t->numel, s->files[f], name));
done:
    return st;
}

/* Codes: I8 for nbits <= 8, else I16, as aqlm's get_int_dtype picks. Values
 * in [-2^(nbits-1), 2^nbits) decode as v mod 2^nbits (aqlm's unpack_int_data);
 * anything else is no code of a 2^nbits-entry codebook. */
static lv_status decode_codes(const hfa_files *s, const io_st_tensor *t, int f, int nbits,
                              uint16_t *dst)
{
    lv_status st = LV_OK;
    const unsigned char *p = (const unsigned char *)s->maps[f].data + t->offset;
    const int32_t K = 1 << nbits;
    for (int64_t i = 0; i < t->numel; i++) {
        int32_t v = nbits <= 8 ? (int32_t)(int8_t)p[i]
                               : (int32_t)(int16_t)(uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
        if (v < -K / 2 || v >= K)
            LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: code %d at index %lld is out of range for "
                    "nbits_per_codebook %d (stored codes lie in [%d, %d))", s->files[f], t->name,
                    v, (long long)i, nbits, -K / 2, K);
        dst[i] = (uint16_t)(v < 0 ? v + K : v);
    }
done:
    return st;
}

/* One block linear from <prefix>.codes / .codebooks / .scales. Cheap header
 * checks first (dtype, shapes, codebook size), so that a config that does not
 * match the file is reported as such rather than as bad code values. */
static lv_status read_linear(const hfa_files *s, const char *dir, const char *prefix,
                             lv_aq_layer *L)
{
    lv_status st = LV_OK;
    char name[160], cbname[160];
    const io_st_tensor *t, *cb;
    int f = 0, fc = 0;
    const int64_t K = (int64_t)1 << L->nbits;
    int64_t cshape[3] = {L->d_out, L->n_groups, L->M};
    int64_t bshape[4] = {L->M, K, 1, L->g};
    int64_t sshape[4] = {L->d_out, 1, 1, 1};
    snprintf(name, sizeof name, "%s.codes", prefix);
    files_find(s, name, &t, &f);
    if (!t) {
        char w[160];
        snprintf(w, sizeof w, "%s.weight", prefix);
        files_find(s, w, &t, &f);
        if (t)
            LV_FAIL(LV_ERR_UNSUPPORTED, "%s: %s is stored unquantized (%s); llmvq reads AQLM "
                    "models whose block linears are all quantized", s->files[f], prefix, w);
    }
    LV_TRY(get_tensor(s, dir, name, 3, cshape, &t, &f));
    const char *want = L->nbits <= 8 ? "I8" : "I16";
    if (strcmp(t->dtype_name, want) != 0)
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has dtype %s; nbits_per_codebook %d needs %s",
                s->files[f], name, t->dtype_name, L->nbits, want);
    snprintf(cbname, sizeof cbname, "%s.codebooks", prefix);
    files_find(s, cbname, &cb, &fc);
    if (cb && cb->ndim == 4 && cb->shape[1] != K)
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has %lld entries per codebook, but config.json's "
                "nbits_per_codebook %d means %lld", s->files[fc], cbname, (long long)cb->shape[1],
                L->nbits, (long long)K);
    LV_TRY(decode_codes(s, t, f, L->nbits, L->codes));
    LV_TRY(read_float(s, dir, cbname, 4, bshape, L->codebooks));
    snprintf(name, sizeof name, "%s.scales", prefix);
    LV_TRY(read_float(s, dir, name, 4, sshape, L->scales));
done:
    return st;
}

/* ---------------------------------------------------------------- config.json */

static lv_status read_config_json(const char *path, cJSON **root)
{
    lv_status st = LV_OK;
    char *text = NULL;
    size_t n = 0;
    LV_TRY(io_read_file(path, &text, &n));
    *root = cJSON_ParseWithLength(text, n);
    if (!*root || !cJSON_IsObject(*root))
        LV_FAIL(LV_ERR_FORMAT, "%s: not a valid JSON object", path);
done:
    free(text);
    return st;
}

static lv_status qc_int(const cJSON *qc, const char *key, int lo, int hi, int *v, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(qc, key);
    if (!cJSON_IsNumber(it) || it->valuedouble != floor(it->valuedouble))
        LV_FAIL(LV_ERR_FORMAT, "%s: quantization_config.%s is missing or not an integer", path, key);
    if (it->valuedouble < lo || it->valuedouble > hi)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: quantization_config.%s = %g; llmvq reads %d..%d", path,
                key, it->valuedouble, lo, hi);
    *v = (int)it->valuedouble;
done:
    return st;
}

/* M, nbits, g of an aqlm quantization_config (out_group_size must be 1). */
static lv_status read_qconfig(const cJSON *root, const lv_model_config *c, int *M, int *nbits,
                              int *g, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    int ogs = 0;
    LV_TRY(qc_int(qc, "num_codebooks", 1, 64, M, path));
    LV_TRY(qc_int(qc, "nbits_per_codebook", 1, 16, nbits, path));
    LV_TRY(qc_int(qc, "in_group_size", 1, 1 << 16, g, path));
    LV_TRY(qc_int(qc, "out_group_size", 1, 1 << 16, &ogs, path));
    if (ogs != 1)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: quantization_config.out_group_size = %d; llmvq reads "
                "only out_group_size 1", path, ogs);
    if (c->dim % *g || c->hidden_dim % *g)
        LV_FAIL(LV_ERR_FORMAT, "%s: in_group_size %d does not divide both hidden_size %d and "
                "intermediate_size %d", path, *g, c->dim, c->hidden_dim);
done:
    return st;
}

/* ---------------------------------------------------------------- public */

lv_status io_hf_is_aqlm(const char *dir, int *is_aqlm)
{
    lv_status st = LV_OK;
    cJSON *root = NULL;
    char *text = NULL, path[4200];
    size_t n = 0;
    if (!dir || !is_aqlm) LV_FAIL(LV_ERR_INVALID_ARG, "io_hf_is_aqlm: NULL argument");
    *is_aqlm = 0;
    snprintf(path, sizeof path, "%s/config.json", dir);
    if (io_read_file(path, &text, &n) != LV_OK) { /* the HF loader reports it */
        lv_error_clear();
        goto done;
    }
    root = cJSON_ParseWithLength(text, n);
    const cJSON *qc = cJSON_GetObjectItemCaseSensitive(root, "quantization_config");
    if (!qc || cJSON_IsNull(qc)) goto done;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(qc, "quant_method");
    if (!cJSON_IsObject(qc) || !cJSON_IsString(m))
        LV_FAIL(LV_ERR_FORMAT, "%s: quantization_config has no quant_method string", path);
    if (strcmp(m->valuestring, "aqlm") != 0)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: quantization_config.quant_method \"%.64s\" is not "
                "supported (llmvq reads \"aqlm\" and unquantized models)", path, m->valuestring);
    *is_aqlm = 1;
done:
    cJSON_Delete(root);
    free(text);
    return st;
}

static lv_status read_fp_parts(lv_qmodel *q, const hfa_files *s, const char *dir)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &q->cfg;
    int64_t emb[2] = {c->vocab_size, c->dim}, d[1] = {c->dim};
    char name[160];
    LV_ALLOC(q->tok_emb, (size_t)emb[0] * (size_t)emb[1]);
    LV_ALLOC(q->final_norm, (size_t)d[0]);
    LV_TRY(read_float(s, dir, "model.embed_tokens.weight", 2, emb, q->tok_emb));
    LV_TRY(read_float(s, dir, "model.norm.weight", 1, d, q->final_norm));
    if (!c->tied_cls) {
        LV_ALLOC(q->wcls, (size_t)emb[0] * (size_t)emb[1]);
        LV_TRY(read_float(s, dir, "lm_head.weight", 2, emb, q->wcls));
    }
    for (int l = 0; l < c->n_layers; l++) {
        snprintf(name, sizeof name, "model.layers.%d.input_layernorm.weight", l);
        LV_TRY(read_float(s, dir, name, 1, d, q->blocks[l].attn_norm));
        snprintf(name, sizeof name, "model.layers.%d.post_attention_layernorm.weight", l);
        LV_TRY(read_float(s, dir, name, 1, d, q->blocks[l].ffn_norm));
    }
done:
    return st;
}

lv_status io_qmodel_read_hf_aqlm(lv_qmodel **out, const char *dir)
{
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    cJSON *root = NULL;
    hfa_files s = {0};
    char cfg_path[4200], prefix[128];
    if (!out || !dir) LV_FAIL(LV_ERR_INVALID_ARG, "io_qmodel_read_hf_aqlm: NULL argument");
    *out = NULL;
    if (strlen(dir) > 3000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    LV_ALLOC(q, 1);
    LV_TRY(io_config_read_hf(&q->cfg, cfg_path));
    LV_TRY(read_config_json(cfg_path, &root));
    int is_aqlm = 0;
    LV_TRY(io_hf_is_aqlm(dir, &is_aqlm));
    if (!is_aqlm) LV_FAIL(LV_ERR_FORMAT, "%s: no aqlm quantization_config", cfg_path);
    LV_TRY(read_qconfig(root, &q->cfg, &q->M, &q->nbits, &q->g, cfg_path));
    LV_ALLOC(q->blocks, (size_t)q->cfg.n_layers);
    for (int l = 0; l < q->cfg.n_layers; l++) {
        LV_TRY(lv_qblock_init(&q->blocks[l], &q->cfg, q->M, q->nbits, q->g));
        q->blocks[l].block_mse = NAN;
        for (int k = 0; k < LV_LIN_COUNT; k++) q->blocks[l].rel_err[k] = NAN;
    }
    LV_TRY(files_open(&s, dir));
    LV_TRY(read_fp_parts(q, &s, dir));
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            io_hf_aqlm_module(prefix, sizeof prefix, l, (lv_lin)k);
            LV_TRY(read_linear(&s, dir, prefix, &q->blocks[l].lin[k]));
        }
    *out = q;
    q = NULL;
done:
    files_free(&s);
    cJSON_Delete(root);
    lv_qmodel_free(q);
    return st;
}

lv_status io_model_open_hf_aqlm(lv_model **out, const char *dir)
{
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    if (!out) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_open_hf_aqlm: NULL argument");
    *out = NULL;
    LV_TRY(io_qmodel_read_hf_aqlm(&q, dir));
    LV_TRY(io_qmodel_to_fp(q, out));
done:
    lv_qmodel_free(q);
    return st;
}
