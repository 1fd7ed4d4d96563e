/* pipe_plan.h: helpers shared by `llmvq quantize` and `llmvq plan`. */
#ifndef PIPE_PLAN_H
#define PIPE_PLAN_H

#include <stdint.h>

#include "job.h"
#include "stage.h"

/* Blocks [*first, *last) of rank `rank` of `size`: contiguous shards of equal
 * cost (every block of a LLaMA model has the same shapes); docs/pipeline.md.
 * The one definition of the shard map: quantize and plan must agree. */
static inline void pipe_shard_of(int n_layers, int rank, int size, int *first, int *last)
{
    *first = (int)((int64_t)n_layers * rank / size);
    *last = (int)((int64_t)n_layers * (rank + 1) / size);
}

/* The [quant] and [finetune] sections of a job as stage configs (seed 0:
 * callers derive per-layer seeds from run.seed). */
lv_status pipe_job_stage_configs(const job_file *j, stage_aqlm_config *a, int *ft_enable,
                                 stage_ft_config *ft);

/* The [pvtune] section as a stage config (seed and hooks left 0), enable and
 * pvtune.nsamples (0: the calibration sequences). */
lv_status pipe_job_pv_config(const job_file *j, int *enable, stage_pv_config *pv,
                             int64_t *nsamples);

#endif
