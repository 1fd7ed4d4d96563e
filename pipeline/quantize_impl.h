/* quantize_impl.h: private to pipeline/quantize*.c: the state of one
 * `llmvq quantize` run shared by the per-block path (quantize.c) and the
 * shared-codebook path (quantize_shared.c). */
#ifndef QUANTIZE_IMPL_H
#define QUANTIZE_IMPL_H

#include "comm.h"
#include "io.h"
#include "stage.h"

/* Where the time goes (summary.json "profile", seconds summed over ranks). */
enum {
    PIPE_PROF_CALIB = 0, /* FP passes: streaming, Hessian taps, FP outputs */
    PIPE_PROF_AQLM_INIT, /* VQ init (k-means) */
    PIPE_PROF_BEAM,      /* beam searches */
    PIPE_PROF_UPDATE,    /* codebook + scale updates */
    PIPE_PROF_FT,        /* block fine-tuning */
    PIPE_PROF_QFWD,      /* quantized block forward for the block error / propagation */
    PIPE_PROF_IO,        /* checkpoint reads and writes */
    PIPE_PROF_APIQ,      /* ApiQ: AQLM + LoRA fits of every linear (apiq.rank > 0) */
    PIPE_PROF_PV,        /* PV-tuning of the assembled model (every rank) */
    PIPE_PROF_N
};
extern const char *const pipe_prof_names[PIPE_PROF_N];

typedef struct {
    /* job */
    const char *model_path, *tok_path, *calib_path, *out_dir, *eval_path, *prop;
    int share;           /* quant.share_codebooks: LV_SHARE_NONE, _MODEL or _TYPE */
    int64_t outlier_cols; /* quant.outlier_cols: outlier columns per linear (0 = none) */
    int fp16;            /* quant.fp16: codebooks and scales rounded to fp16 values */
    int rank_logs;       /* --rank-logs */
    int n_ranks;         /* ranks of this run */
    int64_t apiq_rank, apiq_iters; /* [apiq]: LoRA adapters (rank 0 = none) */
    int pv_enable;       /* [pvtune] */
    stage_pv_config pv;
    char ckpt_dir[4096];
    const char *scratch_dir; /* run.scratch_dir: "" = activations in RAM */
    int64_t nsamples, seqlen, calib_skip, seed, eval_ctx, eval_max;
    stage_aqlm_config acfg;
    int ft_enable;
    stage_ft_config ft;
    uint64_t job_hash, model_hash; /* job_hash: job_hash_blocks (every block file) */
    uint64_t pv_hash;              /* job_hash of all keys: PV-tuning files */
    /* data */
    lv_model *fp;
    io_tokenizer *tok;
    int32_t *seqs; /* (n_seq, T) */
    int64_t pv_nsamples; /* pvtune.nsamples */
    int32_t *pv_seqs;    /* (pv_nsamples, T) PV-tuning's own sequences, or NULL (= seqs) */
    int pv_data_model;
    int scale_bits;      /* quant.scale_bits: 16 or 8 */   /* pvtune.data = model: pv_seqs are sampled from the FP model */
    int64_t n_seq;
    int T;
    /* results */
    double ppl_fp, ppl_quant, ppl_quant_no_lora, ppl_blockwise, wall_s, eval_s;
    stage_pv_stats pv_stats;
    int pv_resumed;          /* 1: the result came from a verified CKPT/pvtuned.h5 */
    int64_t pv_resumed_from; /* > 0: continued from CKPT/pv_state.h5 after this many V steps */
    double prof[PIPE_PROF_N];
    int n_resumed;
} qjob;

/* An activation buffer: malloc'ed, or, with a scratch directory, a shared
 * mapping of an unlinked file there (spilled to node-local disk under memory
 * pressure; run.scratch_dir). */
typedef struct {
    float *p;
    size_t n;      /* floats */
    size_t mapped; /* bytes mapped; 0 = malloc'ed */
} pipe_buf;
/* what: a short name for the file ("act"). Errors name the directory. */
lv_status pipe_buf_alloc(pipe_buf *b, size_t n_floats, const char *scratch_dir, const char *what);
void pipe_buf_free(pipe_buf *b);

/* The progress stream of a sharded job (progress.c): rank 0 prints one line
 * per finished block of the whole model with elapsed time and ETA. */
typedef struct {
    comm_ctx *comm;
    int size, rank, n_layers, rank_logs;
    double t_start, longest_block, last_beat;
    int n_done, first_bad;
    int *done, *total, *finished; /* per rank, rank 0 only */
    double *last_heard, *per_block;
} pipe_progress;
lv_status pipe_progress_init(pipe_progress *p, comm_ctx *comm, int n_layers, double t_start,
                             int rank_logs);
void pipe_progress_free(pipe_progress *p);
/* A block of this rank is finished (block_s: its wall time). */
lv_status pipe_progress_block(pipe_progress *p, int layer, const lv_qblock *b, int resumed,
                              double block_s);
/* Collective, after this rank's shard (local: its status): rank 0 prints the
 * other shards' blocks as they finish and returns when every rank is done;
 * the others wait for it. Waits as long as ranks keep reporting; a rank silent
 * for longer than max(comm timeout, 3 x longest block) is an error. */
lv_status pipe_progress_finish(pipe_progress *p, lv_status local);

/* Relative MSE sum (a - ref)^2 / sum ref^2 over n floats, in order. */
double pipe_rel_mse(const float *a, const float *ref, size_t n);

/* PATH of block `layer`'s checkpoint in q->ckpt_dir. */
void pipe_block_path(const qjob *q, int layer, char *path, size_t cap);

/* Outlier columns of L when q->outlier_cols > 0 (capped at d_in;
 * stage_outliers_fit), then *rel = L's layer error (with them). */
lv_status pipe_fit_outliers(qjob *q, const float *W, const float *H, lv_aq_layer *L, double *rel);

/* Shared-codebook quantization of every block (quant.share_codebooks = model or type):
 * FP calibration of all blocks, AQLM with one codebook tensor for all linears
 * (beam searches split over the ranks' shards), joint fine-tuning, then each
 * rank checkpoints the blocks of its shard. Collective. */
lv_status pipe_quantize_shared(qjob *q, comm_ctx *comm, pipe_progress *prog, double t_start);

/* quant.fp16: codebooks and scales of b rounded to fp16 values (quantize.c). */
lv_status pipe_round_block_f16(const qjob *q, int layer, lv_qblock *b);

/* Perplexity of m on output.eval_data (quantize.c). */
lv_status pipe_eval_model(const lv_model *m, const qjob *q, double *ppl);

/* PV-tuning of the block-wise model *qm, collective over all ranks, each
 * holding the same *qm (quantize_pv.c); *qm is replaced by the result. */
lv_status pipe_pv_tune(qjob *q, comm_ctx *comm, lv_qmodel **qm);

#endif
