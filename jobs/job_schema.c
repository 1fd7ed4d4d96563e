/* job_schema.c: every job-file key, its type, default and help. Append-only in
 * spirit: renaming a key breaks users' job files. */
#include "job.h"

#define NOLIM 0, 0

static const job_key schema[] = {
    /* [model] */
    {"model", "path", JOB_PATH, NULL, NOLIM, NULL,
     "model to quantize: llama2.c .bin or Hugging Face directory"},
    {"model", "tokenizer", JOB_PATH, "", NOLIM, NULL,
     "llama2.c tokenizer.bin for text data (default: tokenizer.bin or tok<vocab>.bin beside the model)"},

    /* [calibration] */
    {"calibration", "data", JOB_PATH, NULL, NOLIM, NULL,
     "calibration text or token file (LVQTOK01)"},
    {"calibration", "nsamples", JOB_INT, "128", 1, 1 << 20, NULL,
     "calibration sequences"},
    {"calibration", "seqlen", JOB_INT, "0", 0, 1 << 20, NULL,
     "tokens per calibration sequence (0 = the model's seq_len)"},
    {"calibration", "skip_tokens", JOB_INT, "0", 0, 9.0e15, NULL,
     "calibration sequences come from the tokens after the first skip_tokens of "
     "calibration.data (with output.eval_max_tokens = skip_tokens and the same file, "
     "calibration and evaluation text are disjoint)"},
    
    /* [quant] */
    {"quant", "num_codebooks", JOB_INT, "1", 1, 8, NULL,
     "additive codebooks per group (AQLM M)"},
    {"quant", "nbits", JOB_INT, "8", 1, 16, NULL,
     "bits per code: each codebook has 2^nbits entries (AQLM B)"},
    {"quant", "group_size", JOB_INT, "8", 1, 64, NULL,
     "input weights per code (AQLM in_group_size)"},
    {"quant", "beam_size", JOB_INT, "8", 1, 256, NULL, "beam width of the code search"},
    {"quant", "max_iters", JOB_INT, "20", 1, 10000, NULL,
     "maximum alternations of code search and codebook update"},
    {"quant", "rel_tol", JOB_FLOAT, "0.01", 0, 1, NULL,
     "stop alternating when the relative error improves by less than this fraction"},
    {"quant", "adam_lr", JOB_FLOAT, "1e-3", 0, 1, NULL,
     "Adam learning rate of the codebook update (codebooks are scaled to ~1)"},
    {"quant", "adam_steps", JOB_INT, "100", 1, 100000, NULL,
     "Adam steps per codebook update"},
    {"quant", "kmeans_iters", JOB_INT, "20", 1, 10000, NULL,
     "k-means iterations of the codebook initialisation"},
    {"quant", "codebook_update", JOB_ENUM, "adam", NOLIM, "adam|lstsq",
     "codebook update between code searches: Adam or closed-form least squares"},
    {"quant", "propagation", JOB_ENUM, "quantized", NOLIM, "quantized|fp",
     "inputs of the next block: outputs of the quantized block (AQLM) or of the FP one (parallel)"},
    {"quant", "scale_bits", JOB_ENUM, "16", NOLIM, "16|8",
     "bits per output-channel scale: 16 (fp16), or 8 (per linear an fp16 base, the largest "
     "scale, and per row q in 0..255 for base * 2^(-q/32), rounded to fp16; steps of 2.2 %, "
     "8 octaves; set as each block is done and after PV-tuning; counted in bits per weight)"},
    {"quant", "fp16", JOB_BOOL, "true", NOLIM, NULL,
     "round codebooks and scales to fp16 values once each block is done (and after "
     "PV-tuning): model.h5 then holds exactly what bits_per_weight counts and what "
     "`export --format hf-aqlm` stores (a lossless export), and 1x16 codebooks take the fp16 "
     "path of the inference kernels; false keeps them fp32 (what older model.h5 files hold)"},
    {"quant", "outlier_cols", JOB_INT, "0", 0, 4096, NULL,
     "outlier columns per linear (VPTQ): after the codes are chosen, this many input columns, "
     "picked greedily by how much they lower the layer's Hessian-weighted error, get a dense "
     "16-bit correction (the exact minimiser given the codes), counted in bits per weight "
     "(16 x out_features + 32 bits per column); fixed during fine-tuning; 0 = none. Not with "
     "PV-tuning, ApiQ or export --format hf-aqlm"},
    {"quant", "share_codebooks", JOB_ENUM, "none", NOLIM, "none|model|type",
     "none: codebooks per linear; model: ONE codebook tensor for every linear of the model "
     "(stored and counted once; needs propagation = fp; for small models, where per-linear "
     "codebooks cost more bits than the codes); type: one codebook tensor per linear type "
     "(wq of every block, wk of every block, ...: 7 tensors; needs propagation = fp)"},

    /* [finetune] */
    {"finetune", "enable", JOB_BOOL, "true", NOLIM, NULL,
     "block fine-tuning: codebooks, scales and norms trained with Adam to match the FP block"},
    {"finetune", "lr", JOB_FLOAT, "1e-3", 0, 1, NULL, "Adam learning rate"},
    {"finetune", "max_epochs", JOB_INT, "20", 1, 100000, NULL,
     "epochs over the block's calibration sequences"},
    {"finetune", "batch_seqs", JOB_INT, "8", 1, 1 << 20, NULL, "sequences per Adam step"},
    {"finetune", "patience", JOB_INT, "3", 1, 1000, NULL,
     "stop after this many epochs without held-out improvement"},
    {"finetune", "holdout", JOB_FLOAT, "0.1", 0, 0.5, NULL,
     "fraction of the calibration sequences held out for early stopping"},
    {"finetune", "freeze_norms", JOB_BOOL, "false", NOLIM, NULL,
     "keep the RMSNorm weights of the FP model"},

    /* [pvtune] */
    {"pvtune", "enable", JOB_BOOL, "false", NOLIM, NULL,
     "PV-tuning after the blocks: the whole quantized model is fine-tuned against the FP "
     "model (V steps: Adam on codebooks, scales and norms; P steps: codes re-searched within "
     "a budget), on the calibration sequences"},
    {"pvtune", "loss", JOB_ENUM, "kl", NOLIM, "kl|ce",
     "kl: KL divergence to the FP model's next-token distributions; ce: next-token cross-entropy"},
    {"pvtune", "nsamples", JOB_INT, "0", 0, 1 << 24, NULL,
     "sequences (calibration.seqlen tokens, random crops of calibration.data after "
     "calibration.skip_tokens, their own seed) PV-tuning trains and holds out on; 0: the "
     "calibration sequences"},
    {"pvtune", "data", JOB_ENUM, "text", NOLIM, "text|model",
     "text: PV-tuning's sequences are crops of calibration.data; model: stories sampled from the "
     "FP model (temperature 1, from BOS, seeded by run.seed; rank 0 samples, every rank gets "
     "them), as many tokens as pvtune.nsamples x calibration.seqlen"},
    {"pvtune", "device", JOB_ENUM, "cpu", NOLIM, "cpu|cuda",
     "where the blocks' forward and backward run: cpu, or cuda (the current GPU; needs a "
     "CUDA build and device; equal to the CPU to fp32 rounding, not bit for bit)"},
    {"pvtune", "lr", JOB_FLOAT, "1e-3", 0, 1, NULL, "V-step Adam learning rate"},
    {"pvtune", "max_epochs", JOB_INT, "4", 1, 100000, NULL, "passes over the training sequences"},
    {"pvtune", "batch_seqs", JOB_INT, "16", 1, 1 << 20, NULL, "sequences per V step"},
    {"pvtune", "micro_batch", JOB_INT, "4", 1, 1 << 20, NULL,
     "sequences per forward/backward pass (the memory bound)"},
    {"pvtune", "patience", JOB_INT, "4", 1, 1000, NULL,
     "held-out evaluations without improvement before stopping"},
    {"pvtune", "eval_every", JOB_INT, "0", 0, 1 << 20, NULL,
     "V steps between held-out evaluations (0: once per epoch)"},
    {"pvtune", "holdout", JOB_FLOAT, "0.1", 0, 0.5, NULL, "fraction of the sequences held out"},
    {"pvtune", "p_every", JOB_INT, "0", -1, 1 << 20, NULL,
     "V steps between P steps (0 or -1: no P steps, V steps only)"},
    {"pvtune", "p_budget", JOB_FLOAT, "1e-3", 0, 1, NULL,
     "at most this fraction of all code groups changes per P step"},
    {"pvtune", "checkpoint_every", JOB_INT, "20", 0, 1 << 20, NULL,
     "V steps between checkpoints of the whole PV-tuning state (CKPT/pv_state.h5: model, "
     "Adam moments, best snapshot, data order; a rerun continues from it bit-identically); "
     "0: only on a stop signal"},
    {"pvtune", "train_embeddings", JOB_BOOL, "false", NOLIM, NULL,
     "also train the token embeddings and classifier (not quantized, so outside the bits per "
     "weight; AQLM/PV-Tuning's update_non_quantized_parameters); they are written to model.h5"},
    {"pvtune", "p_lr", JOB_FLOAT, "1", 0, 1e6, NULL,
     "P-step target What - p_lr * dL/dWhat that the codes are re-searched towards"},

    /* [apiq] */
    {"apiq", "rank", JOB_INT, "0", 0, 4096, NULL,
     "ApiQ: rank of the LoRA adapters initialised jointly with each linear's quantization so "
     "that its calibration outputs are preserved (0 = none); eval applies them, export "
     "--format peft-lora writes them; needs share_codebooks = none and finetune.enable = false"},
    {"apiq", "iters", JOB_INT, "2", 1, 16, NULL,
     "ApiQ alternations of (quantize W - B A, refit B A to the residual)"},

    /* [run] */
    {"run", "seed", JOB_INT, "0", 0, 9.0e15, NULL,
     "seed of every random choice: same job + seed = bit-identical codes"},
    {"run", "checkpoint_dir", JOB_PATH, "", NOLIM, NULL,
     "where finished blocks are checkpointed (default: OUTPUT_DIR/checkpoint)"},
    {"run", "comm_timeout_s", JOB_FLOAT, "600", 0.1, 1e6, NULL,
     "seconds a rank waits for a message before it declares its peer dead (a rank that keeps "
     "finishing blocks is waited for as long as it needs: 3x its longest block)"},
    {"run", "scratch_dir", JOB_PATH, "", NOLIM, NULL,
     "node-local directory for calibration activations that do not fit in RAM: they are "
     "kept in unlinked spill files there (default: RAM)"},

    /* [output] */
    {"output", "dir", JOB_PATH, "out", NOLIM, NULL,
     "output directory: model.h5 and summary.json"},
    {"output", "eval_data", JOB_PATH, "", NOLIM, NULL,
     "text or token file for perplexity before/after (default: none)"},
    {"output", "eval_max_tokens", JOB_INT, "0", 0, 9.0e15, NULL,
     "evaluate on the first N tokens of eval_data only (0 = all)"},
    {"output", "eval_ctx", JOB_INT, "0", 0, 1 << 20, NULL,
     "evaluation window (0 = the model's seq_len)"},
    };

const job_key *job_schema(int *n)
{
    *n = (int)(sizeof schema / sizeof schema[0]);
    return schema;
}
