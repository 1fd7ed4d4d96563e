/* pvtune.c: PV-tuning (stage_pv_tune) of a quantized stories260K against the FP
 * model, perplexity before and after, wall time per V and per P step.
 *
 *   build-pv/llmvq quantize jobs/stories260K-2bit.ini --set output.dir=/tmp/pv-out
 *   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 ./build-pv/bench_pvtune /tmp/pv-out/model.h5 \
 *       [key=value ...]
 *
 * Keys (defaults in brackets; the stage_pv_config ones default to stage_pv_defaults):
 *   n_seq [256] T [256]: calibration sequences from the tokens at offset calib_from [60000]
 *     on (the evaluated tokens come before it): consecutive windows (chunks [1]; at most
 *     what the text holds, so the held-out tail is unseen text), or chunks=0 random crops
 *     (stage_calib_sequences, seed calib_seed [1]);
 *   eval_tokens [60000] ctx [512]: perplexity of the dequantized model on the first tokens;
 *   hess [0]: 1 = FP calibration Hessians of every linear as the P-step metric, 2 = their
 *     diagonals; loss [kl|ce]; lr beta1 beta2 freeze_norms batch micro epochs eval_every
 *     patience holdout p_every p_lr p_budget p_beam p_check seed: stage_pv_config fields;
 *   out [none]: write the tuned model there (io_qmodel_write).
 * Data: LLMVQ_DEMO_DIR (default jobs/demo) holds stories260K.bin, tok512.bin and
 * tinystories_val_subset.txt. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_common.h"

static int fail(const char *what)
{
    fprintf(stderr, "%s: %s\n", what, lv_last_error());
    return 1;
}

/* ppl of the dequantized q on toks[0, n) (first max_tokens), windows of ctx. */
static lv_status qppl(const lv_qmodel *q, const int32_t *toks, int64_t n, int ctx,
                      int64_t max_tokens, double *ppl)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    LV_TRY(io_qmodel_to_fp(q, &m));
    LV_TRY(bench_eval_ppl(m, toks, n, ctx, max_tokens, ppl));
done:
    io_model_free(m);
    return st;
}

/* value of key=... in argv, or NULL */
static const char *arg(int argc, char **argv, const char *key)
{
    const size_t kl = strlen(key);
    for (int i = 2; i < argc; i++)
        if (!strncmp(argv[i], key, kl) && argv[i][kl] == '=') return argv[i] + kl + 1;
    return NULL;
}

static double argd(int argc, char **argv, const char *key, double dflt)
{
    const char *v = arg(argc, argv, key);
    return v ? atof(v) : dflt;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_pvtune QMODEL.h5 [key=value ...] (see bench/pvtune.c)\n");
        return 2;
    }
    const char *dir = bench_env_or("LLMVQ_DEMO_DIR", "jobs/demo");
    int64_t n_seq = (int64_t)argd(argc, argv, "n_seq", 256);
    const int T = (int)argd(argc, argv, "T", 256), ctx = (int)argd(argc, argv, "ctx", 512);
    const int64_t eval_tokens = (int64_t)argd(argc, argv, "eval_tokens", 60000);
    const int64_t calib_from = (int64_t)argd(argc, argv, "calib_from", 60000);
    const int hess = (int)argd(argc, argv, "hess", 0);
    const char *loss = arg(argc, argv, "loss");
    stage_pv_config c = {
        .loss = loss && !strcmp(loss, "ce") ? STAGE_PV_LOSS_CE : STAGE_PV_LOSS_KL,
        .lr = (float)argd(argc, argv, "lr", 0), .beta1 = (float)argd(argc, argv, "beta1", 0),
        .beta2 = (float)argd(argc, argv, "beta2", 0),
        .freeze_norms = (int)argd(argc, argv, "freeze_norms", 0),
        .batch_seqs = (int)argd(argc, argv, "batch", 0),
        .micro_batch = (int)argd(argc, argv, "micro", 0),
        .max_epochs = (int)argd(argc, argv, "epochs", 0),
        .eval_every = (int)argd(argc, argv, "eval_every", 0),
        .patience = (int)argd(argc, argv, "patience", 0),
        .holdout_frac = argd(argc, argv, "holdout", 0),
        .p_every = (int)argd(argc, argv, "p_every", 0),
        .p_lr = (float)argd(argc, argv, "p_lr", 0), .p_budget = argd(argc, argv, "p_budget", 0),
        .p_beam = (int)argd(argc, argv, "p_beam", 0), .p_hess_diag = hess == 2,
        .p_check = (int)argd(argc, argv, "p_check", 0),
        .seed = (uint64_t)argd(argc, argv, "seed", 0), .verbose = 1};
    char path[4096];
    lv_model *fp = NULL;
    lv_qmodel *q = NULL;
    io_tokenizer *tok = NULL;
    int32_t *toks = NULL, *seqs = NULL;
    int64_t n_tok = 0;
    bench_lins lins = {0};

    snprintf(path, sizeof path, "%s/stories260K.bin", dir);
    if (io_model_open(&fp, path, IO_MODEL_AUTO) != LV_OK) return fail(path);
    if (io_qmodel_read(&q, argv[1]) != LV_OK) return fail(argv[1]);
    snprintf(path, sizeof path, "%s/tok512.bin", dir);
    if (io_tokenizer_open(&tok, path, fp->cfg.vocab_size) != LV_OK) return fail(path);
    snprintf(path, sizeof path, "%s/tinystories_val_subset.txt", dir);
    if (io_data_tokens(path, tok, fp->cfg.vocab_size, &toks, &n_tok) != LV_OK) return fail(path);
    if (calib_from < 0 || calib_from + T > n_tok) {
        fprintf(stderr, "calib_from %lld + T %d is past the %lld tokens\n", (long long)calib_from,
                T, (long long)n_tok);
        return 2;
    }
    const int chunks = (int)argd(argc, argv, "chunks", 1);
    if (chunks) { /* consecutive windows: the held-out tail is text never trained on */
        n_seq = (n_tok - calib_from) / T < n_seq ? (n_tok - calib_from) / T : n_seq;
        seqs = malloc(sizeof(int32_t) * (size_t)(n_seq * T));
        if (!seqs) return fail("out of memory");
        memcpy(seqs, toks + calib_from, sizeof(int32_t) * (size_t)(n_seq * T));
    } else if (stage_calib_sequences(toks + calib_from, n_tok - calib_from, n_seq, T,
                                     (uint64_t)argd(argc, argv, "calib_seed", 1), &seqs) != LV_OK) {
        return fail("calibration sequences");
    }
    if (hess) {
        if (bench_fp_hessians(&lins, fp, seqs, n_seq, T) != LV_OK) return fail("hessians");
        c.p_hessians = lins.H;
    }

    double ppl_fp = 0, ppl0 = 0, ppl1 = 0;
    if (bench_eval_ppl(fp, toks, n_tok, ctx, eval_tokens, &ppl_fp) != LV_OK) return fail("eval fp");
    if (qppl(q, toks, n_tok, ctx, eval_tokens, &ppl0) != LV_OK) return fail("eval before");
    stage_pv_config d = stage_pv_defaults(&c);
    d.p_every = d.p_every > 0 ? d.p_every : 0;
    printf("stories260K %s: %.3f bits/weight%s; %lld %s x %d tokens from token %lld; loss %s, "
           "lr %g, batch %d (micro %d), epochs %d, P every %d (0: none; p_lr %g, budget %g, "
           "beam %d, H %s, check %d)\n",
           argv[1], lv_qmodel_bits_per_weight(q), q->shared_codebooks ? " (shared codebooks)" : "",
           (long long)n_seq, chunks ? "windows" : "crops", T, (long long)calib_from, d.loss == STAGE_PV_LOSS_CE ? "CE" : "KL",
           (double)d.lr, d.batch_seqs, d.micro_batch, d.max_epochs, d.p_every, (double)d.p_lr,
           d.p_budget, d.p_beam, hess == 1 ? "calibration" : hess == 2 ? "diag" : "identity",
           d.p_check);
    printf("ppl (first %lld tokens, ctx %d): FP %.4f, before %.4f\n", (long long)eval_tokens, ctx,
           ppl_fp, ppl0);
    fflush(stdout);

    stage_pv_stats sx;
    if (stage_pv_tune(fp, q, seqs, n_seq, T, &c, &sx) != LV_OK) return fail("pv-tune");
    if (qppl(q, toks, n_tok, ctx, eval_tokens, &ppl1) != LV_OK) return fail("eval after");
    printf("held-out loss %.5f -> %.5f (best after %lld V steps), %d epochs, %lld V + %lld P "
           "steps, %lld groups changed%s\n", sx.loss_before, sx.loss_after,
           (long long)sx.best_step, sx.epochs, (long long)sx.v_steps, (long long)sx.p_steps,
           (long long)sx.codes_changed, sx.diverged ? " (diverged)" : "");
    printf("time: %.1f s total; V step %.3f s, P step %.3f s, evals %.1f s\n", sx.wall_s,
           sx.v_steps ? sx.v_s / (double)sx.v_steps : 0.0,
           sx.p_steps ? sx.p_s / (double)sx.p_steps : 0.0, sx.eval_s);
    printf("ppl: FP %.4f, before %.4f, after %.4f: %.1f %% of the gap to FP closed\n", ppl_fp,
           ppl0, ppl1, 100.0 * (ppl0 - ppl1) / (ppl0 - ppl_fp));
    const char *out = arg(argc, argv, "out");
    if (out && io_qmodel_write(q, out) != LV_OK) return fail(out);
    bench_lins_free(&lins);
    free(seqs);
    free(toks);
    io_tokenizer_free(tok);
    lv_qmodel_free(q);
    io_model_free(fp);
    return 0;
}
