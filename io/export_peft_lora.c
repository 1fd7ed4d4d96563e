/* export_peft_lora.c: the LoRA adapters of a quantized model as a PEFT
 * adapter directory (adapter_model.safetensors + adapter_config.json), to be
 * loaded on top of the quantized base (e.g. our HF AQLM export) and trained.
 *
 * Names follow what PEFT saves for a LlamaForCausalLM wrapped in a PeftModel:
 * the module path prefixed with "base_model.model." and the adapter name
 * dropped, "...q_proj.lora_A.weight" (r, in_features) and "...lora_B.weight"
 * (out_features, r). lora_alpha = r makes PEFT's scaling alpha / r equal 1,
 * so the adapted linear is What x + B (A x), as in our files. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

#define PEFT_F16_MAX 65504.0f

typedef struct {
    char name[128];
    const float *x; /* borrowed */
    int64_t rows, cols;
    int permute;    /* q/k lora_B: rows to rotate-half order */
} peft_entry;

double io_qmodel_lora_bits_per_weight(const lv_qmodel *q, int64_t *n_params)
{
    double params = 0, weights = 0;
    for (int l = 0; q && l < q->cfg.n_layers; l++) {
        const lv_qblock *b = &q->blocks[l];
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &b->lin[k];
            weights += (double)L->d_out * (double)L->d_in;
            if (b->lora_rank > 0 && b->lora_A[k] && b->lora_B[k])
                params += (double)b->lora_rank * (double)(L->d_out + L->d_in);
        }
    }
    if (n_params) *n_params = (int64_t)params;
    return weights > 0 ? 16.0 * params / weights : 0.0;
}

/* The rank and the adapted linears (mask bit k) common to every block. */
static lv_status check_model(const lv_qmodel *q, int fp16, int *rank_out, unsigned *mask_out,
                             const char *dir)
{
    lv_status st = LV_OK;
    int r = 0;
    unsigned mask = 0;
    for (int l = 0; l < q->cfg.n_layers; l++) {
        const lv_qblock *b = &q->blocks[l];
        unsigned m = 0;
        for (int k = 0; k < LV_LIN_COUNT; k++)
            if (b->lora_rank > 0 && b->lora_A[k] && b->lora_B[k]) m |= 1u << k;
        if (l == 0) r = b->lora_rank, mask = m;
        if (b->lora_rank != r || m != mask)
            LV_FAIL(LV_ERR_UNSUPPORTED, "%s: block %d has LoRA rank %d on linears 0x%x, block 0 "
                    "rank %d on 0x%x: a PEFT adapter needs the same everywhere", dir, l,
                    b->lora_rank, m, r, mask);
        for (int k = 0; fp16 && k < LV_LIN_COUNT; k++) {
            if (!(m >> k & 1u)) continue;
            const lv_aq_layer *L = &b->lin[k];
            const float *x[2] = {b->lora_A[k], b->lora_B[k]};
            for (int f = 0; f < 2; f++)
                for (int64_t i = 0; i < (int64_t)r * (f ? L->d_out : L->d_in); i++)
                    if (!(fabsf(x[f][i]) <= PEFT_F16_MAX))
                        LV_FAIL(LV_ERR_NUMERIC, "%s: block %d %s lora_%c[%lld] = %g does not fit "
                                "fp16", dir, l, lv_lin_name((lv_lin)k), f ? 'B' : 'A',
                                (long long)i, (double)x[f][i]);
        }
    }
    if (r < 1 || !mask) LV_FAIL(LV_ERR_INVALID_ARG, "%s: the model has no LoRA adapters", dir);
    *rank_out = r;
    *mask_out = mask;
done:
    return st;
}

static lv_status build_entries(const lv_qmodel *q, int r, unsigned mask, peft_entry **out,
                               int *n_out, const char *dir)
{
    lv_status st = LV_OK;
    peft_entry *e = NULL;
    int n = 0;
    char mod[96];
    LV_ALLOC(e, (size_t)q->cfg.n_layers * LV_LIN_COUNT * 2);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            if (!(mask >> k & 1u)) continue;
            const lv_qblock *b = &q->blocks[l];
            const lv_aq_layer *L = &b->lin[k];
            io_hf_aqlm_module(mod, sizeof mod, l, (lv_lin)k);
            snprintf(e[n].name, sizeof e[n].name, "base_model.model.%s.lora_A.weight", mod);
            e[n].x = b->lora_A[k], e[n].rows = r, e[n].cols = L->d_in, e[n].permute = 0;
            n++;
            snprintf(e[n].name, sizeof e[n].name, "base_model.model.%s.lora_B.weight", mod);
            e[n].x = b->lora_B[k], e[n].rows = L->d_out, e[n].cols = r;
            e[n].permute = (k == LV_LIN_WQ || k == LV_LIN_WK) && q->cfg.rope != LV_ROPE_HALF;
            n++;
        }
    *out = e;
    *n_out = n;
    e = NULL;
done:
    free(e);
    return st;
}

/* The JSON header, padded with spaces so the data section starts 8-aligned. */
static lv_status header_json(const peft_entry *e, int n, int fp16, char **text, size_t *len,
                             const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *meta = cJSON_CreateObject();
    char *raw = NULL, *s = NULL;
    if (!o || !meta || !cJSON_AddStringToObject(meta, "format", "pt") ||
        !cJSON_AddItemToObject(o, "__metadata__", meta)) {
        cJSON_Delete(meta);
        LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    }
    double off = 0;
    for (int i = 0; i < n; i++) {
        double shape[2] = {(double)e[i].rows, (double)e[i].cols};
        double offs[2] = {off, off + (fp16 ? 2.0 : 4.0) * (double)e[i].rows * (double)e[i].cols};
        cJSON *t = cJSON_AddObjectToObject(o, e[i].name);
        if (!t || !cJSON_AddStringToObject(t, "dtype", fp16 ? "F16" : "F32") ||
            !cJSON_AddItemToObject(t, "shape", cJSON_CreateDoubleArray(shape, 2)) ||
            !cJSON_AddItemToObject(t, "data_offsets", cJSON_CreateDoubleArray(offs, 2)))
            LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
        off = offs[1];
    }
    raw = cJSON_PrintUnformatted(o);
    if (!raw) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    size_t l = strlen(raw), padded = (l + 7) / 8 * 8;
    LV_ALLOC(s, padded + 1);
    memcpy(s, raw, l);
    memset(s + l, ' ', padded - l);
    *text = s;
    *len = padded;
    s = NULL;
done:
    free(s);
    cJSON_free(raw);
    cJSON_Delete(o);
    return st;
}

/* One tensor row by row (q/k lora_B rows permuted); buf holds one row. */
static lv_status write_entry(io_atomic *a, const peft_entry *e, int hd, int fp16,
                             unsigned char *buf)
{
    lv_status st = LV_OK;
    for (int64_t row = 0; row < e->rows; row++) {
        const int64_t src = e->permute ? io_rope_src_row(row, hd, 1) : row;
        const float *x = e->x + src * e->cols;
        if (!fp16) {
            LV_TRY(io_atomic_write(a, x, (size_t)e->cols * sizeof(float)));
            continue;
        }
        for (int64_t j = 0; j < e->cols; j++) {
            uint16_t h = io_f32_to_f16(x[j]);
            buf[2 * j] = (unsigned char)h, buf[2 * j + 1] = (unsigned char)(h >> 8);
        }
        LV_TRY(io_atomic_write(a, buf, (size_t)e->cols * 2));
    }
done:
    return st;
}

static lv_status write_safetensors(const lv_qmodel *q, const peft_entry *e, int n, int fp16,
                                   const char *path)
{
    lv_status st = LV_OK;
    char *hdr = NULL;
    unsigned char *buf = NULL;
    io_atomic a = {0};
    size_t hlen = 0;
    int64_t maxcols = 1;
    LV_TRY(header_json(e, n, fp16, &hdr, &hlen, path));
    for (int i = 0; i < n; i++) maxcols = e[i].cols > maxcols ? e[i].cols : maxcols;
    LV_ALLOC(buf, (size_t)maxcols * 2);
    LV_TRY(io_atomic_open(&a, path));
    LV_TRY(io_atomic_st_header(&a, hdr, hlen));
    const int hd = lv_cfg_head_dim(&q->cfg);
    for (int i = 0; i < n; i++) LV_TRY(write_entry(&a, &e[i], hd, fp16, buf));
    LV_TRY(io_atomic_close(&a, 1));
done:
    if (st != LV_OK) io_atomic_close(&a, 0);
    free(buf);
    free(hdr);
    return st;
}

static lv_status config_json(int r, unsigned mask, const char *base, char **text,
                             const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *tm = cJSON_CreateArray();
    char mod[96];
    int ok = o && tm;
    for (int k = 0; ok && k < LV_LIN_COUNT; k++) {
        if (!(mask >> k & 1u)) continue;
        io_hf_aqlm_module(mod, sizeof mod, 0, (lv_lin)k);
        ok = cJSON_AddItemToArray(tm, cJSON_CreateString(strrchr(mod, '.') + 1));
    }
    if (ok) {
        ok = cJSON_AddItemToObject(o, "target_modules", tm);
        if (ok) tm = NULL;
    }
    ok = ok && cJSON_AddStringToObject(o, "peft_type", "LORA") &&
         cJSON_AddStringToObject(o, "task_type", "CAUSAL_LM") &&
         cJSON_AddNumberToObject(o, "r", r) && cJSON_AddNumberToObject(o, "lora_alpha", r) &&
         cJSON_AddNumberToObject(o, "lora_dropout", 0.0) &&
         cJSON_AddStringToObject(o, "bias", "none") &&
         cJSON_AddBoolToObject(o, "fan_in_fan_out", 0) &&
         cJSON_AddBoolToObject(o, "use_rslora", 0) && cJSON_AddBoolToObject(o, "use_dora", 0) &&
         cJSON_AddBoolToObject(o, "inference_mode", 1) &&
         cJSON_AddNullToObject(o, "modules_to_save") &&
         (base ? cJSON_AddStringToObject(o, "base_model_name_or_path", base) != NULL
               : cJSON_AddNullToObject(o, "base_model_name_or_path") != NULL);
    if (!ok || !(*text = cJSON_Print(o))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
done:
    cJSON_Delete(tm);
    cJSON_Delete(o);
    return st;
}

lv_status io_qmodel_write_peft_lora_opts(const lv_qmodel *q, const char *dir,
                                         const io_peft_lora_opts *opts)
{
    lv_status st = LV_OK;
    io_peft_lora_opts o = opts ? *opts : (io_peft_lora_opts){0};
    peft_entry *e = NULL;
    char *cfg_text = NULL, path[4096];
    int n = 0, r = 0;
    unsigned mask = 0;
    if (!q || !dir) LV_FAIL(LV_ERR_INVALID_ARG, "io_qmodel_write_peft_lora: NULL argument");
    if (strlen(dir) > 3000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    LV_TRY(check_model(q, o.fp16, &r, &mask, dir));
    LV_TRY(build_entries(q, r, mask, &e, &n, dir));
    LV_TRY(io_mkdir_p(dir));
    snprintf(path, sizeof path, "%s/adapter_model.safetensors", dir);
    LV_TRY(write_safetensors(q, e, n, o.fp16, path));
    snprintf(path, sizeof path, "%s/adapter_config.json", dir);
    LV_TRY(config_json(r, mask, o.base_model, &cfg_text, path));
    LV_TRY(io_atomic_write_text(path, cfg_text));
done:
    cJSON_free(cfg_text);
    free(e);
    return st;
}

lv_status io_qmodel_write_peft_lora(const lv_qmodel *q, const char *dir)
{
    return io_qmodel_write_peft_lora_opts(q, dir, NULL);
}
