/* model_write.c: writing models as HF directories and llama2.c .bin files.
 *
 * Every file is written to a temporary name in its final directory, flushed,
 * fsync'ed and renamed, so a reader (or a crash) never sees half a file, and a
 * model may be rewritten over the files it is memory-mapped from. */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

/* The temp file is created with open(O_EXCL, 0666) rather than mkstemp, so the
 * final file gets the usual umask permissions. */
lv_status io_atomic_open(io_atomic *a, const char *path)
{
    lv_status st = LV_OK;
    static unsigned counter;
    int fd = -1;
    *a = (io_atomic){.path = path};
    if (strlen(path) > 4000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", path);
    for (int tries = 0; fd < 0 && tries < 100; tries++) {
        snprintf(a->tmp, sizeof a->tmp, "%s.tmp.%ld.%u", path, (long)getpid(), counter++);
        fd = open(a->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        if (fd < 0 && errno != EEXIST) break;
    }
    if (fd < 0) LV_FAIL(LV_ERR_IO, "%s: cannot create %s: %s", path, a->tmp, strerror(errno));
    a->f = fdopen(fd, "wb");
    if (!a->f) {
        close(fd);
        unlink(a->tmp);
        LV_FAIL(LV_ERR_IO, "%s: cannot open %s: %s", path, a->tmp, strerror(errno));
    }
done:
    return st;
}

lv_status io_atomic_write(io_atomic *a, const void *p, size_t n)
{
    lv_status st = LV_OK;
    if (n && fwrite(p, 1, n, a->f) != n)
        LV_FAIL(LV_ERR_IO, "%s: write failed: %s", a->path, strerror(errno));
done:
    return st;
}

/* Success: flush, fsync, rename over the target (io_commit_file: the directory is
 * fsync'ed too). Failure (commit == 0): remove the temp file. */
lv_status io_atomic_close(io_atomic *a, int commit)
{
    lv_status st = LV_OK;
    if (!a->f) goto done;
    int bad = fflush(a->f) != 0; /* io_commit_file fsyncs the file, then the directory */
    bad |= fclose(a->f) != 0;
    a->f = NULL;
    if (!commit) {
        unlink(a->tmp);
        goto done;
    }
    if (bad) {
        unlink(a->tmp);
        LV_FAIL(LV_ERR_IO, "%s: write failed: %s", a->path, strerror(errno));
    }
    st = io_commit_file(a->tmp, a->path);
    if (st != LV_OK) unlink(a->tmp);
done:
    return st;
}

lv_status io_atomic_write_text(const char *path, const char *text)
{
    lv_status st = LV_OK;
    io_atomic a = {0};
    LV_TRY(io_atomic_open(&a, path));
    LV_TRY(io_atomic_write(&a, text, strlen(text)));
    LV_TRY(io_atomic_write(&a, "\n", 1));
    LV_TRY(io_atomic_close(&a, 1));
done:
    if (st != LV_OK) io_atomic_close(&a, 0);
    return st;
}

lv_status io_atomic_st_header(io_atomic *a, const char *hdr, size_t hlen)
{
    lv_status st = LV_OK;
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)hlen >> (8 * i));
    LV_TRY(io_atomic_write(a, len8, 8));
    LV_TRY(io_atomic_write(a, hdr, hlen));
done:
    return st;
}

lv_status io_mkdir_p(const char *dir)
{
    lv_status st = LV_OK;
    char buf[4096];
    if (strlen(dir) >= sizeof buf - 64) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    snprintf(buf, sizeof buf, "%s", dir);
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p != '\0') continue;
        char c = *p;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST)
            LV_FAIL(LV_ERR_IO, "%s: cannot create directory %s: %s", dir, buf, strerror(errno));
        *p = c;
        if (!c) break;
    }
    struct stat sb;
    if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
        LV_FAIL(LV_ERR_IO, "%s: not a directory", dir);
done:
    return st;
}

/* Writes tensor r of m, permuting q/k rows when the RoPE pairing changes. */
static lv_status write_tensor(io_atomic *a, const lv_model *m, const io_tensor_ref *r,
                              lv_rope_style target)
{
    lv_status st = LV_OK;
    const float *x = io_model_tensor(m, r->kind, r->layer);
    int permute = (r->kind == IO_T_WQ || r->kind == IO_T_WK) && m->cfg.rope != target;
    if (!permute) {
        LV_TRY(io_atomic_write(a, x, (size_t)io_tensor_numel(r) * sizeof(float)));
        goto done;
    }
    int hd = lv_cfg_head_dim(&m->cfg);
    for (int64_t row = 0; row < r->rows; row++) {
        int64_t src = io_rope_src_row(row, hd, target == LV_ROPE_HALF);
        LV_TRY(io_atomic_write(a, x + src * r->cols, (size_t)r->cols * sizeof(float)));
    }
done:
    return st;
}

static lv_status check_model(const lv_model *m, const char *what, const char *path)
{
    lv_status st = LV_OK;
    if (!m || !path) LV_FAIL(LV_ERR_INVALID_ARG, "%s: NULL argument", what);
    LV_TRY(io_config_check(&m->cfg, path));
done:
    return st;
}

/* ---------------------------------------------------------------- HF */

/* Shortest decimal that reads back as the same float ("1e-05", not 9.99999974737875e-06). */
cJSON *io_json_float(float v)
{
    char buf[32];
    if (v == floorf(v) && fabsf(v) < 1e9f) {
        snprintf(buf, sizeof buf, "%.0f", (double)v);
        return cJSON_CreateRaw(buf);
    }
    for (int prec = 1; prec <= 9; prec++) {
        snprintf(buf, sizeof buf, "%.*g", prec, (double)v);
        if (strtof(buf, NULL) == v) break;
    }
    return cJSON_CreateRaw(buf);
}

cJSON *io_hf_config_object(const lv_model_config *c)
{
    cJSON *o = cJSON_CreateObject();
    const char *arch = "LlamaForCausalLM";
    int ok = o && cJSON_AddItemToObject(o, "architectures", cJSON_CreateStringArray(&arch, 1)) &&
             cJSON_AddStringToObject(o, "model_type", "llama") &&
             cJSON_AddNumberToObject(o, "hidden_size", c->dim) &&
             cJSON_AddNumberToObject(o, "intermediate_size", c->hidden_dim) &&
             cJSON_AddNumberToObject(o, "num_hidden_layers", c->n_layers) &&
             cJSON_AddNumberToObject(o, "num_attention_heads", c->n_heads) &&
             cJSON_AddNumberToObject(o, "num_key_value_heads", c->n_kv_heads) &&
             cJSON_AddItemToObject(o, "rms_norm_eps", io_json_float(c->norm_eps)) &&
             cJSON_AddItemToObject(o, "rope_theta", io_json_float(c->rope_theta)) &&
             cJSON_AddNumberToObject(o, "vocab_size", c->vocab_size) &&
             cJSON_AddNumberToObject(o, "max_position_embeddings", c->seq_len) &&
             cJSON_AddBoolToObject(o, "tie_word_embeddings", c->tied_cls) &&
             cJSON_AddStringToObject(o, "hidden_act", "silu") &&
             cJSON_AddStringToObject(o, "torch_dtype", "float32") &&
             cJSON_AddNumberToObject(o, "bos_token_id", 1) &&
             cJSON_AddNumberToObject(o, "eos_token_id", 2);
    if (!ok) {
        cJSON_Delete(o);
        return NULL;
    }
    return o;
}

static lv_status hf_config_json(const lv_model_config *c, char **text, const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = io_hf_config_object(c);
    if (!o || !(*text = cJSON_Print(o))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
done:
    cJSON_Delete(o);
    return st;
}

/* The safetensors JSON header, padded with spaces so the data starts 8-aligned. */
static lv_status st_header_json(const io_tensor_ref *refs, int n, char **text, size_t *len,
                                const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *meta = cJSON_CreateObject();
    char *s = NULL;
    if (!o || !meta || !cJSON_AddStringToObject(meta, "format", "pt") ||
        !cJSON_AddItemToObject(o, "__metadata__", meta)) {
        cJSON_Delete(meta);
        LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    }
    double off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *e = cJSON_AddObjectToObject(o, refs[i].name);
        double shape[2] = {(double)refs[i].rows, (double)refs[i].cols};
        double end = off + 4.0 * (double)io_tensor_numel(&refs[i]);
        double offs[2] = {off, end};
        if (!e || !cJSON_AddStringToObject(e, "dtype", "F32") ||
            !cJSON_AddItemToObject(e, "shape", cJSON_CreateDoubleArray(shape, refs[i].cols ? 2 : 1)) ||
            !cJSON_AddItemToObject(e, "data_offsets", cJSON_CreateDoubleArray(offs, 2)))
            LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
        off = end;
    }
    char *raw = cJSON_PrintUnformatted(o);
    if (!raw) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    size_t l = strlen(raw), padded = (l + 7) / 8 * 8;
    s = malloc(padded + 1);
    if (!s) {
        cJSON_free(raw);
        LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    }
    memcpy(s, raw, l);
    memset(s + l, ' ', padded - l);
    s[padded] = '\0';
    cJSON_free(raw);
    *text = s;
    *len = padded;
    s = NULL;
done:
    free(s);
    cJSON_Delete(o);
    return st;
}

static lv_status write_safetensors(const lv_model *m, const char *path)
{
    lv_status st = LV_OK;
    io_tensor_ref *refs = NULL;
    char *hdr = NULL;
    size_t hlen = 0;
    io_atomic a = {0};
    int n = io_tensor_count(&m->cfg);
    LV_ALLOC(refs, n);
    io_tensor_list(&m->cfg, refs, IO_NAMES_HF);
    LV_TRY(st_header_json(refs, n, &hdr, &hlen, path));
    LV_TRY(io_atomic_open(&a, path));
    LV_TRY(io_atomic_st_header(&a, hdr, hlen));
    for (int i = 0; i < n; i++) LV_TRY(write_tensor(&a, m, &refs[i], LV_ROPE_HALF));
    LV_TRY(io_atomic_close(&a, 1));
done:
    if (st != LV_OK) io_atomic_close(&a, 0);
    free(hdr);
    free(refs);
    return st;
}

lv_status io_model_write_hf(const lv_model *m, const char *dir)
{
    lv_status st = LV_OK;
    char *cfg_text = NULL;
    char path[4096], cfg_path[4096], index_path[4096];
    LV_TRY(check_model(m, "io_model_write_hf", dir));
    if (strlen(dir) > 3000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    LV_TRY(io_mkdir_p(dir));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    snprintf(cfg_path, sizeof cfg_path, "%s/config.json", dir);
    snprintf(index_path, sizeof index_path, "%s/model.safetensors.index.json", dir);
    LV_TRY(write_safetensors(m, path));
    /* A stale shard index would shadow the single file for every reader. */
    if (unlink(index_path) != 0 && errno != ENOENT)
        LV_FAIL(LV_ERR_IO, "%s: cannot remove stale index: %s", index_path, strerror(errno));
    lv_model_config c = m->cfg;
    c.rope = LV_ROPE_HALF;
    LV_TRY(hf_config_json(&c, &cfg_text, cfg_path));
    LV_TRY(io_atomic_write_text(cfg_path, cfg_text));
done:
    cJSON_free(cfg_text);
    return st;
}

/* ---------------------------------------------------------------- llama2.c */

/* The legacy freq_cis_real / freq_cis_imag arrays (seq_len, head_dim/2), computed
 * as llama2.c's export does, in float32: angle = t * theta^(-2i/head_dim). */
static lv_status write_freq_cis(io_atomic *a, const lv_model_config *c)
{
    lv_status st = LV_OK;
    int half = lv_cfg_head_dim(c) / 2;
    float *row = NULL;
    LV_ALLOC(row, half);
    for (int part = 0; part < 2; part++)
        for (int t = 0; t < c->seq_len; t++) {
            for (int i = 0; i < half; i++) {
                float f = 1.0f / powf(c->rope_theta, (float)(2 * i) / (float)(2 * half));
                float ang = (float)t * f;
                row[i] = part == 0 ? cosf(ang) : sinf(ang);
            }
            LV_TRY(io_atomic_write(a, row, (size_t)half * sizeof(float)));
        }
done:
    free(row);
    return st;
}

lv_status io_model_write_llama2c(const lv_model *m, const char *path)
{
    lv_status st = LV_OK;
    io_tensor_ref *refs = NULL;
    io_atomic a = {0};
    LV_TRY(check_model(m, "io_model_write_llama2c", path));
    const lv_model_config *c = &m->cfg;
    int n = io_tensor_count(c);
    LV_ALLOC(refs, n);
    io_tensor_list(c, refs, IO_NAMES_LLAMA2C);
    int32_t h[7] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                    c->tied_cls ? c->vocab_size : -c->vocab_size, c->seq_len};
    LV_TRY(io_atomic_open(&a, path));
    LV_TRY(io_atomic_write(&a, h, sizeof h));
    LV_TRY(write_tensor(&a, m, &refs[0], LV_ROPE_INTERLEAVED));
    /* The file stacks each per-layer kind over all layers. */
    for (int k = 1; k <= 9; k++)
        for (int l = 0; l < c->n_layers; l++)
            LV_TRY(write_tensor(&a, m, &refs[k + 9 * l], LV_ROPE_INTERLEAVED));
    LV_TRY(write_tensor(&a, m, &refs[1 + 9 * c->n_layers], LV_ROPE_INTERLEAVED));
    LV_TRY(write_freq_cis(&a, c));
    if (!c->tied_cls) LV_TRY(write_tensor(&a, m, &refs[2 + 9 * c->n_layers], LV_ROPE_INTERLEAVED));
    LV_TRY(io_atomic_close(&a, 1));
done:
    if (st != LV_OK) io_atomic_close(&a, 0);
    free(refs);
    return st;
}
