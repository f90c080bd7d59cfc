#!/usr/bin/env bash
# The test command: sets up .venv (first run) and runs the whole suite on all cores (the 25 slowest tests listed at
# the end, so a CI log says where the minutes went). Extra args go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=25 "$@"
