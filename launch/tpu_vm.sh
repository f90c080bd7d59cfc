#!/usr/bin/env bash
# Pretraining on a Cloud TPU VM slice: create the VM (or reuse it), copy this checkout to every worker, install the
# pinned requirements + jax[tpu], and run launch/main.py on all workers at once. Checkpoints go to the gs:// workdir;
# metrics are written on worker 0 under ~/mmrs_logs/<run> and copied to <workdir>/logs every 2 minutes.
# Re-running the same command after a preemption resumes from the latest checkpoint (spot VMs are recreated).
#
# Usage:
#   launch/tpu_vm.sh --name=mmrs-v4 --zone=us-central2-b --accelerator=v4-32 \
#     --config=configs/mixmae.py:vit_b --workdir=gs://BUCKET/runs/mixmae_b [--project=P] \
#     [--version=tpu-ubuntu2204-base] [--spot] [--skip_setup] [--dry_run] [-- --config.key=value ...]
#   --dry_run prints the commands instead of running them.
set -euo pipefail

NAME="" ZONE="" ACCEL="" CONFIG="" WORKDIR="" PROJECT="" VERSION="tpu-ubuntu2204-base"
SPOT=0 SKIP_SETUP=0 DRY=0
EXTRA=()
usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip_setup) SKIP_SETUP=1 ;;
    --dry_run) DRY=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_vm.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
for v in NAME ZONE ACCEL CONFIG WORKDIR; do
  if [[ -z "${!v}" ]]; then
    echo "tpu_vm.sh: --$(tr '[:upper:]' '[:lower:]' <<<"${v/ACCEL/accelerator}") is required (see --help)" >&2
    exit 2
  fi
done
if [[ "$WORKDIR" != gs://* ]]; then
  echo "tpu_vm.sh: --workdir must be a gs:// path: every TPU worker writes its part of each checkpoint there." >&2
  exit 2
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$(basename "$WORKDIR")"
GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")

# Prints a command readably (arguments with spaces in single quotes) or runs it.
show() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() { if ((DRY)); then show "$@"; else "$@"; fi; }

# 1. The VM.
CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
((SPOT)) && CREATE+=(--spot)
if ((DRY)); then
  echo "# 1. create the TPU VM if '${GCLOUD[*]} describe $NAME ${LOC[*]}' finds none:"
  show "${CREATE[@]}"
elif ! "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" >/dev/null 2>&1; then
  "${CREATE[@]}"
fi

# 2. The code: this checkout (tracked and untracked files, no venv / .git), on every worker.
TARBALL="/tmp/mmrs_${RUN}.tgz"
((DRY)) && echo "# 2. copy the code to every worker"
run tar -C "$REPO" --exclude=.venv --exclude=.git --exclude=__pycache__ -czf "$TARBALL" .
run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:~/mmrs.tgz" "${LOC[@]}" --worker=all
run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="rm -rf ~/mmrs && mkdir -p ~/mmrs && tar -xzf ~/mmrs.tgz -C ~/mmrs"

# 3. The environment (pinned requirements; jax[tpu] brings libtpu; gcsfs lets etils/orbax reach gs://).
if ((!SKIP_SETUP)); then
  ((DRY)) && echo "# 3. install the environment on every worker"
  JAX_VERSION="$(grep -E '^jax==' "$REPO/requirements.txt" | cut -d= -f3 | cut -d' ' -f1)"
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cd ~/mmrs && python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt 'jax[tpu]==${JAX_VERSION}' gcsfs"
fi

# 4. Train on all workers at once (--multihost: jax.distributed.initialize() finds the slice's hosts).
LOGDIR="\$HOME/mmrs_logs/$RUN"
TRAIN="python -m launch.main --config=$CONFIG --workdir=$WORKDIR --multihost"
for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do TRAIN+=" $(printf '%q' "$a")"; done
SYNC="gcloud storage rsync --recursive $LOGDIR $WORKDIR/logs >/dev/null 2>&1"
((DRY)) && echo "# 4. train on every worker"
run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cd ~/mmrs && . .venv/bin/activate && mkdir -p $LOGDIR && { (while sleep 120; do $SYNC; done) </dev/null >/dev/null 2>&1 & sync_pid=\$!; }; $TRAIN --logdir=$LOGDIR; rc=\$?; kill \$sync_pid; $SYNC; exit \$rc"
