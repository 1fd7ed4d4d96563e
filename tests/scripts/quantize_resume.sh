#!/usr/bin/env bash
# Kill test: kill -9 the job at random times (seeded) in 10 trials, 8 single-
# process and 2 under mpirun with one rank killed; each rerun must end with a
# model.h5 byte-identical to an uninterrupted run, must not recompute a block
# whose checkpoint was complete, and must leave those checkpoint files untouched.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
PY=$(command -v python3)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
RANDOM=20261124
cmd_for() { # cmd_for DIR NP: the command line, in the array CMD
  local d=$1 np=$2
  CMD=("$LLMVQ_BIN" quantize "$JOB" --quiet --set output.eval_data= --set calibration.nsamples=16 --set finetune.max_epochs=2
       --set output.dir="$d")
  if [ "$np" -gt 0 ]; then CMD=(mpirun -np "$np" "${CMD[@]}" --set quant.propagation=fp); fi
}
run() { cmd_for "$1" "${2:-0}"; "${CMD[@]}"; }
run "$T/ref" >/dev/null 2>&1 || { bad "reference run failed"; finish; exit 1; }
run "$T/ref_fp" 2 >/dev/null 2>&1 || { bad "reference MPI run failed"; finish; exit 1; }
for trial in 1 2 3 4 5 6 7 8 9 10; do
  d=$T/t$trial
  np=0; ref=$T/ref
  [ "$trial" -gt 8 ] && { np=2; ref=$T/ref_fp; }
  delay=$(( 300 + RANDOM % 3500 ))   # 0.3 .. 3.8 s
  cmd_for "$d" $np
  "${CMD[@]}" >/dev/null 2>&1 &   # the process itself (mpirun or llmvq), not a subshell
  pid=$!
  sleep "$(awk "BEGIN{print $delay/1000}")"
  if [ "$np" -gt 0 ]; then
    victim=$(pgrep -P "$pid" | tail -n 1)   # one rank; mpirun then ends the others
    [ -n "$victim" ] && kill -9 "$victim" 2>/dev/null
  else
    kill -9 "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  done_blocks=$(ls "$d/checkpoint"/block_*.h5 2>/dev/null | wc -l)
  sums_before=$(cd "$d/checkpoint" 2>/dev/null && sha256sum block_*.h5 2>/dev/null)
  if ! run "$d" $np >/dev/null 2>"$d.log"; then
    bad "trial $trial: resume failed: $(tail -n 3 "$d.log")"; continue
  fi
  resumed=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['blocks_resumed'])" "$d/summary.json")
  sums_after=""
  if [ -n "$sums_before" ]; then
    sums_after=$(cd "$d/checkpoint" && sha256sum $(echo "$sums_before" | awk '{print $2}') 2>/dev/null)
  fi
  if ! cmp -s "$d/model.h5" "$ref/model.h5"; then
    bad "trial $trial (killed at ${delay} ms, np $np): model differs from the uninterrupted run"
  elif [ "$np" -eq 0 ] && [ "$resumed" != "$done_blocks" ]; then
    # under MPI each rank reports only its own shard's resumed blocks
    bad "trial $trial: $done_blocks blocks were checkpointed but $resumed resumed"
  elif [ "$sums_before" != "$sums_after" ]; then
    bad "trial $trial: a finished checkpoint was rewritten"
  else
    ok "trial $trial (killed at ${delay} ms, np $np): $done_blocks blocks kept, model identical"
  fi
done
finish
