/* cmd_model.c: `llmvq convert` and `llmvq synth` (model files in and out). */
#include <string.h>

#include "io.h"
#include "pipe.h"

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && !strcmp(s + n - k, suffix);
}

int pipe_cmd_convert(int argc, char **argv)
{
    const char *model_path = NULL, *to = "hf", *out = NULL;
    int no_lora = 0;
    const pipe_opt opts[] = {
        {"model", PIPE_OPT_STR, &model_path,
         "input model: llama2.c .bin, HF directory or quantized model.h5 (dequantized)"},
        {"to", PIPE_OPT_STR, &to, "output format: hf (directory) or llama2c (.bin) (default hf)"},
        {"out", PIPE_OPT_STR, &out, "output directory (hf) or file (llama2c)"},
        {"no-lora", PIPE_OPT_FLAG, &no_lora,
         "model.h5: leave out its LoRA adapters (the base model for `export --format peft-lora`)"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    int n_pos = 0;
    int rc = pipe_opts_parse("convert", "--model PATH --to hf|llama2c --out PATH [--no-lora]", opts,
                             n_opts, argc, argv, NULL, 0, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (!model_path || !out) {
        fprintf(stderr, "llmvq convert: --model and --out are required (see --help)\n");
        return PIPE_EXIT_USAGE;
    }
    if (strcmp(to, "hf") && strcmp(to, "llama2c")) {
        fprintf(stderr, "llmvq convert: --to must be hf or llama2c, not '%s'\n", to);
        return PIPE_EXIT_USAGE;
    }
    lv_status st = LV_OK;
    lv_model *m = NULL;
    lv_qmodel *q = NULL;
    if (no_lora) {
        /* What alone: every other reader of model.h5 adds B A */
        lv_status rs = io_qmodel_read(&q, model_path);
        if (rs != LV_OK) {
            char why[512];
            lv_last_error_line(why, sizeof why);
            LV_FAIL(rs, "--no-lora takes a quantized model.h5: %s", why);
        }
        LV_TRY(io_qmodel_to_fp_opts(q, 0, &m));
    } else {
        LV_TRY(io_model_open(&m, model_path, IO_MODEL_AUTO));
    }
    if (!strcmp(to, "hf"))
        LV_TRY(io_model_write_hf(m, out));
    else
        LV_TRY(io_model_write_llama2c(m, out));
    lv_log("wrote %s (%s, %lld parameters)", out, to, (long long)lv_cfg_n_params(&m->cfg));
done:
    io_model_free(m);
    lv_qmodel_free(q);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("convert");
}

int pipe_cmd_synth(int argc, char **argv)
{
    const char *config = NULL, *preset = NULL, *out = NULL, *format = NULL;
    int64_t seed = 1;
    const pipe_opt opts[] = {
        {"config", PIPE_OPT_STR, &config, "HF config.json giving the shapes"},
        {"preset", PIPE_OPT_STR, &preset,
         "named shapes: stories260K, stories15M, stories42M, stories110M, llama2-7b, "
         "llama2-13b, llama2-70b, tiny-bench"},
        {"out", PIPE_OPT_STR, &out, "output: a .bin file (llama2.c) or a directory (HF)"},
        {"format", PIPE_OPT_STR, &format, "hf or llama2c (default: llama2c if --out ends in .bin)"},
        {"seed", PIPE_OPT_I64, &seed, "random seed (default 1)"},
    };
    const int n_opts = (int)(sizeof opts / sizeof opts[0]);
    int n_pos = 0;
    int rc = pipe_opts_parse("synth", "--config config.json | --preset NAME --out PATH [--seed S]",
                             opts, n_opts, argc, argv, NULL, 0, &n_pos);
    if (rc) return rc < 0 ? PIPE_EXIT_OK : rc;
    if (!out || (!config == !preset)) {
        fprintf(stderr, "llmvq synth: need --out and exactly one of --config, --preset\n");
        return PIPE_EXIT_USAGE;
    }
    if (!format) format = ends_with(out, ".bin") ? "llama2c" : "hf";
    if (strcmp(format, "hf") && strcmp(format, "llama2c")) {
        fprintf(stderr, "llmvq synth: --format must be hf or llama2c, not '%s'\n", format);
        return PIPE_EXIT_USAGE;
    }
    lv_status st = LV_OK;
    lv_model *m = NULL;
    lv_model_config cfg;
    if (config)
        LV_TRY(io_config_read_hf(&cfg, config));
    else
        LV_TRY(io_config_preset(&cfg, preset));
    LV_TRY(io_model_synth(&m, &cfg, (uint64_t)seed));
    if (!strcmp(format, "hf"))
        LV_TRY(io_model_write_hf(m, out));
    else
        LV_TRY(io_model_write_llama2c(m, out));
    lv_log("wrote %s (%s, %lld parameters, seed %lld)", out, format,
           (long long)lv_cfg_n_params(&cfg), (long long)seed);
done:
    io_model_free(m);
    return st == LV_OK ? PIPE_EXIT_OK : pipe_report_error("synth");
}
