#!/usr/bin/env bash
# propagation = fp: the quantized model is byte-identical whether the job runs
# in one process or sharded over 2 or 3 MPI ranks (oversubscribed on 2 cores),
# the calibration activations streaming rank to rank; also with the activations
# spilled to files in run.scratch_dir, which leaves nothing behind.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
common=(--quiet --set quant.propagation=fp --set output.eval_data= --set calibration.nsamples=16 --set finetune.max_epochs=2)
"$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np1" >/dev/null 2>"$T/log1" \
  && ok "1 process" || bad "1 process failed: $(tail -n 3 "$T/log1")"
for np in 2 3; do
  if mpirun -np $np "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np$np" >/dev/null 2>"$T/log$np"; then
    cmp -s "$T/np1/model.h5" "$T/np$np/model.h5" && ok "$np ranks: model.h5 byte-identical to 1 process" \
      || bad "$np ranks: model.h5 differs"
  else
    bad "$np ranks failed: $(tail -n 3 "$T/log$np")"
  fi
done
mkdir -p "$T/scratch"
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/spill" --set run.scratch_dir="$T/scratch" >/dev/null 2>"$T/logs"; then
  cmp -s "$T/np1/model.h5" "$T/spill/model.h5" && ok "2 ranks, activations spilled to run.scratch_dir: model.h5 byte-identical" \
    || bad "spilled run: model.h5 differs"
  [ -z "$(ls -A "$T/scratch")" ] && ok "nothing left in run.scratch_dir" || bad "left in scratch: $(ls "$T/scratch")"
else
  bad "spilled run failed: $(tail -n 3 "$T/logs")"
fi
# shards of unequal length (3 vs 2 blocks) with a 1 s comm timeout: the rank
# that finishes first waits as long as the other keeps finishing blocks
slow=(--quiet --set quant.propagation=fp --set output.eval_data= --set calibration.nsamples=16 --set finetune.max_epochs=30 --set finetune.patience=100)
"$LLMVQ_BIN" quantize "$JOB" "${slow[@]}" --set output.dir="$T/slow1" >/dev/null 2>"$T/logslow1" || bad "slow job, 1 process: $(tail -n 3 "$T/logslow1")"
start=$(date +%s.%N)
if mpirun -np 2 "$LLMVQ_BIN" quantize "$JOB" "${slow[@]}" --set run.comm_timeout_s=1 --set output.dir="$T/slow2" >/dev/null 2>"$T/logslow2"; then
  ok "2 ranks, comm timeout 1 s, job of $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $start}") s: no false timeout while the other shard works"
  cmp -s "$T/slow1/model.h5" "$T/slow2/model.h5" && ok "and model.h5 byte-identical" || bad "slow job: model.h5 differs"
else
  bad "2 ranks with comm timeout 1 s failed: $(tail -n 3 "$T/logslow2")"
fi
expect_error "scratch_dir that does not exist" "nothere.*scratch_dir" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet "${common[@]}" --set output.dir="$T/o4" --set run.scratch_dir="$T/nothere"
finish
