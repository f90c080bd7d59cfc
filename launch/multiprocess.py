"""The multi-process flags and start-up shared by the entry points that may span several processes (launch.main,
launch.robustness): defined once here, so both modules can be imported into one process, and adopted by each as
key flags (`flags.adopt_module_key_flags`), so their --helpshort lists them.

A SLURM job with several tasks and GKE TPU slices are detected; TPU VM slices need --multihost; otherwise pass
--coordinator_address, --num_processes and --process_id, or set MMRS_COORDINATOR_ADDRESS / MMRS_NUM_PROCESSES /
MMRS_PROCESS_ID / MMRS_LOCAL_DEVICE_IDS (launch/gpu_slurm.sh does). See mmrs/train/distributed.py.
"""
from __future__ import annotations

from absl import flags

from launch import cli

EXIT_START_FAILED = 4  # the processes could not connect (unreachable coordinator, busy port)

flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_list("local_device_ids", None, "Device ordinals this process drives (default: "
                  "$MMRS_LOCAL_DEVICE_IDS, else all visible ones; gpu_slurm.sh sets all GPUs of the node).")
flags.DEFINE_integer("init_timeout", None, "Seconds to wait for the coordinator (default $MMRS_INIT_TIMEOUT or 300).")
flags.DEFINE_integer("heartbeat_timeout", None, "Seconds without a heartbeat after which a process counts as dead and "
                     "the others are aborted (default $MMRS_HEARTBEAT_TIMEOUT or JAX's 100).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with cluster auto-detection (TPU VM slices: "
                  "launch/tpu_vm.sh sets it; SLURM and GKE are detected without it).")


def initialize(fail=cli.fail) -> bool:
  """Starts jax.distributed where the flags or the environment ask for several processes (call before anything
  touches devices); True if it did. A failure is one `ERROR:` line through `fail(error, code)`: exit 4 when the
  processes could not connect, 2 for values that do not fit together."""
  from mmrs.train import distributed  # pylint: disable=g-import-not-at-top  (jax: not at --help time)
  f = flags.FLAGS
  try:
    return distributed.initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.multihost,
                                  timeout_s=f.init_timeout, heartbeat_timeout_s=f.heartbeat_timeout,
                                  local_device_ids=[int(i) for i in f.local_device_ids] if f.local_device_ids
                                  else None)
  except distributed.DistributedStartError as e:
    fail(e, EXIT_START_FAILED)
  except ValueError as e:
    fail(e, cli.EXIT_USER_ERROR)
  return False
