/* pipe_plan.c: job -> stage configs, shared by `llmvq quantize` and `llmvq plan`. */
#include <string.h>

#include "pipe_plan.h"

lv_status pipe_job_stage_configs(const job_file *j, stage_aqlm_config *a, int *ft_enable,
                                 stage_ft_config *ft)
{
    lv_status st = LV_OK;
    int64_t v = 0;
    double x = 0;
    const char *upd = NULL;
    memset(a, 0, sizeof *a);
    memset(ft, 0, sizeof *ft);
    LV_TRY(job_get_int(j, "quant.num_codebooks", &v)); a->n_codebooks = (int)v;
    LV_TRY(job_get_int(j, "quant.nbits", &v)); a->nbits = (int)v;
    LV_TRY(job_get_int(j, "quant.group_size", &v)); a->group_size = (int)v;
    LV_TRY(job_get_int(j, "quant.beam_size", &v)); a->beam_size = (int)v;
    LV_TRY(job_get_int(j, "quant.max_iters", &v)); a->max_iters = (int)v;
    LV_TRY(job_get_int(j, "quant.adam_steps", &v)); a->adam_steps = (int)v;
    LV_TRY(job_get_int(j, "quant.kmeans_iters", &v)); a->kmeans_iters = (int)v;
    LV_TRY(job_get_float(j, "quant.rel_tol", &x)); a->rel_tol = x;
    LV_TRY(job_get_float(j, "quant.adam_lr", &x)); a->adam_lr = (float)x;
    LV_TRY(job_get_str(j, "quant.codebook_update", &upd));
    a->codebook_update = strcmp(upd, "lstsq") ? STAGE_AQLM_ADAM : STAGE_AQLM_LSTSQ;
    LV_TRY(job_get_bool(j, "finetune.enable", ft_enable));
    LV_TRY(job_get_float(j, "finetune.lr", &x)); ft->lr = (float)x;
    LV_TRY(job_get_int(j, "finetune.max_epochs", &v)); ft->max_epochs = (int)v;
    LV_TRY(job_get_int(j, "finetune.batch_seqs", &v)); ft->batch_seqs = (int)v;
    LV_TRY(job_get_int(j, "finetune.patience", &v)); ft->patience = (int)v;
    LV_TRY(job_get_float(j, "finetune.holdout", &x)); ft->holdout_frac = x;
    LV_TRY(job_get_bool(j, "finetune.freeze_norms", &ft->freeze_norms));
done:
    return st;
}
