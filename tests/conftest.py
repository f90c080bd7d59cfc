"""Tests run on 8 fake CPU devices so sharding code is exercised; single-device tests just use device 0.

Order (CI time): `-n 2 --dist loadfile` runs each file whole on one worker, handing out files in order. xdist's own
order (files with the most tests first) left the few-test, multi-process files (minutes each) for the end, where
one of them ran alone on one worker while the other idled. So the slowest files go first (longest-processing-time-
first scheduling: the short files fill the gaps at the end) and xdist keeps that order; within a file nothing moves.
"""
import os

from launch import cpu_setup  # pylint: disable=g-import-not-at-top

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The XLA:CPU options a training run on this CPU gets (launch/cpu_setup.py): the suite, test_flat_dot.py's pinned
# losses and gradients included, checks the math under them.
cpu_setup.add_xla_flags(os.environ, cpu_setup.xla_flags_for(cpu_setup.cpuinfo()))

# `real_slurm`: a local SLURM cluster (munge + slurmctld + 2 slurmd), one per session, for tests/test_slurm_real.py.
from real_slurm import real_slurm  # pylint: disable=g-import-not-at-top,unused-import

# Files whose run takes longest on 2 cores (pytest --durations, summed per file), slowest first. Files not listed
# follow in collection order. A rough order is enough: it only decides which worker starts what when.
SLOWEST_FIRST = (
    "test_multihost.py", "test_end_to_end_pretrain.py", "test_slurm_real.py", "test_multihost_eval.py",
    "test_gcs.py", "test_launch_cluster.py", "test_tpu_vm_gcs.py", "test_gcs_multihost.py", "test_gcs_outputs.py",
    "test_shard_groups.py", "test_grad_accum.py", "test_peer.py", "test_train_loop.py", "test_end_to_end_finetune.py",
    "test_train_launch.py", "test_finetune_method.py", "test_flat_dot.py", "test_export.py", "test_aot.py",
    "test_finetune_validation.py", "test_flops.py",
)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the collection order below
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
