#!/usr/bin/env bash
# Downloads the cp312 x86-64 wheels the device image lacks (benchmarks/device/wheels.txt) into .whl/ (git-ignored),
# for benchmarks/gpu_suite.sh to install offline there (the device machine reaches no package registry).
#
#   bash benchmarks/device/fetch_wheels.sh        # then name .whl in the device call's carry list
#
# Needs pip and PyPI here; any Python >= 3.8 does (pip downloads for the target, not for itself).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
DEST=.whl
mkdir -p "$DEST"
# pip matches manylinux tags exactly, so name every one these wheels are built for.
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" -r benchmarks/device/wheels.txt
# Exactly one version per package: two would make the offline install fail.
names=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | sort)
if [[ -n "$(uniq -d <<<"$names")" ]]; then
  echo "fetch_wheels.sh: $DEST holds two versions of: $(uniq -d <<<"$names" | tr '\n' ' '); delete the old ones." >&2
  exit 1
fi
ls -l "$DEST"/*.whl | awk '{printf "%8.1f KiB  %s\n", $5 / 1024, $NF}'
du -ch "$DEST"/*.whl | tail -1 | sed 's/total/in all (carry: .whl)/'
