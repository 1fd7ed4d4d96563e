#!/usr/bin/env bash
# quant.outlier_cols: the per-matrix job (quantized propagation) and the shared
# demo job with 2 outlier columns per linear: bits per weight count them
# exactly, the model file holds them, eval from the codes agrees with the
# dequantized model, 2 ranks give the same bytes (shared job), and the combinations that
# cannot carry them (export --format hf-aqlm, PV-tuning, ApiQ) are refused
# with a message naming the key. Labelled slow: out of the sanitizer pass,
# where test_stage_outliers covers the code.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
D=$LLMVQ_SOURCE_DIR/jobs/demo
small=(--set output.eval_data= --set calibration.nsamples=16 --set quant.max_iters=2 --set finetune.max_epochs=2)
for job in stories260K-2bit-permatrix stories260K-2bit; do
  JOB=$LLMVQ_SOURCE_DIR/jobs/$job.ini
  "$LLMVQ_BIN" quantize "$JOB" "${small[@]}" --set output.dir="$T/$job-0" >/dev/null 2>"$T/log0" \
    && "$LLMVQ_BIN" quantize "$JOB" "${small[@]}" --set quant.outlier_cols=2 --set output.dir="$T/$job-2" \
       >/dev/null 2>"$T/log2" \
    && ok "$job: quantized with and without outlier columns" \
    || { bad "$job: failed: $(tail -n 3 "$T/log0" "$T/log2")"; continue; }
  python3 - "$T/$job-2/summary.json" "$T/$job-0/summary.json" <<'PY' \
    && ok "$job: bpw counts 2 x (16 x out_features + 32) bits per linear" || bad "$job: bpw accounting"
import json, sys
a = json.load(open(sys.argv[1])); b = json.load(open(sys.argv[2]))
# stories260K per block: 4 x 64-row (wq, wo, w2 and ... ) -- computed from the shapes
rows = 5 * (64 + 32 + 32 + 64 + 172 + 64 + 172)   # d_out of wq wk wv wo w1 w2 w3, 5 blocks
weights = 5 * (64*64 + 2*32*64 + 64*64 + 2*172*64 + 64*172)
extra = 2 * (16 * rows + 32 * 35) / weights
print(f"  bpw {b['bpw_total']:.6f} -> {a['bpw_total']:.6f}, +{a['bpw_total'] - b['bpw_total']:.6f} (expected +{extra:.6f}); outlier_cols {a['outlier_cols']}")
sys.exit(0 if abs(a['bpw_total'] - b['bpw_total'] - extra) < 1e-9 and a['outlier_cols'] == 2 else 1)
PY
  codes=$("$LLMVQ_BIN" eval --json --quiet --model "$T/$job-2/model.h5" --tokenizer "$D/tok512.bin" \
          --data "$D/tinystories_val_subset.txt" --max-tokens 3000 2>"$T/e1")
  deq=$("$LLMVQ_BIN" eval --json --quiet --dequant --model "$T/$job-2/model.h5" --tokenizer "$D/tok512.bin" \
        --data "$D/tinystories_val_subset.txt" --max-tokens 3000 2>"$T/e2")
  python3 - "$codes" "$deq" <<'PY' && ok "$job: eval from the codes = dequantized eval" || bad "$job: eval differs: $codes / $deq $(cat "$T/e1" "$T/e2")"
import json, sys
a = json.loads(sys.argv[1])["ppl"]; b = json.loads(sys.argv[2])["ppl"]
print(f"  ppl from the codes {a:.6f}, dequantized {b:.6f}")
sys.exit(0 if abs(a - b) <= 1e-4 * b else 1)
PY
done
# 2 ranks on the shared job (FP propagation: the result does not depend on the shard map)
if mpirun -np 2 "$LLMVQ_BIN" quantize "$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit.ini" "${small[@]}" \
     --set quant.outlier_cols=2 --set output.dir="$T/np2" >/dev/null 2>"$T/lognp2"; then
  cmp -s "$T/stories260K-2bit-2/model.h5" "$T/np2/model.h5" \
    && ok "2 ranks: model.h5 byte-identical" || bad "2 ranks: model.h5 differs"
else
  bad "2 ranks failed: $(tail -n 3 "$T/lognp2")"
fi
expect_error "hf-aqlm export refused" "outlier columns" \
  "$LLMVQ_BIN" export --format hf-aqlm --model "$T/stories260K-2bit-permatrix-2/model.h5" --out "$T/hf"
expect_error "PV-tuning refused" "outlier_cols.*pvtune" \
  "$LLMVQ_BIN" quantize "$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-pv.ini" --quiet --set quant.outlier_cols=1 \
  --set output.dir="$T/pv"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
expect_error "bad outlier_cols" "quant.outlier_cols" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet --set quant.outlier_cols=-1 --set output.dir="$T/o3"
finish
