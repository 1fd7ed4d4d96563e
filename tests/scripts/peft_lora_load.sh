#!/usr/bin/env bash
# Hugging Face PEFT loads `llmvq export --format peft-lora` onto the base model
# `llmvq convert --no-lora` writes (What alone, HF form) and gives llmvq's logits
# of the ApiQ model (What + B A) on 8 TinyStories prompts (tools/peft_check.py);
# with PEFT's adapters disabled they are far off. A quick ApiQ quantization of
# stories260K (jobs/stories260K-2bit-apiq.ini, 16 x 128 calibration). The
# --no-lora error paths run first; the rest is skipped (77) when $LLMVQ_PYTHON
# (default python3) cannot import torch, transformers and peft.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}" "${LLMVQ_HF_LOGITS:?}"
PY=${LLMVQ_PYTHON:-python3}
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-apiq.ini
M=$LLMVQ_DEMO_DIR/stories260K.bin
TOK=$LLMVQ_DEMO_DIR/tok512.bin
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} OPENBLAS_NUM_THREADS=${OPENBLAS_NUM_THREADS:-1}
TOL=${LLMVQ_PEFT_LOGIT_TOL:-2e-4}  # measured max 5.8e-5 (max |logit| 19.6)

expect_error "convert --no-lora of a llama2.c model" "--no-lora takes a quantized model.h5.*stories260K.bin" \
  "$LLMVQ_BIN" convert --model "$M" --no-lora --out "$T/x"
if "$LLMVQ_BIN" convert --model "$M" --out "$T/fp-hf" 2>/dev/null; then
  expect_error "convert --no-lora of an HF directory" "--no-lora takes a quantized model.h5.*fp-hf" \
    "$LLMVQ_BIN" convert --model "$T/fp-hf" --no-lora --out "$T/x"
else
  bad "convert of $M to HF failed"
fi
if ! why=$("$PY" -c "import torch, transformers, peft" 2>&1); then
  [ "$FAILS" -eq 0 ] || { finish; exit 1; }
  echo "SKIP: $PY cannot import torch, transformers and peft ($(echo "$why" | tail -n 1));"
  echo "      set LLMVQ_PYTHON to a python with them (pip install torch transformers peft)"
  exit 77
fi

"$LLMVQ_BIN" quantize "$JOB" --quiet --set output.dir="$T/q" --set calibration.nsamples=16 \
    --set calibration.seqlen=128 --set output.eval_max_tokens=4000 >/dev/null 2>"$T/qlog" \
  || { bad "quantize failed: $(tail -n 3 "$T/qlog")"; finish; exit 1; }
"$LLMVQ_BIN" convert --model "$T/q/model.h5" --no-lora --to hf --out "$T/base" 2>"$T/clog" \
  || { bad "convert --no-lora failed: $(cat "$T/clog")"; finish; exit 1; }
# The HF base is What alone: llmvq's perplexity of it is the summary's ppl_quant_no_lora.
if "$LLMVQ_BIN" eval --quiet --json --model "$T/base" --tokenizer "$TOK" \
     --data "$LLMVQ_DEMO_DIR/tinystories_val_subset.txt" --max-tokens 4000 >"$T/eval.json"; then
  "$PY" - "$T/q/summary.json" "$T/eval.json" <<'PYEOF' && ok "$(cat "$T/eval.txt")" || bad "convert --no-lora: $(cat "$T/eval.txt")"
import json, sys
s = json.load(open(sys.argv[1])); e = json.load(open(sys.argv[2]))["ppl"]
msg = "convert --no-lora: ppl %.6f, summary's ppl_quant_no_lora %.6f (with adapters %.4f)" % (
    e, s["ppl_quant_no_lora"], s["ppl_quant"])
open(sys.argv[2].replace(".json", ".txt"), "w").write(msg)
sys.exit(0 if abs(e - s["ppl_quant_no_lora"]) <= 1e-5 * e and abs(e - s["ppl_quant"]) > 1e-3 * e else 1)
PYEOF
else
  bad "eval of the --no-lora HF base failed: $(cat "$T/eval.json")"
fi
"$LLMVQ_BIN" export --model "$T/q/model.h5" --format peft-lora --out "$T/adapter" 2>"$T/xlog" \
  || { bad "peft-lora export failed: $(cat "$T/xlog")"; finish; exit 1; }
awk 'NF' "$LLMVQ_DEMO_DIR/tinystories_val_subset.txt" | head -n 8 >"$T/prompts.txt"
"$LLMVQ_HF_LOGITS" logits --model "$T/q/model.h5" --tokenizer "$TOK" --prompts "$T/prompts.txt" \
    --tokens "$T/tokens.json" --logits "$T/logits.f32" 2>"$T/llog" \
  || { bad "llmvq logits failed: $(cat "$T/llog")"; finish; exit 1; }
if "$PY" "$LLMVQ_SOURCE_DIR/tools/peft_check.py" --base "$T/base" --adapter "$T/adapter" \
     --tokens "$T/tokens.json" --logits "$T/logits.f32" --tol "$TOL" >"$T/out" 2>"$T/err"; then
  ok "PEFT: $(tail -n 2 "$T/out" | tr '\n' ' ')"
else
  bad "PEFT: $(tail -n 2 "$T/out" | tr '\n' ' ') $(grep -v Warn "$T/err" | tail -n 3)"
fi
finish
