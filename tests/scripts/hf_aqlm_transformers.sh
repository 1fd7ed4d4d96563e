#!/usr/bin/env bash
# transformers + the aqlm package load `llmvq export --format hf-aqlm` and give
# llmvq's logits on 8 TinyStories prompts (tools/hf_aqlm_check.py): the real
# quantized stories260K (1x8g4: aqlm's numba kernel) and synthetic models whose
# codes include the edges of aqlm's signed storage (2x8g4; 2x6g4, 1x12g4 and
# 1x16g4: aqlm's dequantize path). Skipped (77) when $LLMVQ_PYTHON (default
# python3) cannot import torch, transformers and aqlm.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}" "${LLMVQ_HF_LOGITS:?}"
PY=${LLMVQ_PYTHON:-python3}
if ! why=$("$PY" -c "import torch, transformers, aqlm, numba" 2>&1); then
  echo "SKIP: $PY cannot import torch, transformers, aqlm and numba ($(echo "$why" | tail -n 1));"
  echo "      set LLMVQ_PYTHON to a python with them (pip install torch transformers 'aqlm[cpu]')"
  exit 77
fi
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit.ini
M=$LLMVQ_DEMO_DIR/stories260K.bin
TOK=$LLMVQ_DEMO_DIR/tok512.bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
TOL=${LLMVQ_HF_LOGIT_TOL:-2e-4}  # measured max 3.05e-5 (max |logit| 20.5)
awk 'NF' "$LLMVQ_DEMO_DIR/tinystories_val_subset.txt" | head -n 8 >"$T/prompts.txt"

# check NAME MODEL.h5: export, llmvq's logits, transformers' logits.
check() {
  local name=$1 h5=$2 d=$T/$1
  if ! "$LLMVQ_BIN" export --model "$h5" --format hf-aqlm --out "$d" 2>"$T/$name.xlog"; then
    bad "$name: export failed: $(cat "$T/$name.xlog")"; return
  fi
  if ! "$LLMVQ_HF_LOGITS" logits --model "$d" --tokenizer "$TOK" --prompts "$T/prompts.txt" \
       --tokens "$T/$name.json" --logits "$T/$name.f32" 2>"$T/$name.llog"; then
    bad "$name: llmvq logits failed: $(cat "$T/$name.llog")"; return
  fi
  if "$PY" "$LLMVQ_SOURCE_DIR/tools/hf_aqlm_check.py" --model "$d" --tokens "$T/$name.json" \
       --logits "$T/$name.f32" --tol "$TOL" >"$T/$name.out" 2>"$T/$name.err"; then
    ok "$name: $(tail -n 1 "$T/$name.out")"
  else
    bad "$name: $(tail -n 1 "$T/$name.out") $(grep -v Warn "$T/$name.err" | tail -n 3)"
  fi
}

if "$LLMVQ_BIN" quantize "$JOB" --quiet --set output.dir="$T/q" --set quant.group_size=4 \
     --set finetune.enable=false --set output.eval_data= >/dev/null 2>"$T/qlog"; then
  check stories260K-1x8g4 "$T/q/model.h5"
else
  bad "quantize failed: $(tail -n 3 "$T/qlog")"
fi
for cfg in "2 8" "2 6" "1 12" "1 16"; do
  set -- $cfg
  name=synth-${1}x${2}g4
  if "$LLMVQ_HF_LOGITS" synth --from "$M" --M "$1" --nbits "$2" --g 4 --seed 5 --out "$T/$name.h5" 2>"$T/$name.slog"; then
    check "$name" "$T/$name.h5"
  else
    bad "$name: synth failed: $(cat "$T/$name.slog")"
  fi
done
finish
