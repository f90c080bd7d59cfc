#!/usr/bin/env bash
# One-shot benchmark suite for a machine with one GPU (<= 8 minutes): writes everything to one folder and appends a
# dated section to benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_suite.sh [--out=DIR] [--results=FILE] [--budget_s=420] [--cpu_smoke]
#
# Measures, in this order (most important first; anything that would overrun the time budget is skipped and listed
# as such in the RESULTS section):
#   1. benchmarks.peer, ViT-B/16 MixMAE and MAE-S2, 128 px, batch 256, bfloat16: mmrs's step (images/s, MFU against
#      the device's datasheet peak from mmrs/train/metrics.py, peak memory) vs the PyTorch peer, eager and
#      torch.compile, on the same GPU;
#   2. the mmrs step of both methods at a second batch size (1024; configs/<method>.py:vit_b);
#   3. the same with remat (config.model.remat_policy=$REMAT_POLICY, default "full") when the config has that key;
#   4. the input pipeline (benchmarks.data_throughput) with N = min(8, cores / 2) worker processes.
# --cpu_smoke: the same suite at a tiny size on the CPU (a dry run: seconds, numbers meaningless; the test uses it).
# Needs requirements-bench.txt (torch with CUDA for the GPU, matplotlib) besides requirements(-gpu).txt.
# Python: $PYTHON, else .venv/bin/python when present, else python.
set -uo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
OUT=""
RESULTS=benchmarks/RESULTS.md
BUDGET=420
for arg in "$@"; do
  case "$arg" in
    --cpu_smoke) SMOKE=1 ;;
    --out=*) OUT="${arg#*=}" ;;
    --results=*) RESULTS="${arg#*=}" ;;
    --budget_s=*) BUDGET="${arg#*=}" ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --out=DIR --results=FILE --budget_s=N --cpu_smoke)" >&2; exit 2 ;;
  esac
done
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-runs/gpu_suite/$STAMP}
mkdir -p "$OUT"
: > "$OUT/skipped.txt"
START=$(date +%s)
REMAT_POLICY=${REMAT_POLICY:-full}

skip() { echo "$1" | tee -a "$OUT/skipped.txt"; }

# run NAME LIMIT_S CMD...: logs to $OUT/NAME.log, the last JSON line to $OUT/NAME.json; never stops the suite.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  # --cpu_smoke: no time limit at all (the test's dry run must not depend on this machine's load: a loaded 2-core
  # machine is many times slower than any per-stage guess).
  if ((!SMOKE && left < 15)); then skip "$name: skipped, the suite's ${BUDGET}s budget was spent"; return; fi
  ((limit > left)) && limit=$left
  ((SMOKE)) && limit=0  # timeout 0: none
  echo "[$(date -u +%T)] $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  if ((rc != 0)); then
    local why="failed"
    ((rc == 124)) && why="timed out after its ${limit}s"
    skip "$name: $why (exit $rc), see $OUT/$name.log: $(tail -1 "$OUT/$name.log" | cut -c1-200)"
    return
  fi
  grep '^{' "$OUT/$name.log" | tail -1 >"$OUT/$name.json"
  tail -1 "$OUT/$name.log" | cut -c1-300
}

if ((SMOKE)); then
  echo "cpu (--cpu_smoke dry run; numbers are meaningless)" >"$OUT/device.txt"
  export JAX_PLATFORMS=cpu
  # The GPU run's peer flags (bfloat16 on both sides, torch.compile) on a tiny model: their code paths run here too.
  PEER=(--size=mu --decoder=mu --decoder_depth=1 --image_size=16 --patch_size=8 --batch=2 --dtype=bfloat16
        --torch_compile --steps=1 --warmup=2 --repeats=1 --fast_compile)
  PEER_METHODS=(mixmae)
  STEP_METHODS=(mixmae)
  STEP_VARIANT=tiny
  BATCH2=4
  STEPS=(--steps=2 --warmup=1)
  DATA=(--seconds=1 --num_synthetic=16 --synthetic_size=32 --image_size=16 --batch_size=4 --normalize=device)
  WORKERS=0
else
  if ! nvidia-smi -L >"$OUT/device.txt" 2>&1; then
    echo "gpu_suite.sh: no GPU found (nvidia-smi failed); run on a GPU machine, or use --cpu_smoke for a dry run." >&2
    exit 1
  fi
  if [[ "$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null)" != "gpu" ]]; then
    echo "gpu_suite.sh: jax does not see the GPU (jax.default_backend() != 'gpu'): pip install -r requirements-gpu.txt." >&2
    exit 1
  fi
  PEER=(--size=B --image_size=128 --batch=256 --dtype=bfloat16 --torch_compile --repeats=1 --steps=10 --warmup=3)
  PEER_METHODS=(mixmae mae_s2)
  STEP_METHODS=(mixmae mae_s2)
  STEP_VARIANT=vit_b
  BATCH2=1024
  STEPS=(--steps=10 --warmup=2)
  cores=$(nproc)
  WORKERS=$((cores / 2 < 8 ? cores / 2 : 8))
  DATA=(--seconds=10 --normalize=device)
fi

# 1. mmrs vs PyTorch (also the mmrs step at the first batch size: the jax side reports MFU and peak memory).
for m in "${PEER_METHODS[@]}"; do
  run "peer_$m" 240 "$PY" -m benchmarks.peer --method="$m" "${PEER[@]}" --json_out="$OUT/peer.jsonl"
done

# 2./3. the mmrs step at the second batch size, without and with remat.
for m in "${STEP_METHODS[@]}"; do
  run "step_${m}_b${BATCH2}_noremat" 120 "$PY" -m benchmarks.step_throughput \
    --config="configs/$m.py:$STEP_VARIANT" --config.batch_size="$BATCH2" "${STEPS[@]}"
done
if "$PY" -c "import sys; from configs import mixmae; sys.exit(0 if 'remat_policy' in mixmae.get_config().model else 1)"; then
  for m in "${STEP_METHODS[@]}"; do
    run "step_${m}_b${BATCH2}_remat" 120 "$PY" -m benchmarks.step_throughput \
      --config="configs/$m.py:$STEP_VARIANT" --config.batch_size="$BATCH2" \
      --config.model.remat_policy="$REMAT_POLICY" "${STEPS[@]}"
  done
else
  skip "remat: config.model.remat_policy does not exist in this version of mmrs (no remat to compare)"
fi

# 4. the input pipeline.
run "data_w$WORKERS" 60 "$PY" -m benchmarks.data_throughput --workers="$WORKERS" "${DATA[@]}"

CMD="bash benchmarks/gpu_suite.sh $*"
"$PY" -m benchmarks.peer_report --suite_dir="$OUT" --results="$RESULTS" --command="${CMD% }" >"$OUT/section.md" \
  || { echo "gpu_suite.sh: writing the RESULTS section failed (see above)" >&2; exit 1; }
echo "gpu_suite.sh: done in $(($(date +%s) - START))s; outputs in $OUT; section appended to $RESULTS"
