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
expect_error "scratch_dir that does not exist" "nothere.*scratch_dir" \
  "$LLMVQ_BIN" quantize "$JOB" --quiet "${common[@]}" --set output.dir="$T/o4" --set run.scratch_dir="$T/nothere"
finish
