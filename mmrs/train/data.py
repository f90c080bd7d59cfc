"""Adapter between the data pipeline and the train loop: one checkpointable iterator per task, global batches.

Each task reads `config.data[task.dataset]` through `mmrs.data.pipeline.make_pipeline`. Any object with
`next()`/`get_state()`/`set_state()` works as an iterator (tests use in-memory fakes). Batches are process-local
numpy dicts; `global_batch` turns them into global `jax.Array`s split over the mesh's data axes, and normalization
(`TaskData.normalize`, jnp) runs inside the jit step, on device.

The sample order is global (mmrs.data.pipeline): each process's pipeline reads exactly the rows of every global batch
that its devices hold under the batch sharding (`batch_rows`), which is also how `jax.make_array_from_process_local_data`
places local rows (the process's addressed row ranges in increasing order). So the global batch of a step does not
depend on the number of processes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np

Batch = dict[str, Any]


@dataclasses.dataclass
class TaskData:
  iterator: Any  # next() / get_state() / set_state()
  normalize: Callable[[Batch], Batch] | None = None  # jnp, traced into the step; None = batches are ready
  bands: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # modality -> band names
  stats: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # the dataset's stats.json
  workers: int = 0  # grain worker count (recorded in checkpoints; the data do not depend on it)
  skipped: Callable[[], int] | None = None  # bad records dropped so far (data.on_bad="skip"), logged
  close: Callable[[], None] | None = None  # stops pipeline workers


class PeekableIterator:
  """Lets the loop look at the first batch (for shapes) without consuming it; checkpoint state stays exact."""

  def __init__(self, iterator):
    self._it = iterator
    self._advance = iterator.__next__ if hasattr(iterator, "__next__") else iterator.next
    self._peeked = None
    self._state_before = None

  def peek(self) -> Batch:
    if self._peeked is None:
      self._state_before = self._it.get_state()
      self._peeked = self._advance()
    return self._peeked

  def next(self) -> Batch:
    if self._peeked is not None:
      out, self._peeked, self._state_before = self._peeked, None, None
      return out
    return self._advance()

  __next__ = next

  def get_state(self):
    return self._state_before if self._peeked is not None else self._it.get_state()

  def set_state(self, state) -> None:
    self._peeked = self._state_before = None
    self._it.set_state(state)


def batch_rows(mesh: jax.sharding.Mesh, global_batch_size: int) -> np.ndarray:
  """The sorted rows of a global batch that this process's devices hold under `mesh_lib.batch_sharding(mesh)`."""
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  index_map = mesh_lib.batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,))
  rows = set()
  for index in index_map.values():
    rows.update(range(*index[0].indices(global_batch_size)))
  return np.asarray(sorted(rows), np.int64)


def build_task_data(config, method, process_index: int, process_count: int,
                    mesh: jax.sharding.Mesh | None = None) -> dict[str, TaskData]:
  """One pipeline per task, from `config.data[task.dataset]` (the real data path).

  `mesh`: the training mesh, whose batch sharding decides which rows of each global batch this process reads
  (default: `config.mesh` over all devices, as `mmrs.train.loop.train` builds it).
  """
  from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  rows = batch_rows(mesh if mesh is not None else mesh_lib.make_mesh(config.mesh), config.batch_size)
  if len(rows) * process_count != config.batch_size:
    raise ValueError(f"config.mesh={config.mesh!r} gives process {process_index} {len(rows)} of the "
                     f"{config.batch_size} rows of a global batch; each of the {process_count} processes must hold an "
                     "equal, distinct share (split the batch over every device: data x fsdp).")
  out = {}
  for i, task in enumerate(method.tasks):
    data_cfg = config.data[task.dataset]
    byol = task.batch_kind == "byol_views"
    transform = _record_transform(method, task) if byol else None
    pipe = pipeline_lib.make_pipeline(
        data_cfg, modalities=tuple(task.modalities), global_batch_size=config.batch_size,
        seed=config.seed + 1000 * i,  # distinct shuffles when two tasks read one dataset
        rows=rows, record_transform=transform,
        normalize="none" if byol else "device")
    # A method may standardize with other statistics than the dataset's (finetuning: the encoder's own); the
    # checkpoint then records those, so a conversion of the run carries what the model was trained on.
    normalizer = getattr(method, "input_normalizer", lambda n: n)(pipe.normalizer)
    stats = dict(pipe.stats or {}) if normalizer is pipe.normalizer else normalizer.to_json()
    normalize = None if byol else functools.partial(normalize_lib.normalize_batch, normalizer=normalizer)
    out[task.name] = TaskData(iterator=pipe.iterator, normalize=normalize, bands=dict(pipe.bands),
                              stats=stats, workers=int(data_cfg.get("workers", 0)),
                              skipped=pipe.skipped, close=pipe.close)
  return out


def _record_transform(method, task):
  """The host-side view sampler of a BYOL-style method: `method.record_transform(task) -> callable(record)`."""
  fn = getattr(method, "record_transform", None)
  if fn is None:
    raise ValueError(f"Task {task.name!r} has batch_kind='byol_views' but method {method.name!r} has no "
                     "`record_transform(task)` (the host view sampler) to build its views with.")
  return fn(task)


def numeric_arrays(batch: Mapping[str, Any]) -> Batch:
  """Keeps the arrays the device needs (drops ids and other strings)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.dtype.kind in "biuf":
      out[k] = v
  return out


def global_batch(local: Mapping[str, Any], sharding: jax.sharding.NamedSharding, global_batch_size: int,
                 task: str) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global arrays; the leading dim must be global_batch_size / process_count."""
  want = global_batch_size // jax.process_count()
  out = {}
  for k, v in numeric_arrays(local).items():
    if v.shape[0] != want:
      raise ValueError(f"Task {task!r}: batch array {k!r} has {v.shape[0]} rows on process {jax.process_index()} "
                       f"but config.batch_size={global_batch_size} over {jax.process_count()} process(es) needs "
                       f"{want}. Does the pipeline drop the last partial batch?")
    out[k] = jax.make_array_from_process_local_data(sharding, v, (global_batch_size,) + v.shape[1:])
  return out
