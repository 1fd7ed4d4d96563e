#!/usr/bin/env bash
# ApiQ job (jobs/stories260K-2bit-apiq.ini): the quantized model with its
# ApiQ-initialised adapters has a lower perplexity than the same job's plain
# AQLM model (apiq.rank = 0), before any training; `llmvq eval` of model.h5
# applies the adapters; `llmvq export --format peft-lora` writes a PEFT
# adapter directory; ApiQ with shared codebooks or block fine-tuning is refused.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-apiq.ini
PY=$(command -v python3)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
common=(--quiet --set calibration.nsamples=32 --set output.eval_max_tokens=20000)
"$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/apiq" >"$T/out1" 2>"$T/log1" \
  || { bad "apiq job failed: $(tail -n 3 "$T/log1")"; finish; exit 1; }
"$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set apiq.rank=0 --set output.dir="$T/plain" >/dev/null 2>"$T/log2" \
  || { bad "plain job failed: $(tail -n 3 "$T/log2")"; finish; exit 1; }
"$PY" - "$T/apiq/summary.json" "$T/plain/summary.json" <<'PYEOF' && ok "$(cat "$T/out1")" || bad "summary values"
import json, sys
a = json.load(open(sys.argv[1])); p = json.load(open(sys.argv[2]))
print("   with adapters %.3f, plain AQLM %.3f, ApiQ What without adapters %.3f, bpw %.3f + %.3f (fp16 adapters)"
      % (a["ppl_quant"], p["ppl_quant"], a["ppl_quant_no_lora"], a["bpw_total"], a["lora_bits_per_weight_fp16"]))
assert a["ppl_quant"] < p["ppl_quant"], (a["ppl_quant"], p["ppl_quant"])
assert abs(a["bpw_total"] - p["bpw_total"]) < 1e-12
assert a["lora_rank"] == 8 and a["lora_params"] > 0
PYEOF
if "$LLMVQ_BIN" eval --quiet --json --model "$T/apiq/model.h5" --tokenizer "$LLMVQ_DEMO_DIR/tok512.bin" \
     --data "$LLMVQ_DEMO_DIR/tinystories_val_subset.txt" --max-tokens 20000 >"$T/eval.json"; then
  "$PY" -c "
import json,sys; a=json.load(open(sys.argv[1]))['ppl_quant']; b=json.load(open(sys.argv[2]))['ppl']
sys.exit(0 if abs(a-b) <= 1e-9*a else 1)" "$T/apiq/summary.json" "$T/eval.json" \
    && ok "llmvq eval of model.h5 applies the adapters (same ppl as the summary)" || bad "eval differs from summary"
else
  bad "eval failed: $(cat "$T/eval.json")"
fi
if "$LLMVQ_BIN" export --model "$T/apiq/model.h5" --format peft-lora --out "$T/peft" 2>"$T/log3"; then
  "$PY" - "$T/peft" <<'PYEOF' && ok "peft-lora export: adapter_config.json + adapter_model.safetensors" || bad "peft export content"
import json, struct, sys, os
d = sys.argv[1]
c = json.load(open(os.path.join(d, "adapter_config.json")))
assert c["peft_type"] == "LORA" and c["r"] == 8, c
with open(os.path.join(d, "adapter_model.safetensors"), "rb") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
keys = [k for k in h if k != "__metadata__"]
assert len(keys) == 5 * 7 * 2, len(keys)
a = h["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]["shape"]
assert a == [8, 64], a
PYEOF
else
  bad "peft export failed: $(cat "$T/log3")"
fi
expect_error "ApiQ with block fine-tuning" "apiq.rank.*finetune.enable" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet --set finetune.enable=true --set output.dir="$T/o3"
expect_error "peft export of a model without adapters" "adapter" \
  "$LLMVQ_BIN" export --model "$T/plain/model.h5" --format peft-lora --out "$T/peft2"
finish
