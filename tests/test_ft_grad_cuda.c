/* test_ft_grad_cuda.c: the CUDA block forward/backward (kernels/cuda/block_grad.cu,
 * kern_ftcuda.h) against the CPU reference (stages/finetune_grad.c) on a block
 * of stories260K with random 1x6g4 codes (one linear with outlier columns):
 * outputs, input gradient, parameter gradients and dL/dWhat agree to fp32
 * rounding (max |cuda - cpu| <= 1e-4 max |cpu| per tensor), accumulate adds,
 * and two runs on the GPU are bit-identical. Exits 77 (skipped) without a
 * CUDA device or a CUDA build. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "kern.h"
#include "kern_ftcuda.h"
#include "stage.h"

#define B 2
#define T 32
#define TOL 1e-4

static int fails;

/* max |a - b| against max |b|; prints and counts a failure above TOL. */
static void compare(const char *what, const float *a, const float *b, int64_t n)
{
    double md = 0.0, mb = 0.0;
    for (int64_t i = 0; i < n; i++) {
        const double d = fabs((double)a[i] - b[i]);
        md = d > md || d != d ? d : md;
        mb = fabs(b[i]) > mb ? fabs(b[i]) : mb;
    }
    const int ok = md <= TOL * (mb > 0 ? mb : 1.0);
    printf("  %-22s n %8lld  max|cpu| %.4g  max|cuda - cpu| %.3g  %s\n", what, (long long)n, mb,
           md, ok ? "ok" : "FAIL");
    fails += !ok;
}

int main(void)
{
    if (lv_cuda_device_count() < 1) {
        printf("no CUDA device: skipped\n");
        return 77;
    }
    const char *dir = getenv("LLMVQ_DEMO_DIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/stories260K.bin", dir ? dir : "jobs/demo");
    lv_model *fp = NULL;
    lv_qblock blk = {0};
    stage_ft_ws *cws = NULL;
    kern_ftcuda *gws = NULL;
    lv_status st = io_model_open(&fp, path, IO_MODEL_AUTO);
    if (st != LV_OK) {
        fprintf(stderr, "%s\n", lv_last_error());
        return 1;
    }
    const lv_model_config *c = &fp->cfg;
    const int64_t nd = (int64_t)B * T * c->dim;
    lv_rng rng;
    lv_rng_seed(&rng, 17);
    if (lv_qblock_init(&blk, c, 1, 6, 4) != LV_OK) return 1;
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        lv_aq_layer *L = &blk.lin[k];
        const float *W = lv_layer_weight(&fp->layers[1], (lv_lin)k);
        double ss = 0.0;
        for (int64_t i = 0; i < L->d_out * L->d_in; i++) ss += (double)W[i] * W[i];
        const float rms = (float)sqrt(ss / (double)(L->d_out * L->d_in));
        for (int64_t i = 0; i < 64 * 4; i++) L->codebooks[i] = rms * lv_rng_normal(&rng);
        for (int64_t i = 0; i < L->d_out * L->n_groups; i++) L->codes[i] = (uint16_t)(lv_rng_u64(&rng) % 64);
        for (int64_t r = 0; r < L->d_out; r++) L->scales[r] = 0.8f + 0.4f * lv_rng_uniform(&rng);
    }
    lv_aq_layer *Lo = &blk.lin[LV_LIN_W2];
    if (lv_aq_outliers_alloc(Lo, 3) != LV_OK) return 1;
    Lo->outl_idx[0] = 4, Lo->outl_idx[1] = 90, Lo->outl_idx[2] = 171;
    for (int64_t i = 0; i < Lo->d_out * 3; i++) Lo->outl_w[i] = 0.05f * lv_rng_normal(&rng);
    memcpy(blk.attn_norm, fp->layers[1].attn_norm, sizeof(float) * (size_t)c->dim);
    memcpy(blk.ffn_norm, fp->layers[1].ffn_norm, sizeof(float) * (size_t)c->dim);

    int64_t len[STAGE_FT_N_SEGS];
    const int64_t np = stage_ft_param_segments(c, &blk, NULL, len);
    float *x = malloc(sizeof(float) * nd), *dy = malloc(sizeof(float) * nd);
    float *y[2], *dx[2], *g[2], *g2 = malloc(sizeof(float) * np), *dW[2][LV_LIN_COUNT];
    for (int s = 0; s < 2; s++) {
        y[s] = malloc(sizeof(float) * nd);
        dx[s] = malloc(sizeof(float) * nd);
        g[s] = malloc(sizeof(float) * np);
        for (int k = 0; k < LV_LIN_COUNT; k++)
            dW[s][k] = malloc(sizeof(float) * (size_t)(blk.lin[k].d_out * blk.lin[k].d_in));
    }
    for (int64_t i = 0; i < nd; i++) {
        x[i] = lv_rng_normal(&rng);
        dy[i] = 1e-3f * lv_rng_normal(&rng);
    }
    if (stage_ft_ws_init(&cws, c, &blk, B, T) != LV_OK ||
        stage_ft_block_forward_save(cws, &blk, x, B, T, y[0]) != LV_OK ||
        stage_ft_block_backward(cws, &blk, x, dy, 0, g[0], dx[0], dW[0]) != LV_OK ||
        kern_ftcuda_init(&gws, c, &blk, B, T) != LV_OK ||
        kern_ftcuda_forward(gws, &blk, x, B, T, y[1]) != LV_OK ||
        kern_ftcuda_backward(gws, &blk, dy, 0, g[1], dx[1], dW[1]) != LV_OK) {
        fprintf(stderr, "test_ft_grad_cuda: %s\n", lv_last_error());
        return 1;
    }
    printf("stories260K block 1, random 1x6g4 codes, 3 outlier columns on w2, batch %d x %d\n", B, T);
    compare("y", y[1], y[0], nd);
    compare("dx", dx[1], dx[0], nd);
    int64_t off = 0;
    static const char *seg[2] = {"codebooks", "scales"};
    for (int s = 0; s < STAGE_FT_N_SEGS; off += len[s], s++) {
        char name[64];
        if (s < 2 * LV_LIN_COUNT)
            snprintf(name, sizeof name, "%s %s", lv_lin_name((lv_lin)(s / 2)), seg[s % 2]);
        else
            snprintf(name, sizeof name, "%s", s == 2 * LV_LIN_COUNT ? "attn_norm" : "ffn_norm");
        compare(name, g[1] + off, g[0] + off, len[s]);
    }
    for (int k = 0; k < LV_LIN_COUNT; k++) {
        char name[64];
        snprintf(name, sizeof name, "dL/dWhat %s", lv_lin_name((lv_lin)k));
        compare(name, dW[1][k], dW[0][k], blk.lin[k].d_out * blk.lin[k].d_in);
    }
    /* accumulate adds; a second run is bit-identical */
    memcpy(g2, g[1], sizeof(float) * (size_t)np);
    if (kern_ftcuda_forward(gws, &blk, x, B, T, NULL) != LV_OK ||
        kern_ftcuda_backward(gws, &blk, dy, 1, g2, NULL, NULL) != LV_OK)
        return 1;
    for (int64_t i = 0; i < np; i++) g2[i] -= g[1][i];
    compare("accumulate (2nd - 1st)", g2, g[1], np);
    if (kern_ftcuda_forward(gws, &blk, x, B, T, y[0]) != LV_OK ||
        kern_ftcuda_backward(gws, &blk, dy, 0, g2, dx[0], NULL) != LV_OK)
        return 1;
    const int same = !memcmp(y[0], y[1], sizeof(float) * nd) && !memcmp(g2, g[1], sizeof(float) * np) &&
                     !memcmp(dx[0], dx[1], sizeof(float) * nd);
    printf("  rerun bit-identical: %s\n", same ? "yes" : "NO");
    fails += !same;
    kern_ftcuda_free(gws);
    stage_ft_ws_free(cws);
    lv_qblock_free(&blk);
    io_model_free(fp);
    for (int s = 0; s < 2; s++) {
        free(y[s]);
        free(dx[s]);
        free(g[s]);
        for (int k = 0; k < LV_LIN_COUNT; k++) free(dW[s][k]);
    }
    free(g2);
    free(x);
    free(dy);
    printf("%s\n", fails ? "FAILED" : "all within tolerance");
    return fails ? 1 : 0;
}
