"""Checkpoints: Orbax `CheckpointManager` with three items per step, atomic commits, fallback on a bad latest.

  state/  the train state (params, per-group optimizer state, method state), sharded arrays (async save)
  data/   every task's data-iterator state, one `process_{i}-of-{n}.json` per process (grain's layout); mmrs
          pipelines order samples globally, so these states agree on the position and a run restores them on any
          process count (elastic resume, see IteratorStatesHandler)
  meta/   JSON: step, seed, the resolved config, band names and normalization stats per task, process count,
          worker counts (written by the primary process)

Orbax writes a step into a temporary directory and renames it (or writes a commit marker on GCS) when every item is
done, so an interrupted save never looks like a checkpoint. Every save also stores per-leaf value fingerprints of the
state in meta/ (mmrs.train.fingerprint); a restore recomputes and compares them, so flipped bytes in array data (which
tensorstore does not checksum) count as damage instead of resuming from wrong weights.

`restore_latest` tries the newest step first and never loses progress on an error that is not proven damage (the
rules, per exception kind of mmrs.train.storage_errors, are in its docstring): an outage stops the run
(`CheckpointUnavailable`), a refused access stops it with a one-line error (`CheckpointAccessDenied`), proven
damage moves that one step aside to `corrupt_step_<N>_<time>` and the previous step restores, and when none restores
the run refuses to start over (`NoRestorableCheckpoint`) unless asked to. A checkpoint that cannot match this run
(per-process data states on another process count, another optimizer layout) raises `CheckpointMismatch`: every
checkpoint of the run would fail the same way.

MMRS_GCS_REQUEST_RETRIES=N (tests) caps tensorstore's attempts per GCS request at N with short waits (its default,
32 attempts with 1 s .. 32 s waits, takes ~15 minutes to give up on a persistent fault).
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
from orbax.checkpoint._src.serialization import tensorstore_utils

from mmrs.train import fingerprint
from mmrs.train import storage_errors as errors

FORMAT_VERSION = 1


class CheckpointMismatch(RuntimeError):
  """The checkpoint is intact but cannot be resumed by this run; the message says what differs and what to do."""


class CheckpointUnavailable(RuntimeError):
  """A checkpoint could not be read (after retries) but is not proven damaged: nothing was moved; rerun later."""


class CheckpointAccessDenied(RuntimeError):
  """The storage refused access (permission, credentials, missing bucket): nothing was moved; fix access, rerun."""


class NoRestorableCheckpoint(RuntimeError):
  """Checkpoints exist but none restores; the run refuses to start over at step 0 without --allow_fresh_start."""


RESTORE_TRIES = 3  # attempts per step and process before its failure counts
RESTORE_BACKOFF_S = 2.0  # first wait between attempts (doubles)


def _gcs_retries_from_env() -> None:
  """MMRS_GCS_REQUEST_RETRIES=N: tensorstore's GCS attempts per request for Orbax (module docstring)."""
  n = os.environ.get("MMRS_GCS_REQUEST_RETRIES")
  if n:
    retries = {"gcs_request_retries": {"max_retries": int(n), "initial_delay": "0.05s", "max_delay": "0.2s"}}
    for context in (tensorstore_utils._BASE_TS_CONTEXT,  # pylint: disable=protected-access
                    tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):  # pylint: disable=protected-access
      context.update(retries)


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


def _check_bucket(directory: epath.Path) -> None:
  """An object-store run on a missing bucket: one error before anything runs (otherwise it trains up to its first
  write, which dies with a bare FileNotFoundError naming an upload URL). A refused check raises what classify()
  calls access, so the caller reports it as such."""
  text = str(directory)
  if "://" not in text:
    return
  scheme, rest = text.split("://", 1)
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  if not epath.Path(bucket).exists():
    raise CheckpointAccessDenied(f"The bucket {bucket} of {directory} does not exist (or this account cannot see "
                                 f"it): create it (gcloud storage buckets create {bucket}) or fix --workdir. Nothing "
                                 "was written.")


_VERDICTS = (None, errors.DAMAGE, errors.UNKNOWN, errors.TRANSIENT, errors.ACCESS)  # codes 0..4, weakest first
_ASIDE = ("corrupt_step_", "unrestorable_step_")


class Checkpointer:
  """Saves/restores (state, data-iterator states, meta) under `directory`."""

  def __init__(self, directory: str | epath.Path, keep: int, async_save: bool = True):
    self.directory = absolute(directory)
    _gcs_retries_from_env()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=async_save)
    try:
      _check_bucket(self.directory)
      self._manager = ocp.CheckpointManager(
          self.directory, item_names=("state", "data", "meta"), options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(), "data": IteratorStatesHandler(),
                         "meta": ocp.JsonCheckpointHandler()})
    except CheckpointAccessDenied:
      raise
    except Exception as e:  # pylint: disable=broad-except  (listing / creating the folder: say what to check)
      kind = errors.classify(e)
      if kind == errors.ACCESS:
        raise CheckpointAccessDenied(_access_message(self.directory, None, e)) from e
      if kind == errors.TRANSIENT:
        raise CheckpointUnavailable(f"Could not list the checkpoints in {self.directory} ({errors.describe(e)}); "
                                    "nothing was changed. Check the storage and rerun the same command.") from e
      raise

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_states: Mapping[str, Any], meta: Mapping[str, Any]) -> bool:
    """Starts an async save (arrays are copied to host before this returns, so the state may be donated next).

    The meta item gets the state's value fingerprints (mmrs.train.fingerprint), checked after every restore."""
    if step in self._manager.all_steps():
      logging.warning("Checkpoint step %d already exists in %s: not saved again.", step, self.directory)
      return False
    prints, _ = fingerprint.compute(state)
    meta = {**meta, "step": int(step), "format_version": FORMAT_VERSION, "process_count": jax.process_count(),
            "saved_at": time.time(), "fingerprints": prints}
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=IteratorStatesSave(dict(data_states)),
        meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_latest(self, abstract_state: Any, check_meta: Callable[[dict], None] | None = None,
                     allow_fresh_start: bool = False) -> Restored | None:
    """The newest checkpoint that restores and proves its values, or None when there is none to resume.

    `check_meta(meta)` may raise `CheckpointMismatch` (e.g. an incompatible config): that stops the search, since
    it is not damage. A state whose saved tree differs from `abstract_state` also raises `CheckpointMismatch`.

    A failure is judged by `storage_errors.classify` on every process, and the processes decide together
    (all-gather; the strongest verdict wins): ACCESS raises `CheckpointAccessDenied` at once; TRANSIENT and UNKNOWN
    are retried RESTORE_TRIES times with backoff, then TRANSIENT raises `CheckpointUnavailable`; DAMAGE (after its
    retries) moves that one step aside to `corrupt_step_<N>_<time>` and tries the previous step, at most once per
    start. Nothing else is ever moved, so when checkpoints exist (or were moved aside) and none restores, this
    raises `NoRestorableCheckpoint` listing the steps and errors, unless `allow_fresh_start`: then the unrestorable
    steps are moved aside to `unrestorable_step_<N>_<time>` and None is returned (a new run at step 0).
    """
    failures, moved = [], False
    for step in sorted(self._manager.all_steps(), reverse=True):
      restored, kind, error, failed = self._restore_jointly(step, abstract_state, check_meta)
      if restored is not None:
        if failures:
          logging.warning("Resuming from checkpoint step %d after: %s", step, "; ".join(failures))
        return restored
      what = errors.describe(error) if error else "an error on another process"
      if kind == errors.ACCESS:
        raise CheckpointAccessDenied(_access_message(self.directory, step, error, failed))
      if kind == errors.TRANSIENT:
        raise CheckpointUnavailable(
            f"Checkpoint step {step} in {self.directory} could not be read on process(es) {failed} after "
            f"{RESTORE_TRIES} tries ({what}); it is not proven damaged, so nothing was moved. Check the storage and "
            "rerun the same command to resume.")
      if kind == errors.DAMAGE and not moved:
        aside = self._move_aside(step, "corrupt_step_")
        logging.warning("Checkpoint step %d in %s is damaged (process(es) %s, %d tries each: %s); moved it aside to "
                        "%s, falling back to the previous checkpoint.", step, self.directory, failed, RESTORE_TRIES,
                        what, aside)
        failures.append(f"step {step}: damaged, moved aside to {aside} ({what})")
        moved = True
        continue
      failures.append(f"step {step}: " + ("damaged, left in place (one step is moved aside per start)"
                                          if kind == errors.DAMAGE else "not restorable and not proven damaged")
                      + f" ({what})")
      break
    aside = sorted(p.name for p in self.directory.iterdir() if p.name.startswith(_ASIDE)) \
        if self.directory.exists() else []
    if not failures and not aside:
      return None
    if allow_fresh_start:
      for step in self._manager.all_steps():
        self._move_aside(step, "unrestorable_step_")
      logging.warning("No checkpoint in %s restores (%s); starting a new run at step 0 as --allow_fresh_start asks.",
                      self.directory, "; ".join(failures) or f"set aside before: {aside}")
      return None
    raise NoRestorableCheckpoint(
        f"Checkpoints exist in {self.directory} but none restores: "
        f"{'; '.join(failures) or 'every step was moved aside before'}"
        f"{f' (set aside: {aside})' if aside else ''}. Nothing else was moved. Rerun to try the previous step (a "
        "damaged step is moved aside once per start), move a step folder aside yourself, or pass "
        "--allow_fresh_start to start again at step 0.")

  def _restore_jointly(self, step: int, abstract_state: Any, check_meta: Callable[[dict], None] | None):
    """(restored or None, verdict, this process's error, failed process indices) of `step`, after retries.

    Every process retries together (Orbax's restore is collective: a process retrying alone would pair its barriers
    with the others' next ones), so the verdicts are all-gathered after each try."""
    for attempt in range(1, RESTORE_TRIES + 1):
      restored, error = None, None
      try:
        restored = self._restore_step(step, abstract_state, check_meta)
      except CheckpointMismatch:
        raise
      except Exception as e:  # pylint: disable=broad-except  (judged with the other processes below)
        error = e
      mine = 0 if error is None else _VERDICTS.index(errors.classify(error))
      # A code outside 0..4 means the processes' collectives got out of step: no evidence of damage either.
      codes = [c if 0 <= c < len(_VERDICTS) else _VERDICTS.index(errors.TRANSIENT) for c in _all_processes(mine)]
      if not any(codes):
        return restored, None, None, []
      kind, failed = _VERDICTS[max(codes)], [i for i, c in enumerate(codes) if c]
      if kind == errors.ACCESS or attempt == RESTORE_TRIES:
        return None, kind, error, failed
      wait = RESTORE_BACKOFF_S * 2 ** (attempt - 1)
      logging.warning("Restoring checkpoint step %d failed on process(es) %s (here: %s); retry %d/%d in %.1fs.",
                      step, failed, errors.describe(error) if error else "restored", attempt, RESTORE_TRIES - 1,
                      wait)
      time.sleep(wait)
      self._manager.reload()

  def _restore_step(self, step: int, abstract_state: Any, check_meta: Callable[[dict], None] | None) -> Restored:
    meta = self.read_meta(step)
    saved_count = meta.get("process_count", jax.process_count())
    if saved_count != jax.process_count():  # elastic resume: the data item decides (IteratorStatesHandler)
      logging.info("Checkpoint step %d was written by %d processes; resuming on %d.", step, saved_count,
                   jax.process_count())
    if check_meta is not None:
      check_meta(meta)
    _check_tree(self._manager.item_metadata(step)["state"], abstract_state, step)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=IteratorStatesRestore(), meta=ocp.args.JsonRestore()))
    restored = Restored(step=step, state=out["state"], data_states=dict(out["data"]), meta=dict(out["meta"]))
    if restored.meta.get("step") != step:
      raise errors.CheckpointDamage(f"checkpoint step {step}'s meta says step {restored.meta.get('step')}")
    _check_values(restored.state, restored.meta.get("fingerprints"), step)
    return restored

  def _move_aside(self, step: int, prefix: str) -> str:
    """Renames the step folder (process 0; the others wait) and rereads the step list. Returns the new name."""
    name = f"{prefix}{step}_{int(time.time())}"
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        _rename_tree(src, self.directory / name)
    _barrier(f"mmrs_move_aside_{step}")
    self._manager.reload()
    return name

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _rename_tree(src: epath.Path, dst: epath.Path) -> None:
  """A folder rename; on object stores (no folders) every object is moved under the new prefix."""
  if "://" not in os.fspath(src):
    src.rename(dst)
    return
  import fsspec  # pylint: disable=g-import-not-at-top  (gs:// paths go through fsspec / gcsfs)
  fs, path = fsspec.core.url_to_fs(os.fspath(src))
  fs.mv(path, fsspec.core.url_to_fs(os.fspath(dst))[1], recursive=True)
  for instance in list(type(fs)._cache.values()):  # pylint: disable=protected-access
    instance.invalidate_cache()  # epath's instance (other options) would still list the old step


def _access_message(directory: epath.Path, step: int | None, error: Exception | None, failed=()) -> str:
  where = f"checkpoint step {step} in {directory}" if step is not None else f"the checkpoints in {directory}"
  proc = f" on process(es) {list(failed)}" if failed else ""
  return (f"Access to {where} was refused{proc} ({errors.describe(error) if error else 'on another process'}); "
          "nothing was moved. Check that the bucket exists and that this machine's credentials / service account may "
          "read and write it (e.g. `gcloud storage ls` on the path), then rerun the same command.")


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


def _check_values(state, saved: Mapping[str, list[int]] | None, step: int) -> None:
  """The restored values against the fingerprints taken at save (older checkpoints have none), and NaN/inf."""
  prints, finite = fingerprint.compute(state)
  if saved is not None:
    bad = fingerprint.differences(dict(saved), prints)
    if bad:
      raise errors.CheckpointDamage(f"checkpoint step {step}: the restored values of {len(bad)} array(s) differ from "
                                    f"those saved (value fingerprints), e.g. {bad[:3]}")
  if not finite:
    raise errors.CheckpointDamage(f"checkpoint step {step}: the restored state has NaN/inf values")


def _all_processes(value: int) -> list[int]:
  """Every process's `value`, in process order (the same list on every process)."""
  if jax.process_count() == 1:
    return [int(value)]
  return [int(v) for v in np.asarray(multihost_utils.process_allgather(np.asarray(value, np.int32))).reshape(-1)]


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
