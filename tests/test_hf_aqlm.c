/* test_hf_aqlm.c: Hugging Face AQLM export and import (io/export_hf_aqlm.c,
 * io/import_hf_aqlm.c): round trips bit-exact for codes (the edges of aqlm's
 * signed storage for 6, 8 and 16 bits), codebooks and scales exactly their fp16
 * rounding (checked against the compiler's _Float16), q/k rows permuted for
 * HF RoPE so that the logits agree; refusals and damaged directories fail with
 * a message naming the file and the tensor. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>

#include <cjson/cJSON.h>

#include "io.h"
#include "io_impl.h"
#include "kern.h"

static char g_dir[64];

static const char *tpath(const char *name)
{
    static char p[32][256];
    static int k = 0;
    LV_ASSERT(k < 32);
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k++];
}

/* The reference fp16 rounding: the compiler's own conversion. */
static float ref_f16(float x) { return (float)(_Float16)x; }

/* stories260K shapes with random weights; codes random except that the first
 * codes of every linear (and of row 1, which the q/k permutation moves) are the
 * edges 0, 2^(B-1)-1, 2^(B-1), 2^B-1. */
static lv_qmodel *make_qmodel(int M, int nbits, int g, int tied, uint64_t seed)
{
    lv_model_config cfg;
    assert_int_equal(io_config_preset(&cfg, "stories260K"), LV_OK);
    cfg.tied_cls = tied;
    lv_model *fp = NULL;
    assert_int_equal(io_model_synth(&fp, &cfg, seed), LV_OK);
    lv_qmodel *q = NULL;
    assert_int_equal(lv_qmodel_init(&q, fp, M, nbits, g), LV_OK);
    io_model_free(fp);
    lv_rng r;
    lv_rng_seed(&r, seed);
    const uint32_t K = 1u << nbits;
    const uint16_t edge[4] = {0, (uint16_t)(K / 2 - 1), (uint16_t)(K / 2), (uint16_t)(K - 1)};
    for (int l = 0; l < cfg.n_layers; l++) {
        lv_qblock *b = &q->blocks[l];
        for (int i = 0; i < cfg.dim; i++) {
            b->attn_norm[i] = 1.0f + 0.1f * lv_rng_normal(&r);
            b->ffn_norm[i] = 1.0f + 0.1f * lv_rng_normal(&r);
        }
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &b->lin[k];
            int64_t per_row = L->n_groups * L->M, nc = L->d_out * per_row;
            for (int64_t i = 0; i < nc; i++) L->codes[i] = (uint16_t)(lv_rng_u64(&r) % K);
            for (int i = 0; i < 4; i++) L->codes[i] = L->codes[per_row + 3 - i] = edge[i];
            for (int64_t i = 0; i < ((int64_t)L->M << nbits) * L->g; i++)
                L->codebooks[i] = 0.3f * lv_rng_normal(&r);
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = 0.05f + 0.1f * lv_rng_uniform(&r);
        }
    }
    return q;
}

static int is_qk(int k) { return k == LV_LIN_WQ || k == LV_LIN_WK; }

/* r (imported, HF row order) against q (exported, llama2.c row order). */
static void assert_imported(const lv_qmodel *q, const lv_qmodel *r)
{
    lv_model_config c = q->cfg;
    c.rope = LV_ROPE_HALF;
    assert_memory_equal(&c, &r->cfg, sizeof c);
    assert_int_equal(r->M, q->M);
    assert_int_equal(r->nbits, q->nbits);
    assert_int_equal(r->g, q->g);
    const size_t emb = (size_t)c.vocab_size * (size_t)c.dim, dim = (size_t)c.dim;
    assert_memory_equal(q->tok_emb, r->tok_emb, emb * sizeof(float));
    assert_memory_equal(q->final_norm, r->final_norm, dim * sizeof(float));
    if (!c.tied_cls) assert_memory_equal(q->wcls, r->wcls, emb * sizeof(float));
    else assert_null(r->wcls);
    const int hd = lv_cfg_head_dim(&c);
    for (int l = 0; l < c.n_layers; l++) {
        const lv_qblock *a = &q->blocks[l], *b = &r->blocks[l];
        assert_memory_equal(a->attn_norm, b->attn_norm, dim * sizeof(float));
        assert_memory_equal(a->ffn_norm, b->ffn_norm, dim * sizeof(float));
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *x = &a->lin[k], *y = &b->lin[k];
            assert_int_equal(x->d_out, y->d_out);
            assert_int_equal(x->d_in, y->d_in);
            assert_int_equal(x->n_groups, y->n_groups);
            const int64_t per_row = x->n_groups * x->M, K = (int64_t)1 << x->nbits;
            for (int64_t row = 0; row < x->d_out; row++) {
                int64_t src = is_qk(k) ? io_rope_src_row(row, hd, 1) : row;
                assert_memory_equal(x->codes + src * per_row, y->codes + row * per_row,
                                    (size_t)per_row * sizeof(uint16_t));
                assert_true(y->scales[row] == ref_f16(x->scales[src]));
            }
            for (int64_t i = 0; i < x->M * K * x->g; i++)
                assert_true(y->codebooks[i] == ref_f16(x->codebooks[i]));
        }
    }
}

/* The stored code values, read straight from the file: aqlm's pack_int_data
 * convention, c >= 2^(B-1) stored as c - 2^B in int8 / int16. */
static void assert_stored_codes(const char *dir, const lv_qmodel *q)
{
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    io_map m;
    io_st_header h;
    assert_int_equal(io_map_open(&m, path), LV_OK);
    assert_int_equal(io_st_parse(&h, m.data, m.size, path), LV_OK);
    const io_st_tensor *t = io_st_find(&h, "model.layers.2.mlp.down_proj.codes");
    assert_non_null(t);
    assert_string_equal(t->dtype_name, q->nbits <= 8 ? "I8" : "I16");
    const lv_aq_layer *L = &q->blocks[2].lin[LV_LIN_W2];
    assert_int_equal(t->numel, L->d_out * L->n_groups * L->M);
    const unsigned char *p = (const unsigned char *)m.data + t->offset;
    const int32_t K = 1 << q->nbits;
    int seen_neg = 0;
    for (int64_t i = 0; i < t->numel; i++) {
        int32_t v = q->nbits <= 8 ? (int8_t)p[i] : (int16_t)(uint16_t)(p[2 * i] | p[2 * i + 1] << 8);
        int32_t want = L->codes[i] >= K / 2 ? L->codes[i] - K : L->codes[i];
        assert_int_equal(v, want);
        seen_neg |= v < 0;
    }
    assert_true(seen_neg);
    const io_st_tensor *cb = io_st_find(&h, "model.layers.2.mlp.down_proj.codebooks");
    assert_non_null(cb);
    assert_string_equal(cb->dtype_name, "F16");
    assert_int_equal(cb->ndim, 4);
    assert_int_equal(cb->shape[2], 1);
    io_st_header_free(&h);
    io_map_close(&m);
}

static void roundtrip(int M, int nbits, int tied, const char *name)
{
    lv_qmodel *q = make_qmodel(M, nbits, 4, tied, 100 + (uint64_t)nbits), *r = NULL;
    const char *dir = tpath(name);
    io_hf_aqlm_report rep;
    assert_int_equal(io_qmodel_write_hf_aqlm(q, dir, &rep), LV_OK);
    printf("  %dx%dg4: %d linears, %.3f bpw, fp16 max rel change %.3g (%s), max abs %.3g\n", M,
           nbits, rep.n_linears, rep.bits_per_weight, rep.max_rel_change, rep.worst,
           rep.max_abs_change);
    assert_int_equal(rep.n_linears, 35);
    assert_true(rep.max_rel_change > 0 && rep.max_rel_change < 1e-3);
    int aqlm = 0;
    assert_int_equal(io_hf_is_aqlm(dir, &aqlm), LV_OK);
    assert_true(aqlm);
    assert_int_equal(io_qmodel_read_hf_aqlm(&r, dir), LV_OK);
    assert_imported(q, r);
    assert_stored_codes(dir, q);
    lv_qmodel_free(q);
    lv_qmodel_free(r);
}

static void test_roundtrip_b8(void **state) { (void)state; roundtrip(2, 8, 1, "rt8"); }
static void test_roundtrip_b16(void **state) { (void)state; roundtrip(1, 16, 0, "rt16"); }
static void test_roundtrip_b6(void **state) { (void)state; roundtrip(2, 6, 1, "rt6"); }

/* The imported model (HF rows, rotate-half RoPE) computes the same logits as
 * the exported one with its codebooks and scales rounded to fp16. */
static void test_logits(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(1, 8, 4, 1, 7);
    const char *dir = tpath("logits");
    assert_int_equal(io_qmodel_write_hf_aqlm(q, dir, NULL), LV_OK);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &q->blocks[l].lin[k];
            for (int64_t i = 0; i < ((int64_t)L->M << L->nbits) * L->g; i++)
                L->codebooks[i] = ref_f16(L->codebooks[i]);
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = ref_f16(L->scales[i]);
        }
    lv_model *a = NULL, *b = NULL;
    assert_int_equal(io_qmodel_to_fp(q, &a), LV_OK);
    assert_int_equal(io_model_open(&b, dir, IO_MODEL_AUTO), LV_OK);
    assert_int_equal(b->cfg.rope, LV_ROPE_HALF);
    const int T = 64, V = a->cfg.vocab_size;
    int32_t tok[64];
    lv_rng r;
    lv_rng_seed(&r, 3);
    for (int i = 0; i < T; i++) tok[i] = i ? (int32_t)(lv_rng_u64(&r) % (uint64_t)V) : 1;
    kern_fwd_ws *wa = NULL, *wb = NULL;
    const float *la = NULL, *lb = NULL;
    assert_int_equal(kern_fwd_ws_init(&wa, &a->cfg, 1, T, 1), LV_OK);
    assert_int_equal(kern_fwd_ws_init(&wb, &b->cfg, 1, T, 1), LV_OK);
    assert_int_equal(kern_model_forward(a, tok, 1, T, wa, &la), LV_OK);
    assert_int_equal(kern_model_forward(b, tok, 1, T, wb, &lb), LV_OK);
    double maxabs = 0, maxdiff = 0;
    for (int64_t i = 0; i < (int64_t)T * V; i++) {
        maxabs = fmax(maxabs, fabs(la[i]));
        maxdiff = fmax(maxdiff, fabs((double)la[i] - lb[i]));
    }
    printf("  logits: max |logit| %.4f, max |diff| %.3g\n", maxabs, maxdiff);
    assert_true(maxabs > 0.1 && maxdiff <= 1e-4 * maxabs);
    kern_fwd_ws_free(wa);
    kern_fwd_ws_free(wb);
    io_model_free(a);
    io_model_free(b);
    lv_qmodel_free(q);
}

/* io_f32_to_f16 against the compiler's conversion on special values and
 * random bit patterns (normals, subnormals, ties, overflow). */
static void test_f16_rounding(void **state)
{
    (void)state;
    const float special[] = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.99f, 65520.0f, 1e9f, -1e9f,
                             5.96e-8f, 2.98e-8f, 2.99e-8f, 1e-10f, 6.1035156e-5f, 6.1e-5f,
                             1.00048828125f, 1.00146484375f, INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
        _Float16 h = (_Float16)special[i];
        uint16_t want;
        memcpy(&want, &h, 2);
        assert_int_equal(io_f32_to_f16(special[i]), want);
    }
    assert_true(isnan(io_f16_to_f32(io_f32_to_f16(NAN))));
    lv_rng r;
    lv_rng_seed(&r, 1);
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)lv_rng_u64(&r);
        if (i & 1) u = (u & 0x80000000u) | ((103u + (u >> 8) % 40u) << 23) | (u & 0x7fffffu);
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f)) continue;
        _Float16 h = (_Float16)f;
        uint16_t want;
        memcpy(&want, &h, 2);
        if (io_f32_to_f16(f) != want) fail_msg("f32 %08x: got %04x, want %04x", u, io_f32_to_f16(f), want);
    }
}

static void expect_fail(lv_status st, lv_status want, const char *n1, const char *n2)
{
    char line[768];
    lv_last_error_line(line, sizeof line);
    printf("  -> %s\n", line);
    assert_int_equal(st, want);
    if (n1) assert_non_null(strstr(line, n1));
    if (n2) assert_non_null(strstr(line, n2));
}

/* g = 8 does not divide hidden_dim 172: refused before anything is written. */
static void test_refusals(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(1, 8, 8, 1, 5);
    const char *dir = tpath("cut");
    expect_fail(io_qmodel_write_hf_aqlm(q, dir, NULL), LV_ERR_UNSUPPORTED,
                "model.layers.0.mlp.down_proj", "cut last group");
    struct stat sb;
    assert_int_not_equal(stat(dir, &sb), 0);
    lv_qmodel_free(q);

    q = make_qmodel(1, 8, 4, 1, 5);
    q->blocks[3].lin[LV_LIN_WO].scales[7] = 1e5f;
    expect_fail(io_qmodel_write_hf_aqlm(q, tpath("big"), NULL), LV_ERR_NUMERIC,
                "model.layers.3.self_attn.o_proj.scales[7]", "fp16");
    q->blocks[3].lin[LV_LIN_WO].scales[7] = 0.1f;
    q->blocks[1].lin[LV_LIN_W3].g = 2;
    expect_fail(io_qmodel_write_hf_aqlm(q, tpath("mixed"), NULL), LV_ERR_UNSUPPORTED,
                "model.layers.1.mlp.up_proj", "one quantization config");
    q->blocks[1].lin[LV_LIN_W3].g = 4;
    lv_qmodel_free(q);
}

/* ---------------- damaged directories ---------------- */

typedef struct {
    const char *target;  /* tensor to edit */
    int drop;            /* leave it out of the header */
    const char *rename;  /* new name */
    const char *dtype;   /* new dtype (same element size) */
    int ndim;            /* > 0: new shape (same number of elements) */
    int64_t shape[4];
    int64_t patch_at;    /* >= 0: overwrite bytes of the tensor at this byte offset */
    unsigned char patch[2];
    int patch_n;
} st_edit;

/* Rewrites dir/model.safetensors with one tensor's header entry (and bytes) changed. */
static void st_rewrite(const char *dir, const st_edit *e)
{
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", dir);
    char *buf = NULL;
    size_t size = 0;
    assert_int_equal(io_read_file(path, &buf, &size), LV_OK);
    io_st_header h;
    assert_int_equal(io_st_parse(&h, buf, size, path), LV_OK);
    cJSON *o = cJSON_CreateObject();
    int found = 0;
    for (int i = 0; i < h.n; i++) {
        const io_st_tensor *t = &h.t[i];
        int hit = !strcmp(t->name, e->target);
        found |= hit;
        if (hit && e->drop) continue;
        cJSON *j = cJSON_AddObjectToObject(o, hit && e->rename ? e->rename : t->name);
        cJSON_AddStringToObject(j, "dtype", hit && e->dtype ? e->dtype : t->dtype_name);
        double sh[8];
        int nd = hit && e->ndim ? e->ndim : t->ndim;
        for (int d = 0; d < nd; d++) sh[d] = (double)(hit && e->ndim ? e->shape[d] : t->shape[d]);
        cJSON_AddItemToObject(j, "shape", cJSON_CreateDoubleArray(sh, nd));
        double off[2] = {(double)(t->offset - h.data_start), (double)(t->offset - h.data_start + t->nbytes)};
        cJSON_AddItemToObject(j, "data_offsets", cJSON_CreateDoubleArray(off, 2));
        if (hit && e->patch_n) memcpy(buf + t->offset + e->patch_at, e->patch, (size_t)e->patch_n);
    }
    assert_true(found);
    char *js = cJSON_PrintUnformatted(o);
    uint64_t n = strlen(js);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fwrite(len8, 1, 8, f);
    fwrite(js, 1, n, f);
    fwrite(buf + h.data_start, 1, size - h.data_start, f);
    fclose(f);
    cJSON_free(js);
    cJSON_Delete(o);
    io_st_header_free(&h);
    free(buf);
}

/* Sets quantization_config[key] (number, or string when s != NULL) in dir/config.json. */
static void cfg_set(const char *dir, const char *key, double v, const char *s)
{
    char path[300];
    snprintf(path, sizeof path, "%s/config.json", dir);
    char *text = NULL;
    size_t n = 0;
    assert_int_equal(io_read_file(path, &text, &n), LV_OK);
    cJSON *o = cJSON_Parse(text), *qc = cJSON_GetObjectItem(o, "quantization_config");
    cJSON_ReplaceItemInObject(qc, key, s ? cJSON_CreateString(s) : cJSON_CreateNumber(v));
    char *out = cJSON_Print(o);
    FILE *f = fopen(path, "w");
    fputs(out, f);
    fclose(f);
    cJSON_free(out);
    cJSON_Delete(o);
    free(text);
}

/* A fresh export to damage (6 bits: codes have unused int8 values). */
static const char *fresh(const char *name, int nbits)
{
    const char *dir = tpath(name);
    lv_qmodel *q = make_qmodel(1, nbits, 4, 1, 21);
    assert_int_equal(io_qmodel_write_hf_aqlm(q, dir, NULL), LV_OK);
    lv_qmodel_free(q);
    return dir;
}

static lv_status open_q(const char *dir)
{
    lv_qmodel *q = NULL;
    lv_status st = io_qmodel_read_hf_aqlm(&q, dir);
    lv_qmodel_free(q);
    lv_model *m = NULL;
    lv_status st2 = io_model_open(&m, dir, IO_MODEL_AUTO);
    io_model_free(m);
    assert_int_equal(st, st2); /* io_model_open goes the same way */
    return st;
}

static void test_damage(void **state)
{
    (void)state;
    const char *cd = "model.layers.1.self_attn.v_proj.codes";
    const char *cb = "model.layers.1.self_attn.v_proj.codebooks";
    const char *d = fresh("d_missing", 8);
    st_rewrite(d, &(st_edit){.target = cd, .drop = 1});
    expect_fail(open_q(d), LV_ERR_FORMAT, "model.safetensors", cd);

    d = fresh("d_weight", 8);
    st_rewrite(d, &(st_edit){.target = cd, .rename = "model.layers.1.self_attn.v_proj.weight"});
    expect_fail(open_q(d), LV_ERR_UNSUPPORTED, "model.safetensors", "v_proj.weight");

    d = fresh("d_dtype", 8);
    st_rewrite(d, &(st_edit){.target = cd, .dtype = "U8"});
    expect_fail(open_q(d), LV_ERR_FORMAT, "model.safetensors", cd);

    d = fresh("d_dtype16", 16);
    st_rewrite(d, &(st_edit){.target = cd, .dtype = "F16"});
    expect_fail(open_q(d), LV_ERR_FORMAT, cd, "I16");

    d = fresh("d_cbdtype", 8);
    st_rewrite(d, &(st_edit){.target = cb, .dtype = "I16"});
    expect_fail(open_q(d), LV_ERR_FORMAT, "model.safetensors", cb);

    d = fresh("d_shape", 8); /* v_proj: 32 x 64, g 4 -> (32, 16, 1) */
    st_rewrite(d, &(st_edit){.target = cd, .ndim = 3, .shape = {16, 32, 1}});
    expect_fail(open_q(d), LV_ERR_FORMAT, cd, "(32, 16, 1)");

    d = fresh("d_range", 6); /* 6 bits: stored codes lie in [-32, 64) */
    st_rewrite(d, &(st_edit){.target = cd, .patch_at = 5, .patch = {100}, .patch_n = 1});
    expect_fail(open_q(d), LV_ERR_FORMAT, cd, "out of range");
    d = fresh("d_range2", 6);
    st_rewrite(d, &(st_edit){.target = cd, .patch_at = 5, .patch = {(unsigned char)-33}, .patch_n = 1});
    expect_fail(open_q(d), LV_ERR_FORMAT, cd, "-33");

    d = fresh("d_nan", 8);
    st_rewrite(d, &(st_edit){.target = cb, .patch_at = 6, .patch = {0x00, 0x7e}, .patch_n = 2});
    expect_fail(open_q(d), LV_ERR_NUMERIC, "model.safetensors", cb);

    d = fresh("d_nbits7", 8); /* codebooks hold 256 entries, config says 128 */
    cfg_set(d, "nbits_per_codebook", 7, NULL);
    expect_fail(open_q(d), LV_ERR_FORMAT, "nbits_per_codebook 7", "codebooks");
    d = fresh("d_nbits9", 8); /* codes are int8, 9 bits need int16 */
    cfg_set(d, "nbits_per_codebook", 9, NULL);
    expect_fail(open_q(d), LV_ERR_FORMAT, "codes", "I16");
    d = fresh("d_g", 8);
    cfg_set(d, "in_group_size", 8, NULL);
    expect_fail(open_q(d), LV_ERR_FORMAT, "config.json", "in_group_size 8");
    d = fresh("d_ogs", 8);
    cfg_set(d, "out_group_size", 2, NULL);
    expect_fail(open_q(d), LV_ERR_UNSUPPORTED, "config.json", "out_group_size");
    d = fresh("d_M", 8);
    cfg_set(d, "num_codebooks", 0, "two");
    expect_fail(open_q(d), LV_ERR_FORMAT, "config.json", "num_codebooks");
    d = fresh("d_method", 8);
    cfg_set(d, "quant_method", 0, "gptq");
    lv_model *m = NULL;
    expect_fail(io_model_open(&m, d, IO_MODEL_AUTO), LV_ERR_UNSUPPORTED, "config.json", "gptq");

    /* truncated data section */
    d = fresh("d_trunc", 8);
    char path[300];
    snprintf(path, sizeof path, "%s/model.safetensors", d);
    assert_int_equal(truncate(path, 4000), 0);
    expect_fail(open_q(d), LV_ERR_FORMAT, "model.safetensors", NULL);
    assert_int_equal(unlink(path), 0);
    expect_fail(open_q(d), LV_ERR_IO, "model.safetensors", NULL);
}

/* The same model split as a sharded checkpoint (index + one shard) reads the same. */
static void test_sharded(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(1, 8, 4, 0, 31), *r = NULL;
    const char *dir = tpath("sharded");
    assert_int_equal(io_qmodel_write_hf_aqlm(q, dir, NULL), LV_OK);
    char a[300], b[300];
    snprintf(a, sizeof a, "%s/model.safetensors", dir);
    snprintf(b, sizeof b, "%s/model-00001-of-00001.safetensors", dir);
    assert_int_equal(rename(a, b), 0);
    char *buf = NULL;
    size_t size = 0;
    io_st_header h;
    assert_int_equal(io_read_file(b, &buf, &size), LV_OK);
    assert_int_equal(io_st_parse(&h, buf, size, b), LV_OK);
    cJSON *o = cJSON_CreateObject(), *wm = cJSON_AddObjectToObject(o, "weight_map");
    for (int i = 0; i < h.n; i++)
        cJSON_AddStringToObject(wm, h.t[i].name, "model-00001-of-00001.safetensors");
    char *js = cJSON_Print(o);
    snprintf(a, sizeof a, "%s/model.safetensors.index.json", dir);
    FILE *f = fopen(a, "w");
    fputs(js, f);
    fclose(f);
    assert_int_equal(io_qmodel_read_hf_aqlm(&r, dir), LV_OK);
    assert_imported(q, r);
    cJSON_free(js);
    cJSON_Delete(o);
    io_st_header_free(&h);
    free(buf);
    lv_qmodel_free(q);
    lv_qmodel_free(r);
}

/* A plain HF directory is no AQLM one and still opens as FP. */
static void test_plain_hf(void **state)
{
    (void)state;
    lv_model_config cfg;
    assert_int_equal(io_config_preset(&cfg, "stories260K"), LV_OK);
    lv_model *fp = NULL, *b = NULL;
    assert_int_equal(io_model_synth(&fp, &cfg, 1), LV_OK);
    const char *dir = tpath("plain");
    assert_int_equal(io_model_write_hf(fp, dir), LV_OK);
    int aqlm = 1;
    assert_int_equal(io_hf_is_aqlm(dir, &aqlm), LV_OK);
    assert_false(aqlm);
    assert_int_equal(io_model_open(&b, dir, IO_MODEL_AUTO), LV_OK);
    lv_qmodel *q = NULL;
    expect_fail(io_qmodel_read_hf_aqlm(&q, dir), LV_ERR_FORMAT, "config.json", "aqlm");
    io_model_free(b);
    io_model_free(fp);
}

int main(void)
{
    lv_log_set_quiet(1);
    snprintf(g_dir, sizeof g_dir, "/tmp/llmvq-hfaqlm.XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_f16_rounding), cmocka_unit_test(test_roundtrip_b8),
        cmocka_unit_test(test_roundtrip_b16), cmocka_unit_test(test_roundtrip_b6),
        cmocka_unit_test(test_logits),        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_damage),        cmocka_unit_test(test_sharded),
        cmocka_unit_test(test_plain_hf),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
