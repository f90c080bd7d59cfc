"""The XLA / libtpu performance flags and the GPU memory fraction of a training run, in one place.

The launchers export them (launch/gpu_slurm.sh, launch/tpu_vm.sh, through `python -m launch.perf_flags`), launch.aot
compiles the target's program with the same flags (as compile options, which the target's compiler checks: an
unknown name fails the compile with "No such compile option"), and benchmarks/gpu_suite.sh runs the step with and
without them. Standard library only: the launchers run this before any venv exists (--dry_run on a laptop).

Chosen for FSDP/data-parallel training of a ViT on jax 0.10.2 (jaxlib's XLA, the CUDA plugin 0.10.2, libtpu
0.0.42.1; each name checked by tests/test_aot_target.py against those compilers), following JAX's GPU performance
tips, NVIDIA's JAX-Toolbox GPU performance page and maxtext's TPU flag library (CF_FOR_ALL_GATHER,
CF_FOR_ALL_REDUCE, DATA_PARALLEL_OVERLAP). A flag the user already set (in XLA_FLAGS / LIBTPU_INIT_ARGS, or a memory
fraction in either variable) wins.
"""
from __future__ import annotations

import os
from typing import Mapping

# GPU (XLA_FLAGS of every training process). name -> (value, what it does)
GPU_XLA_FLAGS: dict[str, tuple[str, str]] = {
    "xla_gpu_enable_latency_hiding_scheduler": (
        "true", "schedule collectives early and overlap them with compute (FSDP all-gathers, gradient reductions)"),
    "xla_gpu_enable_pipelined_all_gather": (
        "true", "with scan_layers: all-gather the next layer's weights during this layer's compute"),
    "xla_gpu_enable_pipelined_reduce_scatter": (
        "true", "with scan_layers: reduce-scatter a layer's gradients during the next layer's backward"),
    "xla_gpu_enable_pipelined_all_reduce": (
        "true", "the same for all-reduces (data-parallel gradients)"),
    "xla_gpu_all_gather_combine_threshold_bytes": (
        "134217728", "combine small all-gathers up to 128 MiB: fewer, larger NCCL calls"),
    "xla_gpu_reduce_scatter_combine_threshold_bytes": (
        "134217728", "the same for reduce-scatters"),
    "xla_gpu_all_reduce_combine_threshold_bytes": (
        "134217728", "the same for all-reduces"),
}

# Left out: xla_gpu_enable_while_loop_double_buffering (NVIDIA recommends it with pipelined collectives). It unrolls
# while loops by two, so with grad_accum_steps two micro-batches' activations are live at once: MixMAE ViT-H, 512 per
# GPU, grad_accum_steps=2 on 8xH100 needs 77.87 GiB with it and 60.40 GiB without (launch.aot, benchmarks/RESULTS.md).
# Add it to XLA_FLAGS yourself where memory allows.

# GPU memory: JAX preallocates 75 % of the device's memory by default (jax 0.10.2: XLA_CLIENT_MEM_FRACTION, the
# older XLA_PYTHON_CLIENT_MEM_FRACTION still read; setting both is an error). 0.90 is what NVIDIA's JAX-Toolbox
# recommends; the rest (~8 GiB of an H100) is left to the CUDA context, cuBLAS/cuDNN workspaces and NCCL, which
# allocate outside XLA's pool. launch.aot's GPU "fits" compares with the device memory times this fraction.
GPU_MEM_FRACTION = 0.90
MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")

# TPU (LIBTPU_INIT_ARGS, read by libtpu when it starts). name -> (value, what it does)
TPU_LIBTPU_FLAGS: dict[str, tuple[str, str]] = {
    "xla_tpu_enable_async_collective_fusion": (
        "true", "continuation fusion: run collectives asynchronously, fused with the compute around them"),
    "xla_tpu_enable_async_collective_fusion_fuse_all_gather": (
        "true", "... for all-gathers (FSDP gathers each layer's weights)"),
    "xla_tpu_enable_async_collective_fusion_fuse_all_reduce": (
        "true", "... for all-reduces (data-parallel gradient reduction)"),
    "xla_tpu_enable_async_collective_fusion_multiple_steps": (
        "true", "let one collective overlap several compute steps"),
    "xla_tpu_overlap_compute_collective_tc": (
        "true", "overlap compute and collectives on the TensorCore"),
    "xla_enable_async_all_gather": ("true", "asynchronous all-gathers"),
    "xla_enable_async_all_reduce": ("true", "asynchronous all-reduces"),
    "xla_tpu_enable_data_parallel_all_reduce_opt": (
        "true", "optimize the data-parallel gradient all-reduces (across slices over DCN too)"),
    "xla_tpu_data_parallel_opt_different_sized_ops": (
        "true", "pipeline data-parallel all-reduces of different sizes across iterations"),
}

PLATFORM_FLAGS = {"gpu": ("XLA_FLAGS", GPU_XLA_FLAGS), "tpu": ("LIBTPU_INIT_ARGS", TPU_LIBTPU_FLAGS)}


def _check(platform: str) -> None:
  if platform not in PLATFORM_FLAGS and platform != "cpu":
    raise ValueError(f"platform {platform!r}: use gpu, tpu or cpu.")


def _flag_names(text: str) -> set[str]:
  return {w.lstrip("-").split("=", 1)[0] for w in text.split() if w.startswith("--")}


def flags(platform: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """name -> value of the platform's performance flags, less those `environ`'s variable already sets ({} on CPU)."""
  _check(platform)
  if platform not in PLATFORM_FLAGS:
    return {}
  var, table = PLATFORM_FLAGS[platform]
  have = _flag_names((environ or {}).get(var, ""))
  return {k: v for k, (v, _) in table.items() if k not in have}


def compiler_options(platform: str, environ: Mapping[str, str] | None = None) -> dict[str, bool | int | str]:
  """The platform's flags as compile options (launch.aot), typed as XLA's option parser takes them; like the
  launchers, a flag `environ`'s (default: this process's) XLA_FLAGS / LIBTPU_INIT_ARGS sets is left to it."""
  out: dict[str, bool | int | str] = {}
  for k, v in flags(platform, os.environ if environ is None else environ).items():
    out[k] = v == "true" if v in ("true", "false") else int(v) if v.isdigit() else v
  return out


def gpu_memory_fraction(environ: Mapping[str, str] | None = None) -> tuple[float, str]:
  """(fraction of the device memory JAX's allocator gets, where it comes from) for a process started by the GPU
  launcher with `environ`: the variable already set, else GPU_MEM_FRACTION (what the launcher sets)."""
  environ = os.environ if environ is None else environ
  if environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
    return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform (no pool: all device memory)"
  for var in MEM_FRACTION_VARS:
    if environ.get(var):
      try:
        return float(environ[var]), f"{var}={environ[var]}"
      except ValueError:
        raise ValueError(f"{var}={environ[var]!r} is not a number; give a fraction such as 0.9.") from None
  return GPU_MEM_FRACTION, f"XLA_CLIENT_MEM_FRACTION={GPU_MEM_FRACTION} (launch/gpu_slurm.sh; mmrs/train/perf_flags.py)"


def environment(platform: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
  """The variables a launcher sets for `platform`, merged with `environ`: the flag variable with our flags first (a
  flag `environ` already sets is left out, so the user's value is the only one), and on GPU the memory fraction
  unless `environ` sets one."""
  environ = os.environ if environ is None else environ
  _check(platform)
  if platform not in PLATFORM_FLAGS:
    return {}
  var, _ = PLATFORM_FLAGS[platform]
  ours = " ".join(f"--{k}={v}" for k, v in flags(platform, environ).items())
  out = {var: f"{ours} {environ.get(var, '')}".strip()}
  if platform == "gpu" and not any(environ.get(v) for v in MEM_FRACTION_VARS):
    out["XLA_CLIENT_MEM_FRACTION"] = f"{GPU_MEM_FRACTION:.2f}"
  return out


def shell_exports(platform: str, environ: Mapping[str, str] | None = None) -> str:
  """Shell lines for a job script (the launchers paste them in): our flags before whatever the job's own variable
  holds when it runs (flags `environ`, the submitting shell, already sets are left out), and on GPU the memory
  fraction unless the job's environment sets one. Empty on CPU."""
  _check(platform)
  if platform not in PLATFORM_FLAGS:
    return ""
  var, _ = PLATFORM_FLAGS[platform]
  ours = " ".join(f"--{k}={v}" for k, v in flags(platform, environ).items())
  lines = [f'export {var}="{ours} ${{{var}:-}}"']
  if platform == "gpu":
    unset = "".join(f"${{{v}:-}}" for v in MEM_FRACTION_VARS)
    lines.append(f'[ -n "{unset}" ] || export XLA_CLIENT_MEM_FRACTION={GPU_MEM_FRACTION:.2f}')
  return "\n".join(lines)


def describe(platform: str) -> str:
  """One line per flag with what it does (python -m launch.perf_flags --describe)."""
  _check(platform)
  if platform not in PLATFORM_FLAGS:
    return "cpu: no performance flags."
  var, table = PLATFORM_FLAGS[platform]
  lines = [f"{var}:"] + [f"  --{k}={v}  # {why}" for k, (v, why) in table.items()]
  if platform == "gpu":
    lines.append(f"XLA_CLIENT_MEM_FRACTION={GPU_MEM_FRACTION:.2f}  # JAX's default is 0.75 of the device memory")
  return "\n".join(lines)
