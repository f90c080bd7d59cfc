#!/usr/bin/env bash
# Pretraining on a single-slice Cloud TPU VM (v4, v5e, v5p, v6e): create the VM (or reuse it), ship this checkout
# (without runs/, data/, .venv, .git) to every worker, install Python 3.11 + requirements-tpu.txt, and start
# launch.main on all workers DETACHED (setsid nohup: an ssh disconnect does not stop it). Each worker logs to
# ~/mmrs_logs/<run>/train.log and writes its exit code to ~/mmrs_logs/<run>/exit_code (0 finished, 75 preempted
# with a checkpoint saved, others: see launch/main.py). Checkpoints go to the gs:// workdir, and so do the metrics and
# TensorBoard events (--logdir=<workdir>/logs: one metrics file per start, never overwritten); each worker copies its
# ~/mmrs_logs/<run> (train.log, exit_code) to <workdir>/logs/workers/<hostname>/<start time>/ every 2 minutes and at
# exit, so a recreated VM (--watch) adds to the history instead of overwriting it.
# Host maintenance: v4 and v5e VMs are created with Cloud TPU's Autocheckpoint (`gcloud alpha ... create
# --autocheckpoint-enabled`, Preview; the docs list v2-v4 and v5e): a maintenance then SIGTERMs the trainer and
# waits for it (up to 5 min) before it starts. On every VM a watcher (launch/maintenance_watch.py) also reads the
# metadata key instance/upcoming-maintenance every --maintenance_poll seconds and SIGTERMs the trainer when a
# maintenance window opens within 10 minutes: the step is saved and the run exits 75, and --watch resumes it.
#
# Usage:
#   launch/tpu_vm.sh --name=mmrs-v4 --zone=us-central2-b --accelerator=v4-32 \
#     --config=configs/mixmae.py:vit_b --workdir=gs://BUCKET/runs/mixmae_b [--project=P] [--version=IMAGE] \
#     [--spot] [--skip_setup] [--module=launch.main] [--shared_workdir] [--dry_run] [--[no]autocheckpoint] \
#     [--maintenance_poll=60] [-- --config.key=value ...]
#   launch/tpu_vm.sh --name=... --zone=... --workdir=... --status | --logs | --stop
#   launch/tpu_vm.sh <the launch flags> --watch [--watch_interval=300]
#     --status: per worker, running / exited <code>; --logs: the last lines of worker 0's train.log;
#     --stop: SIGTERM to the training processes (they checkpoint and exit 75);
#     --watch: for spot/preemptible VMs: every interval, recreate a preempted/deleted VM and restart training (it
#     resumes from the latest checkpoint); ends when the run exits 0 (or with any exit code other than 75).
#   --dry_run prints the commands instead of running them. --shared_workdir allows a non-gs:// workdir that every
#   worker mounts at the same path (e.g. Filestore NFS). --[no]autocheckpoint: create the VM with Cloud TPU's
#   Autocheckpoint or not (default: on for v4/v5e); --maintenance_poll: seconds between metadata reads.
#
# Python: the TPU VM images ship Python 3.10 and the pins need 3.11 (jax 0.10.2 was the last for 3.11; 0.11 needs
# 3.12). uv (pinned, installed with pip --user) downloads a standalone CPython 3.11 into the user's home: no root,
# no apt/PPA (deadsnakes is not on every image and its builds differ per Ubuntu release), and the same interpreter on
# every image. The venv lives in ~/mmrs_venv, outside the code directory, so redeploying code does not reinstall.
set -euo pipefail

NAME="" ZONE="" ACCEL="" CONFIG="" WORKDIR="" PROJECT="" VERSION="" MODULE="launch.main"
SPOT=0 SKIP_SETUP=0 DRY=0 SHARED=0 ACTION="launch" WATCH_S=300 AUTOCKPT="" MAINT_POLL_S=60
UV_VERSION="0.13.8"
EXTRA=()
usage() { sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }
while (($#)); do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --module=*) MODULE="${1#*=}" ;;
    --spot) SPOT=1 ;;
    --skip_setup) SKIP_SETUP=1 ;;
    --shared_workdir) SHARED=1 ;;
    --status) ACTION=status ;;
    --logs) ACTION=logs ;;
    --stop) ACTION=stop ;;
    --watch) ACTION=watch ;;
    --watch_interval=*) WATCH_S="${1#*=}" ;;
    --autocheckpoint) AUTOCKPT=1 ;;
    --noautocheckpoint) AUTOCKPT=0 ;;
    --maintenance_poll=*) MAINT_POLL_S="${1#*=}" ;;
    --dry_run) DRY=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
REQUIRED=(NAME ZONE WORKDIR)
[[ "$ACTION" == launch || "$ACTION" == watch ]] && REQUIRED+=(ACCEL CONFIG)
for v in "${REQUIRED[@]}"; do
  if [[ -z "${!v}" ]]; then
    flag=$(tr '[:upper:]' '[:lower:]' <<<"$v"); die "--${flag/accel/accelerator} is required (see --help)"
  fi
done
if [[ "$WORKDIR" != gs://* ]] && ((!SHARED)); then
  die "--workdir must be a gs:// path: every TPU worker writes its part of each checkpoint there (or pass --shared_workdir for a filesystem every worker mounts)."
fi
[[ "$WATCH_S" =~ ^[1-9][0-9]*$ ]] || die "--watch_interval must be a positive number of seconds, got '$WATCH_S'"
[[ "$MAINT_POLL_S" =~ ^[1-9][0-9]*$ ]] ||
  die "--maintenance_poll must be a positive number of seconds, got '$MAINT_POLL_S'"
if [[ -n "$ACCEL" ]]; then
  # Single-slice accelerator types; the image that supports each (Cloud TPU docs, "TPU VM images").
  case "$ACCEL" in
    v4-[0-9]*) DEFAULT_VERSION="tpu-ubuntu2204-base" ;;
    v5litepod-[0-9]*|v5e-[0-9]*) DEFAULT_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-[0-9]*) DEFAULT_VERSION="v2-alpha-tpuv5" ;;
    v6e-[0-9]*) DEFAULT_VERSION="v2-alpha-tpuv6e" ;;
    *) die "--accelerator=$ACCEL is not a single-slice v4/v5e/v5p/v6e type (e.g. v4-32, v5litepod-16, v5p-64, v6e-8)" ;;
  esac
  [[ "${ACCEL##*-}" =~ ^[1-9][0-9]*$ ]] || die "--accelerator=$ACCEL must end in a core/chip count (e.g. v4-32)"
  VERSION="${VERSION:-$DEFAULT_VERSION}"
  # Autocheckpoint by default where Cloud TPU documents it (v2-v4, v5e); elsewhere only on request.
  if [[ -z "$AUTOCKPT" ]]; then
    case "$ACCEL" in v4-*|v5litepod-*|v5e-*) AUTOCKPT=1 ;; *) AUTOCKPT=0 ;; esac
  fi
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN="$(basename "${WORKDIR%/}")"
GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && LOC+=(--project="$PROJECT")
LOGDIR="\$HOME/mmrs_logs/$RUN"  # expanded on the workers

# Prints a command readably (arguments with spaces in single quotes) or runs it.
show() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
run() { if ((DRY)); then show "$@"; else "$@"; fi; }
on_workers() { run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }

status() {
  on_workers "d=$LOGDIR; if [ -f \$d/exit_code ]; then echo \"\$(hostname): exited \$(cat \$d/exit_code)\"; elif [ -f \$d/pid ] && kill -0 \$(cat \$d/pid) 2>/dev/null; then echo \"\$(hostname): running (pid \$(cat \$d/pid)): \$(tail -n 1 \$d/train.log)\"; else echo \"\$(hostname): not running (no exit code: killed?)\"; fi"
}

case "$ACTION" in
  status) status; exit ;;
  logs) run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="tail -n 100 $LOGDIR/train.log"; exit ;;
  stop)
    on_workers "d=$LOGDIR; [ -f \$d/pid ] && kill -TERM \$(cat \$d/pid) 2>/dev/null && echo \"\$(hostname): SIGTERM sent (checkpoint, then exit 75)\" || echo \"\$(hostname): not running\""
    exit ;;
esac

create_vm() {
  local create=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" --version="$VERSION")
  ((SPOT)) && create+=(--spot)
  # Autocheckpoint (Preview, gcloud alpha): a maintenance event SIGTERMs the trainer and waits for its checkpoint.
  ((AUTOCKPT)) && create=(gcloud alpha "${create[@]:1}" --autocheckpoint-enabled)
  if ((DRY)); then
    echo "# 1. create the TPU VM if '${GCLOUD[*]} describe $NAME ${LOC[*]}' finds none:"
    show "${create[@]}"
  elif ! "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' >/dev/null 2>&1; then
    "${create[@]}"
  fi
}

deploy() {
  # The code: tracked and untracked files of this checkout, without local runs, data, venvs (.venv, .venv-py312 ...),
  # carried wheels, build output or git history.
  local tarball
  if ((DRY)); then tarball="${TMPDIR:-/tmp}/mmrs_${RUN}.tgz"; else tarball="$(mktemp -d)/mmrs_${RUN}.tgz"; fi
  ((DRY)) && echo "# 2. copy the code to every worker"
  run tar -C "$REPO" --exclude='./.venv*' --exclude=./.whl --exclude=./build --exclude=./.git --exclude=./runs \
    --exclude=./data --exclude=__pycache__ --exclude='*.array_record' -czf "$tarball" .
  run "${GCLOUD[@]}" scp "$tarball" "$NAME:~/mmrs.tgz" "${LOC[@]}" --worker=all
  on_workers "rm -rf ~/mmrs.new && mkdir -p ~/mmrs.new && tar -xzf ~/mmrs.tgz -C ~/mmrs.new && rm -rf ~/mmrs && mv ~/mmrs.new ~/mmrs"
  if ((!SKIP_SETUP)); then
    ((DRY)) && echo "# 3. Python 3.11 (uv) and requirements-tpu.txt on every worker"
    on_workers "set -e; python3 -m pip install -q --user uv==$UV_VERSION && export PATH=\$HOME/.local/bin:\$PATH && uv python install 3.11 && { [ -x ~/mmrs_venv/bin/python ] || uv venv --python 3.11 ~/mmrs_venv; } && uv pip install -q --python ~/mmrs_venv/bin/python -r ~/mmrs/requirements-tpu.txt"
  fi
}

start() {
  # Detached: setsid + nohup + redirects cut the wrapper from the ssh session (a disconnect does not stop it). The wrapper records the exit code; on gs:// workdirs it syncs the logs every 2 min and at exit (3 tries: a
  # transient storage error must not lose the last copy, whose exit_code says the start ended).
  # "Already running" needs a live pid AND no exit_code: the wrapper writes exit_code as its last act, and its pid can
  # outlive that (a zombie not yet reaped, or a reused pid), which would otherwise skip the restart on that worker.
  local train sync="" cmd a
  train="python -m $MODULE --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR") --multihost"
  for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do train+=" $(printf '%q' "$a")"; done
  if [[ "$WORKDIR" == gs://* ]]; then
    train+=" --logdir=$(printf '%q' "${WORKDIR%/}/logs")"
    sync="gcloud storage rsync --recursive $LOGDIR ${WORKDIR%/}/logs/workers/\$(hostname)/\$stamp >/dev/null 2>&1"
  fi
  # Performance flags (issue 20): LIBTPU_INIT_ARGS for collective/compute overlap, from their one place,
  # mmrs/train/perf_flags.py (`python3 -m launch.perf_flags --platform=tpu --format=describe`); flags already in the
  # workers' LIBTPU_INIT_ARGS win. launch.aot compiles TPU targets with the same flags.
  local perf
  perf=$(cd "$REPO" && python3 -m launch.perf_flags --platform=tpu) || die "python3 -m launch.perf_flags failed"
  # The wrapper forwards SIGTERM (--stop, a VM shutdown) to the trainer and waits for its checkpoint.
  # The maintenance watcher SIGTERMs the trainer when host maintenance is near (launch/maintenance_watch.py).
  # exit_code is written before the last copy to the bucket, so the bucket's history has it too.
  local watch="python -m launch.maintenance_watch --pid=\$child --poll_s=$MAINT_POLL_S"
  watch+=" --state=$LOGDIR/maintenance_window"
  local body="stamp=\$(date -u +%Y%m%dT%H%M%SZ); cd ~/mmrs && . ~/mmrs_venv/bin/activate || exit 2; ${perf//$'\n'/; }; ${sync:+(while sleep 120; do $sync; done) & sync_pid=\$!; }$train & child=\$!; $watch & watch_pid=\$!; trap 'kill -TERM \$child 2>/dev/null' TERM; while :; do rc=0; wait \$child || rc=\$?; kill -0 \$child 2>/dev/null || break; done; kill \$watch_pid 2>/dev/null; echo \$rc > $LOGDIR/exit_code; ${sync:+kill \$sync_pid; for try in 1 2 3; do $sync && break; sleep 10; done; }exit \$rc"
  cmd="mkdir -p $LOGDIR && d=$LOGDIR && if [ -f \$d/pid ] && [ ! -f \$d/exit_code ] && kill -0 \$(cat \$d/pid) 2>/dev/null; then echo \"\$(hostname): already running\"; exit 0; fi; rm -f \$d/exit_code; setsid nohup bash -c $(printf '%q' "$body") >>\$d/train.log 2>&1 </dev/null & echo \$! > \$d/pid; echo \"\$(hostname): started, log \$d/train.log\""
  ((DRY)) && echo "# 4. train on every worker, detached"
  on_workers "$cmd"
}

vm_state() {  # READY, PREEMPTED, TERMINATED, ... or NOT_FOUND
  "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND
}

if [[ "$ACTION" == launch ]]; then
  create_vm
  deploy
  start
  ((DRY)) || echo "tpu_vm.sh: training started; follow it with: $0 --name=$NAME --zone=$ZONE --workdir=$WORKDIR --status|--logs|--stop"
  exit 0
fi

# --watch: keep the run alive on a spot/preemptible VM.
((DRY)) && { echo "# --watch: every ${WATCH_S}s: describe; PREEMPTED/TERMINATED/missing -> delete, create, deploy, start"; exit 0; }
while :; do
  state="$(vm_state)"
  case "$state" in
    PREEMPTED|TERMINATED|NOT_FOUND)
      echo "tpu_vm.sh --watch: VM $NAME is $state: recreating it and resuming from the latest checkpoint" >&2
      [[ "$state" != NOT_FOUND ]] && "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet
      create_vm; deploy; start ;;
    READY)
      codes="$("${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="cat $LOGDIR/exit_code 2>/dev/null || echo running" 2>/dev/null || echo unreachable)"
      if ! grep -qv '^0$' <<<"$codes"; then echo "tpu_vm.sh --watch: the run finished (exit 0 on every worker)"; exit 0; fi
      if grep -q '^75$' <<<"$codes" && ! grep -q 'running' <<<"$codes"; then
        echo "tpu_vm.sh --watch: the run was preempted (exit 75): restarting it" >&2; start
      elif bad="$(grep -Ev '^(0|75|running|unreachable)$' <<<"$codes")"; then
        echo "tpu_vm.sh --watch: the run failed (exit codes: $(tr '\n' ' ' <<<"$bad")); see --logs" >&2; exit 1
      elif ! grep -q 'running\|unreachable' <<<"$codes"; then
        start  # never started (e.g. the VM was recreated by someone else)
      fi ;;
    *) echo "tpu_vm.sh --watch: VM $NAME is $state; waiting" >&2 ;;
  esac
  sleep "$WATCH_S"
done
