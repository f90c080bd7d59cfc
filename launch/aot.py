"""Ahead-of-time compile for a target topology: will this config fit, before the job starts?

`python -m launch.aot --config=configs/mixmae.py:vit_b --topology=TOPO [--device_memory_gb=X] [--config.key=value]`

TOPO: `cpu:N` (N fake CPU devices, always available), a Cloud TPU slice (`v4-32`, `v5p-128`, `v5e-256`, `v6e-64`)
or a libtpu topology (`v5p:4x4x4`; TPU needs `pip install -r requirements-tpu-aot.txt`), or N NVIDIA GPUs (`8xH100`;
needs jax's CUDA plugin, `pip install -r requirements-gpu-aot.txt` or the [gpu] extra, but no GPU or driver; other
GPU models: `--gpu_target_config=FILE`). Builds the mesh from
config.mesh over the topology's devices, lowers and compiles every task's train step with the real shardings
(mmrs/train/aot.py: the train loop's own plan_state/compile_tasks), prints a table per task and, last, one JSON line
{"topology", "devices", "tasks": {TASK: {per_device_peak_bytes, per_device_argument_bytes,
per_device_param_and_opt_bytes, flops_per_step, compile_s, ...}}, "fits", "device_memory_bytes", ...}.
Exit codes: 0 fits (or memory unknown), 1 does not fit, 2 config/mesh/topology error (in seconds, before compiling).
`--plan_only`: stop after the sharded state layout (params + optimizer bytes per device, in seconds; no compile).
`--dump_hlo_dir=DIR`: write each task's compiled HLO to DIR/<task>.hlo.txt.

The program compiled is the target's (mmrs/train/aot.py: its attention and dtypes, raw uint16 inputs normalized in
the step, the launchers' performance flags as compile options); on GPU "fits" compares with the device memory times
the memory fraction launch/gpu_slurm.sh sets (mmrs/train/perf_flags.py; an XLA_CLIENT_MEM_FRACTION or
XLA_PYTHON_CLIENT_MEM_FRACTION in this environment instead, as a job started with it would get).

Target compilers: libtpu and jax's CUDA plugin are found on the Python path, or in `<venv>/aot-targets/tpu` and
`<venv>/aot-targets/gpu` (`pip install --no-deps --target .venv/aot-targets/tpu -r requirements-tpu-aot.txt`, the
same for gpu; .ci/run does this), which only this command puts on its path: training processes never load them.
"""
from __future__ import annotations

import os
import re
import sys


def _prepare_environment(argv) -> None:
  """Before jax starts: fake CPU devices for cpu:N; the host itself always compiles on CPU (libtpu only describes
  the TPU target), so a TPU VM's chips are never grabbed."""
  topo = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), "")
  if topo.startswith("cpu:") and topo[4:].isdigit():
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={int(topo[4:])}".strip()
  # The target's compiler from <venv>/aot-targets/{tpu,gpu} (see the module docstring): only for that target, so a
  # TPU compile does not load the CUDA plugin and training venvs never see either.
  kind = "" if topo.startswith("cpu:") else "gpu" if re.match(r"^\d+x[A-Za-z]", topo) else "tpu"
  targets = os.path.join(sys.prefix, "aot-targets", kind)
  if kind and os.path.isdir(targets):
    sys.path.append(targets)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's host probing; the target is --topology
  # Compile-only libtpu touches no chip, so several launch.aot processes (a sweep, a test) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


if __name__ == "__main__":
  _prepare_environment(sys.argv)

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position



def _define_flags() -> None:
  """Only when run as a script, so tests can import `run` next to launch.main's flags."""
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant,key=value'.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "cpu:N, v4-32, v5p-128, v5e-256, v6e-64, a libtpu topology (v5p:4x4x4) or "
                      "NxGPU (8xH100).")
  flags.DEFINE_string("gpu_target_config", None, "For --topology=NxMODEL: a GpuTargetConfigProto text file "
                      "describing the GPU (default: the built-in description of MODEL, mmrs/train/gpu_target.py).")
  flags.DEFINE_bool("plan_only", False, "Stop after the sharded state layout: per_device_param_and_opt_bytes in "
                    "seconds, no compile (tasks empty).")
  flags.DEFINE_float("device_memory_gb", 0.0, "Per-device memory in GiB (default: the table in "
                     "mmrs/train/metrics.py; GPU: device memory x the launcher's memory fraction; CPU: host RAM / N).")
  flags.DEFINE_string("dump_hlo_dir", None, "Write each task's compiled HLO to DIR/<task>.hlo.txt.")
  flags.DEFINE_bool("perf_flags", True, "Compile with the launchers' performance flags (mmrs/train/perf_flags.py); "
                    "--noperf_flags shows what they cost in memory.")
  flags.mark_flags_as_required(["config", "topology"])

EXIT_DOES_NOT_FIT = 1
EXIT_CONFIG_ERROR = 2


def _print_report(report: dict, out) -> None:
  """The one JSON line every outcome ends with (strict JSON: no NaN)."""
  print(json.dumps(report, sort_keys=True, allow_nan=False), file=out, flush=True)


def run(config, topology: str, device_memory_gb: float = 0.0, out=sys.stdout,
        gpu_target_config: str | None = None, plan_only: bool = False, dump_hlo_dir: str | None = None,
        perf_flags: bool = True) -> int:
  """Prints the tables and the JSON line; returns the exit code. `gpu_target_config`: a file path."""
  from mmrs.train import aot  # pylint: disable=g-import-not-at-top
  from mmrs.train import config_check  # pylint: disable=g-import-not-at-top
  override = int(device_memory_gb * 2**30) if device_memory_gb else None
  target = None
  if gpu_target_config:
    try:
      with open(gpu_target_config) as f:
        target = f.read()
    except OSError as e:
      print(f"ERROR: --gpu_target_config={gpu_target_config}: {e.strerror}; give a GpuTargetConfigProto text file.",
            file=sys.stderr)
      return EXIT_CONFIG_ERROR
  try:
    report = aot.compile_for(config, topology, device_memory_override=override, gpu_target_config=target,
                             plan_only=plan_only, hlo_dir=dump_hlo_dir, with_perf_flags=perf_flags)
  except (config_check.ConfigError, aot.TopologyError) as e:
    print(f"ERROR: {e}", file=sys.stderr)
    return EXIT_CONFIG_ERROR
  except aot.DoesNotFit as e:
    report = e.args[0]
    if "compile_error" in report:
      print(f"DOES NOT FIT: the compiler ran out of device memory on {report['devices']} x {report['device_kind']}, "
            f"mesh {report['mesh']}: {report['compile_error']} Use remat (config.model.remat_policy=full), "
            "config.grad_accum_steps, more fsdp or more devices.", file=sys.stderr)
      _print_report(report, out)
      return EXIT_DOES_NOT_FIT
    print(f"DOES NOT FIT: the sharded state alone needs {report['per_device_param_and_opt_bytes'] / 2**30:.2f} GiB "
          f"per device but a device has {report['device_memory_bytes'] / 2**30:.2f} GiB ({report['memory_source']}); "
          f"mesh {report['mesh']}. Shard it more (config.mesh fsdp=...) or use more devices.", file=sys.stderr)
    _print_report(report, out)
    return EXIT_DOES_NOT_FIT
  if plan_only:
    print(f"{report['devices']} x {report['device_kind']}, mesh {report['mesh']}: params + optimizer state "
          f"{aot.format_bytes(report['per_device_param_and_opt_bytes'])} per device (plan only, not compiled)",
          file=out)
    _print_report(report, out)
    return 0
  for name, numbers in report["tasks"].items():
    print(aot.format_table(name, numbers), file=out)
  mem = report["device_memory_bytes"]
  print(f"{report['devices']} x {report['device_kind']}, mesh {report['mesh']}, device memory "
        f"{'unknown' if mem is None else f'{mem / 2**30:.1f} GiB'} ({report['memory_source']}): "
        f"{'fits' if report['fits'] else 'unknown' if report['fits'] is None else 'DOES NOT FIT'}", file=out)
  _print_report(report, out)
  return EXIT_DOES_NOT_FIT if report["fits"] is False else 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  sys.exit(run(flags.FLAGS.config, flags.FLAGS.topology, flags.FLAGS.device_memory_gb,
               gpu_target_config=flags.FLAGS.gpu_target_config, plan_only=flags.FLAGS.plan_only,
               dump_hlo_dir=flags.FLAGS.dump_hlo_dir, perf_flags=flags.FLAGS.perf_flags))


if __name__ == "__main__":
  _define_flags()
  from launch import cli  # pylint: disable=g-import-not-at-top  (bad flags / --config.KEY typos: one line, exit 2)
  cli.run(main)
