"""Multi-process start-up: `jax.distributed.initialize` when the run spans several processes.

Explicit settings win (flags, or MMRS_COORDINATOR_ADDRESS / MMRS_NUM_PROCESSES / MMRS_PROCESS_ID, which
launch/gpu_slurm.sh exports). Otherwise JAX's own cluster detection is used when asked (`auto`, launch/main.py's
--multihost, which launch/tpu_vm.sh passes: a GCE TPU VM slice is only visible through its metadata server, so it
cannot be recognized from the environment) or when the environment shows a multi-task SLURM job or a GKE TPU slice.
A single process needs nothing. On CPU the collectives go through gloo (DESIGN §7).
"""
from __future__ import annotations

import os

import jax
from absl import logging

ENV_ADDRESS, ENV_NUM, ENV_ID = "MMRS_COORDINATOR_ADDRESS", "MMRS_NUM_PROCESSES", "MMRS_PROCESS_ID"


def _multi_host_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Initializes jax.distributed if needed (call before anything touches devices). Returns True if it did."""
  address = coordinator_address or os.environ.get(ENV_ADDRESS)
  num = num_processes if num_processes is not None else _env_int(ENV_NUM)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  explicit = [address is not None, num is not None, pid is not None]
  if any(explicit) and not all(explicit):
    raise ValueError("Multi-process start needs all of --coordinator_address, --num_processes and --process_id "
                     f"(or ${ENV_ADDRESS}, ${ENV_NUM}, ${ENV_ID}); got address={address}, num={num}, id={pid}.")
  if all(explicit):
    if num == 1:
      return False
    _use_gloo_on_cpu()
    logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d)", address, num, pid)
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True
  if auto or _multi_host_cluster():
    _use_gloo_on_cpu()
    logging.info("jax.distributed.initialize() with cluster auto-detection (SLURM / TPU)")
    jax.distributed.initialize()
    return True
  return False


def _use_gloo_on_cpu() -> None:
  # Harmless on GPU/TPU (it only configures the CPU client); required for CPU collectives across processes.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} must be an integer.") from None
