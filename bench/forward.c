/* forward.c (bench_forward): CPU block-forward throughput against this machine's
 * own OpenBLAS sgemm on the block's GEMM shapes, measured in the same run.
 *
 *   bench_forward [--dim 512] [--hidden 1376] [--layers 4] [--heads 8] [--kv-heads 8]
 *                 [--vocab 512] [--batch 8] [--seq 256] [--iters 5]
 *
 * Threads follow OMP_NUM_THREADS / OPENBLAS_NUM_THREADS. With more than one thread,
 * OMP_WAIT_POLICY=passive keeps idle OpenMP workers from spinning on the cores the
 * OpenBLAS threads need (the block alternates OpenMP loops and sgemm calls).
 * Times are the best of --iters runs after one warm-up. Block FLOPs: 2*n*d_in*d_out per linear layer plus
 * causal attention 2*B*heads*T*T*hd (QK^T and PV, halved by the causal mask). */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kern.h"

/* Process CPU seconds (all threads): with wall time, shows whether we had the cores. */
static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

typedef struct {
    lv_model_config cfg;
    int B, T, iters;
} bench_opts;

static int parse_args(int argc, char **argv, bench_opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) goto usage;
        int v = atoi(argv[++i]);
        if (v <= 0) goto usage;
        if (!strcmp(a, "--dim")) o->cfg.dim = v;
        else if (!strcmp(a, "--hidden")) o->cfg.hidden_dim = v;
        else if (!strcmp(a, "--layers")) o->cfg.n_layers = v;
        else if (!strcmp(a, "--heads")) o->cfg.n_heads = v;
        else if (!strcmp(a, "--kv-heads")) o->cfg.n_kv_heads = v;
        else if (!strcmp(a, "--vocab")) o->cfg.vocab_size = v;
        else if (!strcmp(a, "--batch")) o->B = v;
        else if (!strcmp(a, "--seq")) o->T = v;
        else if (!strcmp(a, "--iters")) o->iters = v;
        else goto usage;
    }
    o->cfg.seq_len = o->T;
    return 0;
usage:
    fprintf(stderr, "usage: bench_forward [--dim N] [--hidden N] [--layers N] [--heads N] "
                    "[--kv-heads N] [--vocab N] [--batch N] [--seq N] [--iters N] (all > 0)\n");
    return 1;
}

static void fill(lv_rng *r, float *x, int64_t n, float scale, float shift)
{
    for (int64_t i = 0; i < n; i++) x[i] = lv_rng_normal(r) * scale + shift;
}

/* Random weights in one arena; layers array allocated here. */
static lv_status model_random(lv_model *m, float **arena, const lv_model_config *c)
{
    lv_status st = LV_OK;
    int64_t dim = c->dim, kv = lv_cfg_kv_dim(c), hid = c->hidden_dim;
    float *p;
    lv_rng r;
    *m = (lv_model){.cfg = *c};
    LV_ALLOC(*arena, lv_cfg_n_params(c));
    LV_ALLOC(m->layers, c->n_layers);
    lv_rng_seed(&r, 2024);
    p = *arena;
    fill(&r, p, lv_cfg_n_params(c), 0.02f, 0.0f);
    m->tok_emb = m->wcls = p, p += (int64_t)c->vocab_size * dim;
    for (int l = 0; l < c->n_layers; l++) {
        lv_layer *L = &m->layers[l];
        float *an = p;
        L->attn_norm = p, p += dim;
        L->wq = p, p += dim * dim;
        L->wk = p, p += kv * dim;
        L->wv = p, p += kv * dim;
        L->wo = p, p += dim * dim;
        float *fn = p;
        L->ffn_norm = p, p += dim;
        L->w1 = p, p += hid * dim;
        L->w2 = p, p += dim * hid;
        L->w3 = p, p += hid * dim;
        fill(&r, an, dim, 0.0f, 1.0f); /* norms: all ones */
        fill(&r, fn, dim, 0.0f, 1.0f);
    }
    m->final_norm = p;
    fill(&r, p, dim, 0.0f, 1.0f);
done:
    return st;
}

/* The block's seven GEMMs on its own shapes: q, k, v, o, w1, w3, w2. */
static double gemm_seconds(const lv_model *m, float *in, float *out, int64_t n)
{
    const lv_model_config *c = &m->cfg;
    const lv_layer *L = &m->layers[0];
    int kv = lv_cfg_kv_dim(c);
    double t0 = lv_now();
    kern_matmul_ref(out, in, L->wq, n, c->dim, c->dim);
    kern_matmul_ref(out, in, L->wk, n, c->dim, kv);
    kern_matmul_ref(out, in, L->wv, n, c->dim, kv);
    kern_matmul_ref(out, in, L->wo, n, c->dim, c->dim);
    kern_matmul_ref(out, in, L->w1, n, c->dim, c->hidden_dim);
    kern_matmul_ref(out, in, L->w3, n, c->dim, c->hidden_dim);
    kern_matmul_ref(out, in, L->w2, n, c->hidden_dim, c->dim);
    return lv_now() - t0;
}

static lv_status run(const bench_opts *o)
{
    lv_status st = LV_OK;
    const lv_model_config *c = &o->cfg;
    lv_model m = {0};
    float *arena = NULL, *x0 = NULL, *x = NULL, *gin = NULL, *gout = NULL;
    int32_t *tok = NULL;
    kern_fwd_ws *ws = NULL;
    const float *logits = NULL;
    const int64_t n = (int64_t)o->B * o->T;
    const int64_t wide = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    double best_gemm = 1e30, best_blk = 1e30, best_model = 1e30, wall = 0, cpu = 0;

    LV_TRY(model_random(&m, &arena, c));
    LV_TRY(kern_fwd_ws_init(&ws, c, o->B, o->T, 1));
    LV_ALLOC(tok, n);
    LV_ALLOC(x0, n * c->dim); // (B, T, dim) embedded input of block 0
    LV_ALLOC(x, n * c->dim);  // (B, T, dim)
    LV_ALLOC(gin, n * wide);  // (B*T, max(dim, hidden))
    LV_ALLOC(gout, n * wide); // (B*T, max(dim, hidden))
    for (int64_t i = 0; i < n; i++) tok[i] = (int32_t)((i * 7919) % c->vocab_size);
    lv_rng r;
    lv_rng_seed(&r, 7);
    fill(&r, gin, n * wide, 1.0f, 0.0f);
    kern_embed_ref(x0, m.tok_emb, tok, n, c->dim);

    for (int it = -1; it < o->iters; it++) { /* it = -1: warm-up */
        double tg = gemm_seconds(&m, gin, gout, n);
        memcpy(x, x0, (size_t)n * c->dim * sizeof(float));
        double t0 = lv_now(), c0 = cpu_now();
        for (int l = 0; l < c->n_layers; l++) LV_TRY(kern_block_forward(&m, l, x, o->B, o->T, ws));
        double tb = (lv_now() - t0) / c->n_layers;
        if (it >= 0) wall += tb * c->n_layers, cpu += cpu_now() - c0;
        t0 = lv_now();
        LV_TRY(kern_model_forward(&m, tok, o->B, o->T, ws, &logits));
        double tm = lv_now() - t0;
        if (it < 0) continue;
        best_gemm = tg < best_gemm ? tg : best_gemm;
        best_blk = tb < best_blk ? tb : best_blk;
        best_model = tm < best_model ? tm : best_model;
    }

    const int hd = lv_cfg_head_dim(c), kv = lv_cfg_kv_dim(c);
    double lin = 2.0 * n * ((double)c->dim * (2.0 * c->dim + 2.0 * kv) + 3.0 * c->dim * c->hidden_dim);
    double attn = 2.0 * o->B * c->n_heads * (double)o->T * o->T * hd;
    double gemm_gf = lin / best_gemm * 1e-9, blk_gf = (lin + attn) / best_blk * 1e-9;
    printf("shape: dim %d hidden %d layers %d heads %d kv_heads %d vocab %d; batch %d x %d\n",
           c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, o->B,
           o->T);
    printf("threads: OpenMP %d, OpenBLAS %d; best of %d\n", omp_get_max_threads(),
           openblas_get_num_threads(), o->iters);
    printf("sgemm (block GEMM shapes): %8.2f GFLOP/s  (%.2f GFLOP in %.2f ms)\n", gemm_gf,
           lin * 1e-9, best_gemm * 1e3);
    printf("block forward:             %8.2f GFLOP/s  (%.2f GFLOP in %.2f ms, attention %.1f%%)\n",
           blk_gf, (lin + attn) * 1e-9, best_blk * 1e3, 100.0 * attn / (lin + attn));
    printf("ratio block / sgemm:       %8.3f  (target >= 0.5)\n", blk_gf / gemm_gf);
    printf("tokens/s: block %.0f, model forward (%d layers + logits) %.0f\n", n / best_blk,
           c->n_layers, n / best_model);
    printf("block forward used %.2f cores on average (busy-waiting included)\n", cpu / wall);
done:
    free(gout), free(gin), free(x), free(x0), free(tok);
    kern_fwd_ws_free(ws);
    free(m.layers), free(arena);
    return st;
}

int main(int argc, char **argv)
{
    bench_opts o = {.cfg = {.dim = 512, .hidden_dim = 1376, .n_layers = 4, .n_heads = 8,
                            .n_kv_heads = 8, .vocab_size = 512, .norm_eps = 1e-5f,
                            .rope_theta = 10000.0f, .rope = LV_ROPE_INTERLEAVED, .tied_cls = 1},
                    .B = 8, .T = 256, .iters = 5};
    if (parse_args(argc, argv, &o)) return 2;
    lv_status st = run(&o);
    if (st != LV_OK) {
        fprintf(stderr, "bench_forward: %s\n", lv_last_error());
        return 1;
    }
    return 0;
}
