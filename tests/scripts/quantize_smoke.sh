#!/usr/bin/env bash
# A small quantize run through every stage (calibration, VPTQ init, AQLM,
# fine-tuning, checkpoint, assembly, both evaluations): the run the sanitizer
# pass makes, where quantize_e2e (the shipped job) is too slow.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
PY=$(command -v python3)
O=$T/out
if "$LLMVQ_BIN" quantize "$JOB" --quiet --set output.dir="$O" --set calibration.nsamples=6 \
     --set calibration.seqlen=64 --set quant.max_iters=2 --set finetune.max_epochs=2 \
     --set output.eval_max_tokens=3000 >"$T/stdout" 2>"$T/log"; then
  ok "quantize: $(cat "$T/stdout")"
else
  bad "quantize failed: $(tail -n 5 "$T/log")"; finish; exit 1
fi
"$PY" - "$O/summary.json" <<'PYEOF' && ok "summary.json: finite perplexities, bpw" || bad "summary.json"
import json, sys, math
s = json.load(open(sys.argv[1]))
assert 2.0 < s["bpw_total"] <= 2.5 and math.isfinite(s["ppl_quant"]) and s["ppl_quant"] > s["ppl_fp"]
PYEOF
"$LLMVQ_BIN" inspect "$O" >/dev/null 2>&1 && ok "inspect verifies every block" || bad "inspect"
finish
