#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, convert the bundled real BigEarthNet-MM sample to shards, and
# pretrain MixMAE on it (a few minutes on a laptop CPU). Extra args go to launch.main (e.g. --config.total_steps=50).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
DATA=${DATA:-runs/data/bigearthnet_mm_sample}
WORKDIR=${WORKDIR:-runs/mixmae_demo}
python -m data_prep.bigearthnet_mm --src=data_prep/samples/bigearthnet_mm --out="$DATA" --num_shards=1 --workers=0
python -m data_prep.inspect "$DATA" --limit=3
python -m launch.main --config=configs/mixmae.py:demo --workdir="$WORKDIR" "$@"
