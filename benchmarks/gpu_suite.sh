#!/usr/bin/env bash
# One-shot benchmark suite for one lent GPU (<= 8 minutes wall with compiles): runs on the device image as it is,
# installs offline what it lacks, and leaves its results packed in a few files under --out.
#
#   bash benchmarks/gpu_suite.sh [--out=DIR] [--results=FILE] [--budget_s=450] [--wheels=.whl] [--attention=auto|xla]
#                                [--work=DIR] [--cpu_smoke]
#
# The device call (README "Benchmarks", benchmarks/RESULTS.md): `bash benchmarks/device/fetch_wheels.sh` and
# `bash benchmarks/py312_smoke.sh` here first, then
#   command: PYTHONUNBUFFERED=1 bash benchmarks/gpu_suite.sh --out=$OUT/gpu     carry: [".whl"]     timeout_s: 570
# and here `python -m benchmarks.device.pack import <files_at>/gpu` (appends the section to benchmarks/RESULTS.md).
#
# Stages, most valuable first (a stage that fails records its error text and the others still run; one that would
# start with under 30 s of the budget left is recorded as skipped):
#   0. wheels: the packages the image lacks (benchmarks/device/wheels.txt), pip-installed offline from --wheels into
#      a scratch --target on PYTHONPATH, only if this Python cannot import them; versions: what it runs with.
#   1. attention_check: cuDNN flash attention itself, then attention as the JAX stages run it ("auto") at the models'
#      shapes, forward and backward against XLA's (benchmarks/device/check.py). If it fails, or with --attention=xla
#      (the fallback switch), every JAX stage runs with config.model.attention=xla.
#   2. peer_mae_s2, peer_mixmae (benchmarks.peer): ViT-B/16, 128 px, batch 256, bfloat16; mmrs vs PyTorch eager and
#      torch.compile on the same GPU, each side in its own process with --side_timeout_s (a failed side keeps the
#      others); the jax side also gives MFU and peak memory at batch 256.
#   3. step_mixmae_b512_noremat: MFU at the largest batch without remat that fits JAX's default pool (75 % of the
#      GPU: ~59.7 GiB on an H100; the 8xH100 AOT estimate in RESULTS.md is 39.6 GiB at 512, ~78 GiB at 1024).
#   4. step_mixmae_b1024_remat (remat "full": ~8 GiB), step_mixmae_b1024_accum2 (two micro-batches of 512: ~40 GiB),
#      step_mae_s2_b512_noremat; then (issue 20's stage 4b) the first step stage again with the launchers' perf flags.
#   5. data_wN: the input pipeline (benchmarks.data_throughput), N = min(8, cores / 2) worker processes.
# Outputs: logs go to a scratch folder (--work, default a mktemp folder under $TMPDIR); at the end --out (default
# runs/gpu_suite/STAMP) holds only gpu_suite.tar.gz (everything), section.md (the RESULTS section), stages.jsonl and
# peer.jsonl (benchmarks/device/pack.py), and the section and the stage table are printed last. --results=FILE also
# appends the section to FILE (plots beside it). Exit 0 once the results are packed, whatever the stages did (the
# table says); 1 when there is no GPU or nothing could be packed.
# --cpu_smoke: the same stages at a tiny size on the CPU (a dry run: numbers meaningless; the tests and
# benchmarks/py312_smoke.sh use it). There cuDNN attention is absent, so the fallback to XLA attention is exercised.
# Its budget defaults to 3600 s: on a loaded 2-core machine a stage takes minutes, and a test must not skip stages
# because the machine was busy.
# Python: $PYTHON, else .venv/bin/python when present, else python3.
set -uo pipefail
{  # bash reads a script as it runs it: inside braces it parses all first, so an edit (a checkout) mid-run is harmless
cd "$(dirname "$0")/.."

SMOKE=0
OUT=""
RESULTS=""
BUDGET=""
WORK=""
WHEELS=.whl
ATTENTION=auto
for arg in "$@"; do
  case "$arg" in
    --cpu_smoke) SMOKE=1 ;;
    --out=*) OUT="${arg#*=}" ;;
    --results=*) RESULTS="${arg#*=}" ;;
    --budget_s=*) BUDGET="${arg#*=}" ;;
    --wheels=*) WHEELS="${arg#*=}" ;;
    --work=*) WORK="${arg#*=}" ;;
    --attention=auto | --attention=xla) ATTENTION="${arg#*=}" ;;
    *) echo "gpu_suite.sh: unknown argument '$arg' (use --out=DIR --results=FILE --budget_s=N --wheels=DIR" \
            "--attention=auto|xla --work=DIR --cpu_smoke)" >&2; exit 2 ;;
  esac
done
((SMOKE)) && BUDGET=${BUDGET:-3600}
BUDGET=${BUDGET:-450}
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-runs/gpu_suite/$STAMP}
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_suite.XXXXXX")}/$STAMP
mkdir -p "$WORK" "$OUT" || { echo "gpu_suite.sh: cannot create $WORK or $OUT" >&2; exit 1; }
STAGES=$WORK/stages.jsonl
START=$(date +%s)

log() { echo "[$(date -u +%T)] $*" | tee -a "$WORK/suite.log"; }
record() { "$PY" -m benchmarks.device.pack record --stages="$STAGES" "$@" || log "could not record: $*"; }

# run NAME LIMIT_S CMD...: output to $WORK/NAME.log, its last JSON line to $WORK/NAME.json; a stage's failure is
# recorded (with its error text) and never stops the suite. Returns the stage's exit code.
run() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - ($(date +%s) - START)))
  if ((left < 30)); then
    log "$name: skipped (${left}s of the ${BUDGET}s budget left)"
    record --name="$name" --status=skipped --note="the suite's ${BUDGET}s budget was spent"
    return 125
  fi
  ((limit > left)) && limit=$left
  # --cpu_smoke: no per-stage guess of this machine's speed (a loaded 2-core machine is many times slower), only the
  # suite's budget; a stage that still runs out says so ("ran out of its Ns").
  ((SMOKE)) && limit=$left
  log "$name (limit ${limit}s): $*"
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$? secs=$(($(date +%s) - t0))
  grep '^{' "$WORK/$name.log" | tail -1 >"$WORK/$name.json"
  [[ -s "$WORK/$name.json" ]] || rm -f "$WORK/$name.json"
  if ((rc == 0)); then
    record --name="$name" --status=ok --exit=0 --seconds="$secs" --log="$WORK/$name.log"
    log "$name: ok in ${secs}s: $(grep -v '^{' "$WORK/$name.log" | tail -1 | cut -c1-200)"
  else
    local note="failed"
    ((rc == 124 || rc == 137)) && note="ran out of its ${limit}s"
    record --name="$name" --status=failed --exit="$rc" --seconds="$secs" --log="$WORK/$name.log" --note="$note"
    local why=$(grep -E '^[[:alnum:]_.]*(Error|Exception)\b' "$WORK/$name.log" | tail -1)
    log "$name: $note (exit $rc) after ${secs}s: $(echo "${why:-$(tail -1 "$WORK/$name.log")}" | cut -c1-200)"
  fi
  return $rc
}

# 0. The packages the image lacks, offline (the device machine reaches no registry), then what we run with.
if "$PY" -c "import ml_collections, grain, array_record, portpicker" >"$WORK/wheels.log" 2>&1; then
  log "wheels: this Python has ml_collections, grain, array_record and portpicker; nothing to install"
elif compgen -G "$WHEELS/*.whl" >/dev/null; then
  run wheels 120 "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$WHEELS"/*.whl
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
else
  log "wheels: this Python cannot import ml_collections/grain/array_record/portpicker and $WHEELS has no wheels" \
      "(run 'bash benchmarks/device/fetch_wheels.sh' where pip works, and carry .whl); the JAX stages will fail"
  record --name=wheels --status=failed --log="$WORK/wheels.log" --note="no wheels in $WHEELS"
fi
run versions 90 "$PY" -m benchmarks.device.check versions && grep -v '^{' "$WORK/versions.log"

if ((SMOKE)); then
  echo "cpu (--cpu_smoke dry run; numbers are meaningless)" >"$WORK/device.txt"
  export JAX_PLATFORMS=cpu
  # The GPU run's peer flags (bfloat16 on both sides, torch.compile) on a tiny model: their code paths run here too;
  # torch.compile's graphs are traced (dynamo, AOT autograd) but not turned into C++ kernels (inductor's CPU builds
  # take minutes on a loaded 2-core machine; on the GPU inductor makes Triton kernels, which a CPU cannot check).
  PEER=(--size=mu --decoder=mu --decoder_depth=1 --image_size=16 --patch_size=8 --batch=2 --dtype=bfloat16
        --torch_compile --torch_compile_backend=aot_eager --steps=1 --warmup=2 --repeats=1 --fast_compile)
  PEER_METHODS=(mixmae)
  VARIANT=tiny
  STEP_STAGES=("mixmae 4 noremat" "mixmae 8 remat" "mixmae 8 accum2")
  STEPS=(--steps=2 --warmup=1)
  DATA=(--seconds=1 --num_synthetic=16 --synthetic_size=32 --image_size=16 --batch_size=4 --normalize=device)
  WORKERS=0
else
  if ! nvidia-smi -L >"$WORK/device.txt" 2>&1; then
    log "no GPU found (nvidia-smi failed: $(tail -1 "$WORK/device.txt")); run on a GPU machine, or use --cpu_smoke"
    record --name=gpu --status=failed --log="$WORK/device.txt" --note="nvidia-smi failed"
  elif [[ "$(grep -o '"jax_backend": "[a-z]*"' "$WORK/versions.json" 2>/dev/null)" != '"jax_backend": "gpu"' ]]; then
    log "jax does not see the GPU (jax.default_backend() != 'gpu'; its error is in versions.log)"
    record --name=gpu --status=failed --log="$WORK/versions.log" --note="jax does not see the GPU"
  fi
  if grep -q '"stage": "gpu"' "$STAGES" 2>/dev/null; then
    "$PY" -m benchmarks.device.pack pack --work="$WORK" --out="$OUT"
    exit 1
  fi
  PEER=(--size=B --image_size=128 --batch=256 --dtype=bfloat16 --torch_compile --repeats=1 --steps=10 --warmup=2
        --side_timeout_s=180)
  PEER_METHODS=(mae_s2 mixmae)
  VARIANT=vit_b
  STEP_STAGES=("mixmae 512 noremat" "mixmae 1024 remat" "mixmae 1024 accum2" "mae_s2 512 noremat")
  STEPS=(--steps=10 --warmup=2)
  cores=$(nproc)
  WORKERS=$((cores / 2 < 8 ? cores / 2 : 8))
  DATA=(--seconds=10 --normalize=device)
fi

# 1. cuDNN attention: a compile-time failure there would take every JAX stage down, so check it once, cheaply.
PEER_ATTN=()
STEP_ATTN=()
if [[ $ATTENTION == xla ]]; then
  log "attention: --attention=xla: every JAX stage uses XLA attention"
  record --name=attention_check --status=skipped --note="--attention=xla"
elif ! run attention_check 90 "$PY" -m benchmarks.device.check attention; then
  log "attention: the cuDNN check failed (error in attention_check.log): every JAX stage uses XLA attention"
  ATTENTION=xla
fi
if [[ $ATTENTION == xla ]]; then
  PEER_ATTN=(--attention=xla)
  STEP_ATTN=(--config.model.attention=xla)
fi

# 2. mmrs vs PyTorch (the jax side also reports MFU and peak memory at this batch).
for m in "${PEER_METHODS[@]}"; do
  run "peer_$m" 600 "$PY" -m benchmarks.peer --method="$m" "${PEER[@]}" "${PEER_ATTN[@]}" \
    --json_out="$WORK/peer.jsonl"
done

# 3./4. the mmrs step at batch sizes that fit: no remat, remat, gradient accumulation.
for stage in "${STEP_STAGES[@]}"; do
  read -r m batch variant <<<"$stage"
  extra=()
  case "$variant" in
    remat) extra=(--config.model.remat_policy=full) ;;
    accum*) extra=(--config.grad_accum_steps="${variant#accum}") ;;
  esac
  run "step_${m}_b${batch}_${variant}" 150 "$PY" -m benchmarks.step_throughput \
    --config="configs/$m.py:$VARIANT" --config.batch_size="$batch" "${extra[@]}" "${STEP_ATTN[@]}" "${STEPS[@]}"
done

# 4b. (issue 20) the launchers' performance flags (mmrs/train/perf_flags.py; recorded in perf_flags.json): the first
# step stage again with XLA_FLAGS and XLA_CLIENT_MEM_FRACTION as launch/gpu_slurm.sh sets them, against that stage
# run above without them. On one GPU only the single-device flags can matter (no collectives to overlap).
if PERF_ENV=$("$PY" -m launch.perf_flags --platform=gpu) \
    && "$PY" -m launch.perf_flags --platform=gpu --format=json >"$WORK/perf_flags.json"; then
  read -r m batch variant <<<"${STEP_STAGES[0]}"
  run "step_${m}_b${batch}_${variant}_perf_flags" 150 bash -c 'eval "$1"; shift; exec "$@"' _ "$PERF_ENV" \
    "$PY" -m benchmarks.step_throughput --config="configs/$m.py:$VARIANT" --config.batch_size="$batch" \
    "${STEP_ATTN[@]}" "${STEPS[@]}"
else
  record --name=perf_flags --status=failed --note="python -m launch.perf_flags failed"
fi

# 5. the input pipeline.
run "data_w$WORKERS" 60 "$PY" -m benchmarks.data_throughput --workers="$WORKERS" "${DATA[@]}"

# The RESULTS section (plots under $WORK/plots, linked as plots/...), then everything packed into --out.
CMD="bash benchmarks/gpu_suite.sh $*"
if ! "$PY" -m benchmarks.peer_report --suite_dir="$WORK" --results="$WORK/RESULTS.md" --command="${CMD% }" \
    --archive="gpu_suite.tar.gz" >"$WORK/section.md" 2>"$WORK/section.log"; then
  log "writing the RESULTS section failed: $(tail -3 "$WORK/section.log")"
  printf '## GPU suite (`benchmarks/gpu_suite.sh`): no section (peer_report failed; see section.log)\n' \
    >"$WORK/section.md"
fi
rm -f "$WORK/RESULTS.md"
log "done in $(($(date +%s) - START))s; packing into $OUT"
"$PY" -m benchmarks.device.pack pack --work="$WORK" --out="$OUT" || { echo "gpu_suite.sh: packing failed" >&2; exit 1; }
if [[ -n "$RESULTS" ]]; then
  "$PY" -m benchmarks.device.pack import "$OUT" --results="$RESULTS" >/dev/null && echo "section appended to $RESULTS"
fi
exit
}
