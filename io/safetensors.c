/* safetensors.c: the safetensors container: header parsing and dtype conversion.
 *
 * File: uint64 LE header length N, N bytes of JSON, then the data section.
 * JSON: {"__metadata__": {str: str}, NAME: {"dtype": D, "shape": [...],
 * "data_offsets": [begin, end]}, ...}, offsets relative to the data section.
 * Everything is checked against the buffer size before any tensor is touched. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cjson/cJSON.h>

#include "io_impl.h"

static const struct {
    const char *name;
    int size;
    io_dtype dtype;
} st_dtypes[] = {
    {"F32", 4, IO_DT_F32},      {"F16", 2, IO_DT_F16},      {"BF16", 2, IO_DT_BF16},
    {"F64", 8, IO_DT_OTHER},    {"I64", 8, IO_DT_OTHER},    {"U64", 8, IO_DT_OTHER},
    {"I32", 4, IO_DT_OTHER},    {"U32", 4, IO_DT_OTHER},    {"I16", 2, IO_DT_OTHER},
    {"U16", 2, IO_DT_OTHER},    {"I8", 1, IO_DT_OTHER},     {"U8", 1, IO_DT_OTHER},
    {"BOOL", 1, IO_DT_OTHER},   {"F8_E4M3", 1, IO_DT_OTHER}, {"F8_E5M2", 1, IO_DT_OTHER},
};

/* A JSON number that is an exact non-negative integer below 2^53. */
static int json_uint(const cJSON *it, uint64_t *v)
{
    if (!cJSON_IsNumber(it)) return 0;
    double d = it->valuedouble;
    if (!(d >= 0.0) || d > 9007199254740992.0 || d != floor(d)) return 0;
    *v = (uint64_t)d;
    return 1;
}

static lv_status st_dtype(io_st_tensor *t, const cJSON *e, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!cJSON_IsString(dt)) LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has no dtype string", path, t->name);
    for (size_t i = 0; i < sizeof st_dtypes / sizeof st_dtypes[0]; i++)
        if (strcmp(dt->valuestring, st_dtypes[i].name) == 0) {
            snprintf(t->dtype_name, sizeof t->dtype_name, "%s", st_dtypes[i].name);
            t->elem_size = st_dtypes[i].size;
            t->dtype = st_dtypes[i].dtype;
            goto done;
        }
    LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has unknown dtype \"%.32s\"", path, t->name,
            dt->valuestring);
done:
    return st;
}

/* Shape and offsets of one entry, checked against the data section size. */
static lv_status st_extent(io_st_tensor *t, const cJSON *e, size_t data_size, const char *path)
{
    lv_status st = LV_OK;
    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(e, "shape");
    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    if (!cJSON_IsArray(shape)) LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has no shape array", path, t->name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > IO_ST_MAX_DIMS)
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s has %d dimensions (at most %d)", path, t->name, nd,
                IO_ST_MAX_DIMS);
    t->ndim = nd;
    int i = 0, zero = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, shape)
    {
        uint64_t v;
        if (!json_uint(it, &v))
            LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: shape[%d] is not a non-negative integer", path,
                    t->name, i);
        t->shape[i++] = (int64_t)v;
        zero |= v == 0;
    }
    /* numel stays <= data_size at every step, so the product cannot overflow. */
    uint64_t numel = zero ? 0 : 1;
    for (i = 0; i < nd && !zero; i++) {
        uint64_t v = (uint64_t)t->shape[i];
        if (numel > data_size / v)
            LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: shape has more elements than the data section "
                    "(%zu bytes) holds", path, t->name, data_size);
        numel *= v;
    }
    uint64_t b, en;
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 ||
        !json_uint(cJSON_GetArrayItem(offs, 0), &b) || !json_uint(cJSON_GetArrayItem(offs, 1), &en))
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: data_offsets must be two non-negative integers",
                path, t->name);
    if (b > en) LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: data_offsets begin %llu > end %llu", path,
                        t->name, (unsigned long long)b, (unsigned long long)en);
    if (en > data_size)
        LV_FAIL(LV_ERR_FORMAT,
                "%s: tensor %s: data_offsets end %llu is past the data section (%zu bytes)", path,
                t->name, (unsigned long long)en, data_size);
    if (en - b != numel * (uint64_t)t->elem_size)
        LV_FAIL(LV_ERR_FORMAT, "%s: tensor %s: %llu bytes for %llu elements of %s", path, t->name,
                (unsigned long long)(en - b), (unsigned long long)numel, t->dtype_name);
    t->numel = (int64_t)numel;
    t->nbytes = (size_t)(en - b);
    t->offset = (size_t)b;
done:
    return st;
}

static lv_status st_entries(io_st_header *h, const cJSON *root, size_t data_size, const char *path)
{
    lv_status st = LV_OK;
    int n = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, root) n++;
    LV_ALLOC(h->t, n);
    cJSON_ArrayForEach(e, root)
    {
        if (strcmp(e->string, "__metadata__") == 0) continue;
        io_st_tensor *t = &h->t[h->n++];
        t->name = strdup(e->string);
        if (!t->name) LV_FAIL(LV_ERR_NOMEM, "%s: out of memory", path);
        if (!cJSON_IsObject(e))
            LV_FAIL(LV_ERR_FORMAT, "%s: header entry %s is not an object", path, t->name);
        LV_TRY(st_dtype(t, e, path));
        LV_TRY(st_extent(t, e, data_size, path));
        t->offset += h->data_start;
    }
done:
    return st;
}

lv_status io_st_parse(io_st_header *h, const void *buf, size_t size, const char *path)
{
    lv_status st = LV_OK;
    cJSON *root = NULL;
    const unsigned char *p = buf;
    *h = (io_st_header){0};
    if (size < 8)
        LV_FAIL(LV_ERR_FORMAT, "%s: file is %zu bytes, too small for a safetensors header", path,
                size);
    uint64_t len = 0;
    for (int i = 7; i >= 0; i--) len = len << 8 | p[i];
    if (len > size - 8)
        LV_FAIL(LV_ERR_FORMAT, "%s: header length %llu is past the end of the file (%zu bytes)",
                path, (unsigned long long)len, size);
    if (len > IO_ST_MAX_HEADER)
        LV_FAIL(LV_ERR_FORMAT, "%s: header length %llu exceeds the %u-byte limit", path,
                (unsigned long long)len, IO_ST_MAX_HEADER);
    if (len < 2 || p[8] != '{')
        LV_FAIL(LV_ERR_FORMAT, "%s: not a safetensors file (header does not start with '{')", path);
    const char *end = NULL;
    root = cJSON_ParseWithLengthOpts((const char *)p + 8, (size_t)len, &end, 0);
    if (!root || !cJSON_IsObject(root))
        LV_FAIL(LV_ERR_FORMAT, "%s: header is not valid JSON (near byte %lld of the header)", path,
                end ? (long long)(end - (const char *)p - 8) : 0LL);
    /* Only trailing padding (spaces) may follow the JSON object. */
    for (const char *q = end; q < (const char *)p + 8 + len; q++)
        if (*q != ' ' && *q != '\0' && *q != '\n' && *q != '\t' && *q != '\r')
            LV_FAIL(LV_ERR_FORMAT, "%s: trailing bytes after the JSON header", path);
    h->data_start = 8 + (size_t)len;
    LV_TRY(st_entries(h, root, size - h->data_start, path));
done:
    cJSON_Delete(root);
    if (st != LV_OK) io_st_header_free(h);
    return st;
}

void io_st_header_free(io_st_header *h)
{
    if (!h) return;
    for (int i = 0; i < h->n; i++) free(h->t[i].name);
    free(h->t);
    *h = (io_st_header){0};
}

const io_st_tensor *io_st_find(const io_st_header *h, const char *name)
{
    for (int i = 0; i < h->n; i++)
        if (strcmp(h->t[i].name, name) == 0) return &h->t[i];
    return NULL;
}

float io_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    if (e == 0x1f)
        u = sign | 0x7f800000u | m << 13; /* Inf / NaN (payload kept) */
    else if (e != 0)
        u = sign | (e + 112) << 23 | m << 13; /* rebias 15 -> 127 */
    else if (m == 0)
        u = sign;
    else { /* subnormal: normalize the mantissa */
        int shift = 0;
        while (!(m & 0x400)) m <<= 1, shift++;
        u = sign | (uint32_t)(113 - shift) << 23 | (m & 0x3ff) << 13;
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

float io_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

lv_status io_st_to_f32(const io_st_tensor *t, const void *buf, float *dst, const char *path)
{
    lv_status st = LV_OK;
    const unsigned char *src = (const unsigned char *)buf + t->offset;
    int64_t n = t->numel;
    switch (t->dtype) {
    case IO_DT_F32: memcpy(dst, src, (size_t)n * sizeof(float)); break;
    case IO_DT_F16:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            dst[i] = io_f16_to_f32((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
        break;
    case IO_DT_BF16:
#pragma omp parallel for schedule(static)
        for (int64_t i = 0; i < n; i++)
            dst[i] = io_bf16_to_f32((uint16_t)(src[2 * i] | src[2 * i + 1] << 8));
        break;
    default:
        LV_FAIL(LV_ERR_UNSUPPORTED, "%s: tensor %s has dtype %s; supported: F32, F16, BF16", path,
                t->name, t->dtype_name);
    }
done:
    return st;
}
