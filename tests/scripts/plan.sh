#!/usr/bin/env bash
# `llmvq plan`: the shard map quantize uses (pipe_shard_of), JSON output,
# predicted time and memory, a 70B config.json without weights on 32 ranks,
# idle ranks, and the usage / error exits. The rates are measured once (a few
# seconds) and reused through --rates for the other runs.
# LLMVQ_PLAN_COMPARE=1 also runs the stories260K quantize on one rank and prints
# predicted vs actual wall time (not asserted: timing on a loaded machine is noisy).
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
PY=$(command -v python3)

# json FILE EXPR: evaluate a python expression on the parsed JSON (j)
json() { "$PY" -c "import json,sys; j=json.load(open(sys.argv[1])); print($2)" "$1"; }

# ---- measured rates, one rank
if "$LLMVQ_BIN" plan "$JOB" --ranks 1 --json >"$T/r1.json" 2>"$T/r1.err"; then
  ok "plan --ranks 1 --json ran ($(json "$T/r1.json" "round(j['rates']['measure_s'],1)") s of measuring)"
else
  bad "plan --ranks 1 failed: $(tail -n 3 "$T/r1.err")"; finish; exit 1
fi
if [ "$(json "$T/r1.json" "j['shards']")" = "[[0, 4]]" ]; then ok "1 rank: blocks 0..4"
else bad "1 rank shards: $(json "$T/r1.json" "j['shards']")"; fi
if [ "$(json "$T/r1.json" "int(j['total_predicted_s'] > 0 and j['predicted_s'][0] > 0 and j['memory_bytes'][0] > 0 and j['rates_measured'])")" = 1 ]; then
  ok "1 rank: predicted $(json "$T/r1.json" "round(j['total_predicted_s'],1)") s, memory $(json "$T/r1.json" "j['memory_bytes'][0]") bytes"
else bad "1 rank: predicted time or memory not positive"; fi

# ---- 2 and 3 ranks: the shard map of docs/pipeline.md, [L*r/n, L*(r+1)/n)
for n in 2 3; do
  if ! "$LLMVQ_BIN" plan "$JOB" --ranks $n --json --rates "$T/r1.json" >"$T/r$n.json" 2>"$T/r$n.err"; then
    bad "plan --ranks $n failed: $(tail -n 3 "$T/r$n.err")"; continue
  fi
  want=$("$PY" -c "n=$n; L=5; print([[L*r//n, L*(r+1)//n-1] for r in range(n)])")
  got=$(json "$T/r$n.json" "j['shards']")
  if [ "$got" = "$want" ]; then ok "$n ranks: shards $got"; else bad "$n ranks: shards $got, want $want"; fi
  if [ "$(json "$T/r$n.json" "int(len(j['predicted_s']) == $n and min(j['predicted_s']) > 0 and j['total_predicted_s'] == max(j['predicted_s']))")" = 1 ]; then
    ok "$n ranks: per-rank predictions positive, total = slowest rank"
  else bad "$n ranks: predicted_s $(json "$T/r$n.json" "j['predicted_s']")"; fi
done
[ "$(json "$T/r2.json" "j['shards']")" = "[[0, 1], [2, 4]]" ] && ok "2 ranks: [0,1],[2,4]" || bad "2 ranks: not [0,1],[2,4]"
"$LLMVQ_BIN" plan "$JOB" --ranks 2 --rates "$T/r1.json" >"$T/h2.txt" 2>&1
if grep -Eq '^ +0  0\.\.1 ' "$T/h2.txt" && grep -Eq '^ +1  2\.\.4 ' "$T/h2.txt" \
   && grep -q 'predicted quantize phase' "$T/h2.txt" && grep -q 'GPU memory' "$T/h2.txt"; then
  ok "human table for 2 ranks"
else bad "human table: $(cat "$T/h2.txt")"; fi

# ---- more ranks than blocks: a warning, idle ranks listed
if "$LLMVQ_BIN" plan "$JOB" --ranks 7 --json --rates "$T/r1.json" >"$T/r7.json" 2>"$T/r7.err" \
   && grep -q 'warning: 7 ranks for 5 blocks: 2 ranks get no block and stay idle: 0 3' "$T/r7.err" \
   && [ "$(json "$T/r7.json" "j['idle_ranks']")" = "[0, 3]" ] \
   && [ "$(json "$T/r7.json" "sum(s[1]-s[0]+1 for s in j['shards'] if s)")" = 5 ]; then
  ok "7 ranks for 5 blocks: warning, idle ranks [0, 3] (the shard map spreads them)"
else bad "7 ranks: $(cat "$T/r7.err")"; fi

# ---- a Llama-2-70B config.json without weights, 32 ranks
mkdir -p "$T/llama70b"
cat >"$T/llama70b/config.json" <<'EOF'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
 "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
 "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
 "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false}
EOF
cat >"$T/job70.ini" <<EOF
[model]
path = llama70b
[calibration]
data = $LLMVQ_DEMO_DIR/tinystories_val_subset.txt
nsamples = 128
seqlen = 4096
[quant]
num_codebooks = 1
nbits = 16
group_size = 8
beam_size = 8
[output]
dir = out70
EOF
if "$LLMVQ_BIN" plan "$T/job70.ini" --ranks 32 --rates "$T/r1.json" >"$T/p70.txt" 2>"$T/p70.err"; then
  if grep -q '80 blocks, dim 8192, hidden 28672, heads 64/8' "$T/p70.txt" \
     && grep -Eq '^ +31  77\.\.79 +3 ' "$T/p70.txt" && grep -q 'GiB' "$T/p70.txt" \
     && grep -Eq 'predicted quantize phase: [0-9.]+ (s|min|h|d)' "$T/p70.txt" \
     && grep -q 'no weights' "$T/p70.txt"; then
    ok "70B on 32 ranks: $(grep 'predicted quantize phase' "$T/p70.txt")"
  else bad "70B table: $(cat "$T/p70.txt")"; fi
else bad "plan 70B failed: $(cat "$T/p70.err")"; fi
if "$LLMVQ_BIN" plan "$T/job70.ini" --ranks 32 --json --rates "$T/r1.json" >"$T/p70.json" 2>/dev/null \
   && [ "$(json "$T/p70.json" "int(len(j['shards']) == 32 and sum(s[1]-s[0]+1 for s in j['shards']) == 80 and min(j['memory_bytes']) > 10*2**30 and j['total_predicted_s'] > 0 and not j['model']['weights_present'])")" = 1 ]; then
  ok "70B JSON: 80 blocks over 32 ranks, $(json "$T/p70.json" "round(max(j['memory_bytes'])/2**30,1)") GiB per rank"
else bad "70B JSON"; fi
# PV-tuning after the blocks: its own section; every rank holds the FP teacher (280 GB fp32)
if "$LLMVQ_BIN" plan "$T/job70.ini" --ranks 32 --json --rates "$T/r1.json" --set pvtune.enable=true \
     --set pvtune.batch_seqs=32 --set pvtune.micro_batch=1 >"$T/p70pv.json" 2>/dev/null \
   && [ "$(json "$T/p70pv.json" "int(j['pvtune']['ranks_used'] == 32 and abs(j['pvtune']['memory_bytes_per_rank']['fp_teacher'] - 4*68976648192) < 1e9 and j['pvtune']['predicted_s'] > 0 and j['total_predicted_s'] > j['quantize_predicted_s'])")" = 1 ]; then
  ok "70B + PV-tuning: $(json "$T/p70pv.json" "round(j['pvtune']['memory_bytes_per_rank']['host_total']/2**30)") GiB host per rank, $(json "$T/p70pv.json" "j['pvtune']['v_steps']") V steps"
else bad "70B + PV-tuning JSON: $(head -c 300 "$T/p70pv.json")"; fi
"$LLMVQ_BIN" plan "$T/job70.ini" --ranks 32 --rates "$T/r1.json" --set pvtune.enable=true >"$T/p70pv.txt" 2>&1 \
  && grep -q 'PV-tuning host memory per rank' "$T/p70pv.txt" && ok "70B + PV-tuning table: $(grep -o 'predicted PV-tuning phase [^(]*' "$T/p70pv.txt")" \
  || bad "70B + PV-tuning table: $(tail -n 5 "$T/p70pv.txt")"
# quantize cannot run on a config alone: a clear error
expect_error "quantize on config.json alone" "llama70b" \
  "$LLMVQ_BIN" quantize "$T/job70.ini" --quiet --set output.dir="$T/o70"

# ---- usage and errors
rc=0; "$LLMVQ_BIN" plan "$JOB" --ranks 0 >/dev/null 2>"$T/e0" || rc=$?
[ $rc -eq 2 ] && ok "--ranks 0: exit 2" || bad "--ranks 0: exit $rc"
rc=0; "$LLMVQ_BIN" plan "$JOB" >/dev/null 2>"$T/e0" || rc=$?
[ $rc -eq 2 ] && ok "no --ranks: exit 2" || bad "no --ranks: exit $rc"
rc=0; "$LLMVQ_BIN" plan "$JOB" --ranks x >/dev/null 2>"$T/e0" || rc=$?
[ $rc -eq 2 ] && ok "--ranks x: exit 2" || bad "--ranks x: exit $rc"
expect_error "missing job file" "nothere.ini" "$LLMVQ_BIN" plan "$T/nothere.ini" --ranks 2
expect_error "bad --set" "quant.nbitz" "$LLMVQ_BIN" plan "$JOB" --ranks 2 --set quant.nbitz=3
echo '{"rates": {}}' >"$T/bad_rates.json"
expect_error "bad rates file" "bad_rates.json" "$LLMVQ_BIN" plan "$JOB" --ranks 2 --rates "$T/bad_rates.json"

# ---- optional: predicted vs actual on one rank
if [ "${LLMVQ_PLAN_COMPARE:-0}" = 1 ]; then
  "$LLMVQ_BIN" quantize "$JOB" --quiet --set output.dir="$T/qa" --set output.eval_data= >/dev/null 2>&1
  if [ -f "$T/qa/summary.json" ]; then
    echo "predicted $(json "$T/r1.json" "round(j['total_predicted_s'],1)") s, actual $(json "$T/qa/summary.json" "round(j['wall_s'],1)") s"
  fi
fi
finish
