/* cmd_export.c: `llmvq export`: a quantized model in another project's layout.
 * hf-aqlm: a Hugging Face directory that transformers + the aqlm package load
 * (docs/formats-hf-aqlm.md). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io.h"
#include "pipe.h"

/* llmvq's model.h5 or an HF AQLM directory; anything else is no quantized model. */
static lv_status read_quantized(const char *path, lv_qmodel **q)
{
    lv_status st = LV_OK;
    static const unsigned char hdf5_sig[8] = {0x89, 'H', 'D', 'F', '\r', '\n', 0x1a, '\n'};
    struct stat sb;
    if (stat(path, &sb) != 0) LV_FAIL(LV_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    if (S_ISDIR(sb.st_mode)) {
        int aqlm = 0;
        LV_TRY(io_hf_is_aqlm(path, &aqlm));
        if (!aqlm)
            LV_FAIL(LV_ERR_INVALID_ARG, "%s: not a quantized model (no aqlm quantization_config "
                    "in config.json); run llmvq quantize first", path);
        LV_TRY(io_qmodel_read_hf_aqlm(q, path));
        goto done;
    }
    unsigned char head[8] = {0};
    FILE *f = fopen(path, "rb");
    int h5 = f && fread(head, 1, 8, f) == 8 && !memcmp(head, hdf5_sig, 8);
    if (f) fclose(f);
    if (!h5)
        LV_FAIL(LV_ERR_INVALID_ARG, "%s: not a quantized model (want llmvq's model.h5 or an HF "
                "AQLM directory); run llmvq quantize first", path);
    LV_TRY(io_qmodel_read(q, path));
done:
    return st;
}

/* Copies the llama2.c tokenizer to DIR/tokenizer.bin, where llmvq eval finds it. */
static lv_status copy_tokenizer(const char *src, const char *dir)
{
    lv_status st = LV_OK;
    char *buf = NULL, dst[4200], tmp[4300];
    size_t n = 0;
    FILE *f = NULL;
    snprintf(dst, sizeof dst, "%s/tokenizer.bin", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", dst, (long)getpid());
    LV_TRY(io_read_file(src, &buf, &n));
    if (!(f = fopen(tmp, "wb"))) LV_FAIL(LV_ERR_IO, "%s: cannot create: %s", tmp, strerror(errno));
    int bad = fwrite(buf, 1, n, f) != n;
    bad |= fclose(f) != 0;
    f = NULL;
    if (bad) LV_FAIL(LV_ERR_IO, "%s: write failed: %s", tmp, strerror(errno));
    LV_TRY(io_commit_file(tmp, dst));
    tmp[0] = '\0';
done:
    if (f) fclose(f);
    if (st != LV_OK && tmp[0]) unlink(tmp);
    free(buf);
    return st;
}

int pipe_cmd_export(int argc, char **argv)
{
    const char *model_path = NULL, *format = NULL, *out = NULL, *tok_path = NULL, *base = NULL;
    int fp16 = 0;
    const pipe_opt opts[] = {
        {"model", PIPE_OPT_STR, &model_path, "quantized model: model.h5 or an HF AQLM directory"},
        {"format", PIPE_OPT_STR, &format,
         "hf-aqlm (the quantized model) or peft-lora (its ApiQ adapters, for PEFT)"},
        {"fp16", PIPE_OPT_FLAG, &fp16, "peft-lora: store the adapters in fp16 (default fp32)"},
        {"base-model", PIPE_OPT_STR, &base,
         "peft-lora: base_model_name_or_path written into adapter_config.json"},
        {"out", PIPE_OPT_STR, &out, "output directory (created; its files are replaced)"},
        {"tokenizer", PIPE_OPT_STR, &tok_path,
         "llama2.c tokenizer copied to DIR/tokenizer.bin (default: the one beside the model, "
         "if any)"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    int n_pos = 0;
    int rc = pipe_opts_parse("export", "--model PATH --format hf-aqlm|peft-lora --out DIR", opts,
                             n_opts,
                             argc, argv, NULL, 0, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (!model_path || !format || !out) {
        fprintf(stderr, "llmvq export: --model, --format and --out are required (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (strcmp(format, "hf-aqlm") && strcmp(format, "peft-lora")) {
        fprintf(stderr, "llmvq export: --format must be hf-aqlm or peft-lora, not '%s'\n", format);
        return PIPE_EXIT_USAGE;
    }
    lv_status st = LV_OK;
    lv_qmodel *q = NULL;
    io_hf_aqlm_report rep = {0};
    char found[4200];
    LV_TRY(read_quantized(model_path, &q));
    if (!strcmp(format, "peft-lora")) {
        const io_peft_lora_opts po = {.fp16 = fp16, .base_model = base};
        int64_t n_params = 0;
        double bits = io_qmodel_lora_bits_per_weight(q, &n_params);
        LV_TRY(io_qmodel_write_peft_lora_opts(q, out, &po));
        lv_log("wrote %s (PEFT LoRA adapters, rank %d, %lld parameters, %s; %.3f extra bits per "
               "quantized weight at fp16)", out, q->blocks[0].lora_rank, (long long)n_params,
               fp16 ? "fp16" : "fp32", bits);
        goto done;
    }
    LV_TRY(io_qmodel_write_hf_aqlm(q, out, &rep));
    lv_log("wrote %s (HF AQLM %dx%dg%d, %d linears, %.3f bits per quantized weight, %.2f MiB)",
           out, q->M, q->nbits, q->g, rep.n_linears, rep.bits_per_weight,
           (double)rep.bytes / 1048576.0);
    lv_log("fp16 codebooks and scales (lossy; codes exact) change the dequantized weights by "
           "at most %.3g relative (Frobenius, %s), max abs %.3g", rep.max_rel_change, rep.worst,
           rep.max_abs_change);
    if (!tok_path && pipe_find_tokenizer(model_path, q->cfg.vocab_size, found, sizeof found) == LV_OK)
        tok_path = found;
    lv_error_clear();
    if (tok_path) {
        LV_TRY(copy_tokenizer(tok_path, out));
        lv_log("copied tokenizer %s to %s/tokenizer.bin", tok_path, out);
    } else {
        lv_log("no tokenizer beside %s: pass --tokenizer to llmvq eval/generate on %s",
               model_path, out);
    }
done:
    lv_qmodel_free(q);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("export");
}
