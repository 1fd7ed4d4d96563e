/* qmodel_view.c: a quantized model as an lv_model whose linears stay quantized
 * (lv_layer.aq), so that eval and generate multiply straight from the codes
 * (kern_aq_gemm) instead of dequantizing every weight first (io_qmodel_to_fp). */
#include <errno.h>
#include <string.h>
#include <sys/stat.h>
#include <hdf5.h>

#include "io.h"
#include "io_impl.h"

/* Each linear of each block has the shape the config asks for and a consistent
 * group count, so the forward never reads past the codes. */
static lv_status check_blocks(const lv_qmodel *q)
{
    lv_status st = LV_OK;
    if (!q->blocks) LV_FAIL(LV_ERR_INVALID_ARG, "io_qmodel_view: the model has no blocks");
    for (int l = 0; l < q->cfg.n_layers; l++)
        for (int k = 0; k < LV_LIN_COUNT; k++) {
            const lv_aq_layer *L = &q->blocks[l].lin[k];
            int64_t o, i;
            lv_lin_shape(&q->cfg, (lv_lin)k, &o, &i);
            if (L->d_out != o || L->d_in != i || L->g < 1 ||
                L->n_groups != (L->d_in + L->g - 1) / L->g || !L->codes || !L->codebooks)
                LV_FAIL(LV_ERR_INVALID_ARG,
                        "io_qmodel_view: block %d %s is %lldx%lld (g %d, %lld groups), the "
                        "config needs %lldx%lld",
                        l, lv_lin_name((lv_lin)k), (long long)L->d_out, (long long)L->d_in, L->g,
                        (long long)L->n_groups, (long long)o, (long long)i);
        }
done:
    return st;
}

lv_status io_qmodel_view(const lv_qmodel *q, lv_model **out)
{
    lv_status st = LV_OK;
    lv_model *m = NULL;
    if (!out || !q) LV_FAIL(LV_ERR_INVALID_ARG, "io_qmodel_view: NULL argument");
    *out = NULL;
    LV_TRY(io_config_check(&q->cfg, "quantized model"));
    LV_TRY(check_blocks(q));
    for (int l = 0; l < q->cfg.n_layers; l++)
        if (q->blocks[l].lora_rank > 0)
            LV_FAIL(LV_ERR_UNSUPPORTED, "io_qmodel_view: block %d has LoRA adapters, which the "
                    "code path does not apply: use io_qmodel_to_fp", l);
    LV_TRY(io_model_alloc(&m, &q->cfg));
    m->tok_emb = q->tok_emb;
    m->final_norm = q->final_norm;
    m->wcls = q->cfg.tied_cls ? q->tok_emb : q->wcls;
    for (int l = 0; l < q->cfg.n_layers; l++) {
        const lv_qblock *b = &q->blocks[l];
        lv_layer *ly = &m->layers[l];
        ly->attn_norm = b->attn_norm;
        ly->ffn_norm = b->ffn_norm;
        for (int k = 0; k < LV_LIN_COUNT; k++) ly->aq[k] = &b->lin[k];
    }
    *out = m;
    m = NULL;
done:
    io_model_free(m);
    return st;
}

lv_status io_model_open_quantized(lv_model **out, lv_qmodel **q, const char *path)
{
    lv_status st = LV_OK;
    struct stat sb;
    int aqlm = 0;
    if (!out || !q || !path) LV_FAIL(LV_ERR_INVALID_ARG, "io_model_open_quantized: NULL argument");
    *out = NULL;
    *q = NULL;
    if (stat(path, &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        LV_TRY(io_hf_is_aqlm(path, &aqlm));
        if (aqlm) LV_TRY(io_qmodel_read_hf_aqlm(q, path));
    } else if (H5Eset_auto2(H5E_DEFAULT, NULL, NULL) >= 0 && H5Fis_hdf5(path) > 0) {
        LV_TRY(io_qmodel_read(q, path));
    }
    int lora = 0;
    for (int l = 0; *q && l < (*q)->cfg.n_layers; l++) lora |= (*q)->blocks[l].lora_rank > 0;
    if (*q && lora) {
        /* ApiQ adapters: What + B A as float weights (the code path has no adapters) */
        lv_log("%s: has LoRA adapters: run dequantized with the adapters added", path);
        LV_TRY(io_qmodel_to_fp(*q, out));
        lv_qmodel_free(*q);
        *q = NULL;
    } else if (*q)
        LV_TRY(io_qmodel_view(*q, out));
    else
        LV_TRY(io_model_open(out, path, IO_MODEL_AUTO));
done:
    if (st != LV_OK && q) {
        lv_qmodel_free(*q);
        *q = NULL;
    }
    return st;
}
