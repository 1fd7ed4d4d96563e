/* quantize_impl.h: private to pipeline/quantize*.c: the state of one
 * `llmvq quantize` run shared by the per-block path (quantize.c) and the
 * shared-codebook path (quantize_shared.c). */
#ifndef QUANTIZE_IMPL_H
#define QUANTIZE_IMPL_H

#include "comm.h"
#include "io.h"
#include "stage.h"

typedef struct {
    /* job */
    const char *model_path, *tok_path, *calib_path, *out_dir, *eval_path, *prop;
    int share_model;     /* quant.share_codebooks = model */
    char ckpt_dir[4096];
    int64_t nsamples, seqlen, seed, eval_ctx, eval_max;
    stage_aqlm_config acfg;
    int ft_enable;
    stage_ft_config ft;
    uint64_t job_hash, model_hash;
    /* data */
    lv_model *fp;
    io_tokenizer *tok;
    int32_t *seqs; /* (n_seq, T) */
    int64_t n_seq;
    int T;
    /* results */
    double ppl_fp, ppl_quant, wall_s;
    int n_resumed;
} qjob;

/* Relative MSE sum (a - ref)^2 / sum ref^2 over n floats, in order. */
double pipe_rel_mse(const float *a, const float *ref, size_t n);

/* PATH of block `layer`'s checkpoint in q->ckpt_dir. */
void pipe_block_path(const qjob *q, int layer, char *path, size_t cap);

/* Shared-codebook quantization of every block (quant.share_codebooks = model):
 * FP calibration of all blocks, AQLM with one codebook tensor for all linears
 * (beam searches split over the ranks' shards), joint fine-tuning, then each
 * rank checkpoints the blocks of its shard. Collective. */
lv_status pipe_quantize_shared(qjob *q, comm_ctx *comm, double t_start);

#endif
