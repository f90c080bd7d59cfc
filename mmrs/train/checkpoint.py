"""Checkpoints: Orbax `CheckpointManager` with three items per step, atomic commits, fallback on a bad latest.

  state/  the train state (params, per-group optimizer state, method state), sharded arrays (async save)
  data/   every task's data-iterator state, one `process_{i}-of-{n}.json` per process (grain's layout); mmrs
          pipelines order samples globally, so these states agree on the position and a run restores them on any
          process count (elastic resume, see IteratorStatesHandler)
  meta/   JSON: step, seed, the resolved config, band names and normalization stats per task, process count,
          worker counts (written by the primary process)

Orbax writes a step into a temporary directory and renames it (or writes a commit marker on GCS) when every item is
done, so an interrupted save never looks like a checkpoint. `restore_latest` tries the newest step first; a step
that fails to restore (corrupted or truncated files) is moved aside to `corrupt_step_<N>_<time>` with a warning,
and the next older one is tried. A checkpoint that cannot match this run (per-process data states on another process
count, another optimizer layout) raises `CheckpointMismatch`: every checkpoint of the run would fail the same way.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

FORMAT_VERSION = 1


class CheckpointMismatch(RuntimeError):
  """The checkpoint is intact but cannot be resumed by this run; the message says what differs and what to do."""


class CheckpointUnavailable(RuntimeError):
  """A checkpoint could not be read (after retries) but is not proven damaged: nothing was moved; rerun later."""


RESTORE_TRIES = 3  # attempts per step and process before its failure counts
RESTORE_BACKOFF_S = 2.0  # first wait between attempts (doubles)
# Substrings of errors from storage outages (gRPC/tensorstore status names, HTTP throttling, sockets): such a
# failure says nothing about the checkpoint's files, so it never leads to a quarantine.
_TRANSIENT_MARKERS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED",
                      "Connection reset", "Connection refused", "timed out", "Timeout", "Too Many Requests", "SlowDown",
                      "Service Unavailable", "Temporary failure")


# ---------------------------------------------------------------------------------------------------------------
# The data-iterator item: per-process JSON, any iterator whose get_state() is JSON-able (or bytes).


class IteratorStatesHandler(ocp.CheckpointHandler):
  """Saves {task: iterator state} of this process to `process_{i}-of-{n}.json` (synchronously: the iterators move on
  right after the save call).

  Restore on the same process count gives each process its own state back. On another count (elastic resume) the
  states of an mmrs pipeline (`mmrs.data.pipeline`: a global sample order, the state is the number of global
  batches consumed) are merged: every saved process must agree on the position and the pins, and the bad-record
  counters are summed into process 0's. Each process writes its own file rather than process 0 writing one: no
  collective is needed while saving, and the per-process counters stay exact on a same-count resume. Other
  iterators (per-process states, e.g. test fakes) cannot be re-split and are refused on another count.
  """

  def save(self, directory: epath.Path, args: "IteratorStatesSave"):
    i, n = jax.process_index(), jax.process_count()
    states = {k: _encode_state(v) for k, v in args.states.items()}
    payload = {"process_index": i, "process_count": n, "states": states}
    (directory / f"process_{i}-of-{n}.json").write_text(json.dumps(payload, indent=1))

  def restore(self, directory: epath.Path, args: "IteratorStatesRestore" = None) -> dict[str, Any]:
    i, n = jax.process_index(), jax.process_count()
    path = directory / f"process_{i}-of-{n}.json"
    if path.exists():
      payload = json.loads(path.read_text())
      return {k: _decode_state(v) for k, v in payload["states"].items()}
    found = sorted(p.name for p in directory.glob("process_*.json"))
    counts = {int(f.rsplit("-of-", 1)[1][:-len(".json")]) for f in found}
    if len(counts) != 1 or any(f.endswith(f"-of-{n}.json") for f in found):
      raise FileNotFoundError(f"{path} is missing (found {found}).")
    saved_n = counts.pop()
    if len(found) != saved_n:
      raise FileNotFoundError(f"{directory} holds {len(found)} of the {saved_n} data-iterator states written "
                              f"({found}): the checkpoint is incomplete.")
    payloads = [json.loads((directory / f).read_text())["states"] for f in found]
    out = {}
    for task in payloads[0]:
      states = [_decode_state(p.get(task)) for p in payloads]
      if not all(_is_global_state(s) for s in states):
        raise CheckpointMismatch(
            f"{directory} holds data-iterator states written by {saved_n} processes but this run has {n}, and task "
            f"{task!r}'s iterator keeps a per-process state that cannot be re-split (only mmrs pipelines, with their "
            "global sample order, resume on another process count). Resume with the original process count, or "
            "start a fresh run in a new --workdir.")
      out[task] = _merge_global_states(states, task, i)
    logging.info("Data-iterator states written by %d processes restored on %d (global sample order).", saved_n, n)
    return out

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(IteratorStatesHandler, for_save=True)
@dataclasses.dataclass
class IteratorStatesSave(ocp.args.CheckpointArgs):
  states: Mapping[str, Any]


@ocp.args.register_with_handler(IteratorStatesHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStatesRestore(ocp.args.CheckpointArgs):
  pass


def _encode_state(state):
  if isinstance(state, bytes):  # grain DataLoaderIterator states are bytes
    return {"__bytes__": state.decode()}
  return state


_PIPELINE_KEY, _BATCHES_KEY, _SKIPPED_KEY = "mmrs_pipeline", "global_batches", "mmrs_skipped"  # mmrs.data.pipeline


def _is_global_state(state) -> bool:
  return isinstance(state, dict) and _PIPELINE_KEY in state and _BATCHES_KEY in state


def _merge_global_states(states: list[dict], task: str, process_index: int) -> dict:
  """One position for every process; the bad-record counters summed into process 0's (their sum is global)."""
  first = states[0]
  for s in states[1:]:
    if s[_PIPELINE_KEY] != first[_PIPELINE_KEY] or s[_BATCHES_KEY] != first[_BATCHES_KEY]:
      raise ValueError(f"Task {task!r}: the saved processes' data-iterator states disagree ({first[_PIPELINE_KEY]}"
                       f" at batch {first[_BATCHES_KEY]} vs {s[_PIPELINE_KEY]} at batch {s[_BATCHES_KEY]}).")
  skipped = sum(int(s.get(_SKIPPED_KEY, 0)) for s in states)
  return dict(first, **{_SKIPPED_KEY: skipped if process_index == 0 else 0})


def _decode_state(state):
  if isinstance(state, dict) and set(state) == {"__bytes__"}:
    return state["__bytes__"].encode()
  return state


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_states: dict[str, Any]
  meta: dict[str, Any]


def absolute(path: str | epath.Path) -> epath.Path:
  """Orbax needs absolute paths: local paths (e.g. --workdir=runs/x) are made absolute, gs:// ones kept."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


class Checkpointer:
  """Saves/restores (state, data-iterator states, meta) under `directory`."""

  def __init__(self, directory: str | epath.Path, keep: int, async_save: bool = True):
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "meta"), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": IteratorStatesHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_states: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Starts an async save (arrays are copied to host before this returns, so the state may be donated next)."""
    if step in self._manager.all_steps():
      return False
    meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION, "process_count": jax.process_count(),
            "saved_at": time.time()}
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=IteratorStatesSave(dict(data_states)),
        meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any, check_meta: Callable[[dict], None] | None = None
                     ) -> Restored | None:
    """The newest checkpoint that restores cleanly (older ones on failure), or None when there is none.

    `check_meta(meta)` may raise `CheckpointMismatch` (e.g. an incompatible config): that stops the search, since
    it is not damage. A state whose saved tree differs from `abstract_state` also raises `CheckpointMismatch`.

    Failures are retried RESTORE_TRIES times with backoff (storage hiccups). A step is moved aside only when it is
    proven damaged: some process still fails after its retries with an error that is not a storage outage (a
    missing, truncated or undecodable file, NaN values) and no process saw an outage-like error; the processes
    decide together (all-gather of their verdicts). A step that still fails with an outage-like error on some
    process is left in place and `CheckpointUnavailable` stops the run: one host's flaky read never discards a
    checkpoint.
    """
    attempts = _Attempts(sorted(self._manager.all_steps(), reverse=True), self._manager)
    for step in attempts:
      restored, error = None, None
      try:
        meta = self.read_meta(step)
        saved_count = meta.get("process_count", jax.process_count())
        if saved_count != jax.process_count():  # elastic resume: the data item decides (IteratorStatesHandler)
          logging.info("Checkpoint step %d was written by %d processes; resuming on %d.", step, saved_count,
                       jax.process_count())
        if check_meta is not None:
          check_meta(meta)
        _check_tree(self._manager.item_metadata(step)["state"], abstract_state, step)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=IteratorStatesRestore(),
            meta=ocp.args.JsonRestore()))
        restored = Restored(step=step, state=out["state"], data_states=dict(out["data"]), meta=dict(out["meta"]))
        if restored.meta.get("step") != step:
          raise ValueError(f"meta says step {restored.meta.get('step')}")
        _check_finite(restored.state)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except  (retried, then judged with the other processes)
        error = e
      if self._settle(step, error, attempts):
        return restored
    return None

  def _settle(self, step: int, error: Exception | None, attempts: "_Attempts") -> bool:
    """The processes' joint verdict on this attempt at `step`: True = restored on every process. Otherwise every
    process retries (together: Orbax's restore is collective, a process retrying alone would pair its barriers with
    the others' next ones) until RESTORE_TRIES; then the step is moved aside if proven damaged, or
    CheckpointUnavailable is raised when some process could not tell."""
    # 0 restored, 1 failed with a damage-like error, 2 failed with a storage-outage-like one. A value that is none
    # of these means the processes' collectives got out of step (one failed before a barrier the others reached):
    # no evidence of damage either.
    verdicts = [v if v in (0, 1, 2) else 2
                for v in _all_processes(0 if error is None else 2 if _looks_transient(error) else 1)]
    if not any(verdicts):
      return True
    if attempts.retry(step, error, verdicts):
      return False
    failed = [i for i, v in enumerate(verdicts) if v]
    if 2 in verdicts:
      raise CheckpointUnavailable(
          f"Checkpoint step {step} in {self.directory} could not be read on process(es) {failed} after "
          f"{RESTORE_TRIES} tries ({_describe(error) if error else 'an error on another process'}); it is not "
          "proven damaged, so nothing was moved. Check the storage and rerun the same command to resume.")
    self._quarantine(step, error, failed)
    return False

  def _quarantine(self, step: int, error: Exception | None, failed: list[int]) -> None:
    logging.warning("Checkpoint step %d in %s is damaged (process(es) %s, %d tries each: %s); moving it aside and "
                    "falling back to the previous checkpoint.", step, self.directory, failed, RESTORE_TRIES,
                    _describe(error) if error else "failed on another process")
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        src.rename(self.directory / f"corrupt_step_{step}_{int(time.time())}")
    _barrier(f"mmrs_quarantine_{step}")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _signature(tree) -> dict[str, tuple[int, ...]]:
  """{'params/encoder/kernel': shape} with namedtuple fields and list indices spelled alike for both trees."""
  def key(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {"/".join(key(k) for k in path): tuple(leaf.shape) for path, leaf in leaves if hasattr(leaf, "shape")}


def _check_tree(saved_metadata, abstract_state, step: int) -> None:
  saved = _signature(getattr(saved_metadata, "tree", saved_metadata))
  want = _signature(abstract_state)
  if saved == want:
    return
  missing = sorted(set(want) - set(saved))[:5]
  extra = sorted(set(saved) - set(want))[:5]
  reshaped = sorted(k for k in set(saved) & set(want) if saved[k] != want[k])[:5]
  raise CheckpointMismatch(
      f"Checkpoint step {step} holds a train state that does not match this run's model/optimizer "
      f"(missing in checkpoint: {missing}; only in checkpoint: {extra}; other shapes: "
      f"{[(k, saved[k], want[k]) for k in reshaped]}). Was config.model / config.optimizer.name or the method code "
      "changed? Resume with the original settings, or start a fresh --workdir.")


def _check_finite(state) -> None:
  """One jitted reduction over the whole tree (per-leaf eager checks would compile once per shape)."""
  floats = [x for x in jax.tree.leaves(state) if jax.numpy.issubdtype(x.dtype, jax.numpy.inexact)]
  if floats and not bool(jax.jit(lambda xs: jax.numpy.all(jax.numpy.stack(
      [jax.numpy.isfinite(x).all() for x in xs])))(floats)):
    raise ValueError("the restored state has NaN/inf values")


class _Attempts:
  """Iterates over checkpoint steps, yielding a step again (after a backoff) while `retry` allows: each process
  retries its own failures before the processes compare verdicts."""

  def __init__(self, steps: list[int], manager: ocp.CheckpointManager):
    self.steps, self.manager, self._again, self._tries = steps, manager, False, 0

  def __iter__(self):
    for step in self.steps:
      self._tries = 1
      yield step
      while self._again:
        self._again = False
        self._tries += 1
        yield step

  def retry(self, step: int, error: Exception | None, verdicts: list[int]) -> bool:
    if self._tries >= RESTORE_TRIES:
      return False
    wait = RESTORE_BACKOFF_S * 2 ** (self._tries - 1)
    logging.warning("Restoring checkpoint step %d failed on process(es) %s (here: %s); retry %d/%d in %.1fs.", step,
                    [i for i, v in enumerate(verdicts) if v], _describe(error) if error else "restored",
                    self._tries, RESTORE_TRIES - 1, wait)
    time.sleep(wait)
    self.manager.reload()
    self._again = True
    return True


def _all_processes(value: int) -> list[int]:
  """Every process's `value`, in process order (the same list on every process)."""
  if jax.process_count() == 1:
    return [int(value)]
  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).reshape(-1)]


def _looks_transient(error: Exception) -> bool:
  if isinstance(error, (TimeoutError, ConnectionError)):
    return True
  if isinstance(error, AssertionError) and "sync_global_devices" in str(error):
    return True  # processes out of step in Orbax's barriers (another one failed first): says nothing of the files
  text = f"{type(error).__name__}: {error}"
  return any(m in text for m in _TRANSIENT_MARKERS)


def _describe(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class PreemptionWatcher:
  """Tells the loop to checkpoint and exit on a preemption notice (SIGTERM) or, in one process, Ctrl-C (SIGINT).

  Several processes: JAX's preemption sync point (its coordination service catches SIGTERM on any host and all hosts
  agree on the step). One process: SIGTERM and SIGINT handlers that set a flag (Ctrl-C used to raise
  KeyboardInterrupt and lose every step since the last checkpoint); a second Ctrl-C interrupts at once, unsaved.
  """

  def __init__(self):
    self._flag = False
    self._previous: dict[int, Any] = {}
    self._multi = jax.process_count() > 1
    if not self._multi and threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    again = " (Ctrl-C again: stop now, without saving)" if signum == signal.SIGINT else ""
    logging.warning("%s received: will save a checkpoint after the current step and exit%s.",
                    signal.Signals(signum).name, again)
    self._flag = True
    if signum == signal.SIGINT:  # the next Ctrl-C is Python's KeyboardInterrupt again
      signal.signal(signal.SIGINT, signal.default_int_handler)

  def reached(self, step: int) -> bool:
    if not self._multi:
      return self._flag
    try:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    except RuntimeError:  # preemption service disabled
      return False

  def close(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}
