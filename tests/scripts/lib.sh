# lib.sh: helpers for the shell-level tests (sourced). Needs LLMVQ_BIN and
# LLMVQ_DEMO_DIR from ctest's environment.
set -u
: "${LLMVQ_BIN:?}" "${LLMVQ_DEMO_DIR:?}"
T=$(mktemp -d /tmp/llmvq-test.XXXXXX)
trap 'rm -rf "$T"' EXIT
FAILS=0
PASSES=0

ok()   { PASSES=$((PASSES + 1)); echo "ok   $*"; }
bad()  { FAILS=$((FAILS + 1)); echo "FAIL $*"; }

# expect_error NAME PATTERN CMD...: CMD must exit 1 (not crash, not 0) and print
# exactly one stderr line starting with "llmvq" that matches PATTERN.
expect_error() {
  local name=$1 pat=$2; shift 2
  local rc=0
  "$@" >"$T/.cmd_out" 2>"$T/.cmd_err" || rc=$?
  local lines
  lines=$(grep -c '^llmvq' "$T/.cmd_err" || true)
  if [ "$rc" -ne 1 ]; then
    bad "$name: exit $rc (want 1); stderr: $(tail -n 3 "$T/.cmd_err")"
  elif [ "$lines" -ne 1 ]; then
    bad "$name: $lines 'llmvq' error lines (want 1): $(cat "$T/.cmd_err")"
  elif ! grep '^llmvq' "$T/.cmd_err" | grep -Eq -- "$pat"; then
    bad "$name: message does not match /$pat/: $(grep '^llmvq' "$T/.cmd_err")"
  elif grep -q 'AddressSanitizer\|runtime error' "$T/.cmd_err"; then
    bad "$name: sanitizer report: $(head -n 5 "$T/.cmd_err")"
  else
    ok "$name: $(grep '^llmvq' "$T/.cmd_err")"
  fi
}

finish() {
  echo "$PASSES passed, $FAILS failed"
  [ "$FAILS" -eq 0 ]
}

# shared_small_ref: the small model-shared 2-bit job of quantize_shared*.sh
# (16 calibration sequences, 2 AQLM alternations, 2 fine-tuning epochs, no
# eval) run once on 1 process into $T/np1; sets JOB and common (its --set
# flags) for the caller's further runs. Returns the run's status.
shared_small_ref() {
  : "${LLMVQ_SOURCE_DIR:?}"
  JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit.ini
  export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
  common=(--set output.eval_data= --set calibration.nsamples=16 --set quant.max_iters=2 --set finetune.max_epochs=2)
  "$LLMVQ_BIN" quantize "$JOB" "${common[@]}" --set output.dir="$T/np1" >/dev/null 2>"$T/log1"
}
