"""Ahead-of-time compile of every task's train step for a target topology (launch/aot.py is the CLI).

Same code path as the train loop: `step.plan_state` (optimizer + sharded state layout) and `step.compile_tasks`
(lower + compile with the real shardings), on a mesh built from `config.mesh` over the topology's devices. Batches
are abstract shapes from the config (no data is read): per task, its modalities at `config.data.<dataset>.image_size`
with the channel count of `config.bands.<modality>`, in the dtypes the pipeline delivers (S2 uint16, S1 float32 dB plus
its uint8 `s1_valid`), normalized inside the step as in training (placeholder statistics: the program is the same
for any); BYOL-style tasks: two float32 views of `config.views.image_size` (normalized on the host, as in training).
The program is the target's: mmrs/target.py decides attention and compute dtype from the devices compiled for (the
step is traced under `target.compiling_for`), and the target's performance flags (mmrs/train/perf_flags.py, what
the launchers set) are passed as compile options, which the target's compiler checks. The report's per-task
"attention" says which implementation the compiled program holds (a GPU target compiles cuDNN flash attention
without a GPU, where jax accepts it for the shapes).

Topologies: `cpu:N` (N CPU devices; the process must start with XLA_FLAGS=--xla_force_host_platform_device_count>=N,
which launch/aot.py sets); TPU slices by their Cloud name (`v4-32`, `v5p-128`, `v5e-256`, `v6e-64`: the v4/v5p
number counts TensorCores, 2 per chip; v5e/v6e count chips) or a raw libtpu topology (`v5p:4x4x4`), compiled
through `jax.experimental.topologies` with libtpu (requirements-tpu-aot.txt) while the host stays on CPU (checked:
v5p, v5e and v4). A Cloud v4 name asks libtpu for megacore devices (`chip_config_name="megacore"`: one device per
chip with the chip's 32 GiB, as a real v4 slice has); a raw `v4:AxBxC` keeps libtpu's default of one device per
TensorCore (half the chip's HBM each), which jax's TPU mesh builder refuses, so mesh.device_grid falls back to a
physical-order mesh (logged). NVIDIA GPUs: `NxMODEL` (`8xH100`), compile-only CUDA devices from jax's CUDA plugin
and a GPU target description, no GPU needed (mmrs/train/gpu_target.py; requirements-gpu-aot.txt).

Device memory: the HBM table (TPU); on GPU what JAX's allocator gets, the device's memory (as CUDA reports it, from
the target description) times the memory fraction the GPU launcher sets (or the one in this environment).

Numbers per task (per device): argument / output / alias / temp bytes from `compiled.memory_analysis()`;
peak = argument + output - alias + temp (the donated state is aliased); param+opt = this device's shards of the
params, optimizer state and method state from the layout; flops_per_step = XLA's per-device cost analysis x devices
(a while loop's body is counted once: with scan_layers or grad_accum_steps > 1 it undercounts; the report also has
`analytic_flops_per_step`, the method's own count that MFU uses).
"""
from __future__ import annotations

import functools
import math
import os
import pathlib
import re
from typing import Any, Mapping

import jax
import numpy as np

from mmrs.train import config_check
from mmrs.train import gpu_target
from mmrs.train import mesh as mesh_lib
from mmrs.train import metrics as metrics_lib
from mmrs.train import perf_flags
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib

# Cloud TPU name prefix -> (libtpu family, names count TensorCores (2 per chip)?, torus dimensions)
TPU_FAMILIES = {"v4": ("v4", True, 3), "v5p": ("v5p", True, 3), "v5e": ("v5e", False, 2),
                "v5litepod": ("v5e", False, 2), "v6e": ("v6e", False, 2)}


class TopologyError(ValueError):
  """A topology name that cannot be resolved; the message says what to do."""


def tpu_topology_name(name: str) -> str:
  """'v5p-128' -> 'v5p:4x4x4' (64 chips), 'v4-32' -> 'v4:2x2x4', 'v5e-256' -> 'v5e:16x16'; 'v5p:4x4x4' unchanged."""
  if ":" in name:
    return name
  prefix, _, count = name.partition("-")
  if prefix not in TPU_FAMILIES or not count.isdigit():
    names = ", ".join(f"{p}-N" for p in TPU_FAMILIES)
    raise TopologyError(f"--topology={name!r}: use cpu:N, a Cloud TPU name ({names}) or a libtpu topology such as "
                        "v5p:4x4x4.")
  family, cores, ndim = TPU_FAMILIES[prefix]
  chips = int(count) // 2 if cores else int(count)
  if chips < 1 or chips & (chips - 1):
    raise TopologyError(f"--topology={name!r}: {chips} chips is not a power of two; give the shape instead, e.g. "
                        f"{family}:2x2x1.")
  dims = [1] * ndim
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
  # Unit dimensions last: libtpu tiles a topology by hosts of 2x2x1 chips (v5p:2x2x1 is valid, v5p:1x2x2 is not).
  dims = sorted(d for d in dims if d > 1) + [1] * dims.count(1)
  return f"{family}:{'x'.join(str(d) for d in dims)}"


def topology_devices(topology: str, gpu_target_config: str | None = None) -> list:
  """The devices to compile for (real CPU devices, libtpu's compile-only TPU devices or the CUDA plugin's compile-only
  GPU devices; `gpu_target_config`: a GpuTargetConfigProto text for NxMODEL, see mmrs/train/gpu_target.py)."""
  if topology.startswith("cpu:"):
    try:
      n = int(topology[4:])
    except ValueError:
      raise TopologyError(f"--topology={topology!r}: use cpu:N with an integer N.") from None
    have = jax.devices("cpu")
    if n < 1 or n > len(have):
      raise TopologyError(f"--topology={topology}: this process has {len(have)} CPU device(s). Start it with "
                          f"XLA_FLAGS=--xla_force_host_platform_device_count={n} (python -m launch.aot does).")
    return have[:n]
  gpu = gpu_target.parse_gpu_topology(topology)
  if gpu is not None:
    return _gpu_devices(topology, *gpu, gpu_target_config)
  name = tpu_topology_name(topology)
  # A Cloud v4 slice runs in megacore mode (one jax device per chip, both TensorCores); libtpu's compile-only v4
  # topology defaults to one device per TensorCore, so ask for the chip config a real v4 slice has. (A raw name,
  # `v4:2x2x4`, keeps libtpu's default: per-core devices, see mesh.device_grid and device_memory.)
  options = {"chip_config_name": "megacore"} if ":" not in topology and TPU_FAMILIES.get(
      topology.partition("-")[0], ("",))[0] == "v4" else {}
  try:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    return list(topologies.get_topology_desc(name, "tpu", **options).devices)
  except Exception as e:  # pylint: disable=broad-except  (libtpu missing or refusing the name)
    raise TopologyError(f"--topology={topology} ({name}) needs libtpu for compile-only TPU devices: pip install -r "
                        f"requirements-tpu-aot.txt (libtpu matching jax {jax.__version__}). libtpu said: {e}") from None


def _gpu_devices(topology: str, count: int, model: str, target_config: str | None) -> list:
  if target_config is None:
    if model not in gpu_target.GPU_SPECS:
      raise TopologyError(f"--topology={topology}: no built-in description of GPU {model!r} (known: "
                          f"{', '.join(m.upper() for m in gpu_target.GPU_SPECS)}); pass --gpu_target_config=FILE "
                          "(a GpuTargetConfigProto text, see mmrs/train/gpu_target.py).")
    target_config = gpu_target.target_config_text(model)
  try:
    return gpu_target.compile_only_devices(count, target_config)
  except ValueError as e:
    raise TopologyError(f"--topology={topology}: {e}") from None
  except Exception as e:  # pylint: disable=broad-except  (no CUDA plugin, or the plugin refusing the description)
    raise TopologyError(f"--topology={topology} needs jax's CUDA plugin for compile-only GPU devices: pip install -r "
                        f"requirements-gpu-aot.txt (or the [gpu] extra; jax-cuda12-plugin/pjrt {jax.__version__}), "
                        f"no GPU or driver needed; or run launch.aot on the GPU host. jax said: "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def abstract_batches(config, method, batch_size: int) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """task -> global abstract batch as the pipeline delivers it, from the config (see the module docstring)."""
  from mmrs.data import records  # pylint: disable=g-import-not-at-top
  from mmrs.methods import mae as mae_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for task in method.tasks:
    if hasattr(method, "abstract_batch"):
      out[task.name] = dict(method.abstract_batch(task, batch_size))
      continue
    if getattr(task, "batch_kind", "") == "byol_views":
      size = int(config.views.image_size)
      ch = int(method.in_channels)
      out[task.name] = {v: jax.ShapeDtypeStruct((batch_size, size, size, ch), np.float32) for v in ("view1", "view2")}
      continue
    size = int(config.data[task.dataset].image_size)
    if size <= 0:
      raise config_check.ConfigError(f"config.data.{task.dataset}.image_size={size}: launch.aot needs a fixed image "
                                     "size to build the abstract batch.")
    batch = {m: jax.ShapeDtypeStruct((batch_size, size, size, len(mae_lib.band_names(config, m))),
                                     records.ARRAY_DTYPES[m]) for m in task.modalities}
    if "s1" in batch:  # the pipeline's S1 no-data mask (mmrs/data/transforms.py)
      batch["s1_valid"] = jax.ShapeDtypeStruct((batch_size, size, size), records.ARRAY_DTYPES["s1_valid"])
    out[task.name] = batch
  return out


def normalizers(config, method) -> dict[str, Any]:
  """task -> the in-step normalization of its raw batch (None for host-normalized BYOL views), as
  mmrs/train/data.py builds it, with placeholder statistics (mean 1, std 2 per band: not the identity, which XLA
  would fold away)."""
  from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top
  from mmrs.methods import mae as mae_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for task in method.tasks:
    if getattr(task, "batch_kind", "") == "byol_views" or hasattr(method, "abstract_batch"):
      out[task.name] = None
      continue
    bands = {m: tuple(mae_lib.band_names(config, m)) for m in task.modalities}
    normalizer = normalize_lib.Normalizer(bands, {m: np.ones(len(b), np.float32) for m, b in bands.items()},
                                          {m: np.full(len(b), 2.0, np.float32) for m, b in bands.items()},
                                          source="launch.aot placeholder statistics")
    normalizer = getattr(method, "input_normalizer", lambda n: n)(normalizer)
    out[task.name] = functools.partial(normalize_lib.normalize_batch, normalizer=normalizer)
  return out


def state_bytes_per_device(layout: state_lib.StateLayout) -> int:
  """Bytes of one device's shards of the state (params, optimizer state, method state)."""
  total = 0
  for leaf in jax.tree.leaves(layout.abstract):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def device_memory(devices, override_bytes: int | None, gpu_total_bytes: int | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
  """(bytes per device, source): the override; on GPU what JAX's allocator gets (`gpu_total_bytes`, the memory CUDA
  reports, times the launcher's memory fraction: mmrs/train/perf_flags.py, or the one `environ` sets); the HBM
  table; or (CPU) host RAM shared by the fake devices."""
  if override_bytes:
    return int(override_bytes), "--device_memory_gb"
  kind = devices[0].device_kind
  if devices[0].platform == "gpu" and gpu_total_bytes:
    fraction, why = perf_flags.gpu_memory_fraction(environ)
    return int(gpu_total_bytes * fraction), (f"{gpu_total_bytes / 2**30:.1f} GiB ({kind}, as CUDA reports it) x "
                                             f"{fraction:g}: {why}")
  found = metrics_lib.device_memory_bytes(kind)
  if found:
    cores = len({getattr(d, "core_on_chip", 0) for d in devices})
    if cores > 1 and devices[0].platform == "tpu":  # one device per TensorCore: the chip's HBM is split between them
      return found // cores, f"mmrs/train/metrics.py DEVICE_MEMORY_BYTES ({kind}) / {cores} TensorCores per chip"
    return found, f"mmrs/train/metrics.py DEVICE_MEMORY_BYTES ({kind})"
  if devices[0].platform == "cpu":
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // len(devices), f"host RAM / {len(devices)} fake CPU devices"
  return None, f"unknown device kind {kind!r}"


def target_compiler_options(config, platform: str, with_perf_flags: bool = True):
  """A copy of `config` whose xla_compiler_options add the platform's performance flags (perf_flags: what the
  launchers set; unless `with_perf_flags` is False) and, on a compile-only GPU, DEVICELESS_COMPILER_OPTIONS; the
  config's own values win."""
  if platform == "gpu":
    config = gpu_target.with_deviceless_options(config)
  return gpu_target.with_compiler_options(config, perf_flags.compiler_options(platform) if with_perf_flags else {})


_ATTENTION_SCOPE = re.compile(r"attention_(head_major|xla|cudnn)\b")


def attention_implementations(hlo_text: str) -> list[str]:
  """The attention implementations a compiled program holds (mmrs/models/vit.py attend()'s named scopes)."""
  return sorted(set(_ATTENTION_SCOPE.findall(hlo_text)))


class DoesNotFit(RuntimeError):
  """The state alone exceeds device memory (found before compiling), or the compiler ran out of device memory
  (report["compile_error"])."""


def _gpu_total_bytes(topology: str, gpu_target_config: str | None) -> int | None:
  """The device memory of an NxMODEL topology's GPU as CUDA reports it (from its target description)."""
  gpu = gpu_target.parse_gpu_topology(topology)
  if gpu is None:
    return None
  text = gpu_target_config or (gpu_target.target_config_text(gpu[1]) if gpu[1] in gpu_target.GPU_SPECS else "")
  return gpu_target.total_memory_bytes(text)


def compile_for(config, topology: str, method=None, device_memory_override: int | None = None,
                plan_only: bool = False, gpu_target_config: str | None = None,
                hlo_dir: str | None = None, with_perf_flags: bool = True) -> dict[str, Any]:
  """Compiles every task for `topology`; returns the report (the JSON line of launch.aot, plus "memory_source").

  Raises config_check.ConfigError for a mesh/batch that does not divide, DoesNotFit when the sharded state alone is
  larger than a device's memory (before any compile), TopologyError for an unknown topology. `plan_only`: stop
  after the layout (report["per_device_param_and_opt_bytes"], no compile). `hlo_dir`: write each task's compiled
  HLO there (`<task>.hlo.txt`). `with_perf_flags=False`: without the launchers' performance flags (what they cost).
  """
  devices = topology_devices(topology, gpu_target_config)
  platform = devices[0].platform
  config_check.resolve_compute_dtype(config, platform)
  config_check.validate(config, None, device_count=len(devices), process_count=1)
  if method is None:
    from mmrs.train import loop  # pylint: disable=g-import-not-at-top
    method = loop.build_method(config)
  mem_bytes, mem_source = device_memory(devices, device_memory_override, _gpu_total_bytes(topology, gpu_target_config))
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  batches = abstract_batches(config, method, config.batch_size)
  normalize = normalizers(config, method)
  # The plan runs outside the mesh context: its eager bits (the init rng) must not land on compile-only devices.
  example = state_lib.example_batch({n: jax.eval_shape(normalize[n], b) if normalize[n] else b
                                     for n, b in batches.items()})
  optimizer, layout = step_lib.plan_state(config, method, example, mesh, config.total_steps)
  state_bytes = state_bytes_per_device(layout)
  config = target_compiler_options(config, platform, with_perf_flags)
  report = {"topology": topology, "platform": platform, "devices": len(devices),
            "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "tasks": {}, "fits": None, "device_memory_bytes": mem_bytes,
            "memory_source": mem_source, "per_device_param_and_opt_bytes": state_bytes,
            "compute_dtype": config.get("compute_dtype", "float32"),
            "compiler_options": config_check.to_dict(config.get("xla_compiler_options"))}
  if mem_bytes is not None and state_bytes > mem_bytes:
    report["fits"] = False
    raise DoesNotFit(report)
  if plan_only:
    return report
  try:
    with jax.set_mesh(mesh):
      steps = step_lib.compile_tasks(config, method, optimizer, layout, mesh, batches, normalize)
  except Exception as e:  # pylint: disable=broad-except  (only the compiler's out-of-memory verdict is handled)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler refuses a program whose buffers exceed HBM ("Ran out of memory on HBM, the total memory
    # required for HLO temporaries (43.54G) exceeds available HBM (30.75G)"): that is the answer, not a crash.
    report["fits"] = False
    report["compile_error"] = next((l.strip() for l in str(e).splitlines() if "RESOURCE_EXHAUSTED" in l), str(e))
    raise DoesNotFit(report) from None
  for name, st in steps.items():
    hlo = st.compiled.as_text()
    if hlo_dir:
      pathlib.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
      (pathlib.Path(hlo_dir) / f"{name}.hlo.txt").write_text(hlo)
    m = st.compiled.memory_analysis()
    arg, out, alias, temp = (int(getattr(m, f"{k}_size_in_bytes", 0)) for k in ("argument", "output", "alias", "temp"))
    cost = st.compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
      cost = cost[0] if cost else {}
    report["tasks"][name] = {
        "per_device_peak_bytes": arg + out - alias + temp, "per_device_argument_bytes": arg,
        "per_device_output_bytes": out, "per_device_alias_bytes": alias, "per_device_temp_bytes": temp,
        "per_device_param_and_opt_bytes": state_bytes,
        # None (JSON null) where the backend reports no count (XLA:GPU without a device).
        "flops_per_step": float(cost["flops"]) * len(devices) if "flops" in cost else None,
        "analytic_flops_per_step": _analytic_flops(method, name, config.batch_size),
        "compile_s": round(st.seconds, 2),
        "input_dtypes": {k: str(np.dtype(v.dtype)) for k, v in sorted(batches[name].items())},
        "attention": attention_implementations(hlo)}
  if mem_bytes is not None:
    report["fits"] = all(t["per_device_peak_bytes"] <= mem_bytes for t in report["tasks"].values())
  return report


def _analytic_flops(method, task: str, batch_size: int) -> "float | None":
  """The method's own FLOP count (what MFU uses); XLA's cost analysis counts a loop body once, so with
  scan_layers / grad_accum_steps its `flops_per_step` undercounts by the trip counts."""
  try:
    return float(method.flops_per_sample(task)) * batch_size
  except Exception:  # pylint: disable=broad-except  (informative only)
    return None


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def format_table(name: str, numbers: Mapping[str, Any]) -> str:
  rows = [f"task {name}"]
  for k, v in numbers.items():
    if k.endswith("_bytes"):
      rows.append(f"  {k:34s} {format_bytes(v):>14s}")
    elif k.endswith("flops_per_step"):
      rows.append(f"  {k:34s} {'n/a' if v is None else f'{v:.4g}':>12s}")
    elif isinstance(v, (list, dict)):
      text = ", ".join(f"{a}={b}" for a, b in v.items()) if isinstance(v, dict) else ", ".join(v) or "-"
      rows.append(f"  {k:34s} {text}")
    else:
      rows.append(f"  {k:34s} {v:12}")
  return "\n".join(rows)

