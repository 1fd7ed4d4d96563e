/* pv_testlib.h: PV-tuning test fixtures shared by test_stage_pvtune.c (cmocka)
 * and test_pvtune_dist.c (under mpirun): stories260K quantized quickly with
 * stage_aqlm_run (identity Hessian, one alternation), deep copies and bitwise
 * comparison of everything PV-tuning changes. The includer defines
 * PVT_CHECK(cond) (fail the test when cond is false). Include after io.h and
 * stage.h. */
#ifndef LLMVQ_PV_TESTLIB_H
#define LLMVQ_PV_TESTLIB_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PVT_CHECK_EQ(a, b) PVT_CHECK((a) == (b))
#define PVT_CHECK_NN(p) PVT_CHECK((p) != NULL)

static inline const char *demo_path(char *buf, size_t cap, const char *file)
{
    const char *dir = getenv("LLMVQ_DEMO_DIR");
    snprintf(buf, cap, "%s/%s", dir && dir[0] ? dir : "jobs/demo", file);
    return buf;
}

/* q's linears quantized from fp with an identity Hessian; shared: one
 * codebook for all of them (stage_aqlm_run_shared). */
static inline void quantize(const lv_model *fp, lv_qmodel **out, int M, int nbits, int g, int shared)
{
    const lv_model_config *c = &fp->cfg;
    const int n = c->n_layers * LV_LIN_COUNT;
    const int64_t dmax = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    float *I = calloc((size_t)(dmax * dmax), sizeof(float));
    PVT_CHECK_NN(I);
    for (int64_t j = 0; j < dmax; j++) I[j * dmax + j] = 1.0f;
    float *Id = calloc((size_t)(c->dim * c->dim), sizeof(float));
    PVT_CHECK_NN(Id);
    for (int64_t j = 0; j < c->dim; j++) Id[j * c->dim + j] = 1.0f;
    lv_qmodel *q = NULL;
    PVT_CHECK_EQ(lv_qmodel_init(&q, fp, M, nbits, g), LV_OK);
    stage_aqlm_config acfg = {.n_codebooks = M, .nbits = nbits, .group_size = g, .beam_size = 2,
                              .max_iters = 1, .adam_steps = 20, .kmeans_iters = 4};
    const float *W[64], *H[64];
    int64_t d_out[64], d_in[64];
    lv_aq_layer lin[64];
    PVT_CHECK(n <= 64);
    memset(lin, 0, sizeof lin);
    for (int l = 0; l < c->n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const int i = l * LV_LIN_COUNT + k;
            lv_lin_shape(c, (lv_lin)k, &d_out[i], &d_in[i]);
            W[i] = lv_layer_weight(&fp->layers[l], (lv_lin)k);
            H[i] = d_in[i] == c->dim ? Id : I;
            if (!shared) {
                acfg.seed = (uint64_t)i;
                PVT_CHECK_EQ(stage_aqlm_run(W[i], H[i], d_out[i], d_in[i], &acfg, &lin[i], NULL),
                                 LV_OK);
            }
        }
    if (shared)
        PVT_CHECK_EQ(stage_aqlm_run_shared(n, W, H, d_out, d_in, &acfg, lin, NULL), LV_OK);
    for (int i = 0; i < n; i++) {
        lv_aq_layer *dst = &q->blocks[i / LV_LIN_COUNT].lin[i % LV_LIN_COUNT];
        lv_aq_layer_free(dst);
        *dst = lin[i];
    }
    q->shared_codebooks = shared;
    free(I);
    free(Id);
    *out = q;
}

/* A deep copy of q (codes, codebooks, scales, norms). */
static inline lv_qmodel *qcopy(const lv_model *fp, const lv_qmodel *q)
{
    const lv_aq_layer *L0 = &q->blocks[0].lin[0];
    lv_qmodel *d = NULL;
    PVT_CHECK_EQ(lv_qmodel_init(&d, fp, L0->M, L0->nbits, L0->g), LV_OK);
    const int dim = q->cfg.dim;
    for (int l = 0; l < q->cfg.n_layers; l++) {
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *s = &q->blocks[l].lin[k];
            lv_aq_layer *t = &d->blocks[l].lin[k];
            memcpy(t->codes, s->codes, sizeof(uint16_t) * (size_t)(s->d_out * s->n_groups * s->M));
            memcpy(t->codebooks, s->codebooks,
                   sizeof(float) * (size_t)(s->M * ((int64_t)1 << s->nbits) * s->g));
            memcpy(t->scales, s->scales, sizeof(float) * (size_t)s->d_out);
        }
        memcpy(d->blocks[l].attn_norm, q->blocks[l].attn_norm, sizeof(float) * (size_t)dim);
        memcpy(d->blocks[l].ffn_norm, q->blocks[l].ffn_norm, sizeof(float) * (size_t)dim);
    }
    memcpy(d->final_norm, q->final_norm, sizeof(float) * (size_t)dim);
    d->shared_codebooks = q->shared_codebooks;
    return d;
}

/* 1 when a and b hold the same bits in everything PV-tuning may change. */
static inline int qsame(const lv_qmodel *a, const lv_qmodel *b)
{
    const size_t dim = (size_t)a->cfg.dim;
    if (memcmp(a->final_norm, b->final_norm, sizeof(float) * dim)) return 0;
    for (int l = 0; l < a->cfg.n_layers; l++) {
        if (memcmp(a->blocks[l].attn_norm, b->blocks[l].attn_norm, sizeof(float) * dim) ||
            memcmp(a->blocks[l].ffn_norm, b->blocks[l].ffn_norm, sizeof(float) * dim))
            return 0;
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *s = &a->blocks[l].lin[k], *t = &b->blocks[l].lin[k];
            if (memcmp(t->codes, s->codes, sizeof(uint16_t) * (size_t)(s->d_out * s->n_groups * s->M)) ||
                memcmp(t->codebooks, s->codebooks,
                       sizeof(float) * (size_t)(s->M * ((int64_t)1 << s->nbits) * s->g)) ||
                memcmp(t->scales, s->scales, sizeof(float) * (size_t)s->d_out))
                return 0;
        }
    }
    return 1;
}

/* Every codebook copy of a shared model equals its slot owner's (block 0 wq
 * for LV_SHARE_MODEL, block 0's linear of the same type for LV_SHARE_TYPE). */
static inline int shared_identical(const lv_qmodel *q)
{
    const lv_aq_layer *L0 = &q->blocks[0].lin[0];
    const size_t nb = sizeof(float) * (size_t)(L0->M * ((int64_t)1 << L0->nbits) * L0->g);
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            if (memcmp(q->blocks[l].lin[k].codebooks,
                       q->blocks[0].lin[lv_share_slot(q->shared_codebooks, k)].codebooks, nb))
                return 0;
    return 1;
}

/* A type-shared model (LV_SHARE_TYPE) from a model-shared one: linear k's
 * codebook, in every block, is the shared one times (1 + 0.03 k), so the 7
 * tensors differ while the codes stay valid. */
static inline lv_qmodel *type_shared_copy(const lv_model *fp, const lv_qmodel *q)
{
    lv_qmodel *d = qcopy(fp, q);
    const lv_aq_layer *L0 = &d->blocks[0].lin[0];
    const int64_t n = L0->M * ((int64_t)1 << L0->nbits) * L0->g;
    for (int l = 0; l < d->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++)
            for (int64_t i = 0; i < n; i++) d->blocks[l].lin[k].codebooks[i] *= 1.0f + 0.03f * k;
    d->shared_codebooks = LV_SHARE_TYPE;
    return d;
}

#endif
