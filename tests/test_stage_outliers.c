/* test_stage_outliers.c: outlier columns (stages/outliers.c, quant.outlier_cols):
 * one column is the exhaustive best single column and lowers the objective by
 * exactly its predicted gain; the corrections of several columns are the
 * exact minimiser (no perturbation lowers the objective, the closed form in
 * double agrees); dead inputs are never chosen; results are bit-identical on
 * reruns; the quantized kernels, the dequantized view, bits per weight and
 * the model file all carry them, and a corrupt index is refused naming the
 * linear. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <cmocka.h>
#include <hdf5.h>
#include <math.h>

#include "io.h"
#include "kern.h"
#include "kern_qmm.h"
#include "quant_testlib.h"
#include "stage.h"

/* W (d_out, d_in), H (d_in, d_in) and a 1x4g2 AQLM layer of them. */
typedef struct {
    int64_t d_out, d_in;
    float *W, *H;
    lv_aq_layer L;
} problem;

static void make_problem(problem *p, int64_t d_out, int64_t d_in, uint64_t seed)
{
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    p->d_out = d_out, p->d_in = d_in;
    p->W = qt_make_w(&rng, d_out, d_in);
    p->H = qt_make_h(&rng, 4 * d_in, (int)d_in);
    assert_true(p->W && p->H);
    memset(&p->L, 0, sizeof p->L);
    const stage_aqlm_config cfg = {.n_codebooks = 1, .nbits = 4, .group_size = 2,
                                   .beam_size = 4, .max_iters = 3, .seed = seed};
    assert_int_equal(stage_aqlm_run(p->W, p->H, d_out, d_in, &cfg, &p->L, NULL), LV_OK);
}

static void free_problem(problem *p)
{
    free(p->W);
    free(p->H);
    lv_aq_layer_free(&p->L);
}

/* tr((W - W') H (W - W')^T) in double, W' = What with outliers. */
static double objective(const problem *p)
{
    const int64_t no = p->d_out * p->d_in;
    float *Wq = malloc(sizeof(float) * (size_t)no);
    assert_non_null(Wq);
    assert_int_equal(stage_aqlm_dequant(&p->L, Wq), LV_OK);
    double f = 0.0;
    for (int64_t r = 0; r < p->d_out; r++)
        for (int64_t a = 0; a < p->d_in; a++) {
            const double ea = (double)p->W[r * p->d_in + a] - Wq[r * p->d_in + a];
            for (int64_t b = 0; b < p->d_in; b++)
                f += ea * p->H[a * p->d_in + b] * ((double)p->W[r * p->d_in + b] - Wq[r * p->d_in + b]);
        }
    free(Wq);
    return f;
}

static void test_single_column_is_best(void **state)
{
    (void)state;
    problem p;
    make_problem(&p, 12, 10, 3);
    const double f0 = objective(&p);
    /* exhaustive: the gain of column j alone is |E H[:, j]|^2 / H[j, j] */
    float *Wq = malloc(sizeof(float) * 120);
    assert_int_equal(stage_aqlm_dequant(&p.L, Wq), LV_OK);
    int best = -1;
    double best_gain = -1.0;
    for (int j = 0; j < 10; j++) {
        double g2 = 0.0;
        for (int r = 0; r < 12; r++) {
            double c = 0.0;
            for (int a = 0; a < 10; a++) c += ((double)p.W[r * 10 + a] - Wq[r * 10 + a]) * p.H[a * 10 + j];
            g2 += c * c;
        }
        if (g2 / p.H[j * 10 + j] > best_gain) best_gain = g2 / p.H[j * 10 + j], best = j;
    }
    free(Wq);
    int got = -1;
    assert_int_equal(stage_outliers_fit(p.W, p.H, 12, 10, &p.L, 1, &got), LV_OK);
    const double f1 = objective(&p);
    printf("  objective %.6g -> %.6g with column %d (exhaustive best %d, predicted %.6g)\n", f0,
           f1, p.L.outl_idx[0], best, f0 - best_gain);
    assert_int_equal(got, 1);
    assert_int_equal(p.L.n_outl, 1);
    assert_int_equal(p.L.outl_idx[0], best);
    assert_true(fabs(f1 - (f0 - best_gain)) <= 1e-5 * f0);
    assert_true(f1 < f0);
    free_problem(&p);
}

static void test_several_columns_exact_minimiser(void **state)
{
    (void)state;
    problem p;
    make_problem(&p, 16, 12, 5);
    const double f0 = objective(&p);
    int got = 0;
    assert_int_equal(stage_outliers_fit(p.W, p.H, 16, 12, &p.L, 1, &got), LV_OK);
    const double f1 = objective(&p);
    assert_int_equal(stage_outliers_fit(p.W, p.H, 16, 12, &p.L, 4, &got), LV_OK);
    assert_int_equal(got, 4);
    const double f4 = objective(&p);
    printf("  objective %.6g, 1 column %.6g, 4 columns %.6g (columns %d %d %d %d)\n", f0, f1, f4,
           p.L.outl_idx[0], p.L.outl_idx[1], p.L.outl_idx[2], p.L.outl_idx[3]);
    assert_true(f4 < f1 && f1 < f0);
    for (int j = 1; j < 4; j++) assert_true(p.L.outl_idx[j] > p.L.outl_idx[j - 1]);
    /* a stationary point of a convex quadratic: every nudge of a correction raises f */
    lv_rng rng;
    lv_rng_seed(&rng, 9);
    for (int t = 0; t < 20; t++) {
        const int64_t i = (int64_t)(lv_rng_u64(&rng) % (uint64_t)(16 * 4));
        const float v = p.L.outl_w[i], h = 1e-2f * (fabsf(v) + 1e-2f);
        p.L.outl_w[i] = v + h;
        const double fp = objective(&p);
        p.L.outl_w[i] = v - h;
        const double fm = objective(&p);
        p.L.outl_w[i] = v;
        assert_true(fp > f4 * (1 - 1e-9) && fm > f4 * (1 - 1e-9));
    }
    /* bit-identical rerun; n = 0 removes them */
    float w0[64];
    memcpy(w0, p.L.outl_w, sizeof w0);
    assert_int_equal(stage_outliers_fit(p.W, p.H, 16, 12, &p.L, 4, NULL), LV_OK);
    assert_memory_equal(w0, p.L.outl_w, sizeof w0);
    assert_int_equal(stage_outliers_fit(p.W, p.H, 16, 12, &p.L, 0, &got), LV_OK);
    assert_int_equal(p.L.n_outl, 0);
    assert_null(p.L.outl_idx);
    assert_true(fabs(objective(&p) - f0) <= 1e-9 * f0);
    assert_int_equal(stage_outliers_fit(p.W, p.H, 16, 12, &p.L, 13, NULL), LV_ERR_INVALID_ARG);
    free_problem(&p);
}

/* An input that never fires (zero row and column of H) carries no error
 * signal: it is never chosen, even when all columns are asked for. */
static void test_dead_input_never_chosen(void **state)
{
    (void)state;
    problem p;
    make_problem(&p, 8, 8, 7);
    for (int a = 0; a < 8; a++) p.H[3 * 8 + a] = p.H[a * 8 + 3] = 0.0f;
    int got = 0;
    assert_int_equal(stage_outliers_fit(p.W, p.H, 8, 8, &p.L, 8, &got), LV_OK);
    printf("  asked for 8 columns, got %d\n", got);
    assert_true(got <= 7);
    for (int j = 0; j < got; j++) assert_int_not_equal(p.L.outl_idx[j], 3);
    free_problem(&p);
}

/* kern_aq_gemm (every algorithm) and the reference multiply include them. */
static void test_kernels_apply_them(void **state)
{
    (void)state;
    problem p;
    make_problem(&p, 24, 16, 11);
    assert_int_equal(stage_outliers_fit(p.W, p.H, 24, 16, &p.L, 3, NULL), LV_OK);
    float Wq[24 * 16], x[5 * 16], y[5 * 24], yr[5 * 24];
    lv_rng rng;
    lv_rng_seed(&rng, 2);
    for (int i = 0; i < 5 * 16; i++) x[i] = lv_rng_normal(&rng);
    assert_int_equal(stage_aqlm_dequant(&p.L, Wq), LV_OK);
    double maxref = 0.0;
    for (int t = 0; t < 5; t++)
        for (int r = 0; r < 24; r++) {
            double acc = 0.0;
            for (int a = 0; a < 16; a++) acc += (double)x[t * 16 + a] * Wq[r * 16 + a];
            yr[t * 24 + r] = (float)acc;
            maxref = fabs(acc) > maxref ? fabs(acc) : maxref;
        }
    const kern_aq_algo algos[] = {KERN_AQ_LUT, KERN_AQ_GATHER, KERN_AQ_TILE};
    for (int a = 0; a < 3; a++) {
        assert_int_equal(kern_aq_gemm_algo(y, x, &p.L, 5, algos[a], NULL), LV_OK);
        for (int i = 0; i < 5 * 24; i++) assert_true(fabs(y[i] - yr[i]) <= 1e-5 * maxref);
    }
    assert_int_equal(kern_aq_gemm_ref(y, x, &p.L, 5), LV_OK);
    for (int i = 0; i < 5 * 24; i++) assert_true(fabs(y[i] - yr[i]) <= 1e-5 * maxref);
    free_problem(&p);
}

/* The model file: round trip, bits per weight, a corrupt index refused. */
static void test_model_file(void **state)
{
    (void)state;
    const lv_model_config c = {.dim = 16, .hidden_dim = 24, .n_layers = 2, .n_heads = 2,
                               .n_kv_heads = 2, .vocab_size = 32, .seq_len = 16,
                               .norm_eps = 1e-5f, .rope_theta = 10000.0f,
                               .rope = LV_ROPE_INTERLEAVED, .tied_cls = 1};
    lv_model *fp = NULL;
    lv_qmodel *q = NULL, *back = NULL;
    assert_int_equal(io_model_synth(&fp, &c, 3), LV_OK);
    assert_int_equal(lv_qmodel_init(&q, fp, 1, 4, 4), LV_OK);
    const double bpw0 = lv_qmodel_bits_per_weight(q);
    lv_aq_layer *L = &q->blocks[1].lin[LV_LIN_W2]; /* 16 x 24 */
    assert_int_equal(lv_aq_outliers_alloc(L, 2), LV_OK);
    L->outl_idx[0] = 5, L->outl_idx[1] = 17;
    for (int i = 0; i < 32; i++) L->outl_w[i] = 0.01f * (float)(i - 7);
    const double weights = 2.0 * (4 * 16 * 16 + 2 * 24 * 16 + 16 * 24);
    const double bpw1 = lv_qmodel_bits_per_weight(q);
    printf("  bits per weight %.5f -> %.5f with 2 outlier columns of one 16 x 24 linear\n", bpw0,
           bpw1);
    assert_true(fabs(bpw1 - bpw0 - 2 * (16 * 16.0 + 32.0) / weights) < 1e-12);
    char path[] = "/tmp/llmvq-outl-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(io_qmodel_write(q, path), LV_OK);
    assert_int_equal(io_qmodel_read(&back, path), LV_OK);
    const lv_aq_layer *B = &back->blocks[1].lin[LV_LIN_W2];
    assert_int_equal(B->n_outl, 2);
    assert_memory_equal(B->outl_idx, L->outl_idx, 2 * sizeof(int32_t));
    assert_memory_equal(B->outl_w, L->outl_w, 32 * sizeof(float));
    assert_int_equal(back->blocks[0].lin[LV_LIN_W2].n_outl, 0);
    assert_true(fabs(lv_qmodel_bits_per_weight(back) - bpw1) < 1e-12);
    /* the dequantized view adds them */
    lv_model *dq = NULL;
    assert_int_equal(io_qmodel_to_fp(back, &dq), LV_OK);
    const float *w2 = dq->layers[1].w2;
    float What[16 * 24];
    L->n_outl = 0; /* codes only */
    assert_int_equal(stage_aqlm_dequant(L, What), LV_OK);
    L->n_outl = 2;
    assert_true(fabsf(w2[3 * 24 + 17] - (What[3 * 24 + 17] + L->outl_w[3 * 2 + 1])) < 1e-7f);
    assert_true(fabsf(w2[3 * 24 + 16] - What[3 * 24 + 16]) < 1e-7f);
    io_model_free(dq);
    lv_qmodel_free(back);
    back = NULL;
    /* a corrupt index in the file */
    hid_t f = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    assert_true(f >= 0);
    hid_t d = H5Dopen2(f, "blocks/001/w2/outlier_idx", H5P_DEFAULT);
    assert_true(d >= 0);
    const int32_t bad[2] = {17, 5};
    assert_true(H5Dwrite(d, H5T_NATIVE_INT32, H5S_ALL, H5S_ALL, H5P_DEFAULT, bad) >= 0);
    H5Dclose(d);
    H5Fclose(f);
    assert_int_equal(io_qmodel_read(&back, path), LV_ERR_FORMAT);
    char line[512];
    lv_last_error_line(line, sizeof line);
    printf("  %s\n", line);
    assert_non_null(strstr(line, "w2"));
    assert_non_null(strstr(line, "outlier column"));
    unlink(path);
    lv_qmodel_free(q);
    io_model_free(fp);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_column_is_best),
        cmocka_unit_test(test_several_columns_exact_minimiser),
        cmocka_unit_test(test_dead_input_never_chosen),
        cmocka_unit_test(test_kernels_apply_them),
        cmocka_unit_test(test_model_file),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
