/* io.h: reading and writing models, tokenizers and token files.
 *
 * Every reader validates what it reads against the file size and the other
 * metadata before touching it, and fails with LV_ERR_FORMAT / LV_ERR_IO and a
 * message of the form "PATH: problem" (lv_last_error()). Nothing is read past
 * the end of a file, whatever its header says. */
#ifndef IO_H
#define IO_H

#include <stddef.h>
#include <stdint.h>

#include "lv.h"
#include "lv_model.h"
#include "lv_quant.h"

/* ---------------- models ---------------- */

typedef enum {
    IO_MODEL_AUTO = 0,  /* detect from the path: directory => HF, else .bin */
    IO_MODEL_LLAMA2C,   /* llama2.c legacy v0 .bin */
    IO_MODEL_HF,        /* HF directory: config.json + model.safetensors or sharded index */
    IO_MODEL_QH5,       /* llmvq quantized model (.h5), opened dequantized */
} io_model_format;

/* Open a model (memory-mapped; float32 tensors are not copied; f16/bf16 are
 * converted once into an owned arena). Rejects NaN/Inf weights. AUTO picks HF
 * for a directory, QH5 for a file with the HDF5 signature, llama2.c otherwise.
 * On success *out is owned by the caller: io_model_free(). */
lv_status io_model_open(lv_model **out, const char *path, io_model_format fmt);
void io_model_free(lv_model *m);

/* llama2.c .bin alone (memory-mapped, size validated against the header). */
lv_status io_model_open_llama2c(lv_model **out, const char *path);
/* HF directory (config.json + safetensors single or sharded; F32/F16/BF16).
 * q/k are kept as HF stores them (permuted for rotate-half): cfg.rope = LV_ROPE_HALF. */
lv_status io_model_open_hf(lv_model **out, const char *dir);

/* Write m as an HF LLaMA directory (config.json + model.safetensors, F32).
 * q/k rows are permuted to HF's rotate-half order when m uses interleaved RoPE,
 * so the written model gives the same logits. Creates dir if needed. */
lv_status io_model_write_hf(const lv_model *m, const char *dir);

/* Write m as a llama2.c legacy .bin (float32). */
lv_status io_model_write_llama2c(const lv_model *m, const char *path);

/* A model with random weights in the shapes of cfg (normal(0, 0.02) linears,
 * unit norms), seeded; owned arena. For benchmarks (`llmvq synth`). */
lv_status io_model_synth(lv_model **out, const lv_model_config *cfg, uint64_t seed);

/* Config of a named preset ("stories260K", "stories15M", "llama2-7b", "llama2-70b",
 * "tiny-bench" ...) or of an HF config.json (no weights needed). */
lv_status io_config_preset(lv_model_config *cfg, const char *name);
lv_status io_config_read_hf(lv_model_config *cfg, const char *config_json_path);

/* ---------------- quantized models and block checkpoints (HDF5) ----------------
 * Layout: docs/formats-h5.md. */

/* Readers reject any other version with a message saying what to do. */
#define IO_H5_FORMAT_VERSION 1

/* Write a whole quantized model (atomically: temp file, fsync, rename). */
lv_status io_qmodel_write(const lv_qmodel *q, const char *path);
/* Read and validate (shapes against the config attributes, codes < 2^nbits,
 * finite floats). Caller frees with lv_qmodel_free. */
lv_status io_qmodel_read(lv_qmodel **out, const char *path);

/* Arrays stored beside a quantized model in one file (e.g. the PV-tuning
 * checkpoint CKPT/pv_state.h5: the model at that step + the optimiser state).
 * n elements of the type at data (write: read from; read: written to, and the
 * file must hold exactly n). */
typedef enum { IO_ARR_F32 = 0, IO_ARR_F64, IO_ARR_I64, IO_ARR_U64, IO_ARR_U16 } io_arr_type;
typedef struct {
    const char *name;
    io_arr_type type;
    int64_t n;
    void *data;
} io_array;
/* io_qmodel_write plus group `group` holding the arrays and a checksum of
 * their bytes (one atomic file). */
lv_status io_qmodel_write_extra(const lv_qmodel *q, const char *path, const char *group,
                                const io_array *arr, int n_arr);
/* io_qmodel_read plus the arrays of `group` (shapes, types and checksum
 * verified: a missing, resized or corrupt array is LV_ERR_FORMAT naming it). */
lv_status io_qmodel_read_extra(lv_qmodel **out, const char *path, const char *group,
                               io_array *arr, int n_arr);
/* Length of the 1-D dataset `name` ("group/dataset") of a model file written by
 * io_qmodel_write_extra, to size the buffers of io_qmodel_read_extra. */
lv_status io_qmodel_extra_length(const char *path, const char *name, int64_t *n);

/* An FP model whose linears are the dequantized ones (owned arena), so that
 * every FP path (eval, generate, convert) runs a quantized model. LoRA
 * adapters of the blocks, when present, are added (What + B A); see
 * io_qmodel_to_fp_opts to leave them out. Caller frees with io_model_free. */
lv_status io_qmodel_to_fp(const lv_qmodel *q, lv_model **out);
/* *view = fp with block `layer`'s linears replaced by the dequantized b (plus
 * its LoRA adapters when present) and its norms by b's: a shallow copy sharing everything else (view->storage is
 * NULL; never io_model_free it). w (sum of the 7 linears' d_out*d_in floats)
 * and layers (n_layers) are caller-owned scratch the view points into. */
lv_status io_qblock_fp_view(const lv_model *fp, int layer, const lv_qblock *b, float *w,
                            lv_layer *layers, lv_model *view);

/* io_qmodel_read + io_qmodel_to_fp. */
lv_status io_model_open_qh5(lv_model **out, const char *path);

/* One finished block as its own checkpoint file (atomically), tagged with the
 * job and model hashes and a checksum of its data. */
lv_status io_qblock_write(const char *path, const lv_qblock *b, int layer,
                          const lv_model_config *cfg, uint64_t job_hash, uint64_t model_hash);
/* Read a block checkpoint; refuses another config, job or model, and a block
 * whose checksum does not match (LV_ERR_FORMAT, message names the file).
 * b is zeroed first; on success the caller frees it with lv_qblock_free. */
lv_status io_qblock_read(const char *path, const lv_model_config *cfg, uint64_t job_hash,
                         uint64_t model_hash, lv_qblock *b, int *layer);
uint64_t io_qblock_checksum(const lv_qblock *b);

/* What a block checkpoint holds, for `llmvq inspect`. */
typedef struct {
    int layer;
    lv_model_config cfg;
    uint64_t job_hash, model_hash, checksum;
    double block_mse;
    double rel_err[LV_LIN_COUNT];
} io_qblock_info;
/* Read and fully verify a block checkpoint (format, shapes, values, checksum)
 * without a job to compare with; fills info. */
lv_status io_qblock_inspect(const char *path, io_qblock_info *info);

/* W (d_out, d_in) = dequantized L. */
lv_status io_qmodel_dequant_linear(const lv_aq_layer *L, float *W);

/* fsync tmp, rename it to path, fsync the directory. */
lv_status io_commit_file(const char *tmp, const char *path);

/* ---------------- tokenizer (llama2.c tokenizer.bin) ---------------- */

typedef struct io_tokenizer io_tokenizer;

/* vocab_size comes from the model (the file does not store it). */
lv_status io_tokenizer_open(io_tokenizer **out, const char *path, int vocab_size);
void io_tokenizer_free(io_tokenizer *t);

/* Encode text (n bytes, need not be NUL-terminated) as llama2.c's encode does:
 * optional BOS (1), dummy-prefix space when text is non-empty, codepoints with
 * byte fallback (+3), highest-score merges. *tokens is malloc'd, caller frees.
 * Runs in O(n log n) so that a whole evaluation text is encoded at once. */
lv_status io_tokenizer_encode(const io_tokenizer *t, const char *text, size_t n, int bos,
                              int eos, int32_t **tokens, int64_t *n_tokens);

/* Piece of `token` following `prev` (strips the leading space after BOS,
 * maps <0xXX> to the raw byte). Borrowed string. */
const char *io_tokenizer_decode(const io_tokenizer *t, int32_t prev, int32_t token);

int io_tokenizer_vocab_size(const io_tokenizer *t);

/* ---------------- token files (docs/formats.md) ----------------
 * Header (little-endian, 32 bytes): magic "LVQTOK01" (8 bytes), uint32 version (1),
 * uint32 bytes_per_token (2 or 4), uint64 n_tokens, uint32 vocab_size, uint32 reserved (0);
 * then n_tokens unsigned integers of bytes_per_token bytes. */

lv_status io_tokens_write(const char *path, const int32_t *tokens, int64_t n, int vocab_size);
/* Reads and validates (size, every id < vocab_size). *tokens malloc'd. */
lv_status io_tokens_read(const char *path, int32_t **tokens, int64_t *n, int *vocab_size);

/* Tokens of a data file for a model: a token file (by magic) is read as is,
 * anything else is UTF-8 text encoded with `tok` (BOS, no EOS). Empty or
 * unreadable data is an error naming the file. Checks ids < vocab_size. */
lv_status io_data_tokens(const char *path, const io_tokenizer *tok, int vocab_size,
                         int32_t **tokens, int64_t *n);

/* ---------------- files ---------------- */

/* Read-only memory map of a whole file. Empty files map to NULL with size 0. */
typedef struct {
    void *data;
    size_t size;
} io_map;
lv_status io_map_open(io_map *m, const char *path);
void io_map_close(io_map *m);

/* mkdir -p: every missing directory of the path; errors name it. */
lv_status io_mkdir_p(const char *dir);

/* Whole file into a malloc'd, NUL-terminated buffer. */
lv_status io_read_file(const char *path, char **buf, size_t *size);

/* ---------------- Hugging Face AQLM directories (docs/formats-hf-aqlm.md) ----------------
 * config.json with quantization_config {quant_method "aqlm", nbits_per_codebook,
 * num_codebooks, out_group_size 1, in_group_size g, linear_weights_not_to_quantize}
 * and model.safetensors: per block linear <prefix>.codes (d_out, d_in/g, M) I8
 * (nbits <= 8) or I16, codes >= 2^(nbits-1) stored minus 2^nbits; <prefix>.codebooks
 * (M, 2^nbits, 1, g) F16; <prefix>.scales (d_out, 1, 1, 1) F16; everything else F32. */

/* What an export changed: codes are exact, codebooks and scales are rounded to fp16. */
typedef struct {
    double max_rel_change;  /* max over linears of ||W16 - W||_F / ||W||_F (dequantized) */
    double max_abs_change;  /* max |W16 - W| over all quantized weights */
    char worst[96];         /* HF module of the linear with max_rel_change */
    int n_linears;
    double bits_per_weight; /* codes + fp16 codebooks + fp16 scales, per quantized weight */
    size_t bytes;           /* size of model.safetensors */
} io_hf_aqlm_report;

/* Write q as an HF AQLM directory (created if needed; config.json and
 * model.safetensors replaced atomically). q/k rows (codes, scales) are permuted
 * to HF's rotate-half order when q uses interleaved RoPE. Refuses (before
 * writing anything) a group size that does not divide every in_features,
 * linears with differing configs, and values beyond the fp16 range. rep may be NULL. */
lv_status io_qmodel_write_hf_aqlm(const lv_qmodel *q, const char *dir, io_hf_aqlm_report *rep);

/* *is_aqlm = 1 when dir/config.json has quantization_config.quant_method "aqlm";
 * 0 when it has none (or there is no readable config.json: the HF loader reports
 * that). Another quant_method is LV_ERR_UNSUPPORTED. */
lv_status io_hf_is_aqlm(const char *dir, int *is_aqlm);

/* Read an HF AQLM directory (model.safetensors or sharded index) into a
 * quantized model with cfg.rope = LV_ROPE_HALF (q/k as HF stores them);
 * validates dtypes, shapes, code ranges and finiteness, naming file and tensor.
 * rel_err / block_mse are NaN (unknown). Caller frees with lv_qmodel_free. */
lv_status io_qmodel_read_hf_aqlm(lv_qmodel **out, const char *dir);

/* io_qmodel_read_hf_aqlm + io_qmodel_to_fp (what io_model_open does for such a directory). */
lv_status io_model_open_hf_aqlm(lv_model **out, const char *dir);

/* HF module of linear k of block `layer` ("model.layers.3.self_attn.q_proj"), into buf. */
void io_hf_aqlm_module(char *buf, size_t cap, int layer, lv_lin k);

/* float32 -> IEEE fp16 bits, round to nearest even (overflow -> Inf, NaN kept). */
uint16_t io_f32_to_f16(float f);

/* ---------------- LoRA adapters (ApiQ init, stages/apiq.c) ----------------
 * Blocks may carry LoRA factors (lv_qblock lora_rank / lora_A / lora_B): in
 * model.h5 and block checkpoints they are the optional datasets lora_A
 * (r, d_in) and lora_B (d_out, r) of each linear's group (docs/formats-h5.md). */

/* io_qmodel_to_fp with a choice: apply_lora 1 adds each present adapter
 * (What + B A, what io_qmodel_to_fp does), 0 gives the quantized weights alone. */
lv_status io_qmodel_to_fp_opts(const lv_qmodel *q, int apply_lora, lv_model **out);

/* Adapter storage per quantized weight at 16 bits per parameter:
 * 16 * sum over adapters of r (d_out + d_in) / (all linear weights); 0 without
 * adapters. Not part of lv_qmodel_bits_per_weight (adapters are trained further,
 * not a compression of W). *n_params (may be NULL) = the LoRA parameter count. */
double io_qmodel_lora_bits_per_weight(const lv_qmodel *q, int64_t *n_params);

/* The adapters of q as a PEFT LoRA directory (created if needed; files replaced
 * atomically): DIR/adapter_model.safetensors with, per block l and adapted
 * linear, base_model.model.model.layers.{l}.{self_attn.q_proj ... mlp.up_proj}
 * .lora_A.weight (r, in) and .lora_B.weight (out, r), and DIR/adapter_config.json
 * (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha = r so the scaling is 1,
 * target_modules, bias none, base_model_name_or_path null). q/k rows of lora_B
 * are permuted to HF's rotate-half order when q uses interleaved RoPE (as the HF
 * exports permute the weights). Every block must have the same rank and the
 * same adapted linears; float32 tensors. */
lv_status io_qmodel_write_peft_lora(const lv_qmodel *q, const char *dir);

typedef struct {
    int fp16;                   /* 1: F16 tensors (values beyond the fp16 range refused) */
    const char *base_model;     /* base_model_name_or_path (NULL: JSON null), borrowed */
} io_peft_lora_opts;
/* io_qmodel_write_peft_lora with options (opts NULL: the defaults above). */
lv_status io_qmodel_write_peft_lora_opts(const lv_qmodel *q, const char *dir,
                                         const io_peft_lora_opts *opts);

/* ---------------- quantized models run from their codes (io/qmodel_view.c) ---------------- */

/* *out = q as an FP model shell whose linears stay quantized: every lv_layer.aq[k]
 * points to q's block linear, the float linear pointers are NULL, embeddings, norms and
 * classifier point into q. The forward (kern_block_forward, kern_decode_step) multiplies
 * straight from the codes (kern_qmm.h). q is borrowed and must outlive *out; free *out
 * with io_model_free (it owns only the shell). Checks every linear's shape. */
lv_status io_qmodel_view(const lv_qmodel *q, lv_model **out);

/* Open a model for inference. A quantized model (llmvq .h5 file, HF AQLM directory) is
 * read into *q and *out is its io_qmodel_view; any other model is io_model_open'ed
 * (AUTO) with *q = NULL. Free *out (io_model_free) before *q (lv_qmodel_free). */
lv_status io_model_open_quantized(lv_model **out, lv_qmodel **q, const char *path);

#endif
