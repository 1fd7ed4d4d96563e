/* test_io.c: model I/O: llama2.c .bin and HF safetensors loaders and writers,
 * synthetic models, presets, and every malformed input we can think of
 * (each must fail with a message naming the file, never crash). */
#define _XOPEN_SOURCE 700 /* nftw */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "io_impl.h"

static char g_tmp[256];          /* per-run temp directory */
static char g_bin[1024];         /* stories260K.bin */
static lv_model *g_bin_model;    /* stories260K, loaded once */

/* ---------------------------------------------------------------- helpers */

static const char *tmp_path(const char *name)
{
    static char buf[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(buf[k], sizeof buf[k], "%s/%s", g_tmp, name);
    return buf[k];
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

static void write_text(const char *path, const char *s) { write_bytes(path, s, strlen(s)); }

static unsigned char *read_all(const char *path, size_t *n)
{
    char *buf = NULL;
    assert_int_equal(io_read_file(path, &buf, n), LV_OK);
    return (unsigned char *)buf;
}

/* The call failed, and its user-facing line names `file` and contains `what`. */
static void expect_fail(lv_status st, const char *file, const char *what)
{
    char line[1024];
    lv_last_error_line(line, sizeof line);
    if (st == LV_OK || !strstr(line, file) || (what && !strstr(line, what)))
        fail_msg("expected failure naming '%s' and '%s', got status %s: '%s'", file,
                 what ? what : "", lv_status_str(st), line);
}

static lv_status open_bin_bytes(const char *name, const void *p, size_t n, lv_model **m)
{
    write_bytes(tmp_path(name), p, n);
    return io_model_open_llama2c(m, tmp_path(name));
}

static lv_model_config small_cfg(int tied)
{
    return (lv_model_config){.dim = 16, .hidden_dim = 24, .n_layers = 2, .n_heads = 4,
                             .n_kv_heads = 2, .vocab_size = 32, .seq_len = 16,
                             .norm_eps = 1e-5f, .rope_theta = 10000.0f,
                             .rope = LV_ROPE_INTERLEAVED, .tied_cls = tied};
}

static void assert_floats_equal(const float *a, const float *b, int64_t n, const char *what)
{
    for (int64_t i = 0; i < n; i++)
        if (memcmp(&a[i], &b[i], sizeof(float)) != 0)
            fail_msg("%s: index %lld differs: %g vs %g", what, (long long)i, (double)a[i],
                     (double)b[i]);
}

/* HF row r of a q/k projection comes from interleaved row h*hd + 2j + c (test's own copy). */
static int64_t hf_to_interleaved(int64_t r, int hd)
{
    int64_t h = r / hd, c = (r % hd) / (hd / 2), j = (r % hd) % (hd / 2);
    return h * hd + 2 * j + c;
}

/* Tensor-by-tensor equality; q/k of `b` are HF-permuted when b_half. */
static void assert_models_equal(const lv_model *a, const lv_model *b, int b_half)
{
    int n = io_tensor_count(&a->cfg), hd = lv_cfg_head_dim(&a->cfg);
    io_tensor_ref refs[64];
    assert_true(n <= 64);
    io_tensor_list(&a->cfg, refs, IO_NAMES_HF);
    for (int i = 0; i < n; i++) {
        const float *x = io_model_tensor(a, refs[i].kind, refs[i].layer);
        const float *y = io_model_tensor(b, refs[i].kind, refs[i].layer);
        if (b_half && (refs[i].kind == IO_T_WQ || refs[i].kind == IO_T_WK)) {
            for (int64_t r = 0; r < refs[i].rows; r++)
                assert_floats_equal(x + hf_to_interleaved(r, hd) * refs[i].cols,
                                    y + r * refs[i].cols, refs[i].cols, refs[i].name);
        } else {
            assert_floats_equal(x, y, io_tensor_numel(&refs[i]), refs[i].name);
        }
    }
    assert_true((a->wcls == a->tok_emb) == (b->wcls == b->tok_emb));
}

/* ---- hand-written safetensors ---- */

typedef struct {
    const char *dtype;       /* "F32" (default), "F16", "BF16" for all tensors */
    const char *skip;        /* tensor left out */
    const char *odd_name;    /* tensor stored with dtype odd_dtype (bytes sized to match) */
    const char *odd_dtype;
    const char *nan_name;    /* tensor with a NaN at index 3 */
    int end_past_eof;        /* last tensor's end offset pushed past the file */
    int misalign;            /* header length == 2 (mod 8): F32 data not 4-aligned */
} st_opts;

static const struct {
    uint16_t bits;
    float f;
} f16_pat[] = {{0x3C00, 1.0f},        {0xC000, -2.0f},        {0x0001, 0x1p-24f},
               {0x03FF, 0x1.ff8p-15f}, {0x7BFF, 65504.0f},     {0x3555, 0x1.554p-2f},
               {0x8000, -0.0f},        {0x0400, 0x1p-14f}},
  bf16_pat[] = {{0x3F80, 1.0f},         {0xC040, -3.0f},   {0x0001, 0x1p-133f},
                {0x3E20, 0.15625f},     {0x8000, -0.0f},   {0x7F7F, 0x1.fep127f}};
#define NPAT(p) ((int64_t)(sizeof p / sizeof p[0]))

static int dtype_size(const char *d)
{
    if (!strcmp(d, "F16") || !strcmp(d, "BF16")) return 2;
    if (!strcmp(d, "F64")) return 8;
    if (!strcmp(d, "I8")) return 1;
    return 4;
}

/* Writes tensors [lo, hi) of m (HF names, rows as stored in m) to path. */
static void write_st(const char *path, const lv_model *m, int lo, int hi, const st_opts *o)
{
    io_tensor_ref refs[64];
    io_tensor_list(&m->cfg, refs, IO_NAMES_HF);
    cJSON *root = cJSON_CreateObject();
    size_t total = 0;
    for (int i = lo; i < hi; i++) {
        if (o->skip && !strcmp(o->skip, refs[i].name)) continue;
        const char *dt = o->odd_name && !strcmp(o->odd_name, refs[i].name) ? o->odd_dtype
                         : o->dtype ? o->dtype : "F32";
        size_t nb = (size_t)io_tensor_numel(&refs[i]) * (size_t)dtype_size(dt);
        cJSON *e = cJSON_AddObjectToObject(root, refs[i].name);
        cJSON_AddStringToObject(e, "dtype", dt);
        double shape[2] = {(double)refs[i].rows, (double)refs[i].cols};
        cJSON_AddItemToObject(e, "shape", cJSON_CreateDoubleArray(shape, refs[i].cols ? 2 : 1));
        double off[2] = {(double)total, (double)(total + nb)};
        if (o->end_past_eof && i == hi - 1) off[1] += 4096;
        cJSON_AddItemToObject(e, "data_offsets", cJSON_CreateDoubleArray(off, 2));
        total += nb;
    }
    char *json = cJSON_PrintUnformatted(root);
    size_t jl = strlen(json), hl = (jl + 7) / 8 * 8 + (o->misalign ? 2 : 0);
    unsigned char *buf = calloc(8 + hl + total, 1);
    for (int i = 0; i < 8; i++) buf[i] = (unsigned char)((uint64_t)hl >> (8 * i));
    memset(buf + 8, ' ', hl);
    memcpy(buf + 8, json, jl);
    unsigned char *p = buf + 8 + hl;
    for (int i = lo; i < hi; i++) {
        if (o->skip && !strcmp(o->skip, refs[i].name)) continue;
        const char *dt = o->odd_name && !strcmp(o->odd_name, refs[i].name) ? o->odd_dtype
                         : o->dtype ? o->dtype : "F32";
        int64_t n = io_tensor_numel(&refs[i]);
        const float *x = io_model_tensor(m, refs[i].kind, refs[i].layer);
        for (int64_t k = 0; k < n; k++) {
            if (!strcmp(dt, "F16") || !strcmp(dt, "BF16")) {
                uint16_t b = !strcmp(dt, "F16") ? f16_pat[k % NPAT(f16_pat)].bits
                                                : bf16_pat[k % NPAT(bf16_pat)].bits;
                if (o->nan_name && !strcmp(o->nan_name, refs[i].name) && k == 3) b = 0x7FC0;
                memcpy(p, &b, 2), p += 2;
            } else if (!strcmp(dt, "F32")) {
                float v = x[k];
                if (o->nan_name && !strcmp(o->nan_name, refs[i].name) && k == 3) v = NAN;
                memcpy(p, &v, 4), p += 4;
            } else {
                p += dtype_size(dt); /* zeros */
            }
        }
    }
    write_bytes(path, buf, 8 + hl + total);
    free(buf);
    cJSON_free(json);
    cJSON_Delete(root);
}

/* An HF directory `name` holding m: config.json via the writer, weights by hand. */
static const char *make_hf_dir(const char *name, const lv_model *m, const st_opts *o)
{
    const char *dir = tmp_path(name);
    assert_int_equal(io_model_write_hf(m, dir), LV_OK);
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    write_st(p, m, 0, io_tensor_count(&m->cfg), o);
    return dir;
}

/* ---------------------------------------------------------------- setup */

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int setup(void **state)
{
    (void)state;
    lv_log_set_quiet(1);
    snprintf(g_tmp, sizeof g_tmp, "/tmp/llmvq_test_io_XXXXXX");
    if (!mkdtemp(g_tmp)) return -1;
    const char *demo = getenv("LLMVQ_DEMO_DIR"), *shared = getenv("LLMVQ_SHARED_DATA");
    if (demo) snprintf(g_bin, sizeof g_bin, "%s/stories260K.bin", demo);
    if (!demo || access(g_bin, R_OK) != 0) {
        snprintf(g_bin, sizeof g_bin, "%s/models/stories260K/stories260K.bin",
                 shared ? shared : "/work/shared/data");
    }
    if (io_model_open_llama2c(&g_bin_model, g_bin) != LV_OK) {
        fprintf(stderr, "cannot load %s: %s\n", g_bin, lv_last_error());
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    io_model_free(g_bin_model);
    nftw(g_tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    return 0;
}

/* ---------------------------------------------------------------- loading */

static float raw_float(const unsigned char *file, int64_t index)
{
    float v;
    memcpy(&v, file + 28 + 4 * index, 4);
    return v;
}

static void test_llama2c_stories260K(void **state)
{
    (void)state;
    const lv_model *m = g_bin_model;
    const lv_model_config *c = &m->cfg;
    assert_int_equal(c->dim, 64);
    assert_int_equal(c->hidden_dim, 172);
    assert_int_equal(c->n_layers, 5);
    assert_int_equal(c->n_heads, 8);
    assert_int_equal(c->n_kv_heads, 4);
    assert_int_equal(c->vocab_size, 512);
    assert_int_equal(c->seq_len, 512);
    assert_true(c->tied_cls && m->wcls == m->tok_emb);
    assert_true(c->rope == LV_ROPE_INTERLEAVED);
    assert_true(c->norm_eps == 1e-5f && c->rope_theta == 10000.0f);
    assert_int_equal(lv_cfg_n_params(c), 260032);
    /* no copy: tensors point into the map */
    assert_int_equal(m->storage->n_maps, 1);
    assert_null(m->storage->arena);
    assert_ptr_equal(m->tok_emb, (const float *)((const char *)m->storage->maps[0].data + 28));
    size_t n;
    unsigned char *raw = read_all(g_bin, &n);
    assert_int_equal(n, 1056540);
    const int64_t emb = 512 * 64, norm = 5 * 64, wq = 5 * 64 * 64, wkv = 5 * 32 * 64;
    assert_true(m->tok_emb[777] == raw_float(raw, 777));
    assert_true(m->layers[0].attn_norm[5] == raw_float(raw, emb + 5));
    assert_true(m->layers[2].wq[100] == raw_float(raw, emb + norm + 2 * 64 * 64 + 100));
    assert_true(m->layers[3].wk[7] == raw_float(raw, emb + norm + wq + 3 * 32 * 64 + 7));
    assert_true(m->layers[4].w3[171 * 64 + 63] ==
                raw_float(raw, emb + 2 * norm + 2 * wq + 2 * wkv + 3 * 5 * 172 * 64 - 1));
    assert_true(m->final_norm[63] == raw_float(raw, 260032 - 1));
    free(raw);
}

static void test_hf_roundtrip(void **state)
{
    (void)state;
    const char *dir = tmp_path("hf260K");
    lv_model *h = NULL;
    assert_int_equal(io_model_write_hf(g_bin_model, dir), LV_OK);
    assert_int_equal(io_model_open(&h, dir, IO_MODEL_AUTO), LV_OK);
    lv_model_config a = g_bin_model->cfg, b = h->cfg;
    assert_true(b.rope == LV_ROPE_HALF);
    b.rope = LV_ROPE_INTERLEAVED;
    assert_memory_equal(&a, &b, sizeof a);
    assert_models_equal(g_bin_model, h, 1);
    /* F32 written 8-aligned: every tensor points into the map, nothing converted */
    assert_null(h->storage->arena);
    const char *base = h->storage->maps[0].data;
    assert_true((const char *)h->layers[4].w2 > base &&
                (const char *)h->layers[4].w2 < base + h->storage->maps[0].size);
    lv_model_config c;
    assert_int_equal(io_config_read_hf(&c, tmp_path("hf260K/config.json")), LV_OK);
    assert_memory_equal(&c, &h->cfg, sizeof c);
    io_model_free(h);
}

static void test_llama2c_roundtrip(void **state)
{
    (void)state;
    const char *p1 = tmp_path("rt1.bin"), *p2 = tmp_path("rt2.bin"), *hf = tmp_path("rt_hf");
    lv_model *h = NULL;
    assert_int_equal(io_model_write_llama2c(g_bin_model, p1), LV_OK);
    size_t n0, n1, n2;
    unsigned char *r0 = read_all(g_bin, &n0), *r1 = read_all(p1, &n1);
    assert_int_equal(n0, n1);
    /* weights bit-exact; legacy freq_cis recomputed, within 1 ulp of PyTorch's */
    const size_t fstart = 28 + 4 * 260032, fend = fstart + 4 * 2 * 512 * 4;
    assert_memory_equal(r0, r1, fstart);
    assert_memory_equal(r0 + fend, r1 + fend, n0 - fend);
    for (size_t i = fstart; i < fend; i += 4) {
        float x, y;
        memcpy(&x, r0 + i, 4), memcpy(&y, r1 + i, 4);
        assert_true(fabsf(x - y) <= 1.2e-7f);
    }
    /* .bin -> HF -> .bin undoes the q/k permutation bit-exactly */
    assert_int_equal(io_model_write_hf(g_bin_model, hf), LV_OK);
    assert_int_equal(io_model_open_hf(&h, hf), LV_OK);
    assert_int_equal(io_model_write_llama2c(h, p2), LV_OK);
    unsigned char *r2 = read_all(p2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(r1, r2, n1);
    free(r0), free(r1), free(r2);
    io_model_free(h);
}

static void test_untied_roundtrip(void **state)
{
    (void)state;
    lv_model_config c = small_cfg(0);
    lv_model *m = NULL, *b = NULL, *h = NULL, *b2 = NULL;
    assert_int_equal(io_model_synth(&m, &c, 5), LV_OK);
    assert_true(m->wcls != m->tok_emb);
    assert_int_equal(io_model_write_llama2c(m, tmp_path("untied.bin")), LV_OK);
    size_t n;
    unsigned char *raw = read_all(tmp_path("untied.bin"), &n);
    int32_t v;
    memcpy(&v, raw + 20, 4);
    assert_int_equal(v, -32); /* negative vocab: unshared classifier */
    free(raw);
    assert_int_equal(io_model_open(&b, tmp_path("untied.bin"), IO_MODEL_AUTO), LV_OK);
    assert_false(b->cfg.tied_cls);
    assert_models_equal(m, b, 0);
    assert_int_equal(io_model_write_hf(m, tmp_path("untied_hf")), LV_OK);
    assert_int_equal(io_model_open_hf(&h, tmp_path("untied_hf")), LV_OK);
    assert_false(h->cfg.tied_cls);
    assert_models_equal(m, h, 1);
    /* HALF -> HF writes rows as they are; HALF -> .bin inverts the permutation */
    assert_int_equal(io_model_write_hf(h, tmp_path("untied_hf2")), LV_OK);
    assert_int_equal(io_model_open_hf(&b2, tmp_path("untied_hf2")), LV_OK);
    assert_models_equal(h, b2, 0);
    io_model_free(b2), io_model_free(h), io_model_free(b), io_model_free(m);
}

static void check_pattern(const lv_model *h, int f16)
{
    io_tensor_ref refs[64];
    int n = io_tensor_count(&h->cfg);
    io_tensor_list(&h->cfg, refs, IO_NAMES_HF);
    for (int i = 0; i < n; i++) {
        const float *x = io_model_tensor(h, refs[i].kind, refs[i].layer);
        for (int64_t k = 0; k < io_tensor_numel(&refs[i]); k++) {
            float want = f16 ? f16_pat[k % NPAT(f16_pat)].f : bf16_pat[k % NPAT(bf16_pat)].f;
            if (memcmp(&want, &x[k], 4) != 0)
                fail_msg("%s[%lld] = %a, want %a", refs[i].name, (long long)k, (double)x[k],
                         (double)want);
        }
    }
}

static void test_f16_bf16(void **state)
{
    (void)state;
    lv_model_config c = small_cfg(0);
    lv_model *m = NULL, *h = NULL;
    assert_int_equal(io_model_synth(&m, &c, 1), LV_OK);
    const char *dir = make_hf_dir("f16", m, &(st_opts){.dtype = "F16"});
    assert_int_equal(io_model_open_hf(&h, dir), LV_OK);
    assert_non_null(h->storage->arena);
    assert_int_equal(h->storage->arena_floats, (size_t)lv_cfg_n_params(&c));
    check_pattern(h, 1);
    io_model_free(h);
    dir = make_hf_dir("bf16", m, &(st_opts){.dtype = "BF16"});
    assert_int_equal(io_model_open_hf(&h, dir), LV_OK);
    check_pattern(h, 0);
    /* nothing points into the shard any more: it was unmapped */
    assert_null(h->storage->maps[0].data);
    io_model_free(h);
    /* misaligned F32 data is copied, not pointed to */
    dir = make_hf_dir("misaligned", m, &(st_opts){.misalign = 1});
    assert_int_equal(io_model_open_hf(&h, dir), LV_OK);
    assert_non_null(h->storage->arena);
    assert_models_equal(m, h, 0);
    io_model_free(h), io_model_free(m);
}

static void test_sharded(void **state)
{
    (void)state;
    lv_model_config c = small_cfg(0);
    lv_model *m = NULL, *h = NULL;
    assert_int_equal(io_model_synth(&m, &c, 2), LV_OK);
    const char *dir = tmp_path("sharded");
    assert_int_equal(io_model_write_hf(m, dir), LV_OK);
    char p[600];
    snprintf(p, sizeof p, "%s/model.safetensors", dir);
    unlink(p);
    int n = io_tensor_count(&c), half = n / 2;
    const char *s1 = "model-00001-of-00002.safetensors", *s2 = "model-00002-of-00002.safetensors";
    snprintf(p, sizeof p, "%s/%s", dir, s1);
    write_st(p, m, 0, half, &(st_opts){0});
    snprintf(p, sizeof p, "%s/%s", dir, s2);
    write_st(p, m, half, n, &(st_opts){.dtype = "BF16"});
    io_tensor_ref refs[64];
    io_tensor_list(&c, refs, IO_NAMES_HF);
    cJSON *idx = cJSON_CreateObject(), *wm = cJSON_AddObjectToObject(idx, "weight_map");
    cJSON_AddObjectToObject(idx, "metadata");
    for (int i = 0; i < n; i++) cJSON_AddStringToObject(wm, refs[i].name, i < half ? s1 : s2);
    char *json = cJSON_Print(idx);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    write_text(p, json);
    assert_int_equal(io_model_open(&h, dir, IO_MODEL_AUTO), LV_OK);
    assert_int_equal(h->storage->n_maps, 2);
    for (int i = 0; i < half; i++)
        assert_floats_equal(io_model_tensor(m, refs[i].kind, refs[i].layer),
                            io_model_tensor(h, refs[i].kind, refs[i].layer),
                            io_tensor_numel(&refs[i]), refs[i].name);
    assert_true(h->wcls[0] == 1.0f && h->wcls[1] == -3.0f); /* bf16 pattern in shard 2 */
    io_model_free(h);
    /* a shard the index points at is missing */
    snprintf(p, sizeof p, "%s/%s", dir, s2);
    unlink(p);
    expect_fail(io_model_open_hf(&h, dir), s2, "cannot be opened");
    assert_null(h);
    /* a tensor missing from weight_map */
    cJSON_DeleteItemFromObject(wm, "model.norm.weight");
    cJSON_free(json);
    json = cJSON_Print(idx);
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    write_text(p, json);
    snprintf(p, sizeof p, "%s/%s", dir, s2);
    write_st(p, m, half, n, &(st_opts){0});
    expect_fail(io_model_open_hf(&h, dir), "index.json", "model.norm.weight");
    snprintf(p, sizeof p, "%s/model.safetensors.index.json", dir);
    write_text(p, "{\"weight_map\": [1, 2");
    expect_fail(io_model_open_hf(&h, dir), "index.json", "JSON");
    cJSON_free(json);
    cJSON_Delete(idx);
    io_model_free(m);
}

/* ---------------------------------------------------------------- bad inputs */

static void test_bad_llama2c(void **state)
{
    (void)state;
    lv_model *m = NULL;
    size_t n;
    unsigned char *raw = read_all(g_bin, &n), *b = malloc(n + 4);
    expect_fail(io_model_open_llama2c(&m, tmp_path("nonexistent.bin")), "nonexistent.bin", NULL);
    expect_fail(open_bin_bytes("empty.bin", raw, 0, &m), "empty.bin", "too small");
    expect_fail(open_bin_bytes("hdr.bin", raw, 20, &m), "hdr.bin", "too small");
    expect_fail(open_bin_bytes("trunc.bin", raw, n - 4, &m), "trunc.bin", "1056540");
    memcpy(b, raw, n), memset(b + n, 0, 4);
    expect_fail(open_bin_bytes("long.bin", b, n + 4, &m), "long.bin", "implies 1056540 bytes");
    const struct {
        int field, value;
        const char *what;
    } bad[] = {{0, -64, "dim"},          {1, 0, "hidden_dim"},       {2, -1, "n_layers"},
               {3, 7, "not a multiple"}, {4, 3, "not a multiple"},   {3, 64, "odd"},
               {5, INT32_MIN, "vocab"},  {6, 0, "seq_len"},          {0, 1 << 30, "dim"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        memcpy(b, raw, n);
        memcpy(b + 4 * bad[i].field, &bad[i].value, 4);
        expect_fail(open_bin_bytes("badhdr.bin", b, n, &m), "badhdr.bin", bad[i].what);
    }
    /* NaN in layer 1's wq (stacked after the embedding and 5 attention norms) */
    memcpy(b, raw, n);
    float nan = NAN, inf = INFINITY;
    memcpy(b + 28 + 4 * (512 * 64 + 5 * 64 + 64 * 64 + 10), &nan, 4);
    expect_fail(open_bin_bytes("nan.bin", b, n, &m), "nan.bin",
                "tensor layers.1.wq has NaN at index 10");
    memcpy(b, raw, n);
    memcpy(b + 28 + 4 * 3, &inf, 4);
    expect_fail(open_bin_bytes("inf.bin", b, n, &m), "inf.bin",
                "tensor token_embedding_table has Inf at index 3");
    assert_null(m);
    free(b), free(raw);
}

/* Rewrites the first n bytes of dir/model.safetensors with p, or cuts `cut`
 * bytes off its end (keep > 0: keep only that many bytes). */
static void patch_st(const char *dir, size_t cut, size_t keep, const void *p, size_t n)
{
    char path[600];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    size_t size;
    unsigned char *raw = read_all(path, &size);
    if (p) memcpy(raw, p, n);
    write_bytes(path, raw, keep ? keep : size - cut);
    free(raw);
}

static void test_bad_safetensors(void **state)
{
    (void)state;
    lv_model_config c = small_cfg(1);
    lv_model *m = NULL, *h = NULL;
    assert_int_equal(io_model_synth(&m, &c, 3), LV_OK);
    const char *st = "model.safetensors";
    const char *d = make_hf_dir("bad_trunc", m, &(st_opts){0});
    patch_st(d, 100, 0, NULL, 0);
    expect_fail(io_model_open_hf(&h, d), st, "past the data section");
    patch_st(d, 0, 1000, NULL, 0);
    expect_fail(io_model_open_hf(&h, d), st, "past the end of the file");
    patch_st(d, 0, 5, NULL, 0);
    expect_fail(io_model_open_hf(&h, d), st, "too small");
    d = make_hf_dir("bad_len", m, &(st_opts){0});
    const unsigned char big[8] = {0, 0, 0, 0, 0, 0, 0, 1};
    patch_st(d, 0, 0, big, 8);
    expect_fail(io_model_open_hf(&h, d), st, "past the end of the file");
    const unsigned char huge[8] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    patch_st(d, 0, 0, huge, 8);
    expect_fail(io_model_open_hf(&h, d), st, "past the end of the file");
    d = make_hf_dir("bad_json", m, &(st_opts){0});
    patch_st(d, 0, 0, "\x10\0\0\0\0\0\0\0{\"a\": [1, 2 }}}", 22);
    expect_fail(io_model_open_hf(&h, d), st, "JSON");
    d = make_hf_dir("bad_offsets", m, &(st_opts){.end_past_eof = 1});
    expect_fail(io_model_open_hf(&h, d), st, "past the data section");
    d = make_hf_dir("bad_missing", m, &(st_opts){.skip = "model.layers.1.mlp.up_proj.weight"});
    expect_fail(io_model_open_hf(&h, d), st, "missing tensor model.layers.1.mlp.up_proj.weight");
    const char *odd[] = {"I8", "F64", "XYZ"};
    const char *why[] = {"dtype I8", "dtype F64", "unknown dtype \"XYZ\""};
    for (int i = 0; i < 3; i++) {
        d = make_hf_dir("bad_dtype", m,
                        &(st_opts){.odd_name = "model.norm.weight", .odd_dtype = odd[i]});
        expect_fail(io_model_open_hf(&h, d), st, why[i]);
    }
    d = make_hf_dir("bad_nan", m, &(st_opts){.nan_name = "model.layers.0.self_attn.v_proj.weight"});
    expect_fail(io_model_open_hf(&h, d), st,
                "tensor model.layers.0.self_attn.v_proj.weight has NaN at index 3");
    d = make_hf_dir("bad_nan16", m, &(st_opts){.dtype = "F16", .nan_name = "model.norm.weight"});
    expect_fail(io_model_open_hf(&h, d), st, "tensor model.norm.weight has NaN at index 3");
    /* begin > end */
    d = make_hf_dir("bad_order", m, &(st_opts){0});
    const char *j = "{\"x\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,4]}}";
    unsigned char hb[8 + 64] = {64};
    memset(hb + 8, ' ', 64);
    memcpy(hb + 8, j, strlen(j));
    patch_st(d, 0, 0, hb, sizeof hb);
    expect_fail(io_model_open_hf(&h, d), st, "begin 8 > end 4");
    /* shape against config.json */
    d = make_hf_dir("bad_shape", m, &(st_opts){0});
    char cfgp[600];
    snprintf(cfgp, sizeof cfgp, "%s/config.json", d);
    lv_model_config c2 = c;
    c2.hidden_dim = 20;
    lv_model *m2 = NULL;
    assert_int_equal(io_model_synth(&m2, &c2, 3), LV_OK);
    assert_int_equal(io_model_write_hf(m2, tmp_path("tmpcfg")), LV_OK);
    size_t n;
    char *cfgtext = (char *)read_all(tmp_path("tmpcfg/config.json"), &n);
    write_text(cfgp, cfgtext);
    expect_fail(io_model_open_hf(&h, d), st,
                "tensor model.layers.0.mlp.gate_proj.weight has shape (24, 16), config.json "
                "implies (20, 16)");
    assert_null(h);
    free(cfgtext);
    io_model_free(m2), io_model_free(m);
}

static void test_bad_config(void **state)
{
    (void)state;
    lv_model_config c = small_cfg(1), out;
    lv_model *m = NULL, *h = NULL;
    assert_int_equal(io_model_synth(&m, &c, 4), LV_OK);
    const char *d = tmp_path("bad_cfg");
    assert_int_equal(io_model_write_hf(m, d), LV_OK);
    const char *cfgp = tmp_path("bad_cfg/config.json");
    write_text(cfgp, "{\"hidden_size\": 16,, }");
    expect_fail(io_model_open_hf(&h, d), "config.json", "invalid JSON");
    write_text(cfgp, "[1, 2]");
    expect_fail(io_config_read_hf(&out, cfgp), "config.json", "not a JSON object");
    write_text(cfgp, "{\"intermediate_size\": 24, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"vocab_size\": 32}");
    expect_fail(io_model_open_hf(&h, d), "config.json", "missing key \"hidden_size\"");
    write_text(cfgp, "{\"hidden_size\": \"16\", \"intermediate_size\": 24, \"num_hidden_layers\": "
                     "2, \"num_attention_heads\": 4, \"vocab_size\": 32}");
    expect_fail(io_model_open_hf(&h, d), "config.json", "\"hidden_size\" must be an integer");
    write_text(cfgp, "{\"model_type\": \"mistral\", \"hidden_size\": 16}");
    expect_fail(io_model_open_hf(&h, d), "config.json", "model_type \"mistral\"");
    write_text(cfgp, "{\"hidden_size\": 16, \"intermediate_size\": 24, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 3, \"vocab_size\": 32}");
    expect_fail(io_model_open_hf(&h, d), "config.json", "not a multiple of n_heads");
    /* defaults: kv heads = heads, theta 10000, untied */
    write_text(cfgp, "{\"hidden_size\": 16, \"intermediate_size\": 24, \"num_hidden_layers\": 2, "
                     "\"num_attention_heads\": 4, \"vocab_size\": 32, \"rms_norm_eps\": 1e-6}");
    assert_int_equal(io_config_read_hf(&out, cfgp), LV_OK);
    assert_int_equal(out.n_kv_heads, 4);
    assert_true(out.rope_theta == 10000.0f && out.norm_eps == 1e-6f && !out.tied_cls);
    assert_true(out.rope == LV_ROPE_HALF);
    unlink(cfgp);
    expect_fail(io_model_open_hf(&h, d), "config.json", "cannot open");
    assert_int_equal(io_model_write_hf(m, d), LV_OK);
    unlink(tmp_path("bad_cfg/model.safetensors"));
    expect_fail(io_model_open_hf(&h, d), "bad_cfg", "no model.safetensors");
    expect_fail(io_model_open_hf(&h, g_bin), "stories260K.bin", "not a directory");
    expect_fail(io_model_open(&h, tmp_path("nothing"), IO_MODEL_AUTO), "nothing", "cannot open");
    assert_null(h);
    io_model_free(m);
}

/* ---------------------------------------------------------------- synth, presets */

static void test_synth(void **state)
{
    (void)state;
    lv_model_config c;
    assert_int_equal(io_config_preset(&c, "tiny-bench"), LV_OK);
    lv_model *a = NULL, *b = NULL, *d = NULL;
    assert_int_equal(io_model_synth(&a, &c, 42), LV_OK);
    assert_int_equal(io_model_synth(&b, &c, 42), LV_OK);
    assert_int_equal(io_model_synth(&d, &c, 43), LV_OK);
    size_t n = a->storage->arena_floats;
    assert_int_equal(n, (size_t)lv_cfg_n_params(&c));
    assert_memory_equal(a->storage->arena, b->storage->arena, n * sizeof(float));
    assert_true(memcmp(a->storage->arena, d->storage->arena, n * sizeof(float)) != 0);
    /* one arena, tensors inside it */
    assert_true(a->layers[7].w2 > a->storage->arena && a->wcls < a->storage->arena + n);
    double s = 0, s2 = 0;
    int64_t k = (int64_t)c.hidden_dim * c.dim;
    for (int64_t i = 0; i < k; i++) s += a->layers[3].w1[i], s2 += a->layers[3].w1[i] * a->layers[3].w1[i];
    assert_true(fabs(s / k) < 1e-3 && fabs(sqrt(s2 / k) - 0.02) < 1e-3);
    for (int i = 0; i < c.dim; i++) assert_true(a->layers[1].attn_norm[i] == 1.0f);
    assert_int_equal(io_model_check_finite(a, "synth", IO_NAMES_HF), LV_OK);
    io_model_free(a), io_model_free(b), io_model_free(d);
    c.n_heads = 7;
    expect_fail(io_model_synth(&a, &c, 1), "synthetic model", "n_heads");
    assert_null(a);
}

static void test_presets(void **state)
{
    (void)state;
    const char *names[] = {"stories260K", "stories15M", "stories42M", "stories110M",
                           "llama2-7b", "llama2-13b", "llama2-70b", "tiny-bench"};
    lv_model_config c;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        assert_int_equal(io_config_preset(&c, names[i]), LV_OK);
        assert_int_equal(io_config_check(&c, names[i]), LV_OK);
    }
    assert_int_equal(io_config_preset(&c, "stories260K"), LV_OK);
    lv_model_config want = g_bin_model->cfg;
    assert_memory_equal(&c, &want, sizeof c);
    assert_int_equal(io_config_preset(&c, "llama2-7b"), LV_OK);
    assert_int_equal(lv_cfg_n_params(&c), 6738415616LL); /* the published 6.74B */
    assert_int_equal(io_config_preset(&c, "llama2-70b"), LV_OK);
    assert_int_equal(c.n_kv_heads, 8);
    assert_int_equal(lv_cfg_n_params(&c), 68976648192LL);
    assert_int_equal(io_config_preset(&c, "stories15M"), LV_OK);
    assert_true(c.dim == 288 && c.hidden_dim == 768 && c.seq_len == 256 && c.vocab_size == 32000);
    expect_fail(io_config_preset(&c, "gpt-5"), "gpt-5", "stories260K, stories15M");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_llama2c_stories260K), cmocka_unit_test(test_hf_roundtrip),
        cmocka_unit_test(test_llama2c_roundtrip),   cmocka_unit_test(test_untied_roundtrip),
        cmocka_unit_test(test_f16_bf16),            cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_bad_llama2c),         cmocka_unit_test(test_bad_safetensors),
        cmocka_unit_test(test_bad_config),          cmocka_unit_test(test_synth),
        cmocka_unit_test(test_presets),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
