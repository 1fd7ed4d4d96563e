/* dump_layers.c: write layers (W and their Hessian H) as float32 .npy files so
 * that another implementation (tools/aqlm_ref/, the AQLM reference) can
 * quantize exactly the problems our stage_aqlm_run sees.
 *
 *   bench_dump_layers OUTDIR [SPEC ...]          (default SPECs: b0.wq b2.w1 b4.w2)
 *
 * SPEC "bL.NAME" (NAME in wq wk wv wo w1 w2 w3): linear NAME of block L of the
 * model, H = X^T X / rows of its input, computed as the pipeline does
 * (stage_calib_sequences: 64 sequences x 256 tokens of the text, seed 0;
 * stage_calib_block with stage_block_hessians, FP propagation through the
 * blocks; stage_hessian_to_f32), via bench_fp_hessians.
 * SPEC "synth:RxC[:nN][:sS]": synthetic layer as bench_quant_layer builds it
 * (tests/quant_testlib.h): W (R, C) N(0,1) with heavier rows, H from N
 * correlated samples (default N = 4 * C), seed S (default 2024).
 *
 * Writes OUTDIR/NAME.W.npy (d_out, d_in), OUTDIR/NAME.H.npy (d_in, d_in) and
 * OUTDIR/index.json listing them. Paths default to the demo files under
 * jobs/demo/ and can be overridden with LLMVQ_MODEL, LLMVQ_TOKENIZER, LLMVQ_TEXT. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../tests/quant_testlib.h"
#include "bench_common.h"
#include "bench_npy.h"

#define N_SEQ 64
#define SEQ_T 256
#define CALIB_SEED 0
#define MAX_SPECS 64

static const char *const lin_names[LV_LIN_COUNT] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};

typedef struct {
    char name[64], source[160];
    int64_t d_out, d_in;
} dump_entry;

typedef struct {
    lv_model *fp;
    int32_t *toks;
    int64_t n_tok;
    bench_lins lin;
    io_tokenizer *tok;
} dump_model;

static void dump_model_free(dump_model *m)
{
    bench_lins_free(&m->lin);
    free(m->toks);
    io_tokenizer_free(m->tok);
    io_model_free(m->fp);
    memset(m, 0, sizeof *m);
}

/* Model, tokens and the Hessians of every linear (FP propagation). */
static lv_status dump_model_load(dump_model *m)
{
    lv_status st = LV_OK;
    int32_t *seqs = NULL;
    const char *model = bench_env_or("LLMVQ_MODEL", "jobs/demo/stories260K.bin");
    const char *tokp = bench_env_or("LLMVQ_TOKENIZER", "jobs/demo/tok512.bin");
    const char *text = bench_env_or("LLMVQ_TEXT", "jobs/demo/tinystories_val_subset.txt");
    double t0 = lv_now();
    LV_TRY(io_model_open(&m->fp, model, IO_MODEL_AUTO));
    LV_TRY(io_tokenizer_open(&m->tok, tokp, m->fp->cfg.vocab_size));
    LV_TRY(io_data_tokens(text, m->tok, m->fp->cfg.vocab_size, &m->toks, &m->n_tok));
    LV_TRY(stage_calib_sequences(m->toks, m->n_tok, N_SEQ, SEQ_T, CALIB_SEED, &seqs));
    LV_TRY(bench_fp_hessians(&m->lin, m->fp, seqs, N_SEQ, SEQ_T));
    printf("%s: %d linears, calibration %d x %d tokens of %s, seed %d (%.1f s)\n", model,
           m->lin.n_lin, N_SEQ, SEQ_T, text, CALIB_SEED, lv_now() - t0);
done:
    free(seqs);
    return st;
}

static lv_status dump_write(const char *dir, const char *name, const float *W, const float *H,
                            int64_t d_out, int64_t d_in)
{
    lv_status st = LV_OK;
    char path[1024];
    snprintf(path, sizeof path, "%s/%s.W.npy", dir, name);
    LV_TRY(bench_npy_write(path, W, d_out, d_in));
    snprintf(path, sizeof path, "%s/%s.H.npy", dir, name);
    LV_TRY(bench_npy_write(path, H, d_in, d_in));
done:
    return st;
}

/* One "bL.NAME" spec from the model (loaded on first use). */
static lv_status dump_model_layer(dump_model *m, const char *dir, const char *spec,
                                  dump_entry *e)
{
    lv_status st = LV_OK;
    int blk = -1, n = 0, k = -1;
    char lname[8] = {0};
    if (sscanf(spec, "b%d.%3s%n", &blk, lname, &n) != 2 || spec[n] != '\0')
        LV_FAIL(LV_ERR_INVALID_ARG, "dump: bad spec '%s' (want bL.NAME or synth:RxC)", spec);
    for (int t = 0; t < LV_LIN_COUNT; t++)
        if (strcmp(lname, lin_names[t]) == 0) k = t;
    if (k < 0) LV_FAIL(LV_ERR_INVALID_ARG, "dump: unknown linear '%s' in '%s'", lname, spec);
    if (!m->fp) LV_TRY(dump_model_load(m));
    if (blk < 0 || blk >= m->fp->cfg.n_layers)
        LV_FAIL(LV_ERR_INVALID_ARG, "dump: block %d out of range 0..%d", blk,
                m->fp->cfg.n_layers - 1);
    const int i = blk * LV_LIN_COUNT + k;
    e->d_out = m->lin.d_out[i];
    e->d_in = m->lin.d_in[i];
    snprintf(e->name, sizeof e->name, "b%d_%s", blk, lname);
    snprintf(e->source, sizeof e->source, "%s block %d %s, FP-propagation Hessian %dx%d seed %d",
             bench_env_or("LLMVQ_MODEL", "jobs/demo/stories260K.bin"), blk, lname, N_SEQ, SEQ_T,
             CALIB_SEED);
    LV_TRY(dump_write(dir, e->name, m->lin.W[i], m->lin.H[i], e->d_out, e->d_in));
done:
    return st;
}

/* One "synth:RxC[:nN][:sS]" spec. */
static lv_status dump_synth(const char *dir, const char *spec, dump_entry *e)
{
    lv_status st = LV_OK;
    float *W = NULL, *H = NULL;
    int rows = 0, cols = 0, n = 0;
    if (sscanf(spec, "synth:%dx%d%n", &rows, &cols, &n) != 2 || rows <= 0 || cols <= 0)
        LV_FAIL(LV_ERR_INVALID_ARG, "dump: bad spec '%s' (want synth:RxC[:nN][:sS])", spec);
    const char *ns = strstr(spec + n, ":n"), *ss = strstr(spec + n, ":s");
    int64_t n_samples = ns ? strtoll(ns + 2, NULL, 10) : 4 * (int64_t)cols;
    uint64_t seed = ss ? strtoull(ss + 2, NULL, 10) : 2024;
    if (n_samples <= 0) LV_FAIL(LV_ERR_INVALID_ARG, "dump: bad sample count in '%s'", spec);
    lv_rng rng;
    lv_rng_seed(&rng, seed);
    double t0 = lv_now();
    W = qt_make_w(&rng, rows, cols);
    H = qt_make_h(&rng, n_samples, cols);
    if (!W || !H) LV_FAIL(LV_ERR_NOMEM, "dump: out of memory for %s", spec);
    e->d_out = rows;
    e->d_in = cols;
    snprintf(e->name, sizeof e->name, "synth_%dx%d", rows, cols);
    snprintf(e->source, sizeof e->source,
             "synthetic: qt_make_w, H = qt_make_h from %lld correlated samples, seed %llu",
             (long long)n_samples, (unsigned long long)seed);
    printf("%s: built in %.1f s\n", e->name, lv_now() - t0);
    LV_TRY(dump_write(dir, e->name, W, H, rows, cols));
done:
    free(H);
    free(W);
    return st;
}

static lv_status dump_index(const char *dir, const dump_entry *e, int n)
{
    lv_status st = LV_OK;
    char path[1024];
    snprintf(path, sizeof path, "%s/index.json", dir);
    FILE *f = fopen(path, "w");
    if (!f) LV_FAIL(LV_ERR_IO, "dump: cannot create %s", path);
    fprintf(f, "{\n  \"format\": \"llmvq layer dump 1\",\n  \"layers\": [\n");
    for (int i = 0; i < n; i++)
        fprintf(f,
                "    {\"name\": \"%s\", \"d_out\": %lld, \"d_in\": %lld, \"W\": \"%s.W.npy\", "
                "\"H\": \"%s.H.npy\", \"source\": \"%s\"}%s\n",
                e[i].name, (long long)e[i].d_out, (long long)e[i].d_in, e[i].name, e[i].name,
                e[i].source, i + 1 < n ? "," : "");
    fprintf(f, "  ]\n}\n");
    if (fclose(f) != 0) LV_FAIL(LV_ERR_IO, "dump: write failed on %s", path);
done:
    return st;
}

int main(int argc, char **argv)
{
    static const char *dflt[] = {"b0.wq", "b2.w1", "b4.w2"};
    static dump_entry entries[MAX_SPECS];
    dump_model m = {0};
    lv_status st = LV_OK;
    if (argc < 2) {
        fprintf(stderr, "usage: bench_dump_layers OUTDIR [bL.NAME | synth:RxC[:nN][:sS] ...]\n");
        return 2;
    }
    const char *dir = argv[1];
    int n = argc > 2 ? argc - 2 : (int)(sizeof dflt / sizeof dflt[0]);
    if (n > MAX_SPECS) LV_FAIL(LV_ERR_INVALID_ARG, "dump: at most %d layers", MAX_SPECS);
    for (int i = 0; i < n; i++) {
        const char *spec = argc > 2 ? argv[i + 2] : dflt[i];
        if (strncmp(spec, "synth:", 6) == 0)
            LV_TRY(dump_synth(dir, spec, &entries[i]));
        else
            LV_TRY(dump_model_layer(&m, dir, spec, &entries[i]));
        printf("wrote %s/%s.{W,H}.npy (%lld x %lld)\n", dir, entries[i].name,
               (long long)entries[i].d_out, (long long)entries[i].d_in);
    }
    LV_TRY(dump_index(dir, entries, n));
done:
    dump_model_free(&m);
    if (st != LV_OK) {
        fprintf(stderr, "bench_dump_layers: %s\n", lv_last_error());
        return 1;
    }
    return 0;
}
