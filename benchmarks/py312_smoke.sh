#!/usr/bin/env bash
# The GPU suite's dry run on the device image's software, here: Python 3.12 with the image's jax 0.11.2 (CPU
# jaxlib), flax, optax, orbax, tensorstore and torch 2.11.0 (benchmarks/device/image.txt), WITHOUT the packages the
# image lacks: gpu_suite.sh installs those offline from .whl/ (benchmarks/device/fetch_wheels.sh) exactly as on the
# device. Then checks that --out holds only what the device call brings back and that every stage but the cuDNN
# check (no GPU here) passed. Run it before handing a GPU session the suite (see README "GPU benchmarks").
#
#   bash benchmarks/py312_smoke.sh [--out=runs/py312_smoke/out]
#
# First run: builds .venv-py312 (git-ignored; ~6 GB: torch's CUDA wheels, as the image has them; a few minutes where
# PyPI is near) and downloads the wheels; later runs reuse both while image.txt is unchanged. Python 3.12: $PY312,
# else python3.12 on PATH, else pyenv's newest 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/py312_smoke/out
for arg in "$@"; do
  case "$arg" in
    --out=*) OUT="${arg#*=}" ;;
    *) echo "py312_smoke.sh: unknown argument '$arg' (use --out=DIR)" >&2; exit 2 ;;
  esac
done
# The first candidate that runs as 3.12 (a pyenv shim on PATH may exist and still refuse to run).
py312=""
for candidate in ${PY312:-} python3.12 $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null \
    | sort -rV); do
  if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
    py312=$candidate
    break
  fi
done
if [[ -z "$py312" ]]; then
  echo "py312_smoke.sh: no Python 3.12 found (set PY312=/path/to/python3.12, or: pyenv install 3.12)" >&2
  exit 1
fi
VENV=.venv-py312
want=$(sha256sum benchmarks/device/image.txt | cut -d' ' -f1)
if [[ "$(cat "$VENV/.image.sha256" 2>/dev/null)" != "$want" ]]; then
  echo "py312_smoke.sh: building $VENV with $py312 ($("$py312" -V)) from benchmarks/device/image.txt"
  rm -rf "$VENV"
  "$py312" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r benchmarks/device/image.txt
  echo "$want" >"$VENV/.image.sha256"
fi
# As on the device: what wheels.txt carries must not be in the venv, or the offline install would go untested.
if "$VENV/bin/python" -c "import ml_collections" 2>/dev/null || "$VENV/bin/python" -c "import grain" 2>/dev/null; then
  echo "py312_smoke.sh: $VENV has ml_collections or grain, which the device image lacks; delete $VENV" >&2
  exit 1
fi
PYTHON="$VENV/bin/python" bash benchmarks/device/fetch_wheels.sh
rm -rf "$OUT"
PYTHON="$VENV/bin/python" bash benchmarks/gpu_suite.sh --cpu_smoke --out="$OUT"
"$VENV/bin/python" -m benchmarks.device.pack verify "$OUT" --allow_failed=attention_check
