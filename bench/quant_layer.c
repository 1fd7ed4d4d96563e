/* quant_layer.c: wall time and relative error of VQ init + AQLM on one random
 * layer with a realistic (correlated, non-diagonal) Hessian.
 *
 *   bench_quant_layer [d (512)] [n_samples (2048)]
 *   OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=1 ./bench_quant_layer 512
 *
 * Reports per config: rel. error after init and after AQLM, wall time, bits
 * per weight, and beam-search throughput in candidate scores per second. */
#include <stdio.h>
#include <stdlib.h>

#include "../tests/quant_testlib.h"
#include "stage.h"

typedef struct {
    const char *name;
    stage_aqlm_config cfg;
} bench_case;

int main(int argc, char **argv)
{
    int d = argc > 1 ? atoi(argv[1]) : 512;
    int n = argc > 2 ? atoi(argv[2]) : 2048;
    if (d <= 0 || n <= 0) {
        fprintf(stderr, "usage: bench_quant_layer [d] [n_samples]\n");
        return 2;
    }
    lv_rng rng;
    lv_rng_seed(&rng, 2024);
    double t0 = lv_now();
    float *W = qt_make_w(&rng, d, d), *H = qt_make_h(&rng, n, d);
    if (!W || !H) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    printf("layer %dx%d, H from %d correlated samples (%.2f s)\n", d, d, n, lv_now() - t0);
    const bench_case cases[] = {
        {"1x8g8", {.n_codebooks = 1, .nbits = 8, .group_size = 8, .beam_size = 8,
                   .max_iters = 10, .rel_tol = 1e-3, .adam_steps = 100, .seed = 1}},
        {"2x8g8", {.n_codebooks = 2, .nbits = 8, .group_size = 8, .beam_size = 8,
                   .max_iters = 10, .rel_tol = 1e-3, .adam_steps = 100, .seed = 1}},
        {"2x8g8-lstsq", {.n_codebooks = 2, .nbits = 8, .group_size = 8, .beam_size = 8,
                         .max_iters = 10, .rel_tol = 1e-3,
                         .codebook_update = STAGE_AQLM_LSTSQ, .seed = 1}},
        {"1x16g8-beam1", {.n_codebooks = 1, .nbits = 16, .group_size = 8, .beam_size = 1,
                          .max_iters = 1, .adam_steps = 20, .seed = 1}},
    };
    int rc = 0;
    printf("%-14s %8s %9s %9s %5s %8s %8s %8s %12s\n", "config", "bpw", "rel_init", "rel_final",
           "iters", "wall_s", "init_s", "beam_s", "cand/s");
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        stage_aqlm_layer L = {0};
        stage_aqlm_stats sx = {0};
        lv_status st = stage_aqlm_run(W, H, d, d, &cases[c].cfg, &L, &sx);
        if (st != LV_OK) {
            fprintf(stderr, "%s: %s\n", cases[c].name, lv_last_error());
            rc = 1;
        } else {
            printf("%-14s %8.3f %9.5f %9.5f %5d %8.2f %8.2f %8.2f %12.3g\n", cases[c].name,
                   stage_aqlm_bits_per_weight(&L), sx.rel_err_init, sx.rel_err[sx.iters - 1],
                   sx.iters, sx.wall_s, sx.init_s, sx.beam_s,
                   sx.beam_s > 0 ? (double)sx.n_candidates / sx.beam_s : 0.0);
            fflush(stdout);
        }
        lv_aq_layer_free(&L);
    }
    free(H);
    free(W);
    return rc;
}
