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

lv_status pipe_job_pv_config(const job_file *j, int *enable, stage_pv_config *pv,
                             int64_t *nsamples)
{
    lv_status st = LV_OK;
    const char *loss = NULL, *dev = NULL;
    int64_t e, b, m, pat, ev, pe, ce;
    int te = 0;
    double lr, ho, pb, plr;
    LV_TRY(job_get_bool(j, "pvtune.enable", enable));
    LV_TRY(job_get_str(j, "pvtune.loss", &loss));
    LV_TRY(job_get_float(j, "pvtune.lr", &lr));
    LV_TRY(job_get_int(j, "pvtune.max_epochs", &e));
    LV_TRY(job_get_int(j, "pvtune.batch_seqs", &b));
    LV_TRY(job_get_int(j, "pvtune.micro_batch", &m));
    LV_TRY(job_get_int(j, "pvtune.patience", &pat));
    LV_TRY(job_get_int(j, "pvtune.eval_every", &ev));
    LV_TRY(job_get_float(j, "pvtune.holdout", &ho));
    LV_TRY(job_get_int(j, "pvtune.p_every", &pe));
    LV_TRY(job_get_float(j, "pvtune.p_budget", &pb));
    LV_TRY(job_get_float(j, "pvtune.p_lr", &plr));
    LV_TRY(job_get_int(j, "pvtune.checkpoint_every", &ce));
    LV_TRY(job_get_int(j, "pvtune.nsamples", nsamples));
    LV_TRY(job_get_str(j, "pvtune.device", &dev));
    LV_TRY(job_get_bool(j, "pvtune.train_embeddings", &te));
    *pv = (stage_pv_config){.loss = strcmp(loss, "ce") ? STAGE_PV_LOSS_KL : STAGE_PV_LOSS_CE,
                            .lr = (float)lr, .max_epochs = (int)e, .batch_seqs = (int)b,
                            .micro_batch = (int)m, .patience = (int)pat, .eval_every = (int)ev,
                            .holdout_frac = ho, .p_every = pe == 0 ? -1 : (int)pe,
                            .p_budget = pb, .p_lr = (float)plr, .ckpt_every = (int)ce,
                            .verbose = 1, .train_emb = te,
                            .device = strcmp(dev, "cuda") ? STAGE_PV_DEVICE_CPU
                                                          : STAGE_PV_DEVICE_CUDA};
done:
    return st;
}
