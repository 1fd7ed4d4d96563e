#!/usr/bin/env bash
# Shards of unequal length (2 vs 3 blocks of ~3 s each) with a 2 s comm
# timeout: the rank that finishes first waits as long as the other keeps
# finishing blocks (a fixed deadline would fail the job), and the result is the
# single-process model (test_comm checks that a silent peer times out with a
# message).
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
slow=(--quiet --set quant.propagation=fp --set output.eval_data= --set calibration.nsamples=32 --set finetune.max_epochs=30 --set finetune.patience=100)
"$LLMVQ_BIN" quantize "$JOB" "${slow[@]}" --set output.dir="$T/one" >/dev/null 2>"$T/log1" \
  || bad "1 process: $(tail -n 3 "$T/log1")"
start=$(date +%s.%N)
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${slow[@]}" --set run.comm_timeout_s=2 --set output.dir="$T/two" >/dev/null 2>"$T/log2"; then
  ok "2 ranks, comm timeout 2 s, job of $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s: no false timeout while the other shard works"
  cmp -s "$T/one/model.h5" "$T/two/model.h5" && ok "model.h5 byte-identical to 1 process" || bad "model.h5 differs"
else
  bad "2 ranks with comm timeout 2 s failed: $(grep -m2 llmvq "$T/log2")"
fi
finish
