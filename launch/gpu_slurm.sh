#!/usr/bin/env bash
# Pretraining on NVIDIA GPUs with SLURM: ONE PROCESS PER NODE driving all GPUs of its node, process 0's node as the
# JAX coordinator. Writes an sbatch script to <workdir>/mmrs_slurm.sbatch and submits it; inside an existing
# allocation (--in_allocation) it runs the job body directly.
#
# Usage:
#   launch/gpu_slurm.sh --install [--venv=.venv] [--python=python3.11]   # once, on a login node (shared FS)
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --config=configs/mixmae.py:vit_b --workdir=/shared/runs/m1 \
#     [--partition=P] [--account=A] [--time=24:00:00] [--cpus_per_node=64] [--port=P] [--venv=.venv] \
#     [--signal_seconds=300] [--module=launch.main] [--shared_nodes] [--in_allocation] [--dry_run] \
#     [-- --config.key=value ...]
#   --port: the coordinator's port (default 20000 + job id % 10000: two jobs on one node do not collide).
#   --shared_nodes: do not ask for whole nodes (default --exclusive: the run's throughput and memory are its own).
#   --install creates the venv with requirements-gpu.txt (jax[cuda12] pinned to requirements.txt's jax).
#   --dry_run prints the sbatch script and the submit command instead of running them.
#
# Why one process per node (not one per GPU): JAX's SLURM auto-detection binds process i of a node to GPU
# $SLURM_LOCALID among the GPUs it can see; with --gpus-per-task=1 each task sees only GPU 0, so every task but the
# first asks for a GPU that does not exist (jax-ml/jax#23452, #28194). One process per node sees its node's GPUs as
# ordinals 0..G-1 whatever physical GPUs SLURM picked, and mmrs/train/distributed.py passes them explicitly as
# local_device_ids (MMRS_LOCAL_DEVICE_IDS), so no auto-detection guess is involved. It is also the TPU layout (one
# process per host): one grain pipeline per node with all its CPUs for workers, one data-iterator state per node,
# and 8x fewer processes in the coordination service.
#
# Signals (as tested against a real SLURM, tests/test_slurm_real.py; README "Run on a GPU cluster with SLURM"):
# - time limit: the job asks for SIGUSR1 to the batch shell <signal_seconds> before it (--signal=B:USR1@N); the
#   trap sends SIGTERM to the training processes (scancel --signal=TERM: job steps only), every process saves a
#   checkpoint of the same step (JAX's preemption sync point) and exits 75; the script runs `scontrol requeue`, the
#   job restarts and resumes from that checkpoint.
# - SIGTERM to the batch shell (`scancel --signal=TERM --full`): srun runs in its own session, so the TERM sent to
#   the batch shell's process group does not reach it (srun would SIGKILL its tasks, nothing saved); the trap
#   forwards it to the tasks as above; saved and still RUNNING -> requeued.
# - preemption (PreemptMode=REQUEUE): with a GraceTime, SLURM sends TERM to the tasks only; they save and exit 75 and
#   the script requeues the job. Without one, SLURM ends the job at once (TERM to everything, SIGKILL after
#   KillWait: the tasks must save within it) and requeues it itself.
# - a plain `scancel` (the job is already COMPLETING): the tasks get SLURM's TERM and save, the job ends CANCELLED,
#   no requeue.
# - a task that dies (kill -9, OOM): its grain workers exit with it (mmrs/parent_watch.py), so srun sees the task end
#   at once and stops the others (--kill-on-bad-exit); the job fails, no requeue. --requeue covers node failures.
# Exit code of the job: the first failing task's own code (launch.main's: 2 config/flag error, 3 NaN/inf, 4 could
# not connect, 5 checkpoint unreadable, 1 crash), not srun's 143 for the tasks it then stopped; 75 when every task
# saved (requeued); 0 finished. Each task writes its code to <workdir>/.slurm/<job id>/<task>.
set -euo pipefail

NODES="" GPN="" CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" TIME="24:00:00" CPN="" PORT="" VENV=".venv"
SIGNAL_S=300 MODULE="launch.main" PYTHON="python3.11" IN_ALLOC=0 DRY=0 INSTALL=0 EXCLUSIVE=1
EXTRA=()
usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "gpu_slurm.sh: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPN="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --cpus_per_node=*) CPN="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --signal_seconds=*) SIGNAL_S="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --python=*) PYTHON="${1#*=}" ;;
    --install) INSTALL=1 ;;
    --shared_nodes) EXCLUSIVE=0 ;;
    --in_allocation) IN_ALLOC=1 ;;
    --dry_run) DRY=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ "$VENV" = /* ]] || VENV="$REPO/$VENV"

if ((INSTALL)); then
  # The GPU install path (README "Run on a GPU cluster"): CUDA 12 wheels of jax (jax-cuda12-plugin/pjrt bring
  # cuDNN/NCCL/cuBLAS as pip packages; only an NVIDIA driver >= 525 is needed on the nodes).
  CMD="$PYTHON -m venv $VENV && $VENV/bin/pip install -q --upgrade pip && $VENV/bin/pip install -r $REPO/requirements-gpu.txt"
  if ((DRY)); then echo "$CMD"; exit 0; fi
  command -v "$PYTHON" >/dev/null || die "$PYTHON not found: the pins need Python 3.11 (module load python/3.11, or uv python install 3.11 and --python=\$(uv python find 3.11))"
  eval "$CMD"
  exit
fi

for v in NODES GPN CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then
    flag=$(tr '[:upper:]' '[:lower:]' <<<"$v"); flag=${flag/gpn/gpus_per_node}
    die "--$flag is required (see --help)"
  fi
done
[[ -n "$CPN" ]] || CPN=$((GPN * 8))
for v in NODES GPN CPN SIGNAL_S ${PORT:+PORT}; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "${v/CPN/cpus_per_node} must be a positive integer, got '${!v}'"
done
((${PORT:-1} < 65536)) || die "--port must be below 65536, got $PORT"
[[ "$TIME" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] || die "--time must be SLURM's [D-]HH:MM:SS, got '$TIME'"
[[ "$WORKDIR" = /* ]] || WORKDIR="$(pwd)/$WORKDIR"  # the job runs from the repo: a relative path would move
if ((!DRY)) && [[ ! -x "$VENV/bin/python" ]]; then
  die "no Python environment at $VENV: run 'launch/gpu_slurm.sh --install --venv=$VENV' first (or pass --venv)"
fi

DEVICES=$(seq -s, 0 $((GPN - 1)))
TRAIN="$VENV/bin/python -m $MODULE --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done

# Performance flags + GPU memory fraction (issue 20), generated from their one place, mmrs/train/perf_flags.py
# (`python -m launch.perf_flags --platform=gpu --format=describe` says what each does): XLA_FLAGS for
# compute/collective overlap (latency-hiding scheduler, pipelined collectives), and XLA_CLIENT_MEM_FRACTION=0.90
# instead of JAX's default 75 % preallocation. Flags or a fraction already in the job's environment win. launch.aot
# compiles with the same flags and compares memory with the same fraction.
FLAGS_PY="$VENV/bin/python"; [[ -x "$FLAGS_PY" ]] || FLAGS_PY=python3
PERF_ENV=$(cd "$REPO" && "$FLAGS_PY" -m launch.perf_flags --platform=gpu) || die "python -m launch.perf_flags failed"

# The job body (also what --in_allocation runs). Single-quoted parts are expanded by the task's shell at run time.
EXITS="$WORKDIR/.slurm"
BODY="cd $(printf '%q' "$REPO")
$PERF_ENV
port=${PORT:-\$((20000 + SLURM_JOB_ID % 10000))}  # from the job id: two jobs sharing a node get two ports
export MMRS_COORDINATOR_ADDRESS=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):\$port\"
export MMRS_LOCAL_DEVICE_IDS=$DEVICES  # all GPUs the task sees (ordinals within its CUDA_VISIBLE_DEVICES)
export SRUN_CPUS_PER_TASK=$CPN  # since SLURM 22.05 srun does not inherit sbatch's --cpus-per-task
export MMRS_EXIT_DIR=$(printf '%q' "$EXITS")/\$SLURM_JOB_ID  # each task's exit code (shared workdir)
rm -rf \"\$MMRS_EXIT_DIR\" && mkdir -p \"\$MMRS_EXIT_DIR\"
requeue=1
stop_tasks() {
  echo \"mmrs: \$1: asking the training processes to checkpoint and stop\" >&2
  scancel --signal=TERM \"\$SLURM_JOB_ID\" 2>/dev/null  # job steps only, not this shell
}
on_term() {  # scancel --full (job still RUNNING: forward, requeue once saved), or SLURM ending the job (plain
  # scancel, the time limit, a preemption without GraceTime: COMPLETING), which sends the tasks its own TERM; a
  # forward then only stalls this shell in scancel's retries (\"Job can not be altered now\") until SIGKILL
  local state; state=\$(squeue -h -j \"\$SLURM_JOB_ID\" -o %T 2>/dev/null)
  [[ \$state == RUNNING ]] || requeue=0
  if [[ \$state == COMPLETING ]]; then
    echo \"mmrs: SIGTERM (job COMPLETING): the training processes got SLURM's TERM: they checkpoint and stop\" >&2
  else
    stop_tasks \"SIGTERM (job \${state:-state unknown})\"
  fi
}
trap 'stop_tasks \"time limit in ${SIGNAL_S}s\"' USR1
trap on_term TERM INT
# setsid: srun out of this shell's process group, which scancel --full signals (srun would SIGKILL the tasks).
# The task's shell outlives a SIGTERM (trap :) to record the training process's exit code.
setsid srun --kill-on-bad-exit=1 --nodes=$NODES --ntasks-per-node=1 --gpus-per-node=$GPN --cpus-per-task=$CPN \\
  bash -c 'trap : TERM INT; MMRS_NUM_PROCESSES=\$SLURM_NTASKS MMRS_PROCESS_ID=\$SLURM_PROCID $TRAIN
rc=\$?; echo \$rc >\"\$MMRS_EXIT_DIR/\$SLURM_PROCID\"; exit \$rc' &
srun_pid=\$!
while :; do  # wait returns early when a trap runs; keep waiting for srun itself
  rc=0; wait \$srun_pid || rc=\$?
  kill -0 \$srun_pid 2>/dev/null || break
done
trap '' TERM INT USR1  # the tasks are gone: nothing to forward (scontrol requeue below TERMs this shell too)
if ((rc != 0)); then  # srun returns the highest task code (143: the tasks it stopped): report the cause instead
  saved=0 cause=\"\"
  for f in \$(ls -tr \"\$MMRS_EXIT_DIR\"); do
    code=\$(<\"\$MMRS_EXIT_DIR/\$f\")
    ((code == 75)) && saved=\$((saved + 1))
    [[ -z \$cause ]] && ((code != 0 && code != 75 && code < 128)) && cause=\$code
  done
  if ((saved == $NODES)); then rc=75; elif [[ -n \$cause ]]; then rc=\$cause; fi
fi
if ((rc == 75 && requeue)); then
  echo \"mmrs: preempted, checkpoint saved: requeueing job \$SLURM_JOB_ID to resume\" >&2
  scontrol requeue \"\$SLURM_JOB_ID\" || echo \"mmrs: scontrol requeue failed: resubmit to resume\" >&2
elif ((rc == 75)); then
  echo \"mmrs: cancelled, checkpoint saved: resubmit to resume\" >&2
fi
exit \$rc"

SCRIPT="#!/bin/bash
#SBATCH --job-name=mmrs-$(basename "$WORKDIR")
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPN
#SBATCH --cpus-per-task=$CPN
#SBATCH --time=$TIME
#SBATCH --signal=B:USR1@$SIGNAL_S
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=$WORKDIR/slurm-%j.out"
((EXCLUSIVE)) && SCRIPT+=$'\n'"#SBATCH --exclusive"
[[ -n "$PARTITION" ]] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
SCRIPT+="
# Generated by launch/gpu_slurm.sh. Exit codes: 0 finished, 2 config error, 3 NaN/inf, 4 no coordinator,
# 5 checkpoint unreadable, 75 preempted or cancelled with a checkpoint saved (requeued unless cancelled).
set -uo pipefail
$BODY"

if ((IN_ALLOC)); then
  if ((DRY)); then echo "$BODY"; exit 0; fi
  [[ -n "${SLURM_JOB_ID:-}" ]] || die "--in_allocation needs to run inside salloc/sbatch (no \$SLURM_JOB_ID)"
  exec bash -c "set -uo pipefail; $BODY"
fi
FILE="$WORKDIR/mmrs_slurm.sbatch"
if ((DRY)); then
  echo "# $FILE:"
  echo "$SCRIPT"
  echo "# submit:"
  echo "sbatch $FILE"
else
  command -v sbatch >/dev/null || die "sbatch not found: run this on a SLURM login node"
  mkdir -p "$WORKDIR"
  printf '%s\n' "$SCRIPT" >"$FILE.tmp" && mv "$FILE.tmp" "$FILE"
  sbatch "$FILE"
fi
