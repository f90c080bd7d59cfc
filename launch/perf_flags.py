"""Print the performance flags a launcher sets (mmrs/train/perf_flags.py holds them, with what each does).

`python -m launch.perf_flags --platform=gpu|tpu [--format=sh|json|describe]`
  sh (default): `export` lines for a job script (launch/gpu_slurm.sh and launch/tpu_vm.sh paste them in);
  json: {"platform", "variables": {VAR: value}, "compiler_options": {...}} (benchmarks/gpu_suite.sh records it);
  describe: one line per flag with what it does.
Standard library only, so it runs before any venv exists.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mmrs.train import perf_flags


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m launch.perf_flags", description=__doc__.splitlines()[0])
  parser.add_argument("--platform", required=True, choices=("gpu", "tpu", "cpu"))
  parser.add_argument("--format", default="sh", choices=("sh", "json", "describe"))
  args = parser.parse_args(argv)
  if args.format == "sh":
    print(perf_flags.shell_exports(args.platform, os.environ))
  elif args.format == "describe":
    print(perf_flags.describe(args.platform))
  else:
    print(json.dumps({"platform": args.platform, "variables": perf_flags.environment(args.platform, os.environ),
                      "compiler_options": perf_flags.compiler_options(args.platform)}, sort_keys=True))
  return 0


if __name__ == "__main__":
  sys.exit(main())
