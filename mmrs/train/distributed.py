"""Multi-process start-up: `jax.distributed.initialize` when the run spans several processes.

Explicit settings win (flags, or MMRS_COORDINATOR_ADDRESS / MMRS_NUM_PROCESSES / MMRS_PROCESS_ID /
MMRS_LOCAL_DEVICE_IDS, which launch/gpu_slurm.sh exports). Otherwise JAX's own cluster detection is used when asked
(`auto`, launch/main.py's --multihost, which launch/tpu_vm.sh passes: a GCE TPU VM slice is only visible through its
metadata server, so it cannot be recognized from the environment) or when the environment shows a multi-task SLURM
job or a GKE TPU slice. A single process needs nothing. On CPU the collectives go through gloo (DESIGN §7).

GPU device binding. JAX's SLURM detection assumes one process per GPU that sees *all* GPUs of its node and drives
GPU number $SLURM_LOCALID (jax/_src/clusters/cluster.py sets local_device_ids=[SLURM_LOCALID]). Under
`--gpus-per-task=1` each task sees one GPU (ordinal 0), so local ids 1..7 point at GPUs that do not exist
(jax-ml/jax#23452, #28194); and a process-per-node job would be cut down to one GPU. So local_device_ids are never
left to that guess here: launch/gpu_slurm.sh runs one process per node and exports the ordinals of all the GPUs the
task sees (MMRS_LOCAL_DEVICE_IDS=0,...,G-1, ordinals *within* the task's CUDA_VISIBLE_DEVICES).

An unreachable coordinator makes JAX's C++ client abort the process (SIGABRT, a stack trace, no Python exception),
so the address is probed first and a plain `DistributedStartError` is raised instead.

Dead peers. When one process dies (or leaves without JAX's shutdown barrier, e.g. after a checkpoint read error) the
others can be left waiting in a collective or an Orbax barrier; JAX's coordination service aborts them once the dead
process has sent no heartbeat for `heartbeat_timeout_s` (--heartbeat_timeout, $MMRS_HEARTBEAT_TIMEOUT; default JAX's
100 s). A shorter value frees a stuck job's nodes sooner but must stay well above the longest stall of a live
process's heartbeat thread (a busy or swapping host); the multi-process tests use 10 s.
"""
from __future__ import annotations

import os
import socket
import time

import jax
from absl import logging

ENV_ADDRESS, ENV_NUM, ENV_ID = "MMRS_COORDINATOR_ADDRESS", "MMRS_NUM_PROCESSES", "MMRS_PROCESS_ID"
ENV_LOCAL_DEVICES, ENV_TIMEOUT = "MMRS_LOCAL_DEVICE_IDS", "MMRS_INIT_TIMEOUT"
ENV_HEARTBEAT = "MMRS_HEARTBEAT_TIMEOUT"
DEFAULT_TIMEOUT_S = 300  # JAX's default: long enough for a slow node to come up
DEFAULT_HEARTBEAT_TIMEOUT_S = 100  # JAX's default (jax.distributed.initialize's heartbeat_timeout_seconds)


class DistributedStartError(RuntimeError):
  """The processes could not connect (no coordinator at the address, a bad address, a busy port)."""


def _multi_host_cluster() -> bool:
  if int(os.environ.get("SLURM_NTASKS", os.environ.get("SLURM_STEP_NUM_TASKS", "1")) or 1) > 1:
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False, local_device_ids: list[int] | None = None,
               timeout_s: int | None = None, heartbeat_timeout_s: int | None = None) -> bool:
  """Initializes jax.distributed if needed (call before anything touches devices). Returns True if it did.

  `heartbeat_timeout_s`: seconds without a heartbeat after which a process counts as dead and every other process
  is aborted (default $MMRS_HEARTBEAT_TIMEOUT, else JAX's 100)."""
  address = coordinator_address or os.environ.get(ENV_ADDRESS)
  num = num_processes if num_processes is not None else _env_int(ENV_NUM)
  pid = process_id if process_id is not None else _env_int(ENV_ID)
  local = local_device_ids if local_device_ids is not None else _env_ints(ENV_LOCAL_DEVICES)
  timeout = int(timeout_s if timeout_s is not None else (_env_int(ENV_TIMEOUT) or DEFAULT_TIMEOUT_S))
  heartbeat = heartbeat_timeout_s if heartbeat_timeout_s is not None else _env_int(ENV_HEARTBEAT)
  heartbeat = DEFAULT_HEARTBEAT_TIMEOUT_S if heartbeat is None else int(heartbeat)
  if heartbeat < 1:
    raise ValueError(f"--heartbeat_timeout / ${ENV_HEARTBEAT} must be a positive number of seconds, got {heartbeat} "
                     f"(JAX's default is {DEFAULT_HEARTBEAT_TIMEOUT_S}).")
  explicit = [address is not None, num is not None, pid is not None]
  if any(explicit) and not all(explicit):
    raise ValueError("Multi-process start needs all of --coordinator_address, --num_processes and --process_id "
                     f"(or ${ENV_ADDRESS}, ${ENV_NUM}, ${ENV_ID}); got address={address}, num={num}, id={pid}.")
  if all(explicit):
    if num == 1:
      return False
    if not 0 <= pid < num:
      raise ValueError(f"--process_id={pid} must be in [0, {num}) for --num_processes={num}.")
    _use_gloo_on_cpu()
    deadline = time.monotonic() + timeout
    _probe(address, pid, timeout)
    logging.info("jax.distributed.initialize(%s, num_processes=%d, process_id=%d, local_device_ids=%s, "
                 "heartbeat_timeout_seconds=%d)", address, num, pid, local, heartbeat)
    # All four given: JAX skips its cluster auto-detection (and its local_device_ids=[SLURM_LOCALID] guess).
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid,
                               local_device_ids=local,
                               initialization_timeout=max(int(deadline - time.monotonic()), 10),
                               heartbeat_timeout_seconds=heartbeat)
    return True
  if auto or _multi_host_cluster():
    _use_gloo_on_cpu()
    logging.info("jax.distributed.initialize() with cluster auto-detection (SLURM / TPU), local_device_ids=%s, "
                 "heartbeat_timeout_seconds=%d", local, heartbeat)
    jax.distributed.initialize(local_device_ids=local, initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat)
    return True
  return False


def _probe(address: str, process_id: int, timeout: float) -> None:
  """Process 0 must be able to bind the port; the others must reach it within `timeout` seconds."""
  host, _, port_text = address.rpartition(":")
  host = host.strip("[]")
  if not host or not port_text.isdigit():
    raise DistributedStartError(f"coordinator address {address!r} must be HOST:PORT (e.g. node001:29500).")
  port = int(port_text)
  try:
    socket.getaddrinfo(host, port)
  except OSError as e:
    raise DistributedStartError(f"coordinator host {host!r} does not resolve ({e}): pass process 0's hostname or "
                                "IP as --coordinator_address / $MMRS_COORDINATOR_ADDRESS.") from None
  if process_id == 0:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      try:
        s.bind(("", port))
      except OSError as e:
        raise DistributedStartError(f"process 0 cannot listen on port {port} for the coordinator ({e}): another "
                                    "run may be using it; pick another port (launchers: --port).") from None
    return
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, port), timeout=2):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedStartError(
            f"no coordinator answered at {address} within {timeout:g}s ({e.strerror or e}): check that process 0 "
            f"started and that this host can reach {host} on port {port}, or raise ${ENV_TIMEOUT} / "
            "--init_timeout.") from None
      time.sleep(1.0)


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


def _env_ints(name: str) -> list[int] | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return [int(v) for v in value.split(",")]
  except ValueError:
    raise ValueError(f"${name}={value!r} must be comma-separated device ordinals, e.g. 0,1,2,3.") from None
