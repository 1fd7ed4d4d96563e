#!/usr/bin/env bash
# PV-tuning in `llmvq quantize` (jobs/stories260K-2bit-pv.ini, made small):
#  1. data-parallel: the same job on 2 ranks (micro-batches and P-step searches
#     split over the ranks) writes a model.h5 byte-identical to 1 process;
#  2. kill -9 while PV-tuning (after the k-th checkpoint CKPT/pv_state.h5):
#     the rerun continues from that step ("resumed at epoch") and ends
#     byte-identical; also under mpirun with one rank killed, rerun on 2 ranks
#     or on 1 process;
#  3. SIGTERM while PV-tuning: exit status 75 (stopped) with pv_state.h5 written,
#     the rerun ends byte-identical;
#  4. a corrupt pv_state.h5 is named in a warning and PV-tuning starts over,
#     still byte-identical;
#  5. pvtune.data = model with pvtune.train_embeddings (the blocks reused from
#     the reference run): sequences sampled from the FP model, the embedding
#     table trained (it differs from the block-wise model's), 2 ranks
#     byte-identical to 1 process.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-pv.ini
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
cmd_for() { # cmd_for DIR NP: the command line, in the array CMD
  local d=$1 np=$2
  CMD=("$LLMVQ_BIN" quantize "$JOB" --set output.eval_data= --set calibration.nsamples=24
       --set calibration.seqlen=128 --set quant.max_iters=4 --set finetune.max_epochs=2
       --set pvtune.data=text --set pvtune.train_embeddings=false
       --set pvtune.nsamples=0 --set pvtune.max_epochs=4 --set pvtune.batch_seqs=4 --set pvtune.micro_batch=2
       --set pvtune.lr=3e-4 --set pvtune.p_every=4 --set pvtune.p_budget=2e-4
       --set pvtune.checkpoint_every=1 --set output.dir="$d")
  if [ "$np" -gt 0 ]; then CMD=(mpirun -np "$np" "${CMD[@]}"); fi
}
run() { cmd_for "$1" "${2:-0}"; "${CMD[@]}"; }
same() { # same NAME DIR: DIR/model.h5 == the reference
  if cmp -s "$T/ref/model.h5" "$2/model.h5"; then ok "$1: model.h5 byte-identical"
  else bad "$1: model.h5 differs from the uninterrupted run"; fi
}
# wait_state DIR N PID: until the N-th checkpoint line is logged (or PID ends)
wait_state() {
  local i
  for i in $(seq 1 600); do
    [ "$(grep -c 'pv-tune: checkpoint after' "$1.log" 2>/dev/null)" -ge "$2" ] && return 0
    kill -0 "$3" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

run "$T/ref" >/dev/null 2>"$T/ref.log" || { bad "reference run failed: $(tail -n 3 "$T/ref.log")"; finish; exit 1; }
grep -q "PV-tuning: held-out loss" "$T/ref.log" && ok "reference run PV-tuned: $(grep 'PV-tuning: held-out' "$T/ref.log" | sed 's/.*\] //')" \
  || bad "reference run did not PV-tune"
[ -e "$T/ref/checkpoint/pv_state.h5" ] && bad "pv_state.h5 left after the run" || ok "pv_state.h5 removed once pvtuned.h5 is written"
grep -q '"pvtune"' "$T/ref/summary.json" && ok "summary.json has pvtune" || bad "summary.json lacks pvtune"
# the tuned model must differ from the block-wise one, or the byte-identity checks below prove little
python3 -c "import json,sys; p=json.load(open(sys.argv[1]))['pvtune']; sys.exit(0 if p['loss_after'] < p['loss_before'] and p['best_step'] > 4 and p['p_steps'] > 0 else 1)" "$T/ref/summary.json" \
  && ok "PV-tuning improved the held-out loss with P steps before the kept step" || bad "PV-tuning kept the input model: $(grep -A12 '"pvtune"' "$T/ref/summary.json" | tr -d '\n\t')"

# 1. 2 ranks
run "$T/np2" 2 >/dev/null 2>"$T/np2.log" || bad "2-rank run failed: $(tail -n 3 "$T/np2.log")"
grep -q "data-parallel over 2 ranks" "$T/np2.log" && ok "2 ranks: PV-tuning data-parallel" || bad "2 ranks: no data-parallel PV line"
same "2 ranks" "$T/np2"

# 2. kill -9 after the 5th checkpoint: 1 process; 2 ranks with one rank killed, rerun on 2
#    ranks; the same, rerun on 1 process (the state does not depend on the rank count)
for spec in 0:0 2:2 2:0; do
  np=${spec%%:*}; rnp=${spec##*:}
  d=$T/kill$np$rnp
  cmd_for "$d" $np
  "${CMD[@]}" >/dev/null 2>"$d.log" &
  pid=$!
  if wait_state "$d" 5 "$pid"; then
    if [ "$np" -gt 0 ]; then
      victim=$(pgrep -P "$pid" | tail -n 1); [ -n "$victim" ] && kill -9 "$victim" 2>/dev/null
    else
      kill -9 "$pid" 2>/dev/null
    fi
  fi
  wait "$pid" 2>/dev/null
  [ -e "$d/checkpoint/pv_state.h5" ] && ok "np=$np: pv_state.h5 present after kill -9" || bad "np=$np: no pv_state.h5 after kill -9"
  if [ "$spec" = 0:0 ]; then  # llmvq inspect shows where PV-tuning stands
    "$LLMVQ_BIN" inspect "$d" >"$d.insp" 2>&1 && grep -q "PV-tuning state pv_state.h5: ok, epoch" "$d.insp" \
      && ok "inspect: $(grep -o 'PV-tuning state.*' "$d.insp")" || bad "inspect after kill: $(cat "$d.insp")"
  fi
  if run "$d" $rnp >/dev/null 2>"$d.rerun.log"; then
    grep -q "pv-tune: resumed at epoch" "$d.rerun.log" && ok "np=$np -> $rnp: rerun resumed PV-tuning: $(grep -o 'resumed at epoch.*' "$d.rerun.log" | head -n 1)" \
      || bad "np=$np -> $rnp: rerun did not resume PV-tuning"
    same "np=$np kill -9 + rerun on np=$rnp" "$d"
  else
    bad "np=$np -> $rnp: rerun failed: $(tail -n 3 "$d.rerun.log")"
  fi
done

# 3. SIGTERM
d=$T/term
cmd_for "$d" 0
"${CMD[@]}" >/dev/null 2>"$d.log" &
pid=$!
wait_state "$d" 3 "$pid" && kill -TERM "$pid" 2>/dev/null
rc=0; wait "$pid" 2>/dev/null || rc=$?
[ "$rc" -eq 75 ] && ok "SIGTERM while PV-tuning: exit 75 ($(grep '^llmvq' "$d.log" | tail -n 1))" || bad "SIGTERM: exit $rc (want 75): $(tail -n 2 "$d.log")"
run "$d" >/dev/null 2>"$d.rerun.log" && same "SIGTERM + rerun" "$d" || bad "rerun after SIGTERM failed: $(tail -n 3 "$d.rerun.log")"

# 4. corrupt state
d=$T/corrupt
cmd_for "$d" 0
"${CMD[@]}" >/dev/null 2>"$d.log" &
pid=$!
wait_state "$d" 3 "$pid" && kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
if [ -e "$d/checkpoint/pv_state.h5" ]; then
  size=$(stat -c %s "$d/checkpoint/pv_state.h5")
  printf 'garbage!' | dd of="$d/checkpoint/pv_state.h5" bs=1 seek=$((size - 2000)) conv=notrunc 2>/dev/null
  rc=0; "$LLMVQ_BIN" inspect "$d" >"$d.insp" 2>&1 || rc=$?
  [ $rc -eq 1 ] && grep -q "PV-tuning state pv_state.h5: CORRUPT" "$d.insp" \
    && ok "inspect reports the damaged state (exit 1): $(grep -o 'CORRUPT.*' "$d.insp" | head -c 150)" \
    || bad "inspect of a damaged pv_state.h5: exit $rc: $(cat "$d.insp")"
  if run "$d" >/dev/null 2>"$d.rerun.log"; then
    grep -q "pv_state.h5: not used" "$d.rerun.log" && ok "corrupt pv_state.h5: $(grep -o 'pv_state.h5: not used.*' "$d.rerun.log" | head -c 200)" \
      || bad "corrupt pv_state.h5 not reported"
    same "corrupt state + rerun" "$d"
  else
    bad "rerun with a corrupt pv_state.h5 failed: $(tail -n 3 "$d.rerun.log")"
  fi
else
  bad "corrupt: no pv_state.h5 to damage"
fi
# 5. sampled data + trained embeddings, 1 process and 2 ranks
for np in 0 2; do
  d=$T/gen$np
  mkdir -p "$d" && cp -r "$T/ref/checkpoint" "$d/" && rm -f "$d"/checkpoint/pv*.h5
  cmd_for "$d" $np
  "${CMD[@]}" --set pvtune.data=model --set pvtune.nsamples=16 --set pvtune.train_embeddings=true \
    --set pvtune.p_every=0 >/dev/null 2>"$d.log" || bad "data = model, np=$np: failed: $(tail -n 3 "$d.log")"
done
grep -q "pv-tune: sampled 16 sequences of 128 tokens" "$T/gen0.log" \
  && ok "data = model: $(grep -o 'sampled 16 sequences.*' "$T/gen0.log")" || bad "data = model: no sampling line: $(grep 'pv-tune' "$T/gen0.log" | head -n 3)"
rc=0; h5diff -q "$T/gen0/checkpoint/blockwise.h5" "$T/gen0/model.h5" /tok_embeddings /tok_embeddings >/dev/null 2>&1 || rc=$?
[ $rc -eq 1 ] && ok "train_embeddings: tok_embeddings trained (differ from the block-wise model's)" \
  || bad "train_embeddings: h5diff of tok_embeddings gave $rc (0: unchanged by PV-tuning, 2: unreadable)"
cmp -s "$T/gen0/model.h5" "$T/gen2/model.h5" && ok "data = model: 2 ranks byte-identical to 1 process" \
  || bad "data = model: 2 ranks differ from 1 process"

# pvtune.device = cuda where no GPU is usable: refused before any work, naming the key
if ! nvidia-smi -L >/dev/null 2>&1; then
  expect_error "pvtune.device = cuda without a GPU" "pvtune.device = cuda" \
    "$LLMVQ_BIN" quantize "$JOB" --quiet --set pvtune.device=cuda --set output.dir="$T/cuda"
fi
finish
