"""Compile-only NVIDIA GPU devices for launch.aot (`--topology=8xH100`) on a host without a GPU.

jax 0.10.2's CUDA PJRT plugin (jax-cuda12-plugin + jax-cuda12-pjrt 0.10.2, the `[gpu]` extra) creates a GPU
topology without touching a device when it is given a target description: `jax.experimental.topologies.
get_topology_desc("cuda", "cuda", target_config=TEXT, topology="PxHxD")`, where TEXT is a
`stream_executor.GpuTargetConfigProto` in protobuf text format (the plugin parses it with TextFormat) and the topology
counts partitions x hosts per partition x GPUs per host. XLA then lowers to PTX and cubin on the CPU (checked on a
host without a driver: the plugin loads, `cuInit` fails harmlessly, compile + memory_analysis work).

The target description is what StreamExecutor reports for the device; `GPU_SPECS` holds the numbers of the models
we name (from NVIDIA's published specifications and what CUDA reports for them). Another GPU: dump the description
on a host that has one, or write it, and pass `--gpu_target_config=FILE` to launch.aot.
"""
from __future__ import annotations

import copy
import re
from typing import Any

from absl import logging

from mmrs.train import config_check

# model (lowercase) -> GpuDeviceInfoProto fields, platform, cuDNN version (major, minor, patch), description string.
GPU_SPECS: dict[str, dict[str, Any]] = {
    # H100 SXM5 80 GB (HBM3): 132 SMs of compute capability 9.0, 228 KiB shared memory per SM (227 KiB per block
    # opt-in), 50 MiB L2, 3.35 TB/s, 1.98 GHz boost; device_memory_size is what cudaMemGetInfo reports (79.1 GiB).
    "h100": dict(
        device_info=dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=48 * 1024,
                         shared_memory_per_core=228 * 1024, threads_per_core_limit=2048, core_count=132,
                         fpus_per_core=128, block_dim_limit_x=2**31 - 1, block_dim_limit_y=65535,
                         block_dim_limit_z=65535, memory_bandwidth=3_352_320_000_000, l2_cache_size=50 * 2**20,
                         clock_rate_ghz=1.98, device_memory_size=84_978_434_048,
                         shared_memory_per_block_optin=227 * 1024, registers_per_core_limit=65536,
                         registers_per_block_limit=65536),
        compute_capability=(9, 0), dnn_version=(9, 8, 0), description="NVIDIA H100 80GB HBM3"),
}
GPUS_PER_HOST = 8
# XLA options a compile without a device needs (each unless config.xla_compiler_options sets it). Triton GEMM fusions
# are tiled by the autotuner, which needs a GPU: without one, jax 0.10.2's XLA fails on the ViT's matmuls with
# "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot... backend_config={"sizes":["16"]}" (ViT-B MixMAE,
# 8xH100). With Triton GEMMs off the matmuls go to cuBLAS; on the real GPU XLA may pick a Triton kernel instead, whose
# scratch memory differs a little, so the temp bytes are an estimate of the same order.
DEVICELESS_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
_NAME = re.compile(r"^(\d+)x([A-Za-z][A-Za-z0-9_-]*)$")


def parse_gpu_topology(name: str) -> tuple[int, str] | None:
  """'8xH100' -> (8, 'h100'); None for a name that is not NxMODEL."""
  m = _NAME.match(name)
  return (int(m.group(1)), m.group(2).lower()) if m else None


def target_config_text(model: str) -> str:
  """The GpuTargetConfigProto text of a model in GPU_SPECS."""
  spec = GPU_SPECS[model]
  info = "\n".join(f"  {k}: {v}" for k, v in spec["device_info"].items())
  major, minor = spec["compute_capability"]
  dnn = spec["dnn_version"]
  return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}\n"
          f'device_description_str: "{spec["description"]}"\n')


def topology_shape(count: int) -> str:
  """PJRT GPU topology 'partitions x hosts x GPUs per host': up to 8 GPUs on one host, else hosts of 8."""
  if count <= GPUS_PER_HOST:
    return f"1x1x{count}"
  if count % GPUS_PER_HOST:
    raise ValueError(f"{count} GPUs: more than {GPUS_PER_HOST} must be whole hosts of {GPUS_PER_HOST}.")
  return f"1x{count // GPUS_PER_HOST}x{GPUS_PER_HOST}"


def compile_only_devices(count: int, target_config: str) -> list:
  """`count` compile-only CUDA devices described by `target_config` (raises what jax / the plugin raise)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc("cuda", "cuda", target_config=target_config,
                                           topology=topology_shape(count)).devices)


def total_memory_bytes(target_config: str) -> int | None:
  """`device_memory_size` of a GpuTargetConfigProto text (what CUDA reports as the device's total memory)."""
  m = re.search(r"\bdevice_memory_size:\s*(\d+)", target_config or "")
  return int(m.group(1)) if m else None


def with_compiler_options(config, options: dict):
  """A copy of `config` whose xla_compiler_options add `options` (those the config sets keep the config's value;
  the config itself is unchanged)."""
  have = config_check.to_dict(config.get("xla_compiler_options"))
  missing = {k: v for k, v in options.items() if k not in have}
  if not missing:
    return config
  config = copy.deepcopy(config)
  with config.unlocked():
    config.xla_compiler_options = {**have, **missing}
  return config


def with_deviceless_options(config):
  """A copy of `config` whose xla_compiler_options add DEVICELESS_COMPILER_OPTIONS (the config itself is unchanged)."""
  out = with_compiler_options(config, DEVICELESS_COMPILER_OPTIONS)
  if out is not config:
    logging.info("Compile-only GPU target: XLA options %s (no autotuner without a device).",
                 DEVICELESS_COMPILER_OPTIONS)
  return out
