#!/usr/bin/env bash
# Pretraining on GPUs with SLURM: one process per GPU (srun), process 0's node as the JAX coordinator.
# Writes an sbatch script to <workdir>/mmrs_slurm.sbatch and submits it; inside an existing allocation
# (--in_allocation) it runs the srun line directly. The job asks for SIGTERM 5 minutes before its time limit, so the
# run checkpoints and exits cleanly; `--requeue` lets SLURM restart it, and the restart resumes from that checkpoint.
#
# Usage:
#   launch/gpu_slurm.sh --nodes=2 --gpus_per_node=8 --config=configs/mixmae.py:vit_b --workdir=/shared/runs/m1 \
#     [--partition=P] [--account=A] [--time=24:00:00] [--cpus_per_gpu=8] [--port=29500] [--venv=.venv] \
#     [--in_allocation] [--dry_run] [-- --config.key=value ...]
#   --dry_run prints the sbatch script and the command instead of running them.
set -euo pipefail

NODES=1 GPN=8 CONFIG="" WORKDIR="" PARTITION="" ACCOUNT="" TIME="24:00:00" CPG=8 PORT=29500 VENV=".venv"
IN_ALLOC=0 DRY=0
EXTRA=()
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --nodes=*) NODES="${1#*=}" ;;
    --gpus_per_node=*) GPN="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --partition=*) PARTITION="${1#*=}" ;;
    --account=*) ACCOUNT="${1#*=}" ;;
    --time=*) TIME="${1#*=}" ;;
    --cpus_per_gpu=*) CPG="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --in_allocation) IN_ALLOC=1 ;;
    --dry_run) DRY=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_slurm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$CONFIG" || -z "$WORKDIR" ]]; then
  echo "gpu_slurm.sh: --config and --workdir are required (see --help)" >&2
  exit 2
fi
for v in NODES GPN CPG PORT; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_slurm.sh: ${v} must be a positive integer, got '${!v}'" >&2; exit 2; }
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TRAIN="python -m launch.main --config=$CONFIG --workdir=$WORKDIR"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
# Each task learns its rank from SLURM at run time (single quotes: expanded by the task's shell, not here).
SRUN="srun --kill-on-bad-exit=1 --ntasks-per-node=$GPN --gpus-per-task=1 bash -c 'MMRS_PROCESS_ID=\$SLURM_PROCID exec $TRAIN'"
ENV_LINES="export MMRS_COORDINATOR_ADDRESS=\"\$(scontrol show hostnames \"\$SLURM_JOB_NODELIST\" | head -n1):$PORT\"
export MMRS_NUM_PROCESSES=\"\$SLURM_NTASKS\""

SCRIPT="#!/bin/bash
#SBATCH --job-name=mmrs-$(basename "$WORKDIR")
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPN
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=$CPG
#SBATCH --time=$TIME
#SBATCH --signal=TERM@300
#SBATCH --requeue
#SBATCH --output=$WORKDIR/slurm-%j.out"
[[ -n "$PARTITION" ]] && SCRIPT+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -n "$ACCOUNT" ]] && SCRIPT+=$'\n'"#SBATCH --account=$ACCOUNT"
SCRIPT+="
set -euo pipefail
cd $REPO
source $VENV/bin/activate
$ENV_LINES
$SRUN"

if ((IN_ALLOC)); then
  CMD="$ENV_LINES
$SRUN"
  if ((DRY)); then echo "$CMD"; else eval "$CMD"; fi
  exit
fi
FILE="$WORKDIR/mmrs_slurm.sbatch"
if ((DRY)); then
  echo "# $FILE:"
  echo "$SCRIPT"
  echo "# submit:"
  echo "sbatch $FILE"
else
  mkdir -p "$WORKDIR"
  echo "$SCRIPT" >"$FILE"
  sbatch "$FILE"
fi
