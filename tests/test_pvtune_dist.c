/* test_pvtune_dist.c: data-parallel PV-tuning (stage_pv_config.dist) under
 * mpirun with 2 and 3 ranks against the same tuning on one rank.
 *
 * Every rank builds the same quantized stories260K (pv_testlib.h), tunes one
 * copy alone (dist NULL) and one copy data-parallel over all ranks (each
 * micro-batch computed by its owner, items shared by MPI broadcast), and
 * checks that both are bit-identical in every parameter and code, with equal
 * statistics, and that all ranks hold the same model. Cases: per-linear 2x4g4
 * with P steps (the beam searches split by linear), 3 micro-batches per global
 * batch (not a multiple of the ranks), KL; shared 1x6g4 with V steps only, CE.
 * The wall times of one V step alone and over the ranks are printed (the
 * ranks share 2 cores in CI: the scaling figure is for reading, not asserted). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "io.h"
#include "kern.h"
#include "stage.h"

static int g_fail = 0;
static int g_rank = 0;
#define PVT_CHECK(cond)                                                                      \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            fprintf(stderr, "rank %d: CHECK failed at %s:%d: %s\n%s\n", g_rank, __FILE__,   \
                    __LINE__, #cond, lv_last_error());                                       \
            g_fail++;                                                                        \
        }                                                                                    \
    } while (0)
#include "pv_testlib.h"

typedef struct {
    comm_ctx *comm;
    int rank, size;
} dist_ctx;

static int d_owns(void *user, int item)
{
    const dist_ctx *d = user;
    return item % d->size == d->rank;
}

static lv_status d_share(void *user, int item, void *buf, size_t bytes)
{
    dist_ctx *d = user;
    return comm_bcast(d->comm, buf, bytes, item % d->size);
}

/* 1 when every rank's q holds the same bits as rank 0's (codes and params). */
static int same_on_all_ranks(comm_ctx *c, const lv_qmodel *q)
{
    /* checksum of everything: each rank computes it, rank 0's is broadcast */
    uint64_t h = 1469598103934665603ULL;
#define MIX(p, n)                                                              \
    do {                                                                       \
        const unsigned char *b_ = (const unsigned char *)(p);                  \
        for (size_t i_ = 0; i_ < (size_t)(n); i_++) h = (h ^ b_[i_]) * 1099511628211ULL; \
    } while (0)
    const size_t dim = (size_t)q->cfg.dim;
    MIX(q->final_norm, sizeof(float) * dim);
    for (int l = 0; l < q->cfg.n_layers; l++) {
        MIX(q->blocks[l].attn_norm, sizeof(float) * dim);
        MIX(q->blocks[l].ffn_norm, sizeof(float) * dim);
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *s = &q->blocks[l].lin[k];
            MIX(s->codes, sizeof(uint16_t) * (size_t)(s->d_out * s->n_groups * s->M));
            MIX(s->codebooks, sizeof(float) * (size_t)(s->M * ((int64_t)1 << s->nbits) * s->g));
            MIX(s->scales, sizeof(float) * (size_t)s->d_out);
        }
    }
#undef MIX
    uint64_t h0 = h;
    PVT_CHECK(comm_bcast(c, &h0, sizeof h0, 0) == LV_OK);
    int diff = h0 != h, any = 0;
    PVT_CHECK(comm_agree_flag(c, diff, &any) == LV_OK);
    return !any;
}

static void run_case(comm_ctx *c, const lv_model *fp, const lv_qmodel *q0, const int32_t *tok,
                     int n_seq, int T, const stage_pv_config *base, const char *name)
{
    dist_ctx dc = {.comm = c, .rank = comm_rank(c), .size = comm_size(c)};
    const stage_dist dist = {.user = &dc, .owns = d_owns, .share = d_share};
    stage_pv_config cfg = *base;
    lv_qmodel *a = qcopy(fp, q0), *b = qcopy(fp, q0);
    stage_pv_stats sa, sb;
    PVT_CHECK(stage_pv_tune(fp, a, tok, n_seq, T, &cfg, &sa) == LV_OK);
    cfg.dist = &dist;
    PVT_CHECK(stage_pv_tune(fp, b, tok, n_seq, T, &cfg, &sb) == LV_OK);
    PVT_CHECK(qsame(a, b));
    PVT_CHECK(!memcmp(&sa.loss_before, &sb.loss_before, sizeof(double)));
    PVT_CHECK(!memcmp(&sa.loss_after, &sb.loss_after, sizeof(double)));
    PVT_CHECK(!memcmp(&sa.train_loss, &sb.train_loss, sizeof(double)));
    PVT_CHECK(sa.v_steps == sb.v_steps && sa.p_steps == sb.p_steps &&
              sa.codes_changed == sb.codes_changed && sa.best_step == sb.best_step);
    PVT_CHECK(sa.loss_after < sa.loss_before);
    if (cfg.p_every > 0) PVT_CHECK(sa.codes_changed > 0);
    if (q0->shared_codebooks) PVT_CHECK(shared_identical(b));
    PVT_CHECK(same_on_all_ranks(c, b));
    if (g_rank == 0)
        printf("%s, %d ranks: held-out loss %.6f -> %.6f, %lld V / %lld P steps (%lld groups "
               "changed); V steps %.3f s alone, %.3f s over %d ranks; P steps %.3f s / %.3f s; "
               "bit-identical\n",
               name, dc.size, sa.loss_before, sa.loss_after, (long long)sa.v_steps,
               (long long)sa.p_steps, (long long)sa.codes_changed, sa.v_s, sb.v_s, dc.size,
               sa.p_s, sb.p_s);
    lv_qmodel_free(a);
    lv_qmodel_free(b);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    comm_ctx *c = NULL;
    comm_config ccfg = {.allow_nccl = 0, .timeout_s = 120};
    if (comm_ctx_init(&c, MPI_COMM_WORLD, &ccfg) != LV_OK) {
        fprintf(stderr, "comm_ctx_init: %s\n", lv_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    g_rank = comm_rank(c);
    lv_log_set_quiet(2);
    char path[4096];
    lv_model *fp = NULL;
    io_tokenizer *tk = NULL;
    int32_t *toks = NULL;
    int64_t n_tok = 0;
    if (io_model_open(&fp, demo_path(path, sizeof path, "stories260K.bin"), IO_MODEL_AUTO) != LV_OK ||
        io_tokenizer_open(&tk, demo_path(path, sizeof path, "tok512.bin"), fp->cfg.vocab_size) != LV_OK ||
        io_data_tokens(demo_path(path, sizeof path, "tinystories_val_subset.txt"), tk,
                       fp->cfg.vocab_size, &toks, &n_tok) != LV_OK) {
        fprintf(stderr, "rank %d: setup: %s\n", g_rank, lv_last_error());
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    io_tokenizer_free(tk);
    lv_qmodel *qa = NULL, *qs = NULL;
    quantize(fp, &qa, 2, 4, 4, 0);
    quantize(fp, &qs, 1, 6, 4, 1);
    /* 14 sequences: 2 held out, 12 trained in batches of 6 = 3 micro-batches of 2 */
    const stage_pv_config pv = {.lr = 1e-3f, .batch_seqs = 6, .micro_batch = 2, .max_epochs = 2,
                                .eval_every = 1, .holdout_frac = 0.15, .p_every = 1,
                                .p_lr = 0.2f, .p_budget = 1e-3, .p_beam = 2, .p_check = -1,
                                .seed = 3};
    run_case(c, fp, qa, toks + 4000, 14, 32, &pv, "per-linear 2x4g4, KL, V + P steps");
    stage_pv_config ce = pv;
    ce.loss = STAGE_PV_LOSS_CE;
    ce.p_every = 0;
    ce.batch_seqs = 8;
    ce.micro_batch = 3; /* micro-batches of 3, 3, 2 */
    run_case(c, fp, qs, toks + 9000, 14, 32, &ce, "shared 1x6g4, CE, V steps");
    lv_qmodel_free(qa);
    lv_qmodel_free(qs);
    io_model_free(fp);
    free(toks);
    int any = 0;
    comm_agree_flag(c, g_fail != 0, &any);
    if (g_rank == 0) printf("%s\n", any ? "FAILED" : "all checks passed");
    comm_ctx_free(c);
    MPI_Finalize();
    return any ? 1 : 0;
}
