"""`python -m tests.launch_entry` = `python -m launch.main` with test hooks on the data iterators (launcher tests),
and one compilation cache entry for every process on CPU (tests/cpu_cache_share.py).

The data are the config's real pipelines (grain, workers as configured), or tests/train_toy_method.py's fake data
when the config's method is the toy. Hooks, by environment (0-based count of next() calls per task iterator):
  MMRS_TEST_BLOCK_AT=N         next() call N sleeps forever (a process alive but stuck: kill -9 it)
  MMRS_TEST_SIGTERM_AT=P:N     process P sends itself SIGTERM at next() call N (a preemption notice on one host)
  MMRS_TEST_RESTORE_ERROR=P    process P's every restore of a train state fails with a storage-outage error
  MMRS_TEST_STEP_SLEEP_S=T     every next() call sleeps T seconds. JAX's SIGTERM notifier polls once a second and the
                               sync step then travels through the coordination service: a toy run on a fast CPU
                               (~100 steps/s) would finish before a preemption notice lands; this keeps a run long
                               enough for it, whatever the host.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import time

from mmrs.train import data as data_lib


class HookedIterator:
  """Delegates to `inner` (state included); fires the hooks above."""

  def __init__(self, inner, process_index: int):
    self.inner, self.calls = inner, 0
    self.block_at = int(os.environ.get("MMRS_TEST_BLOCK_AT", "-1"))
    target, _, at = os.environ.get("MMRS_TEST_SIGTERM_AT", "-1:-1").partition(":")
    self.sigterm_at = int(at) if int(target) == process_index else -1
    self.sleep_s = float(os.environ.get("MMRS_TEST_STEP_SLEEP_S", "0"))

  def next(self):
    if self.calls == self.block_at:
      print(f"launch_entry: blocking at call {self.calls}", flush=True)
      while True:
        time.sleep(60)
    if self.calls == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    if self.sleep_s:
      time.sleep(self.sleep_s)
    self.calls += 1
    return next(self.inner) if hasattr(self.inner, "__next__") else self.inner.next()

  __next__ = next

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _fail_restores_here(process_index: int) -> None:
  if not os.environ.get("MMRS_TEST_RESTORE_ERROR"):
    return
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from mmrs.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt_lib.RESTORE_BACKOFF_S = 0.01  # every process retries together: the same (short) waits everywhere
  if os.environ["MMRS_TEST_RESTORE_ERROR"] != str(process_index):
    return
  real = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    if "state" in (kwargs.get("args") or {}):
      raise ValueError("UNAVAILABLE: injected by MMRS_TEST_RESTORE_ERROR")
    return real(self, step, *args, **kwargs)
  ocp.CheckpointManager.restore = restore


def hooked_data(config, method, process_index, process_count):
  _fail_restores_here(process_index)
  if str(config.method).startswith("tests.train_toy_method"):
    from tests import train_toy_method  # pylint: disable=g-import-not-at-top
    out = train_toy_method.fake_data(config, method, process_index, process_count)
  else:
    out = data_lib.build_task_data(config, method, process_index, process_count)
  return {name: dataclasses.replace(td, iterator=HookedIterator(td.iterator, process_index))
          for name, td in out.items()}


if __name__ == "__main__":
  from tests import cpu_cache_share  # pylint: disable=g-import-not-at-top
  cpu_cache_share.enable()  # every process loads the compiled step process 0 cached (each restart of a test job)
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import main as launch_main  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(launch_main.main, task_data=hooked_data))
