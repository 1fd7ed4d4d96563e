/* test_h5.c: HDF5 quantized models and block checkpoints: bit-exact round
 * trips, and every kind of damage (corrupt data, truncation, another job or
 * model, unknown format version) detected with a message naming the file. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>

#include <hdf5.h>

#include "io.h"
#include "io_impl.h" /* io_f16_to_f32 */
#include "kern.h"

static char g_dir[64];

/* Path in the test directory; each name gets its own buffer slot. */
static const char *tpath(const char *name)
{
    static char p[16][256];
    static int k = 0;
    LV_ASSERT(k < 16);
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k++];
}

/* A small quantized model with random codes/codebooks/scales (d_in 172 is not
 * a multiple of g = 8: the last group is cut). */
static lv_qmodel *make_qmodel(uint64_t seed)
{
    lv_model_config cfg;
    assert_int_equal(io_config_preset(&cfg, "stories260K"), LV_OK);
    lv_model *fp = NULL;
    assert_int_equal(io_model_synth(&fp, &cfg, seed), LV_OK);
    lv_qmodel *q = NULL;
    assert_int_equal(lv_qmodel_init(&q, fp, 2, 6, 8), LV_OK);
    io_model_free(fp);
    lv_rng r;
    lv_rng_seed(&r, seed);
    for (int l = 0; l < cfg.n_layers; l++) {
        lv_qblock *b = &q->blocks[l];
        b->block_mse = 0.01 * (l + 1);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &b->lin[k];
            int64_t nc = L->d_out * L->n_groups * L->M;
            for (int64_t i = 0; i < nc; i++) L->codes[i] = (uint16_t)(lv_rng_u64(&r) % 64);
            for (int64_t i = 0; i < ((int64_t)L->M << L->nbits) * L->g; i++)
                L->codebooks[i] = lv_rng_normal(&r) * 0.05f;
            for (int64_t i = 0; i < L->d_out; i++) L->scales[i] = 0.5f + lv_rng_uniform(&r);
            b->rel_err[k] = 0.1 + k;
        }
    }
    q->job_hash = 0x1234;
    q->model_hash = 0xabcd;
    return q;
}

static void assert_blocks_equal(const lv_qblock *a, const lv_qblock *b, int dim)
{
    assert_memory_equal(a->attn_norm, b->attn_norm, sizeof(float) * (size_t)dim);
    assert_memory_equal(a->ffn_norm, b->ffn_norm, sizeof(float) * (size_t)dim);
    assert_true(a->block_mse == b->block_mse);
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *x = &a->lin[k], *y = &b->lin[k];
        assert_int_equal(x->d_out, y->d_out);
        assert_int_equal(x->d_in, y->d_in);
        assert_int_equal(x->n_groups, y->n_groups);
        assert_int_equal(x->M, y->M);
        assert_int_equal(x->nbits, y->nbits);
        assert_int_equal(x->g, y->g);
        assert_memory_equal(x->codes, y->codes, sizeof(uint16_t) * (size_t)(x->d_out * x->n_groups * x->M));
        assert_memory_equal(x->codebooks, y->codebooks, sizeof(float) * (size_t)(((int64_t)x->M << x->nbits) * x->g));
        assert_memory_equal(x->scales, y->scales, sizeof(float) * (size_t)x->d_out);
        assert_true(a->rel_err[k] == b->rel_err[k]);
    }
}

static void test_model_roundtrip(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(5), *r = NULL;
    const char *p = tpath("model.h5");
    assert_int_equal(io_qmodel_write(q, p), LV_OK);
    assert_int_equal(io_qmodel_read(&r, p), LV_OK);
    assert_memory_equal(&q->cfg, &r->cfg, sizeof q->cfg);
    assert_int_equal(r->M, 2);
    assert_int_equal(r->nbits, 6);
    assert_int_equal(r->g, 8);
    assert_true(r->job_hash == 0x1234 && r->model_hash == 0xabcd);
    for (int l = 0; l < q->cfg.n_layers; l++) assert_blocks_equal(&q->blocks[l], &r->blocks[l], q->cfg.dim);
    /* bits per weight by hand for wq of stories260K (64 x 64, 8 groups, M 2, 6 bits):
     * the whole-model figure is checked against the same formula */
    double bits = 0, w = 0;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        const lv_aq_layer *L = &q->blocks[0].lin[k];
        bits += (double)L->d_out * L->n_groups * 2 * 6 + 2.0 * 64 * 8 * 16 + L->d_out * 16.0;
        w += (double)L->d_out * L->d_in;
    }
    assert_true(fabs(lv_qmodel_bits_per_weight(q) - bits / w) < 1e-12);

    /* dequantized FP view: wq row 3 by hand */
    lv_model *fp = NULL;
    assert_int_equal(io_qmodel_to_fp(r, &fp), LV_OK);
    const lv_aq_layer *L = &r->blocks[1].lin[LV_LIN_W2]; /* d_in 172: last group cut */
    for (int64_t col = 0; col < L->d_in; col++) {
        int64_t grp = col / 8, a = col % 8;
        float s = 0;
        for (int m = 0; m < 2; m++)
            s += L->codebooks[((size_t)m * 64 + L->codes[(3 * L->n_groups + grp) * 2 + m]) * 8 + a];
        assert_true(fabsf(fp->layers[1].w2[3 * L->d_in + col] - L->scales[3] * s) <= 1e-6f * (1 + fabsf(s)));
    }
    assert_ptr_equal(fp->wcls, fp->tok_emb);
    /* io_model_open recognises the file by its HDF5 signature */
    lv_model *fp2 = NULL;
    assert_int_equal(io_model_open(&fp2, p, IO_MODEL_AUTO), LV_OK);
    assert_memory_equal(fp2->layers[1].w2, fp->layers[1].w2, sizeof(float) * (size_t)(L->d_out * L->d_in));
    io_model_free(fp2);
    io_model_free(fp);
    lv_qmodel_free(q);
    lv_qmodel_free(r);
}

static void expect_fail(lv_status st, const char *path, const char *needle)
{
    assert_int_not_equal(st, LV_OK);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  -> %s\n", line);
    assert_non_null(strstr(line, path));
    if (needle) assert_non_null(strstr(line, needle));
}

static void copy_file(const char *from, const char *to, long keep)
{
    FILE *a = fopen(from, "rb"), *b = fopen(to, "wb");
    assert_non_null(a);
    assert_non_null(b);
    int c;
    long n = 0;
    while ((c = fgetc(a)) != EOF && (keep < 0 || n < keep)) {
        fputc(c, b);
        n++;
    }
    fclose(a);
    fclose(b);
}

/* A model with extra arrays (the PV-tuning checkpoint's layout): bit-exact
 * round trip of every type; a wrong length, a missing group or damaged array
 * bytes are errors naming the file. */
static void test_model_extra(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(9), *r = NULL;
    const char *p = tpath("extra.h5");
    float f[5] = {1.5f, -2.0f, 3.25f, 0.0f, 1e-30f}, f2[5];
    double d[2] = {3.141592653589793, -1e300}, d2[2];
    int64_t i64[3] = {-7, 0, 1LL << 40}, i2[3];
    uint64_t u64[4] = {1, 2, 3, ~0ULL}, u2[4];
    uint16_t u16[6] = {0, 1, 65535, 7, 8, 9}, h2[6];
    const io_array w[] = {{"f", IO_ARR_F32, 5, f},     {"d", IO_ARR_F64, 2, d},
                          {"i", IO_ARR_I64, 3, i64},   {"u", IO_ARR_U64, 4, u64},
                          {"h", IO_ARR_U16, 6, u16}};
    io_array rd[] = {{"f", IO_ARR_F32, 5, f2},   {"d", IO_ARR_F64, 2, d2},
                     {"i", IO_ARR_I64, 3, i2},   {"u", IO_ARR_U64, 4, u2},
                     {"h", IO_ARR_U16, 6, h2}};
    assert_int_equal(io_qmodel_write_extra(q, p, "state", w, 5), LV_OK);
    assert_int_equal(io_qmodel_read_extra(&r, p, "state", rd, 5), LV_OK);
    assert_memory_equal(f, f2, sizeof f);
    assert_memory_equal(d, d2, sizeof d);
    assert_memory_equal(i64, i2, sizeof i64);
    assert_memory_equal(u64, u2, sizeof u64);
    assert_memory_equal(u16, h2, sizeof u16);
    for (int l = 0; l < q->cfg.n_layers; l++) assert_blocks_equal(&q->blocks[l], &r->blocks[l], q->cfg.dim);
    lv_qmodel_free(r);
    r = NULL;
    /* the lengths, to size the buffers of a reader that does not know them */
    int64_t len = 0;
    assert_int_equal(io_qmodel_extra_length(p, "state/u", &len), LV_OK);
    assert_int_equal(len, 4);
    assert_int_equal(io_qmodel_extra_length(p, "state/h", &len), LV_OK);
    assert_int_equal(len, 6);
    expect_fail(io_qmodel_extra_length(p, "state/nope", &len), p, "state/nope missing");
    expect_fail(io_qmodel_extra_length(p, "other/f", &len), p, "other/f missing");
    /* a plain model reader ignores the group */
    assert_int_equal(io_qmodel_read(&r, p), LV_OK);
    lv_qmodel_free(r);
    r = NULL;
    /* the expected length differs */
    rd[2].n = 4;
    expect_fail(io_qmodel_read_extra(&r, p, "state", rd, 5), p, "dimension");
    assert_null(r);
    rd[2].n = 3;
    /* no such group */
    expect_fail(io_qmodel_read_extra(&r, p, "other", rd, 5), p, "group other missing");
    /* other bytes in one array under the old checksum: only the checksum can tell */
    const char *p2 = tpath("extra2.h5");
    copy_file(p, p2, -1);
    hid_t fh = H5Fopen(p2, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(fh >= 0);
    hid_t ds = H5Dopen2(fh, "state/f", H5P_DEFAULT);
    assert_true(ds >= 0);
    f[1] = -2.5f;
    assert_true(H5Dwrite(ds, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, f) >= 0);
    H5Dclose(ds);
    H5Fclose(fh);
    expect_fail(io_qmodel_read_extra(&r, p2, "state", rd, 5), p2, "checksum mismatch in group state");
    assert_null(r);
    lv_qmodel_free(q);
}

/* lv_round_f16 (quant.fp16) equals an fp16 store and load (io_f32_to_f16 +
 * io_f16_to_f32, the HF export's conversion) on normals, subnormals, ties,
 * the range edge and specials; a layer rounds idempotently, and a value
 * beyond fp16 is refused with the layer unchanged. */
static void test_round_f16(void **state)
{
    (void)state;
    lv_rng r;
    lv_rng_seed(&r, 4);
    const float special[] = {0.0f, -0.0f, 1.0f, 65504.0f, 65519.0f, 65520.0f, -65520.0f, 1e6f,
                             6.1035156e-05f, 6.0e-05f, 5.9604645e-08f, 2.9802322e-08f,
                             2.98023259e-08f, 1e-9f, 1.00048828125f, 1.00146484375f,
                             INFINITY, -INFINITY};
    for (size_t i = 0; i < sizeof special / sizeof special[0]; i++) {
        const float x = special[i], a = lv_round_f16(x), b = io_f16_to_f32(io_f32_to_f16(x));
        assert_memory_equal(&a, &b, sizeof a);
    }
    for (int i = 0; i < 200000; i++) {
        uint32_t u = (uint32_t)lv_rng_u64(&r);
        float x;
        memcpy(&x, &u, sizeof x);
        if (isnan(x)) continue;
        const float a = lv_round_f16(x), b = io_f16_to_f32(io_f32_to_f16(x));
        assert_memory_equal(&a, &b, sizeof a);
        const float y = lv_rng_normal(&r) * 0.05f, c = lv_round_f16(y);
        const float d = io_f16_to_f32(io_f32_to_f16(y));
        assert_memory_equal(&c, &d, sizeof c);
        assert_true(lv_round_f16(c) == c);
    }
    assert_true(isnan(lv_round_f16(NAN)));
    lv_aq_layer L;
    memset(&L, 0, sizeof L);
    assert_int_equal(lv_aq_layer_init(&L, 4, 8, 1, 3, 4), LV_OK);
    for (int i = 0; i < 8 * 4; i++) L.codebooks[i] = lv_rng_normal(&r);
    for (int i = 0; i < 4; i++) L.scales[i] = 1.0f + lv_rng_uniform(&r);
    assert_int_equal(lv_aq_layer_round_f16(&L, "t"), LV_OK);
    float cb[32], sc[4];
    memcpy(cb, L.codebooks, sizeof cb);
    memcpy(sc, L.scales, sizeof sc);
    assert_int_equal(lv_aq_layer_round_f16(&L, "t"), LV_OK);
    assert_memory_equal(cb, L.codebooks, sizeof cb);
    assert_memory_equal(sc, L.scales, sizeof sc);
    L.codebooks[5] = 1e5f;
    L.scales[0] = 1.2345678f;
    assert_int_equal(lv_aq_layer_round_f16(&L, "block 3 wq"), LV_ERR_NUMERIC);
    assert_non_null(strstr(lv_last_error(), "block 3 wq: codebooks[5]"));
    assert_true(L.scales[0] == 1.2345678f); /* unchanged */
    lv_aq_layer_free(&L);
}

/* quant.scale_bits = 8: the grid (base * 2^(-q/32) in fp16), rounding to the
 * nearest grid value (within 1.1 % + fp16 rounding above base / 256,
 * idempotent), refusals, bits per weight (16 per linear + 8 per row) and the
 * file round trip (attribute kept, off-grid scales refused on write). */
static void test_scales8(void **state)
{
    (void)state;
    const float base = lv_round_f16(0.7f);
    assert_true(lv_scale8_value(base, 0) == base);
    assert_true(lv_scale8_value(base, 32) == base * 0.5f);
    assert_true(lv_scale8_value(base, 255) < lv_scale8_value(base, 254));
    lv_qmodel *q = make_qmodel(11), *r = NULL;
    const double bpw16 = lv_qmodel_bits_per_weight(q);
    double worst = 0.0, weights = 0.0, rows = 0.0;
    lv_rng rng;
    lv_rng_seed(&rng, 12);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            lv_aq_layer *L = &q->blocks[l].lin[k];
            for (int64_t i = 0; i < L->d_out; i++) /* scales over 3 octaves, one tiny */
                L->scales[i] = lv_round_f16(ldexpf(1.0f + lv_rng_uniform(&rng), -(int)(i % 3)));
            L->scales[0] = 1e-4f;
            float *before = malloc(sizeof(float) * (size_t)L->d_out);
            assert_non_null(before);
            memcpy(before, L->scales, sizeof(float) * (size_t)L->d_out);
            assert_int_equal(lv_aq_layer_round_scales8(L, "test"), LV_OK);
            assert_true(lv_aq_scales8_ok(L));
            float m = 0.0f;
            for (int64_t i = 0; i < L->d_out; i++) m = before[i] > m ? before[i] : m;
            for (int64_t i = 1; i < L->d_out; i++) {
                const double e = fabs((double)L->scales[i] - before[i]) / before[i];
                worst = e > worst ? e : worst;
            }
            assert_true(L->scales[0] == lv_scale8_value(lv_round_f16(m), 255)); /* clamped */
            memcpy(before, L->scales, sizeof(float) * (size_t)L->d_out);
            assert_int_equal(lv_aq_layer_round_scales8(L, "test"), LV_OK);
            assert_memory_equal(before, L->scales, sizeof(float) * (size_t)L->d_out);
            free(before);
            weights += (double)L->d_out * L->d_in;
            rows += (double)L->d_out;
        }
    printf("  8-bit scales: worst relative change %.4f %%\n", 100.0 * worst);
    assert_true(worst <= 0.011 + 1e-3);
    q->scale_bits = 8;
    const double want = bpw16 - (8.0 * rows - 16.0 * LV_LIN_COUNT * q->cfg.n_layers) / weights;
    assert_true(fabs(lv_qmodel_bits_per_weight(q) - want) < 1e-12);
    const char *p = tpath("scales8.h5");
    assert_int_equal(io_qmodel_write(q, p), LV_OK);
    assert_int_equal(io_qmodel_read(&r, p), LV_OK);
    assert_int_equal(r->scale_bits, 8);
    for (int l = 0; l < q->cfg.n_layers; l++) assert_blocks_equal(&q->blocks[l], &r->blocks[l], q->cfg.dim);
    assert_true(lv_qmodel_bits_per_weight(r) == lv_qmodel_bits_per_weight(q));
    lv_qmodel_free(r);
    /* off the grid: refused on write, naming the linear */
    q->blocks[3].lin[LV_LIN_W2].scales[5] *= 1.003f;
    assert_int_equal(io_qmodel_write(q, tpath("scales8-bad.h5")), LV_ERR_INVALID_ARG);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, "block 3 w2"));
    /* scales <= 0 refused, naming the row, the layer unchanged */
    lv_aq_layer *L = &q->blocks[0].lin[LV_LIN_WQ];
    L->scales[7] = -0.25f;
    const float keep = L->scales[3];
    assert_int_equal(lv_aq_layer_round_scales8(L, "block 0 wq"), LV_ERR_NUMERIC);
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, "scales[7]"));
    assert_true(L->scales[3] == keep && L->scales[7] == -0.25f);
    lv_qmodel_free(q);
}

static void test_block_checkpoints(void **state)
{
    (void)state;
    lv_qmodel *q = make_qmodel(9);
    const lv_model_config *c = &q->cfg;
    const char *p = tpath("block_002.h5");
    lv_qblock b;
    int layer = -1;
    assert_int_equal(io_qblock_write(p, &q->blocks[2], 2, c, 77, 88), LV_OK);
    assert_int_equal(io_qblock_read(p, c, 77, 88, &b, &layer), LV_OK);
    assert_int_equal(layer, 2);
    assert_blocks_equal(&q->blocks[2], &b, c->dim);
    assert_true(io_qblock_checksum(&b) == io_qblock_checksum(&q->blocks[2]));
    lv_qblock_free(&b);

    /* another job / another model */
    expect_fail(io_qblock_read(p, c, 78, 88, &b, &layer), p, "another job");
    expect_fail(io_qblock_read(p, c, 77, 89, &b, &layer), p, "another model");
    lv_model_config c2 = *c;
    c2.hidden_dim = 176;
    expect_fail(io_qblock_read(p, &c2, 77, 88, &b, &layer), p, "config");

    /* corrupt data: flip bytes in the middle of the file (dataset payload) */
    const char *bad = tpath("corrupt.h5");
    copy_file(p, bad, -1);
    FILE *f = fopen(bad, "r+b");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    for (long off = size / 2; off < size / 2 + 64; off += 8) {
        fseek(f, off, SEEK_SET);
        int ch = fgetc(f);
        fseek(f, off, SEEK_SET);
        fputc(ch ^ 0x5a, f);
    }
    fclose(f);
    expect_fail(io_qblock_read(bad, c, 77, 88, &b, &layer), bad, NULL);

    /* truncated */
    const char *tr = tpath("trunc.h5");
    copy_file(p, tr, size / 3);
    expect_fail(io_qblock_read(tr, c, 77, 88, &b, &layer), tr, NULL);
    copy_file(p, tr, 0);
    expect_fail(io_qblock_read(tr, c, 77, 88, &b, &layer), tr, NULL);
    expect_fail(io_qblock_read(tpath("none.h5"), c, 77, 88, &b, &layer), "none.h5", "cannot open");

    /* a model file is not a block file, and vice versa */
    const char *mp = tpath("m.h5");
    assert_int_equal(io_qmodel_write(q, mp), LV_OK);
    expect_fail(io_qblock_read(mp, c, 77, 88, &b, &layer), mp, "expected 'llmvq-block'");
    lv_qmodel *r = NULL;
    expect_fail(io_qmodel_read(&r, p), p, "expected 'llmvq-qmodel'");

    /* unknown format version */
    hid_t h = H5Fopen(mp, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(h >= 0);
    hid_t a = H5Aopen(h, "format_version", H5P_DEFAULT);
    int64_t v = 99;
    assert_true(H5Awrite(a, H5T_NATIVE_INT64, &v) >= 0);
    H5Aclose(a);
    H5Fclose(h);
    expect_fail(io_qmodel_read(&r, mp), mp, "format_version 99");
    assert_null(r);
    lv_qmodel_free(q);
}

int main(void)
{
    snprintf(g_dir, sizeof g_dir, "/tmp/llmvq-h5.XXXXXX");
    if (!mkdtemp(g_dir)) return 1;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_model_roundtrip),
        cmocka_unit_test(test_model_extra),
        cmocka_unit_test(test_round_f16),
        cmocka_unit_test(test_scales8),
        cmocka_unit_test(test_block_checkpoints),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    return rc;
}
