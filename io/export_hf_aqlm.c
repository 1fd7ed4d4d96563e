/* export_hf_aqlm.c: a quantized model as a Hugging Face AQLM directory
 * (docs/formats-hf-aqlm.md): config.json with quantization_config
 * {quant_method "aqlm", ...} and one model.safetensors holding, per block
 * linear, `<prefix>.codes` (out, in/g, M) int8/int16, `<prefix>.codebooks`
 * (M, 2^nbits, 1, g) fp16 and `<prefix>.scales` (out, 1, 1, 1) fp16, plus the
 * non-quantized tensors in float32, as the `aqlm` package's QuantizedLinear
 * and transformers' AQLM quantizer load them.
 *
 * Codes are exact; codebooks and scales are rounded to fp16, which is the only
 * loss: a first pass checks every linear (fp16 range, group size) and measures
 * what the rounding changes in the dequantized weights before a byte is
 * written. Files are written to a temporary name, fsync'ed and renamed. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

/* fp16 has no finite value above this; larger magnitudes round to Inf. */
#define HFA_F16_MAX 65504.0f

uint16_t io_f32_to_f16(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u, e = (u >> 23) & 0xffu, m = u & 0x7fffffu;
    if (e == 0xffu) /* Inf / NaN (quiet, top payload bits kept) */
        return (uint16_t)(sign | 0x7c00u | (m ? 0x200u | (m >> 13) : 0u));
    int32_t ue = (int32_t)e - 127 + 15; /* rebias */
    if (ue >= 0x1f) return (uint16_t)(sign | 0x7c00u);
    if (ue <= 0) { /* subnormal or zero: shift the full mantissa, round to nearest even */
        if (ue < -10) return (uint16_t)sign;
        uint32_t mant = m | 0x800000u, shift = (uint32_t)(14 - ue);
        uint32_t h = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = (uint32_t)ue << 10 | m >> 13, rem = m & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++; /* carry may reach Inf: correct */
    return (uint16_t)(sign | h);
}

static float f16_round(float f) { return io_f16_to_f32(io_f32_to_f16(f)); }

void io_hf_aqlm_module(char *buf, size_t cap, int l, lv_lin k)
{
    static const char *names[LV_LIN_COUNT] = {"self_attn.q_proj", "self_attn.k_proj",
                                              "self_attn.v_proj", "self_attn.o_proj",
                                              "mlp.gate_proj",    "mlp.down_proj",
                                              "mlp.up_proj"};
    snprintf(buf, cap, "model.layers.%d.%s", l, names[k]);
}

/* ---------------------------------------------------------------- checks */

/* Refuses what HF AQLM cannot express and measures the fp16 rounding of one
 * linear: sums of squares of W and of (W16 - W), max |W16 - W|. cb16 is
 * scratch of M * 2^nbits * g floats. */
static lv_status check_linear(const lv_aq_layer *L, const lv_qmodel *q, const char *name,
                              float *cb16, double *ss_w, double *ss_d, double *max_abs,
                              const char *dir)
{
    lv_status st = LV_OK;
    if (L->M != q->M || L->nbits != q->nbits || L->g != q->g)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: %s is %dx%dg%d but the model is %dx%dg%d; HF AQLM has "
                "one quantization config for all linears", dir, name, L->M, L->nbits, L->g, q->M,
                q->nbits, q->g);
    if (L->n_outl > 0)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: %s has %d outlier columns (quant.outlier_cols), which HF "
                "AQLM cannot express; quantize with quant.outlier_cols = 0 to export", dir, name,
                L->n_outl);
    if (L->d_in % L->g != 0)
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: %s: in_features %lld is not a multiple of the group size "
                "%d, and HF AQLM cannot express a cut last group; quantize with a group size that "
                "divides both dim %d and hidden_dim %d", dir, name, (long long)L->d_in, L->g,
                q->cfg.dim, q->cfg.hidden_dim);
    const int64_t K = (int64_t)1 << L->nbits, ncb = (int64_t)L->M * K * L->g;
    for (int64_t i = 0; i < ncb; i++) {
        if (!(fabsf(L->codebooks[i]) <= HFA_F16_MAX))
            LV_FAIL(LV_ERR_NUMERIC, "%s: %s.codebooks[%lld] = %g is not finite in fp16 (|x| <= "
                    "65504)", dir, name, (long long)i, (double)L->codebooks[i]);
        cb16[i] = f16_round(L->codebooks[i]);
    }
    for (int64_t r = 0; r < L->d_out; r++)
        if (!(fabsf(L->scales[r]) <= HFA_F16_MAX))
            LV_FAIL(LV_ERR_NUMERIC, "%s: %s.scales[%lld] = %g is not finite in fp16 (|x| <= 65504)",
                    dir, name, (long long)r, (double)L->scales[r]);
    double sw = 0, sd = 0, mx = 0;
#pragma omp parallel for reduction(+ : sw, sd) reduction(max : mx) schedule(static)
    for (int64_t r = 0; r < L->d_out; r++) {
        const double s = L->scales[r], s16 = f16_round(L->scales[r]);
        for (int64_t i = 0; i < L->n_groups; i++) {
            const uint16_t *c = L->codes + (r * L->n_groups + i) * L->M;
            for (int a = 0; a < L->g; a++) {
                double v = 0, v16 = 0;
                for (int m = 0; m < L->M; m++) {
                    int64_t at = ((int64_t)m * K + c[m]) * L->g + a;
                    v += L->codebooks[at];
                    v16 += cb16[at];
                }
                double w = s * v, d = s16 * v16 - w;
                sw += w * w;
                sd += d * d;
                if (fabs(d) > mx) mx = fabs(d);
            }
        }
    }
    *ss_w = sw, *ss_d = sd;
    if (mx > *max_abs) *max_abs = mx;
done:
    return st;
}

static lv_status check_model(const lv_qmodel *q, io_hf_aqlm_report *rep, const char *dir)
{
    lv_status st = LV_OK;
    float *cb16 = NULL;
    LV_TRY(io_config_check(&q->cfg, dir));
    if (q->M < 1 || q->nbits < 1 || q->nbits > 16 || q->g < 1)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: bad quantization config %dx%dg%d", dir, q->M, q->nbits,
                q->g);
    LV_ALLOC(cb16, ((size_t)q->M << q->nbits) * (size_t)q->g);
    double bits = 0, weights = 0;
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            char name[96];
            io_hf_aqlm_module(name, sizeof name, l, (lv_lin)k);
            double ss_w = 0, ss_d = 0;
            LV_TRY(check_linear(L, q, name, cb16, &ss_w, &ss_d, &rep->max_abs_change, dir));
            double rel = ss_w > 0 ? sqrt(ss_d / ss_w) : 0.0;
            if (rel > rep->max_rel_change || !rep->worst[0]) {
                rep->max_rel_change = rel;
                snprintf(rep->worst, sizeof rep->worst, "%s", name);
            }
            rep->n_linears++;
            bits += (double)L->d_out * (double)L->n_groups * L->M * L->nbits +
                    16.0 * ((double)L->M * (double)((int64_t)1 << L->nbits) * L->g + L->d_out);
            weights += (double)L->d_out * (double)L->d_in;
        }
    rep->bits_per_weight = bits / weights;
done:
    free(cb16);
    return st;
}

/* ---------------------------------------------------------------- safetensors */

typedef enum { HFA_F32 = 0, HFA_CODES, HFA_CODEBOOKS, HFA_SCALES } hfa_kind;

typedef struct {
    char name[112];
    hfa_kind kind;
    const float *x;          /* HFA_F32: borrowed */
    const lv_aq_layer *L;    /* the others: borrowed */
    int permute;             /* q/k rows to HF rotate-half order */
    int ndim;
    int64_t shape[4];
    size_t nbytes;
} hfa_entry;

static const char *hfa_dtype(const hfa_entry *e, int nbits)
{
    if (e->kind == HFA_F32) return "F32";
    if (e->kind == HFA_CODES) return nbits <= 8 ? "I8" : "I16";
    return "F16";
}

static int64_t entry_numel(const hfa_entry *e)
{
    int64_t n = 1;
    for (int i = 0; i < e->ndim; i++) n *= e->shape[i];
    return n;
}

/* The tensor table in io_tensor_list order, each block linear as its three
 * AQLM tensors. *n = entries filled. */
static lv_status build_entries(const lv_qmodel *q, hfa_entry **out, int *n, const char *dir)
{
    lv_status st = LV_OK;
    io_tensor_ref *refs = NULL;
    hfa_entry *e = NULL;
    const lv_model_config *c = &q->cfg;
    int nref = io_tensor_count(c), k = 0;
    static const int lin_of_kind[] = {[IO_T_WQ] = LV_LIN_WQ, [IO_T_WK] = LV_LIN_WK,
                                      [IO_T_WV] = LV_LIN_WV, [IO_T_WO] = LV_LIN_WO,
                                      [IO_T_W1] = LV_LIN_W1, [IO_T_W2] = LV_LIN_W2,
                                      [IO_T_W3] = LV_LIN_W3};
    LV_ALLOC(refs, nref);
    LV_ALLOC(e, (size_t)nref * 3);
    io_tensor_list(c, refs, IO_NAMES_HF);
    const int cb = q->nbits <= 8 ? 1 : 2;
    for (int i = 0; i < nref; i++) {
        const io_tensor_ref *r = &refs[i];
        const lv_qblock *b = r->layer >= 0 ? &q->blocks[r->layer] : NULL;
        switch (r->kind) {
        case IO_T_EMB:
        case IO_T_FINAL_NORM:
        case IO_T_WCLS:
        case IO_T_ATTN_NORM:
        case IO_T_FFN_NORM:
            e[k] = (hfa_entry){.kind = HFA_F32, .ndim = r->cols ? 2 : 1,
                               .shape = {r->rows, r->cols}};
            e[k].x = r->kind == IO_T_EMB ? q->tok_emb : r->kind == IO_T_FINAL_NORM ? q->final_norm
                   : r->kind == IO_T_WCLS ? q->wcls : r->kind == IO_T_ATTN_NORM ? b->attn_norm
                   : b->ffn_norm;
            snprintf(e[k].name, sizeof e[k].name, "%s", r->name);
            e[k].nbytes = (size_t)io_tensor_numel(r) * sizeof(float);
            k++;
            break;
        default: {
            lv_lin lin = (lv_lin)lin_of_kind[r->kind];
            const lv_aq_layer *L = &b->lin[lin];
            int perm = (lin == LV_LIN_WQ || lin == LV_LIN_WK) && c->rope != LV_ROPE_HALF;
            char pre[96];
            io_hf_aqlm_module(pre, sizeof pre, r->layer, lin);
            if (L->d_out != r->rows || L->d_in != r->cols)
                LV_FAIL(LV_ERR_INVALID_ARG, "%s: %s is %lld x %lld, the model config says %lld x "
                        "%lld", dir, pre, (long long)L->d_out, (long long)L->d_in,
                        (long long)r->rows, (long long)r->cols);
            hfa_entry base = {.L = L, .permute = perm};
            e[k] = base;
            e[k].kind = HFA_CODES, e[k].ndim = 3;
            e[k].shape[0] = L->d_out, e[k].shape[1] = L->n_groups, e[k].shape[2] = L->M;
            e[k].nbytes = (size_t)entry_numel(&e[k]) * (size_t)cb;
            snprintf(e[k].name, sizeof e[k].name, "%s.codes", pre);
            k++;
            e[k] = base;
            e[k].kind = HFA_CODEBOOKS, e[k].ndim = 4;
            e[k].shape[0] = L->M, e[k].shape[1] = (int64_t)1 << L->nbits, e[k].shape[2] = 1;
            e[k].shape[3] = L->g;
            e[k].nbytes = (size_t)entry_numel(&e[k]) * 2;
            snprintf(e[k].name, sizeof e[k].name, "%s.codebooks", pre);
            k++;
            e[k] = base;
            e[k].kind = HFA_SCALES, e[k].ndim = 4;
            e[k].shape[0] = L->d_out, e[k].shape[1] = e[k].shape[2] = e[k].shape[3] = 1;
            e[k].nbytes = (size_t)L->d_out * 2;
            snprintf(e[k].name, sizeof e[k].name, "%s.scales", pre);
            k++;
        }
        }
    }
    *out = e;
    *n = k;
    e = NULL;
done:
    free(e);
    free(refs);
    return st;
}

/* The JSON header, padded with spaces so the data section starts 8-aligned. */
static lv_status header_json(const hfa_entry *e, int n, int nbits, char **text, size_t *len,
                             const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = cJSON_CreateObject(), *meta = cJSON_CreateObject();
    char *raw = NULL;
    if (!o || !meta || !cJSON_AddStringToObject(meta, "format", "pt") ||
        !cJSON_AddItemToObject(o, "__metadata__", meta)) {
        cJSON_Delete(meta);
        LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    }
    double off = 0;
    for (int i = 0; i < n; i++) {
        cJSON *t = cJSON_AddObjectToObject(o, e[i].name), *shape = cJSON_CreateArray();
        double offs[2] = {off, off + (double)e[i].nbytes};
        int ok = t && shape && cJSON_AddItemToObject(t, "shape", shape);
        if (!ok) cJSON_Delete(shape);
        for (int d = 0; ok && d < e[i].ndim; d++)
            ok = cJSON_AddItemToArray(shape, cJSON_CreateNumber((double)e[i].shape[d]));
        if (!ok || !cJSON_AddStringToObject(t, "dtype", hfa_dtype(&e[i], nbits)) ||
            !cJSON_AddItemToObject(t, "data_offsets", cJSON_CreateDoubleArray(offs, 2)))
            LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
        off = offs[1];
    }
    raw = cJSON_PrintUnformatted(o);
    if (!raw) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    size_t l = strlen(raw), padded = (l + 7) / 8 * 8;
    char *s = malloc(padded + 1);
    if (!s) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
    memcpy(s, raw, l);
    memset(s + l, ' ', padded - l);
    s[padded] = '\0';
    *text = s;
    *len = padded;
done:
    cJSON_free(raw);
    cJSON_Delete(o);
    return st;
}

/* One AQLM tensor, row by row (rows permuted for q/k when needed), in the
 * file's little-endian dtype. buf holds at least one row of the largest tensor. */
static lv_status write_aq_entry(io_atomic *a, const hfa_entry *e, int hd, unsigned char *buf)
{
    lv_status st = LV_OK;
    const lv_aq_layer *L = e->L;
    const int64_t K = (int64_t)1 << L->nbits, half = K / 2;
    if (e->kind == HFA_CODEBOOKS) {
        const int64_t n = (int64_t)L->M * K * L->g;
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = io_f32_to_f16(L->codebooks[i]);
            buf[0] = (unsigned char)h, buf[1] = (unsigned char)(h >> 8);
            LV_TRY(io_atomic_write(a, buf, 2));
        }
        goto done;
    }
    const int64_t per_row = e->kind == HFA_CODES ? L->n_groups * L->M : 1;
    for (int64_t r = 0; r < L->d_out; r++) {
        int64_t src = e->permute ? io_rope_src_row(r, hd, 1) : r;
        size_t nb = 0;
        if (e->kind == HFA_SCALES) {
            uint16_t h = io_f32_to_f16(L->scales[src]);
            buf[nb++] = (unsigned char)h, buf[nb++] = (unsigned char)(h >> 8);
        } else {
            /* aqlm's signed convention: codes >= 2^(nbits-1) are stored minus 2^nbits. */
            const uint16_t *c = L->codes + src * per_row;
            for (int64_t j = 0; j < per_row; j++) {
                int32_t v = c[j] >= half ? (int32_t)c[j] - (int32_t)K : (int32_t)c[j];
                uint16_t bits = (uint16_t)(v & 0xffff);
                buf[nb++] = (unsigned char)bits;
                if (L->nbits > 8) buf[nb++] = (unsigned char)(bits >> 8);
            }
        }
        LV_TRY(io_atomic_write(a, buf, nb));
    }
done:
    return st;
}

static lv_status write_safetensors(const lv_qmodel *q, const char *path, size_t *bytes)
{
    lv_status st = LV_OK;
    hfa_entry *e = NULL;
    char *hdr = NULL;
    unsigned char *buf = NULL;
    io_atomic a = {0};
    int n = 0;
    size_t hlen = 0, row = 16;
    LV_TRY(build_entries(q, &e, &n, path));
    LV_TRY(header_json(e, n, q->nbits, &hdr, &hlen, path));
    for (int i = 0; i < n; i++)
        if (e[i].kind == HFA_CODES) {
            size_t r = (size_t)(e[i].shape[1] * e[i].shape[2]) * 2;
            if (r > row) row = r;
        }
    LV_ALLOC(buf, row);
    LV_TRY(io_atomic_open(&a, path));
    LV_TRY(io_atomic_st_header(&a, hdr, hlen));
    *bytes = 8 + hlen;
    const int hd = lv_cfg_head_dim(&q->cfg);
    for (int i = 0; i < n; i++) {
        if (e[i].kind == HFA_F32)
            LV_TRY(io_atomic_write(&a, e[i].x, e[i].nbytes));
        else
            LV_TRY(write_aq_entry(&a, &e[i], hd, buf));
        *bytes += e[i].nbytes;
    }
    LV_TRY(io_atomic_close(&a, 1));
done:
    if (st != LV_OK) io_atomic_close(&a, 0);
    free(buf);
    free(hdr);
    free(e);
    return st;
}

/* ---------------------------------------------------------------- config.json */

/* Modules left as nn.Linear / embeddings. Both spellings: transformers 4.x
 * compares "<module>.weight" paths, 5.x module names (and the embedding is
 * no nn.Linear either way; listed as AQLM's own checkpoints do). */
static cJSON *json_not_quantized(void)
{
    const char *names[] = {"model.embed_tokens.weight", "lm_head.weight", "lm_head"};
    return cJSON_CreateStringArray(names, 3);
}

static lv_status config_json(const lv_qmodel *q, char **text, const char *path)
{
    lv_status st = LV_OK;
    cJSON *o = io_hf_config_object(&q->cfg), *qc = cJSON_CreateObject();
    int ok = o && qc && cJSON_AddStringToObject(qc, "quant_method", "aqlm") &&
             cJSON_AddNumberToObject(qc, "nbits_per_codebook", q->nbits) &&
             cJSON_AddNumberToObject(qc, "num_codebooks", q->M) &&
             cJSON_AddNumberToObject(qc, "out_group_size", 1) &&
             cJSON_AddNumberToObject(qc, "in_group_size", q->g) &&
             cJSON_AddItemToObject(qc, "linear_weights_not_to_quantize", json_not_quantized());
    if (ok) {
        ok = cJSON_AddItemToObject(o, "quantization_config", qc);
        qc = NULL;
    }
    if (!ok || !(*text = cJSON_Print(o))) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
done:
    cJSON_Delete(qc);
    cJSON_Delete(o);
    return st;
}

/* ---------------------------------------------------------------- public */

lv_status io_qmodel_write_hf_aqlm(const lv_qmodel *q, const char *dir, io_hf_aqlm_report *rep)
{
    lv_status st = LV_OK;
    char *cfg_text = NULL;
    io_hf_aqlm_report r = {0};
    char path[4096];
    if (!q || !dir) LV_FAIL(LV_ERR_INVALID_ARG, "io_qmodel_write_hf_aqlm: NULL argument");
    if (strlen(dir) > 3000) LV_FAIL(LV_ERR_INVALID_ARG, "%.100s...: path too long", dir);
    LV_TRY(check_model(q, &r, dir));
    LV_TRY(io_mkdir_p(dir));
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    LV_TRY(write_safetensors(q, path, &r.bytes));
    /* A stale shard index would shadow the single file for every reader. */
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
    if (unlink(path) != 0 && errno != ENOENT)
        LV_FAIL(LV_ERR_IO, "%s: cannot remove stale index: %s", path, strerror(errno));
    snprintf(path, sizeof path, "%s/config.json", dir);
    LV_TRY(config_json(q, &cfg_text, path));
    LV_TRY(io_atomic_write_text(path, cfg_text));
    if (rep) *rep = r;
done:
    cJSON_free(cfg_text);
    return st;
}
