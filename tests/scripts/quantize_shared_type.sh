#!/usr/bin/env bash
# quant.share_codebooks = type (one codebook per linear type, shared by the
# blocks): 1 process and 2 ranks give the same bytes, the log and inspect name
# the sharing, bits per weight count the 7 codebooks once each, eval reads the
# model, and resume after losing a block file reuses shared_aqlm.h5 and gives
# the same bytes. Labelled slow (out of the sanitizer pass, where
# test_shared_codebooks and test_stage_pvtune cover the type mode).
. "$(dirname "$0")/lib.sh"
# eval_reads NAME DIR: llmvq eval reads DIR/model.h5 (2000 tokens)
eval_reads() {
  "$LLMVQ_BIN" eval --quiet --model "$2/model.h5" --tokenizer "$LLMVQ_SOURCE_DIR/jobs/demo/tok512.bin" \
    --data "$LLMVQ_SOURCE_DIR/jobs/demo/tinystories_val_subset.txt" \
    --max-tokens 2000 >"$2.eval" 2>&1 && grep -q "^ppl " "$2.eval" && ok "$1: eval reads the model" \
    || bad "$1: eval failed: $(tail -n 3 "$2.eval")"
}
shared_small_ref || bad "model-shared reference run failed: $(tail -n 3 "$T/log1")"
# quant.share_codebooks = type: one codebook per linear type; 1 process and 2
# ranks give the same bytes, the file says so, eval reads it, resume after
# losing a block file reuses shared_aqlm.h5 and gives the same bytes
typ=("${common[@]}" --set quant.share_codebooks=type)
"$LLMVQ_BIN" quantize "$JOB" "${typ[@]}" --set output.dir="$T/t1" >/dev/null 2>"$T/logt1" \
  && ok "type: 1 process" || bad "type: 1 process failed: $(tail -n 3 "$T/logt1")"
grep -q "shared AQLM: 7 codebooks (one per linear type) over 35 linears" "$T/logt1" \
  && ok "type: 7 codebooks fitted" || bad "type: no per-type AQLM log line: $(grep -i 'shared AQLM' "$T/logt1")"
"$LLMVQ_BIN" inspect "$T/t1/model.h5" 2>&1 | grep -q "one codebook per linear type" \
  && ok "type: inspect names the sharing" || bad "type: inspect says $("$LLMVQ_BIN" inspect "$T/t1/model.h5" 2>&1)"
python3 - "$T/t1/summary.json" "$T/np1/summary.json" <<'PY' && ok "type: bpw = model-shared bpw + 6 codebooks" || bad "type: bpw accounting"
import json, sys
t = json.load(open(sys.argv[1]))["bpw_total"]; m = json.load(open(sys.argv[2]))["bpw_total"]
extra = 6 * 256 * 4 * 16 / 226560  # six more 1x8g4 codebooks over stories260K's 226,560 linear weights
print(f"  type {t:.6f}, model {m:.6f}, difference {t - m:.6f} (expected {extra:.6f})")
sys.exit(0 if abs(t - m - extra) < 1e-9 else 1)
PY
eval_reads type "$T/t1"
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${typ[@]}" --set output.dir="$T/t2" >/dev/null 2>"$T/logt2"; then
  cmp -s "$T/t1/model.h5" "$T/t2/model.h5" && ok "type: 2 ranks byte-identical to 1 process" || bad "type: 2 ranks differ"
else
  bad "type: 2 ranks failed: $(tail -n 3 "$T/logt2")"
fi
rm -f "$T/t1/checkpoint/block_003.h5"
if "$LLMVQ_BIN" quantize "$JOB" "${typ[@]}" --set output.dir="$T/t1" >/dev/null 2>"$T/logt1r"; then
  grep -q "shared AQLM resumed from" "$T/logt1r" && cmp -s "$T/t1/model.h5" "$T/t2/model.h5" \
    && ok "type: resume reuses shared_aqlm.h5, same bytes" || bad "type: resume: $(grep -i shared "$T/logt1r" | head -3)"
else
  bad "type: rerun failed: $(tail -n 3 "$T/logt1r")"
fi

# quant.scale_bits = 8 (on the model-shared job): 16 bits per linear + 8 per row in bits per
# weight, inspect says so, eval reads the model (the reader checks the grid), 2 ranks same bytes
s8=("${common[@]}" --set quant.scale_bits=8)
"$LLMVQ_BIN" quantize "$JOB" "${s8[@]}" --set output.dir="$T/s8" >/dev/null 2>"$T/logs8" \
  && ok "scale_bits 8: 1 process" || bad "scale_bits 8 failed: $(tail -n 3 "$T/logs8")"
python3 - "$T/s8/summary.json" "$T/np1/summary.json" <<'PY' && ok "scale_bits 8: bpw = fp16-scale bpw - (8 x 3000 rows - 16 x 35 linears) / 226560" || bad "scale_bits 8: bpw accounting"
import json, sys
a = json.load(open(sys.argv[1]))["bpw_total"]; b = json.load(open(sys.argv[2]))["bpw_total"]
less = (8 * 3000 - 16 * 35) / 226560  # stories260K: 3000 output rows in 35 linears
print(f"  8-bit scales {a:.6f}, fp16 scales {b:.6f}, difference {b - a:.6f} (expected {less:.6f})")
sys.exit(0 if abs(b - a - less) < 1e-9 else 1)
PY
"$LLMVQ_BIN" inspect "$T/s8/model.h5" 2>&1 | grep -q "8-bit scales" \
  && ok "scale_bits 8: inspect names them" || bad "scale_bits 8: inspect says $("$LLMVQ_BIN" inspect "$T/s8/model.h5" 2>&1)"
eval_reads "scale_bits 8" "$T/s8"
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${s8[@]}" --set output.dir="$T/s8b" >/dev/null 2>"$T/logs8b"; then
  cmp -s "$T/s8/model.h5" "$T/s8b/model.h5" && ok "scale_bits 8: 2 ranks byte-identical" || bad "scale_bits 8: 2 ranks differ"
else
  bad "scale_bits 8: 2 ranks failed: $(tail -n 3 "$T/logs8b")"
fi

finish
