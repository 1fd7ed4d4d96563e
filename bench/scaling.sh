#!/usr/bin/env bash
# Scaling of the quantize phase, 1 vs 2 MPI ranks (issue 5): a synthetic model
# with LLaMA shapes large enough that compute dominates (4 blocks, dim 512,
# hidden 1376), propagation = fp, one thread per rank. Prints both wall times,
# the speedup, and checks the two model.h5 are byte-identical.
#   bash bench/scaling.sh [BUILD_DIR]      (default: build)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin=$root/${1:-build}/llmvq
work=$(mktemp -d /tmp/llmvq-scaling.XXXXXX)
trap 'rm -rf "$work"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
cat >"$work/config.json" <<'JSON'
{"model_type": "llama", "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
 "num_attention_heads": 8, "num_key_value_heads": 8, "vocab_size": 512,
 "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "tie_word_embeddings": false}
JSON
"$bin" synth --config "$work/config.json" --out "$work/model.bin" --seed 1 2>/dev/null
cat >"$work/job.ini" <<INI
[model]
path = model.bin
tokenizer = $root/jobs/demo/tok512.bin
[calibration]
data = $root/jobs/demo/tinystories_val_subset.txt
nsamples = 16
seqlen = 128
[quant]
num_codebooks = 1
nbits = 6
group_size = 4
max_iters = 2
propagation = fp
[finetune]
enable = false
INI
t0=$(date +%s.%N)
"$bin" quantize "$work/job.ini" --quiet --set output.dir="$work/r1" >/dev/null
t1=$(date +%s.%N)
mpirun -np 2 "$bin" quantize "$work/job.ini" --quiet --set output.dir="$work/r2" >/dev/null
t2=$(date +%s.%N)
awk -v a="$t0" -v b="$t1" -v c="$t2" 'BEGIN{printf "1 rank: %.1f s   2 ranks: %.1f s   speedup %.2fx (target >= 1.8)\n", b-a, c-b, (b-a)/(c-b)}'
cmp -s "$work/r1/model.h5" "$work/r2/model.h5" && echo "model.h5 byte-identical for 1 and 2 ranks" \
  || { echo "model.h5 differs between 1 and 2 ranks"; exit 1; }
