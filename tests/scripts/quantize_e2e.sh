#!/usr/bin/env bash
# End-to-end quantization of the real stories260K with the shipped demo job
# (jobs/stories260K-2bit.ini: one codebook shared by all linears): bits per
# weight, perplexities in summary.json, `llmvq eval` of the written model.h5
# agreeing with the summary, the codebook stored once.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit.ini
TXT=$LLMVQ_DEMO_DIR/tinystories_val_subset.txt
PY=$(command -v python3)
O=$T/out
if ! "$LLMVQ_BIN" quantize "$JOB" --set output.dir="$O" --set output.eval_max_tokens=20000 >"$T/stdout" 2>"$T/log"; then
  bad "quantize failed: $(tail -n 5 "$T/log")"; finish; exit 1
fi
grep -q "perplexity FP" "$T/stdout" && ok "prints perplexity before/after: $(cat "$T/stdout")" || bad "no perplexity line"
[ "$(grep -c '^\[llmvq .*\] block [0-9]/5 done' "$T/log")" = 5 ] && ok "one progress line per block" || bad "progress lines: $(grep -c 'block' "$T/log")"
grep -q 'ETA' "$T/log" && ok "progress has ETA" || bad "no ETA"
"$PY" - "$O/summary.json" <<'PYEOF' && ok "summary.json values" || bad "summary.json values"
import json, sys, math
s = json.load(open(sys.argv[1]))
print("   bpw_total %.3f ppl_fp %.4f ppl_quant %.4f wall_s %.1f" % (s["bpw_total"], s["ppl_fp"], s["ppl_quant"], s["wall_s"]))
assert 2.0 < s["bpw_total"] <= 2.5, s["bpw_total"]
assert abs(s["ppl_fp"] - 4.0653) < 0.001, s["ppl_fp"]  # FP on the first 20000 tokens, ctx 512
assert math.isfinite(s["ppl_quant"]) and s["ppl_fp"] < s["ppl_quant"] < 14, s["ppl_quant"]  # measured 11.1
assert len(s["blocks"]) == 5 and all(0 <= b["block_mse"] < 1 for b in s["blocks"])
assert s["blocks_resumed"] == 0
PYEOF
# the written model evaluates to the same perplexity through `llmvq eval`
if "$LLMVQ_BIN" eval --quiet --json --model "$O/model.h5" --tokenizer "$LLMVQ_DEMO_DIR/tok512.bin" --data "$TXT" --max-tokens 20000 >"$T/eval.json"; then
  "$PY" -c "
import json,sys; a=json.load(open(sys.argv[1]))['ppl_quant']; b=json.load(open(sys.argv[2]))['ppl']
sys.exit(0 if abs(a-b) <= 1e-9*a else 1)" "$O/summary.json" "$T/eval.json" \
    && ok "llmvq eval of model.h5 equals summary ppl_quant" || bad "eval of model.h5 differs from summary"
else
  bad "llmvq eval of model.h5 failed: $(cat "$T/eval.json")"
fi
"$LLMVQ_BIN" inspect "$O" >"$T/inspect.txt" 2>&1 && grep -q "5 of 5 blocks done and verified, 0 corrupt, 0 left" "$T/inspect.txt" \
  && ok "inspect: all blocks verified" || bad "inspect: $(cat "$T/inspect.txt")"
h5dump -A "$O/model.h5" >/dev/null 2>&1 && ok "model.h5 readable by h5dump" || bad "h5dump cannot read model.h5"
# one codebook tensor at the root, none per linear
h5ls -r "$O/model.h5" >"$T/ls.txt" 2>&1
[ "$(grep -c 'codebooks' "$T/ls.txt")" = 1 ] && grep -q '^/codebooks ' "$T/ls.txt" \
  && ok "shared codebooks stored once (/codebooks)" || bad "codebooks in model.h5: $(grep codebooks "$T/ls.txt" | head -3)"
# a rerun of the finished job resumes every block and gives the same bytes
cp "$O/model.h5" "$T/first.h5"
"$LLMVQ_BIN" quantize "$JOB" --quiet --set output.dir="$O" --set output.eval_data= >/dev/null 2>&1 \
  && cmp -s "$O/model.h5" "$T/first.h5" && ok "rerun resumes all blocks, same model.h5" || bad "rerun differs"
"$PY" -c "import json,sys; sys.exit(0 if json.load(open(sys.argv[1]))['blocks_resumed']==5 else 1)" "$O/summary.json" \
  && ok "rerun recomputed no block" || bad "rerun recomputed blocks"
# bad job files and values are errors naming the key
printf '[model]\npath = x.bin\n[quant]\nnbits = 99\n' >"$T/bad.ini"
expect_error "bad value in job file" "bad.ini.*quant.nbits" "$LLMVQ_BIN" quantize "$T/bad.ini"
expect_error "unknown --set key" "quant.nbitz" "$LLMVQ_BIN" quantize "$JOB" --set quant.nbitz=2
expect_error "missing calibration data" "nothere.txt" "$LLMVQ_BIN" quantize "$JOB" --quiet --set calibration.data="$T/nothere.txt" --set output.dir="$T/o2"
expect_error "calibration.skip_tokens past the end" "calibration.skip_tokens = 99999999 leaves fewer than one sequence" "$LLMVQ_BIN" quantize "$JOB" --quiet --set calibration.skip_tokens=99999999 --set output.dir="$T/o3"
finish
