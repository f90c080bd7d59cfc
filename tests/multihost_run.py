"""A real-data run for the multi-host tests: AuxMAE `tiny` on the bundled sample, mesh data=2,fsdp=2, Adafactor with
factored kernels; every global batch's record keys are logged, parameters are dumped after each phase.

    python -m tests.multihost_run --shards=DIR --workdir=DIR --phases=3,4 [--shard_groups=G] \
        [--stage_root=DIR --stage_quota_gb=Q] \
        [--elastic_from=CKPT_DIR:STEP --elastic_workdir=DIR --elastic_steps=4] \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I] [--outdir=DIR]

Each phase trains to that many steps (a later phase resumes from the checkpoint of the earlier one in the same
processes). `--elastic_from` then copies checkpoint STEP of another run (written with another process/device count)
into `--elastic_workdir` and resumes it there to `--elastic_steps`. Each run directory gets metrics.jsonl (losses),
records_p{I}.jsonl (task, global batch index, rows this process read, their record keys), params_{STEPS}.npz
(process 0, gathered); the workdir also gets rows_p{I}.json (the rows this process reads and whether
`jax.make_array_from_process_local_data` put them at those global rows). With a gs:// --workdir these local files go
to --outdir instead (the metrics stay in the workdir, on the bucket).
"""
from __future__ import annotations

import importlib
import json
import os
import shutil

from absl import app
from absl import flags
import jax
import numpy as np
from jax.experimental import multihost_utils

flags.DEFINE_string("shards", None, "The converted sample (tests/sample_data.py).")
flags.DEFINE_string("workdir", None, "Run directory.")
flags.DEFINE_string("phases", "4", "Comma-separated total_steps of the phases (empty: only the elastic resume).")
flags.DEFINE_integer("elastic_steps", 4, "total_steps of the elastic resume.")
flags.DEFINE_string("elastic_from", None, "CHECKPOINTS_DIR:STEP of another run to resume in --elastic_workdir.")
flags.DEFINE_string("elastic_workdir", None, "Where the elastic resume runs.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
flags.DEFINE_integer("num_processes", None, "Processes.")
flags.DEFINE_integer("process_id", None, "This process.")
flags.DEFINE_integer("shard_groups", 0, "data.*.shard_groups (issue 19: a process reads only its groups' shards).")
flags.DEFINE_string("stage_root", None, "--shards is a file:// URL staged per process into STAGE_ROOT/p{I} (one "
                    "disk per host), capped by --stage_quota_gb; stage_p{I}.json lists the staged files.")
flags.DEFINE_float("stage_quota_gb", 0.0, "data.*.stage_quota_gb.")
flags.DEFINE_string("outdir", None, "Where the workdir's local side files go (records, rows, params, staged "
                    "names); default: the workdir itself. Needed when --workdir is a gs:// URL.")
flags.DEFINE_string("compilation_cache_dir", "auto", "config.compilation_cache_dir of every run (the tests share one "
                    "across runs, so a run that compiles what an earlier one did loads it).")


def config_for(shards: str):
  """The equality config (also used in-process by tests/test_multihost.py)."""
  c = importlib.import_module("configs.auxmae").get_config(f"tiny,shards={shards}")
  c.mesh = "data=2,fsdp=2"
  c.fsdp_min_size = 16  # shard the mu-size kernels too
  # decay_steps: the runs that stop at step 3 and go on to 4 share one schedule with the 4-step runs.
  c.optimizer.update(dict(name="adafactor", adafactor_min_dim_to_factor=8, learning_rate=1e-3, weight_decay=0.0,
                          decay_steps=4))
  c.total_steps, c.log_every_steps, c.checkpoint_every_steps, c.keep_checkpoints = 4, 1, 2, 10
  c.visualize_every_steps = 0
  c.xla_compiler_options = {"xla_backend_optimization_level": 0}  # halves CPU compile time
  for name in c.data:
    c.data[name].shard_groups = flags.FLAGS.shard_groups
    c.data[name].stage_quota_gb = flags.FLAGS.stage_quota_gb
  return c


class RecordingIterator:
  """Wraps a pipeline iterator: logs (task, global batch index, rows, record keys) of every batch it yields."""

  def __init__(self, it, task: str, rows, path):
    self._it, self._task, self._rows, self._path = it, task, [int(r) for r in rows], path

  def next(self):
    k = self._it.get_state()["global_batches"]
    batch = next(self._it)
    with open(self._path, "a") as f:
      f.write(json.dumps({"task": self._task, "batch": k, "rows": self._rows,
                          "keys": [str(x) for x in batch["record_key"]]}) + "\n")
    return batch

  __next__ = next

  def get_state(self):
    return self._it.get_state()

  def set_state(self, state):
    self._it.set_state(state)


def recording_data(workdir: str, devices=None):
  """A `task_data` factory for `loop.train`: the real pipelines, with their batches logged."""
  from mmrs.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  def factory(config, method, process_index, process_count):
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    out = data_lib.build_task_data(config, method, process_index, process_count, mesh=mesh)
    rows = data_lib.batch_rows(mesh, config.batch_size)
    path = f"{workdir}/records_p{process_index}.jsonl"
    for name, td in out.items():
      td.iterator = RecordingIterator(td.iterator, name, rows, path)
    return out
  return factory


def flat_params(params) -> dict[str, np.ndarray]:
  """{'encoder/.../kernel': full numpy array}, gathered over processes."""
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(params))[0]
  out = {}
  for path, x in leaves:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    out[name] = np.asarray(multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x)
  return out


def check_rows(config, workdir: str) -> None:
  """Writes the rows this process reads and whether jax places this process's local rows at exactly those rows."""
  from mmrs.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.mesh)
  b = config.batch_size
  rows = data_lib.batch_rows(mesh, b)
  arr = jax.make_array_from_process_local_data(mesh_lib.batch_sharding(mesh), rows.astype(np.int32), (b,))
  full = np.asarray(multihost_utils.process_allgather(arr, tiled=True) if jax.process_count() > 1 else arr)
  with open(f"{workdir}/rows_p{jax.process_index()}.json", "w") as f:
    json.dump({"rows": rows.tolist(), "placed_where_read": bool(np.array_equal(full, np.arange(b)))}, f)


def main(argv):
  del argv
  from mmrs.train import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  from mmrs.train import loop  # pylint: disable=g-import-not-at-top
  workdir = flags.FLAGS.workdir
  side = lambda run_dir: (flags.FLAGS.outdir or run_dir) if run_dir == workdir else run_dir  # local side files
  stage_root = flags.FLAGS.stage_root
  if stage_root:  # a disk of its own per process (the default stage dir lives under $MMRS_STAGE_DIR)
    os.environ["MMRS_STAGE_DIR"] = os.path.join(stage_root, f"p{jax.process_index()}")
  config = config_for(flags.FLAGS.shards)
  config.compilation_cache_dir = flags.FLAGS.compilation_cache_dir
  os.makedirs(side(workdir), exist_ok=True)
  check_rows(config, side(workdir))
  runs = [(workdir, int(s)) for s in flags.FLAGS.phases.split(",") if s]
  if flags.FLAGS.elastic_from:
    src, step = flags.FLAGS.elastic_from.rsplit(":", 1)
    target = flags.FLAGS.elastic_workdir
    if jax.process_index() == 0:
      shutil.copytree(os.path.join(src, step), os.path.join(target, "checkpoints", step))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmrs_test_copied")
    runs.append((target, flags.FLAGS.elastic_steps))
  for run_dir, total in runs:
    config.total_steps = total
    summary = loop.train(config, run_dir, task_data=recording_data(side(run_dir)), logdir=run_dir)
    params = flat_params(summary["state"]["params"])
    if jax.process_index() == 0:
      np.savez(f"{side(run_dir)}/params_{total}.npz", **params)
  if stage_root:
    staged = [n for _, _, names in os.walk(os.environ["MMRS_STAGE_DIR"]) for n in names if n.endswith(".array_record")]
    with open(f"{side(workdir)}/stage_p{jax.process_index()}.json", "w") as f:
      json.dump(sorted(staged), f)
  print(f"done process {jax.process_index()}", flush=True)


if __name__ == "__main__":
  app.run(main)
