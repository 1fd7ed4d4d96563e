#!/usr/bin/env bash
# The sbatch script on a real one-node Slurm cluster (tools/slurm-local.sh, in a
# scratch directory): a reference job runs straight through; a second job gets
# SIGUSR1 once it has checkpointed a block (by hand, as Slurm's --signal would
# send it before the time limit), its step exits with 75, the script requeues
# the job, the rerun (SLURM_RESTART_COUNT 1) resumes from the checkpoint and
# ends with a model.h5 byte-identical to the reference. And a step that cannot
# launch (srun 22.05 exits 0 then) fails the job. Skipped (77) where Slurm
# cannot be installed or started (not root). The cluster is stopped on every exit.
. "$(dirname "$0")/lib.sh"
: "${LLMVQ_SOURCE_DIR:?}"
export PATH=$PATH:/usr/sbin:/sbin # munged, slurmctld, slurmd
SL=$LLMVQ_SOURCE_DIR/tools/slurm-local.sh
SBATCH_SCRIPT=$LLMVQ_SOURCE_DIR/slurm/llmvq-1node.sbatch
JOB=$LLMVQ_SOURCE_DIR/jobs/stories260K-2bit-permatrix.ini
C=$T/slurm # the cluster's scratch directory
export SLURM_CONF=$C/slurm.conf
cluster_started=0
cleanup() {
  [ "$cluster_started" = 1 ] && "$SL" stop "$C" >/dev/null 2>&1
  rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 1' INT TERM HUP
skip() { echo "SKIP: $*"; exit 77; }
t_begin=$SECONDS

# -- packages and privileges
[ "$(id -u)" = 0 ] || skip "needs root (slurmd runs the jobs); run the suite as root to include this test"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  "$LLMVQ_SOURCE_DIR/tools/install-deps.sh" --slurm >"$T/deps.log" 2>&1 \
    || skip "Slurm is not installed and tools/install-deps.sh --slurm failed: $(tail -n 2 "$T/deps.log" | tr '\n' ' ')"
  command -v slurmctld >/dev/null || skip "slurmctld still missing after tools/install-deps.sh --slurm"
fi

# -- helpers
jobfield() { # JOBID FIELD: one field of `scontrol show job` (accounting is off: no sacct)
  scontrol show job -o "$1" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$2=//p" | head -n 1
}
# wait_for SECONDS CMD...: poll CMD every 0.1 s; 1 on timeout
wait_for() {
  local end=$((SECONDS + $1)); shift
  until "$@"; do
    [ "$SECONDS" -lt "$end" ] || return 1
    sleep 0.1
  done
}
job_ended() { # JOBID: a final state (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...)
  case "$(jobfield "$1" JobState)" in
    PENDING | RUNNING | CONFIGURING | COMPLETING | REQUEUED | REQUEUE_FED | REQUEUE_HOLD | \
    RESIZING | SUSPENDED | SIGNALING | STAGE_OUT | "") return 1 ;;
    *) return 0 ;;
  esac
}
diag() { # LOG: what to show when a job went wrong
  echo "--- job log $1"; tail -n 15 "$1" 2>/dev/null
  echo "--- slurmctld.log"; tail -n 8 "$C/log/slurmctld.log" 2>/dev/null
  echo "--- slurmd.log"; tail -n 8 "$C/log/slurmd.log" 2>/dev/null
}
fail() { bad "$*"; finish; exit 1; }
submit() { # NAME [SBATCH OPTIONS]: the job into $T/NAME, log $T/NAME.log; prints the job id
  local name=$1; shift
  sbatch --parsable "$@" --job-name="llmvq-$name" --chdir="$T" --output="$T/$name.log" \
    --export="ALL,LLMVQ=$LLMVQ_BIN" "$SBATCH_SCRIPT" "$JOB" \
    --set output.dir="$T/$name" --set output.eval_data= \
    --set calibration.nsamples=16 --set finetune.max_epochs=2
}

# -- the cluster
t0=$SECONDS
"$SL" start "$C" >"$T/start.log" 2>&1 || { cluster_started=1; fail "cluster did not start: $(cat "$T/start.log")"; }
cluster_started=1
ok "one-node cluster up in $((SECONDS - t0)) s: $(sinfo -h -o '%P %D %T %c CPUs %m MB' | head -n 1)"

# -- reference: straight through
t0=$SECONDS
ref=$(submit ref) || fail "sbatch (reference) failed"
wait_for 180 job_ended "$ref" || { diag "$T/ref.log"; fail "reference job $ref not done after 180 s (state $(jobfield "$ref" JobState))"; }
st=$(jobfield "$ref" JobState)
if [ "$st" = COMPLETED ] && grep -q "step exited with 0" "$T/ref.log" && [ -s "$T/ref/model.h5" ]; then
  ok "reference job $ref: COMPLETED, step exit 0, model.h5 written ($((SECONDS - t0)) s)"
else
  diag "$T/ref.log"; fail "reference job $ref: state $st"
fi

# -- preempted job: USR1 after the first checkpoint, exit 75, requeue, resume
t0=$SECONDS
pre=$(submit pre) || fail "sbatch (preempted job) failed"
wait_for 120 test -f "$T/pre/checkpoint/block_000.h5" \
  || { diag "$T/pre.log"; fail "job $pre: no checkpoint/block_000.h5 after 120 s (state $(jobfield "$pre" JobState))"; }
st=$(jobfield "$pre" JobState)
[ "$st" = RUNNING ] || { diag "$T/pre.log"; fail "job $pre: $st when its first block was checkpointed (want RUNNING)"; }
# what --signal=B:USR1@120 does before the time limit: USR1 to the batch script only
scancel --batch --signal=USR1 "$pre" || fail "scancel --batch --signal=USR1 $pre failed"
ok "job $pre: block_000.h5 checkpointed after $((SECONDS - t0)) s; sent USR1 to the batch script"

t0=$SECONDS
wait_for 60 grep -q "step exited with" "$T/pre.log" \
  || { diag "$T/pre.log"; fail "job $pre: step still running 60 s after USR1"; }
line=$(grep -m 1 "step exited with" "$T/pre.log")
if grep -q "USR1: asking the ranks" "$T/pre.log" && [ "$line" = "[llmvq-sbatch] step exited with 75" ] \
   && grep -q "stopped by a signal" "$T/pre.log"; then
  ok "job $pre: the script forwarded USR1, the step stopped at a block boundary and exited with 75 ($((SECONDS - t0)) s)"
else
  diag "$T/pre.log"; fail "job $pre: want step exit 75 after USR1, got '$line'"
fi

# the script requeues the job: it goes back to PENDING with Restarts=1, held for
# its begin time (cred_expire); start it now, not at the next scheduler pass
requeued() { [ "$(jobfield "$pre" Restarts)" = 1 ]; }
wait_for 30 requeued || { diag "$T/pre.log"; fail "job $pre not requeued 30 s after the step stopped (Restarts=$(jobfield "$pre" Restarts), state $(jobfield "$pre" JobState))"; }
grep -q "requeueing job $pre" "$T/pre.log" || fail "job $pre: no 'requeueing' line in the log"
ok "job $pre requeued by the script (Restarts=1, state $(jobfield "$pre" JobState))"
t0=$SECONDS
# Before starting the rerun at once: the first run's step daemon takes a few
# seconds to exit, and until it has, its PMIx socket (SlurmdSpoolDir/
# stepd.slurm.pmix.JOB.0) blocks the rerun's step 0 of the same id ("Cannot bind()
# UNIX socket ... Address already in use"). A real requeue waits much longer for
# its begin time. And a start in the same second as the requeue fails ("Job
# credential revoked").
old_step_gone() {
  ! compgen -G "$C/spool/stepd.slurm.pmix.$pre.*" >/dev/null \
    && grep -q "\[$pre\.0\] done with job" "$C/log/slurmd.log"
}
wait_for 60 old_step_gone || { diag "$T/pre.log"; fail "job $pre: the first run's step not finished 60 s after the requeue"; }
sleep 1.5
rerun_started() { case "$(jobfield "$pre" JobState)" in PENDING | REQUEUED | COMPLETING) return 1 ;; esac; }
for _ in 1 2 3 4 5 6; do
  [ "$(jobfield "$pre" JobState)" = PENDING ] && scontrol update JobId="$pre" StartTime=now 2>/dev/null
  wait_for 10 rerun_started && break
done
rerun_started || { diag "$T/pre.log"; fail "job $pre: rerun not started 60 s after the requeue (state $(jobfield "$pre" JobState), $(jobfield "$pre" Reason))"; }
wait_for 180 job_ended "$pre" || { diag "$T/pre.log"; fail "job $pre: rerun not done after 180 s"; }
st=$(jobfield "$pre" JobState)
resumed=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['blocks_resumed'])" "$T/pre/summary.json" 2>/dev/null)
if [ "$st" = COMPLETED ] && grep -q "^\[llmvq-sbatch\] job $pre restart 1 " "$T/pre.log" \
   && [ "$(grep -c 'step exited with' "$T/pre.log")" = 2 ] && grep -q "step exited with 0" "$T/pre.log" \
   && [ "${resumed:-0}" -ge 1 ]; then
  ok "job $pre: rerun with SLURM_RESTART_COUNT 1 resumed $resumed checkpointed blocks, COMPLETED ($((SECONDS - t0)) s)"
else
  diag "$T/pre.log"; fail "job $pre: rerun state $st, blocks_resumed '${resumed}'"
fi
cmp -s "$T/pre/model.h5" "$T/ref/model.h5" \
  && ok "model.h5 after preemption + requeue + resume is byte-identical to the reference" \
  || bad "model.h5 after requeue differs from the reference"

# -- a step that cannot launch: srun 22.05 then exits 0; the script must not
# report success (the PMIx socket of the step, taken in advance, makes it fail)
t0=$SECONDS
nl=$(submit nolaunch --hold) || fail "sbatch (launch failure) failed"
python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])' \
  "$C/spool/stepd.slurm.pmix.$nl.0" || fail "could not take the step's PMIx socket"
scontrol release "$nl"
wait_for 120 job_ended "$nl" || { diag "$T/nolaunch.log"; fail "job $nl not done after 120 s"; }
st=$(jobfield "$nl" JobState)
if [ "$st" = FAILED ] && grep -q "the step never started" "$T/nolaunch.log" \
   && grep -q "step exited with 1" "$T/nolaunch.log" && [ ! -e "$T/nolaunch/model.h5" ]; then
  ok "job $nl: step launch failed (srun exit 0): the script says so and the job is FAILED ($((SECONDS - t0)) s)"
else
  diag "$T/nolaunch.log"; bad "job $nl: launch failure: state $st"
fi
rm -f "$C/spool/stepd.slurm.pmix.$nl.0"

# -- stop: no daemon may outlive the test
pids=$(cat "$C"/run/*.pid 2>/dev/null | tr '\n' ' ')
"$SL" stop "$C" >"$T/stop.log" 2>&1
left=""
for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
[ -n "$left" ] || cluster_started=0
[ -z "$left" ] && ok "cluster stopped: munged, slurmctld, slurmd (pids $pids) gone; whole test $((SECONDS - t_begin)) s" \
  || bad "daemons still running after stop: pids$left"
finish
