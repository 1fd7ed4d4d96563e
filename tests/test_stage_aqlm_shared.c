/* test_stage_aqlm_shared.c: AQLM with codebooks shared by a set of layers
 * (stages/aqlm_shared.c): the set of one is stage_aqlm_run, the joint objective
 * never increases, every layer improves on the pooled VQ init, the codebook
 * copies are identical, padding, storage cost, determinism, bad arguments. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>
#include <omp.h>

#include "quant_testlib.h"
#include "stage.h"

#define NL 4

/* Four layers of different shapes (d_in 172 with g 4 or 8 exercises padding)
 * and Hessians of different scale and spectrum. */
typedef struct {
    float *W[NL], *H[NL];
    int64_t d_out[NL], d_in[NL];
} layer_set;

static void set_make(layer_set *s, uint64_t seed)
{
    static const int64_t shapes[NL][2] = {{32, 64}, {24, 172}, {40, 64}, {16, 48}};
    static const float hscale[NL] = {1.0f, 0.01f, 50.0f, 3.0f};
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    for (int i = 0; i < NL; i++) {
        s->d_out[i] = shapes[i][0];
        s->d_in[i] = shapes[i][1];
        s->W[i] = qt_make_w(&rng, s->d_out[i], s->d_in[i]);
        s->H[i] = qt_make_h(&rng, 4 * s->d_in[i] + 64 * i, (int)s->d_in[i]);
        assert_true(s->W[i] && s->H[i]);
        for (int64_t t = 0; t < s->d_in[i] * s->d_in[i]; t++) s->H[i][t] *= hscale[i];
        for (int64_t t = 0; t < s->d_out[i] * s->d_in[i]; t++) s->W[i][t] *= 0.1f * (float)(i + 1);
    }
}

static void set_free(layer_set *s)
{
    for (int i = 0; i < NL; i++) {
        free(s->W[i]);
        free(s->H[i]);
    }
}

static void layers_free(lv_aq_layer *L, int n)
{
    for (int i = 0; i < n; i++) lv_aq_layer_free(&L[i]);
}

static double layer_rel(const float *W, const float *H, const lv_aq_layer *L)
{
    float *What = malloc((size_t)(L->d_out * L->d_in) * sizeof(float));
    double rel = -1.0;
    assert_non_null(What);
    assert_int_equal(stage_aqlm_dequant(L, What), LV_OK);
    assert_int_equal(stage_aqlm_layer_error(W, What, H, L->d_out, L->d_in, &rel), LV_OK);
    free(What);
    return rel;
}

static void assert_same_layer(const lv_aq_layer *a, const lv_aq_layer *b)
{
    assert_true(a->d_out == b->d_out && a->d_in == b->d_in && a->M == b->M &&
                a->nbits == b->nbits && a->g == b->g);
    assert_memory_equal(a->codes, b->codes,
                        (size_t)(a->d_out * a->n_groups * a->M) * sizeof(uint16_t));
    assert_memory_equal(a->codebooks, b->codebooks,
                        (size_t)a->M * ((size_t)1 << a->nbits) * (size_t)a->g * sizeof(float));
    assert_memory_equal(a->scales, b->scales, (size_t)a->d_out * sizeof(float));
}

/* n_layers = 1 is stage_aqlm_run, bit for bit (Adam and LSTSQ, with padding). */
static void test_single_is_run(void **state)
{
    (void)state;
    layer_set s;
    set_make(&s, 41);
    const stage_aqlm_config cfgs[2] = {
        {.n_codebooks = 2, .nbits = 5, .group_size = 8, .beam_size = 4, .max_iters = 3,
         .adam_steps = 20, .seed = 5},
        {.n_codebooks = 1, .nbits = 6, .group_size = 4, .beam_size = 4, .max_iters = 3,
         .codebook_update = STAGE_AQLM_LSTSQ, .seed = 6},
    };
    for (int c = 0; c < 2; c++) {
        const int i = 1; /* 24 x 172: padded for both g */
        lv_aq_layer a = {0}, b = {0};
        stage_aqlm_stats sa, sb;
        const float *W = s.W[i], *H = s.H[i];
        assert_int_equal(stage_aqlm_run(W, H, s.d_out[i], s.d_in[i], &cfgs[c], &a, &sa), LV_OK);
        assert_int_equal(
            stage_aqlm_run_shared(1, &W, &H, &s.d_out[i], &s.d_in[i], &cfgs[c], &b, &sb), LV_OK);
        assert_same_layer(&a, &b);
        assert_true(sa.iters == sb.iters && sa.rel_err_init == sb.rel_err_init);
        assert_true(sa.rel_err[sa.iters - 1] == sb.rel_err[sb.iters - 1]);
        lv_aq_layer_free(&a);
        lv_aq_layer_free(&b);
    }
    set_free(&s);
}

/* Four layers, one codebook set: the joint objective never increases, the
 * reported error is the mean relative error, every layer ends finite and below
 * its pooled-VQ-init error, and all codebook copies are identical. */
static void shared_case(const stage_aqlm_config *cfg, uint64_t seed)
{
    layer_set s;
    set_make(&s, seed);
    lv_aq_layer L[NL] = {{0}}, V[NL] = {{0}};
    stage_aqlm_stats sx;
    const float *const *W = (const float *const *)s.W, *const *H = (const float *const *)s.H;
    assert_int_equal(stage_vq_run_shared(NL, W, H, s.d_out, s.d_in, NULL, cfg, V), LV_OK);
    assert_int_equal(stage_aqlm_run_shared(NL, W, H, s.d_out, s.d_in, cfg, L, &sx), LV_OK);
    printf("shared %dx%dg%d %s: mean rel err init %.5f ->", cfg->n_codebooks, cfg->nbits,
           cfg->group_size, cfg->codebook_update == STAGE_AQLM_LSTSQ ? "lstsq" : "adam",
           sx.rel_err_init);
    for (int it = 0; it < sx.iters; it++) printf(" %.5f", sx.rel_err[it]);
    printf(" (%.2f s)\n", sx.wall_s);
    assert_true(sx.iters >= 1);
    assert_true(sx.rel_err[0] <= sx.rel_err_init);
    for (int it = 1; it < sx.iters; it++) assert_true(sx.rel_err[it] <= sx.rel_err[it - 1]);
    assert_true(sx.rel_err[sx.iters - 1] < 0.9 * sx.rel_err_init);
    double mean_vq = 0.0, mean = 0.0;
    const size_t nb = (size_t)cfg->n_codebooks * ((size_t)1 << cfg->nbits) *
                      (size_t)cfg->group_size * sizeof(float);
    for (int i = 0; i < NL; i++) {
        double rv = layer_rel(s.W[i], s.H[i], &V[i]), r = layer_rel(s.W[i], s.H[i], &L[i]);
        printf("  layer %d (%lldx%lld): vq %.5f aqlm %.5f\n", i, (long long)s.d_out[i],
               (long long)s.d_in[i], rv, r);
        assert_true(isfinite(r) && r > 0.0 && r < rv);
        mean_vq += rv / NL;
        mean += r / NL;
        assert_memory_equal(L[i].codebooks, L[0].codebooks, nb);
        assert_memory_equal(V[i].codebooks, V[0].codebooks, nb);
    }
    /* default weights: J / sum alpha_i r_i is the mean relative error */
    assert_true(fabs(mean_vq - sx.rel_err_init) <= 1e-4 * mean_vq);
    assert_true(fabs(mean - sx.rel_err[sx.iters - 1]) <= 1e-4 * mean);
    layers_free(L, NL);
    layers_free(V, NL);
    set_free(&s);
}

static void test_shared_adam(void **state)
{
    (void)state;
    const stage_aqlm_config cfg = {.n_codebooks = 2, .nbits = 6, .group_size = 4,
                                   .beam_size = 4, .max_iters = 4, .adam_steps = 30,
                                   .adam_lr = 1e-3f, .seed = 7};
    shared_case(&cfg, 42);
}

static void test_shared_lstsq(void **state)
{
    (void)state;
    const stage_aqlm_config cfg = {.n_codebooks = 1, .nbits = 7, .group_size = 8,
                                   .beam_size = 4, .max_iters = 4,
                                   .codebook_update = STAGE_AQLM_LSTSQ, .seed = 8};
    shared_case(&cfg, 43);
}

/* Explicit weights change the objective's balance: a layer weighted 100x more
 * ends with a lower error than under the default weights. */
static void test_weights(void **state)
{
    (void)state;
    layer_set s;
    set_make(&s, 44);
    const float *const *W = (const float *const *)s.W, *const *H = (const float *const *)s.H;
    const stage_aqlm_config cfg = {.n_codebooks = 1, .nbits = 6, .group_size = 4,
                                   .beam_size = 4, .max_iters = 3,
                                   .codebook_update = STAGE_AQLM_LSTSQ, .seed = 9};
    lv_aq_layer A[NL] = {{0}}, B[NL] = {{0}};
    double ref[NL], wt[NL];
    for (int i = 0; i < NL; i++) {
        lv_aq_layer Z = {0};
        /* zero codebooks: What = 0 and the objective is tr(W H W^T) */
        assert_int_equal(lv_aq_layer_init(&Z, s.d_out[i], s.d_in[i], 1, 1, 4), LV_OK);
        memset(Z.codebooks, 0, 2 * 4 * sizeof(float));
        assert_int_equal(stage_aqlm_objective(s.W[i], s.H[i], &Z, &ref[i]), LV_OK);
        lv_aq_layer_free(&Z);
        wt[i] = (i == 3 ? 100.0 : 1.0) / ref[i];
    }
    assert_int_equal(stage_aqlm_run_shared(NL, W, H, s.d_out, s.d_in, &cfg, A, NULL), LV_OK);
    assert_int_equal(stage_aqlm_run_shared_weighted(NL, W, H, s.d_out, s.d_in, wt, &cfg, B, NULL),
                     LV_OK);
    double ra = layer_rel(s.W[3], s.H[3], &A[3]), rb = layer_rel(s.W[3], s.H[3], &B[3]);
    printf("layer 3 rel err: default weights %.5f, weight x100 %.5f\n", ra, rb);
    assert_true(rb < ra);
    layers_free(A, NL);
    layers_free(B, NL);
    /* bad weights are refused */
    wt[2] = -1.0;
    assert_int_equal(stage_aqlm_run_shared_weighted(NL, W, H, s.d_out, s.d_in, wt, &cfg, B, NULL),
                     LV_ERR_INVALID_ARG);
    layers_free(B, NL);
    set_free(&s);
}

static void run_set(const layer_set *s, const stage_aqlm_config *cfg, lv_aq_layer *L)
{
    assert_int_equal(stage_aqlm_run_shared(NL, (const float *const *)s->W,
                                           (const float *const *)s->H, s->d_out, s->d_in, cfg,
                                           L, NULL),
                     LV_OK);
}

static void test_determinism(void **state)
{
    (void)state;
    layer_set s;
    set_make(&s, 45);
    const stage_aqlm_config cfg = {.n_codebooks = 2, .nbits = 5, .group_size = 8,
                                   .beam_size = 4, .max_iters = 2, .adam_steps = 20,
                                   .seed = 77};
    lv_aq_layer a[NL] = {{0}}, b[NL] = {{0}}, c[NL] = {{0}};
    int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    run_set(&s, &cfg, a);
    run_set(&s, &cfg, b);
    omp_set_num_threads(2);
    run_set(&s, &cfg, c);
    omp_set_num_threads(saved);
    for (int i = 0; i < NL; i++) {
        assert_same_layer(&a[i], &b[i]);
        assert_same_layer(&a[i], &c[i]);
    }
    layers_free(a, NL);
    layers_free(b, NL);
    layers_free(c, NL);
    set_free(&s);
}

static void test_bits_and_args(void **state)
{
    (void)state;
    lv_aq_layer L[2] = {{0}};
    assert_int_equal(lv_aq_layer_init(&L[0], 64, 64, 2, 8, 8), LV_OK);
    assert_int_equal(lv_aq_layer_init(&L[1], 64, 172, 2, 8, 8), LV_OK);
    /* codes 64*8*16 + 64*22*16, one codebook copy 2*256*8*16, scales 2*64*16 */
    double want = (64.0 * 8 * 16 + 64.0 * 22 * 16 + 2 * 256 * 8 * 16.0 + 128 * 16.0) /
                  (64.0 * 64 + 64.0 * 172);
    assert_true(fabs(stage_aqlm_bits_per_weight_shared(2, L) - want) < 1e-12);
    assert_true(stage_aqlm_bits_per_weight_shared(1, L) == stage_aqlm_bits_per_weight(&L[0]));
    L[1].nbits = 7;
    assert_true(stage_aqlm_bits_per_weight_shared(2, L) == 0.0);
    L[1].nbits = 8;
    layers_free(L, 2);
    assert_true(stage_aqlm_bits_per_weight_shared(0, L) == 0.0);

    layer_set s;
    set_make(&s, 46);
    const float *const *W = (const float *const *)s.W, *const *H = (const float *const *)s.H;
    stage_aqlm_config cfg = {.n_codebooks = 1, .nbits = 4, .group_size = 4, .max_iters = 1,
                             .adam_steps = 1};
    lv_aq_layer out[NL] = {{0}};
    assert_int_equal(stage_aqlm_run_shared(0, W, H, s.d_out, s.d_in, &cfg, out, NULL),
                     LV_ERR_INVALID_ARG);
    assert_int_equal(stage_aqlm_run_shared(NL, W, NULL, s.d_out, s.d_in, &cfg, out, NULL),
                     LV_ERR_INVALID_ARG);
    cfg.nbits = 17;
    assert_int_equal(stage_aqlm_run_shared(NL, W, H, s.d_out, s.d_in, &cfg, out, NULL),
                     LV_ERR_INVALID_ARG);
    cfg.nbits = 4;
    int64_t bad[NL] = {32, 0, 40, 16};
    assert_int_equal(stage_aqlm_run_shared(NL, W, H, bad, s.d_in, &cfg, out, NULL),
                     LV_ERR_INVALID_ARG);
    layers_free(out, NL);
    set_free(&s);
}

int main(void)
{
    lv_log_set_quiet(1);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_is_run), cmocka_unit_test(test_shared_adam),
        cmocka_unit_test(test_shared_lstsq),  cmocka_unit_test(test_weights),
        cmocka_unit_test(test_determinism),   cmocka_unit_test(test_bits_and_args),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
