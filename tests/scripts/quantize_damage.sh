#!/usr/bin/env bash
# Damaged checkpoints: a corrupt block file, a truncated one, one from another
# job and one that is not HDF5 at all are each detected, reported by name and
# recomputed (never used); the final model equals the undamaged run's. And
# SIGUSR1 stops the job at a safe point with exit status 75; the rerun finishes
# with the same model.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
PY=$(command -v python3)
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
base=("$JOB" --set output.eval_data= --set calibration.nsamples=16 --set finetune.max_epochs=2)
"$LLMVQ_BIN" quantize "${base[@]}" --quiet --set output.dir="$T/ref" >/dev/null 2>&1 || { bad "reference run"; finish; exit 1; }
"$LLMVQ_BIN" quantize "${base[@]}" --quiet --set run.seed=7 --set output.dir="$T/other" >/dev/null 2>&1 || { bad "other-job run"; finish; exit 1; }
C=$T/ref/checkpoint

damage() { # NAME BLOCK PATTERN: run after damaging, expect PATTERN in the log
  local name=$1 blk=$2 pat=$3
  if ! "$LLMVQ_BIN" quantize "${base[@]}" --set output.dir="$T/ref" >"$T/out" 2>"$T/log"; then
    bad "$name: rerun failed: $(tail -n 3 "$T/log")"; return
  fi
  local line
  line=$(grep "block $blk: checkpoint not used" "$T/log")
  if [ -z "$line" ]; then bad "$name: not reported: $(grep -i block "$T/log" | head -n 3)"; return; fi
  echo "$line" | grep -Eq "$pat" || { bad "$name: message does not match /$pat/: $line"; return; }
  local resumed
  resumed=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['blocks_resumed'])" "$T/ref/summary.json")
  cmp -s "$T/ref/model.h5" "$T/good.h5" && [ "$resumed" = 4 ] \
    && ok "$name: detected, recomputed, model identical ($line)" \
    || bad "$name: model differs or $resumed blocks resumed"
}
cp "$T/ref/model.h5" "$T/good.h5"
"$PY" - "$C/block_002.h5" <<'PYEOF'
import sys
p = sys.argv[1]; b = bytearray(open(p, 'rb').read())
for off in range(len(b) // 2, len(b) // 2 + 64, 8): b[off] ^= 0x5a
open(p, 'wb').write(b)
PYEOF
rc=0; "$LLMVQ_BIN" inspect "$T/ref" >"$T/insp" 2>&1 || rc=$?
[ "$rc" = 1 ] && grep -q "block_002.h5  CORRUPT" "$T/insp" && grep -q "4 of 5 blocks done and verified, 1 corrupt, 1 left (2)" "$T/insp" \
  && ok "inspect reports the corrupt block (exit 1)" || bad "inspect: exit $rc: $(cat "$T/insp")"
damage "corrupt block file" 2 "block_002.h5: "
f=$C/block_003.h5; head -c $(( $(stat -c %s "$f") / 2 )) "$f" >"$f.x" && mv "$f.x" "$f"
damage "truncated block file" 3 "block_003.h5"
cp "$T/other/checkpoint/block_001.h5" "$C/block_001.h5"
damage "block file of another job" 1 "block_001.h5.*another job"
echo "not hdf5" >"$C/block_004.h5"
damage "garbage block file" 4 "block_004.h5.*not an HDF5 file"

# SIGUSR1: stop at the next block boundary, exit 75, resume to the same model
rm -rf "$T/sig"
"$LLMVQ_BIN" quantize "${base[@]}" --set output.dir="$T/sig" >/dev/null 2>"$T/sig.log" &
pid=$!
for _ in $(seq 1 200); do grep -q "block 1/5" "$T/sig.log" 2>/dev/null && break; sleep 0.05; done
kill -USR1 "$pid"
t0=$(date +%s.%N)
rc=0; wait "$pid" || rc=$?
dt=$(awk "BEGIN{print $(date +%s.%N) - $t0}")
if [ "$rc" = 75 ] && grep -q "stopped by a signal" "$T/sig.log"; then
  ok "SIGUSR1: exit 75 after $dt s: $(grep 'stopped by a signal' "$T/sig.log")"
else
  bad "SIGUSR1: exit $rc: $(tail -n 2 "$T/sig.log")"
fi
"$LLMVQ_BIN" quantize "${base[@]}" --quiet --set output.dir="$T/sig" >/dev/null 2>&1 \
  && cmp -s "$T/sig/model.h5" "$T/good.h5" && ok "resume after SIGUSR1: model identical" || bad "resume after SIGUSR1"
finish
