"""grain pipelines: source -> per-process slice -> seeded shuffle -> repeat -> decode+augment -> batch -> workers.

    pipe = make_pipeline(config.data.paired, modalities=("s1", "s2"), global_batch_size=256, seed=0,
                         process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(pipe.iterator)                       # {"s1": float32 (b,S,S,2) dB, "s2": uint16 (b,S,S,C)}
    batch = normalize_batch(batch, pipe.normalizer)   # inside the jit step (normalize="device", the default)

Per-record randomness comes from grain's `random_map` (seeded by seed, process and element index), the order from
a seeded index shuffle reseeded each epoch, so a run is reproducible and its iterator state (`get_state`,
`set_state`, or grain's Orbax handler) resumes exactly. The state pins the worker count and batch layout: restoring
it into a pipeline built differently is refused, because grain would silently yield different data.
"""
from __future__ import annotations

import ctypes
import dataclasses
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from mmrs import bands as bands_lib
from mmrs.data import normalize as normalize_lib
from mmrs.data import sources
from mmrs.data import transforms

NORMALIZE = ("device", "host", "none")
_STATE_KEY = "mmrs_pipeline"
_SKIPPED_KEY = "mmrs_skipped"
_MAX_CONSECUTIVE_BAD = 1000


@dataclasses.dataclass
class DatasetInfo:
  """What a pipeline reads, before any data is read: the source, selected bands, normalizer, label specs."""
  source: Any
  manifest: dict
  stats: dict | None
  bands: dict[str, tuple[str, ...]]  # selected bands, modality -> names, in batch channel order
  stored_bands: dict[str, tuple[str, ...]]  # as the shards store them
  normalizer: normalize_lib.Normalizer
  labels: tuple[transforms.LabelSpec, ...]
  num_records: int


def describe(data_cfg, modalities: Sequence[str], split: str | None = None) -> DatasetInfo:
  """Opens `data_cfg.shards` and resolves bands, normalization and labels (cheap: reads only metadata).

  Useful before `make_pipeline` when a `record_transform` needs the normalizer (e.g. BYOL views).
  """
  modalities = tuple(modalities)
  split = split or data_cfg.get("split", "train")
  groups = tuple(data_cfg.get("groups", None) or sources.default_groups(modalities))
  info = sources.open_source(data_cfg.shards, split, groups)
  where = f"{data_cfg.shards}/manifest.json" if not data_cfg.shards.startswith("tfds:") else data_cfg.shards
  bands = {}
  for m in modalities:
    stored = info.bands.get(m)
    if not stored:
      raise ValueError(f"{where} lists no {m} bands (it has {sorted(info.bands)}): the dataset has no {m.upper()} "
                       f"data; choose other modalities than {modalities}.")
    wanted = bands_lib.parse_band_list(data_cfg.get("s2_bands", "")) if m == "s2" else None
    wanted = wanted or tuple(stored)
    missing = [b for b in wanted if b not in stored]
    if missing:
      raise ValueError(f"data.s2_bands={data_cfg.get('s2_bands')!r} asks for {missing}, which {where} does not have "
                       f"(it has {list(stored)}).")
    bands[m] = tuple(wanted)
  if info.stats is None:
    logging.warning("%s not found: normalizing with published statistics from mmrs.bands.", info.stats_file)
    normalizer = normalize_lib.Normalizer.from_published(bands)
  else:
    normalizer = normalize_lib.Normalizer.from_stats(info.stats, bands, source=info.stats_file)
  labels = []
  for name in [s.strip() for s in str(data_cfg.get("label_set", "") or "").split(",") if s.strip()]:
    spec = info.label_sets.get(name)
    if spec is None:
      raise ValueError(f"data.label_set={name!r} is not a label set of {where} (it has {sorted(info.label_sets)}).")
    labels.append(transforms.LabelSpec(name, spec["kind"], len(spec["names"])))
  return DatasetInfo(info.source, info.manifest, info.stats, bands, info.bands, normalizer, tuple(labels),
                     info.num_records)


def tune_malloc(*_unused) -> None:
  """Keeps glibc from mmap-ing (and page-faulting) every ~0.5 MB record and batch buffer: reading a zstd shard
  record measured 2.1 ms with the default dynamic threshold and 0.8 ms with this. Runs in every grain worker
  (worker_init_fn) and in-process when data.workers=0; a no-op where glibc's mallopt is unavailable."""
  try:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: allocations below 64 MiB come from the heap
    libc.mallopt(-1, 256 << 20)  # M_TRIM_THRESHOLD: keep freed heap for reuse
  except (OSError, AttributeError):
    pass


def worker_init(*_unused) -> None:
  """grain worker start-up: tune_malloc, and ignore SIGTERM. A preemption notice (SLURM, a spot VM's shutdown)
  signals every process of the job; a worker killed by it would fail the training process's next batch before it
  reaches the checkpoint. The training process stops its workers itself (grain: stop event, join, SIGKILL)."""
  import signal  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  tune_malloc()


class PermutationShuffle(grain.MapDataset):
  """Seeded global shuffle, a fresh order each epoch, from a materialized permutation per epoch.

  Same contract as grain's `MapDataset.shuffle` (index -> epoch, position), but grain's cipher-based
  `index_shuffle` costs ~28,000/n microseconds per element (0.45 ms at n=64, 7 us at n=8k) because it walks a
  large cycle for small datasets; test, finetune-subset and benchmark datasets are small. Above `max_materialize`
  records this defers to grain's shuffle (fast there, and no O(n) memory).
  """

  def __init__(self, parent: grain.MapDataset, seed: int):
    super().__init__(parent)
    self._seed = int(seed)
    self._perms: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return len(self._parent)

  def _perm(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent)).astype(np.int32)
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep ~2 epochs (threads overlap)
      self._perms[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    epoch, pos = divmod(int(index), n)
    return self._parent[int(self._perm(epoch)[pos]) + epoch * n]

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perms"] = {}
    return state

  def __str__(self):
    return f"PermutationShuffle(seed={self._seed})"


def shuffle_dataset(ds: grain.MapDataset, seed: int, max_materialize: int = 1 << 22) -> grain.MapDataset:
  return PermutationShuffle(ds, seed) if len(ds) <= max_materialize else ds.shuffle(seed=seed)


class _DropBadIterator(grain.DatasetIterator):
  """Drops `BadRecord`s, counts them in the (checkpointed) state and logs them."""

  def __init__(self, parent):
    super().__init__(parent)
    self._skipped = 0
    self._consecutive = 0

  def __next__(self):
    while True:
      x = next(self._parent)
      if not isinstance(x, transforms.BadRecord):
        self._consecutive = 0
        return x
      self._skipped += 1
      self._consecutive += 1
      if self._skipped <= 10 or self._skipped % 1000 == 0:
        logging.warning("Skipping bad record: %s record %d (%s); %d skipped so far (data.on_bad='skip').",
                        x.shard, x.index, x.reason, self._skipped)
      if self._consecutive >= _MAX_CONSECUTIVE_BAD:
        raise transforms.BadRecordError(
            f"{self._consecutive} consecutive bad records (last: {x.shard} record {x.index}: {x.reason}); the "
            "dataset or the pipeline settings are broken, not a few records. Fix them instead of skipping.")

  def get_state(self):
    return {"parent": self._parent.get_state(), _SKIPPED_KEY: self._skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._skipped = int(state[_SKIPPED_KEY])
    self._consecutive = 0


class _DropBadIterDataset(grain.IterDataset):

  def __iter__(self):
    return _DropBadIterator(self._parent.__iter__())

  def __str__(self):
    return "DropBadRecords"


class HostNormalize:
  """Per-batch host normalization (normalize='host'); a picklable map for grain workers."""

  def __init__(self, normalizer: normalize_lib.Normalizer):
    self.normalizer = normalizer

  def __call__(self, batch):
    return normalize_lib.normalize_batch(batch, self.normalizer)


class PipelineIterator(grain.DatasetIterator):
  """The pipeline's iterator: grain's, with the build settings pinned in its state."""

  def __init__(self, parent, pins: dict):
    super().__init__(parent)
    self._pins = dict(pins)

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict:
    return {_STATE_KEY: dict(self._pins), "grain": self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    pins = state.get(_STATE_KEY) if isinstance(state, dict) else None
    if pins is None:
      raise ValueError("This data-iterator state was not written by an mmrs pipeline (no "
                       f"{_STATE_KEY!r} entry); it cannot be restored here.")
    diff = {k: (pins.get(k), v) for k, v in self._pins.items() if pins.get(k) != v}
    if diff:
      detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(f"Refusing to restore the data-iterator state: the pipeline was built differently ({detail}). "
                       "grain would silently yield different data. Resume with the saved settings (e.g. the same "
                       "data.workers, batch size, seed and number of processes), or start the data afresh.")
    self._parent.set_state(state["grain"])


def skipped_in_state(state: Any) -> int:
  """Sum of the bad-record counters in an iterator state (one per worker)."""
  if isinstance(state, dict):
    return int(state.get(_SKIPPED_KEY, 0)) + sum(skipped_in_state(v) for k, v in state.items() if k != _SKIPPED_KEY)
  if isinstance(state, (list, tuple)):
    return sum(skipped_in_state(v) for v in state)
  return 0


@dataclasses.dataclass
class Pipeline:
  iterator: PipelineIterator
  normalizer: normalize_lib.Normalizer
  bands: dict[str, tuple[str, ...]]
  stats: dict | None
  manifest: dict
  num_records: int  # records in the selected shards (all processes)
  batch_size: int  # per process
  labels: tuple[transforms.LabelSpec, ...] = ()

  def skipped(self) -> int:
    """Bad records dropped so far (data.on_bad='skip'), summed over workers; survives checkpoint/restore."""
    return skipped_in_state(self.iterator.get_state())

  def close(self) -> None:
    self.iterator.close()


def make_pipeline(data_cfg, *, modalities: tuple[str, ...], global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1,
                  record_transform: Callable[[dict, np.random.Generator], dict] | None = None,
                  normalize: str = "device", split: str | None = None, shuffle: bool = True, repeat: bool = True,
                  drop_remainder: bool = True, augment: bool | None = None) -> Pipeline:
  """Builds the per-process pipeline for one dataset entry of the config (`configs.common.dataset_config`).

  normalize: "device" (raw uint16/float32 batches; apply `normalize_batch(batch, pipe.normalizer)` in the jit
  step), "host" (float32 normalized batches), "none" (raw). augment: random crops/flips/rot90 as data_cfg says;
  None = same as `shuffle` (evaluation pipelines get centre crops). drop_remainder=False pads the last batch to the
  fixed size and adds a `valid` (b,) bool to every batch. Optional data_cfg keys: split ("train"), groups
  (from modalities), label_set (comma-separated), rrc_scale ((0.2, 1.0)), read_threads (2),
  worker_buffer_size (2), thread_prefetch (2 batches, workers=0 only), indices (record indices to read,
  e.g. a label-fraction subset; empty = all).
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize={normalize!r}: use one of {NORMALIZE}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the {process_count} processes; "
                     "choose config.batch_size as a multiple of the process count.")
  batch_size = global_batch_size // process_count
  workers = int(data_cfg.workers)
  augment = shuffle if augment is None else augment
  info = describe(data_cfg, modalities, split)

  source = info.source
  if data_cfg.get("indices"):  # a subset of the records (finetuning label fractions), in this index space
    source = sources.IndexedSource(source, data_cfg.indices)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) < batch_size and drop_remainder and not repeat:
    raise ValueError(f"{data_cfg.shards}: process {process_index} sees {len(ds)} records, fewer than one batch "
                     f"of {batch_size}, and drop_remainder=True would yield nothing.")
  shuffle_seed = (seed + int(data_cfg.shuffle_seed_offset)) % 2**32
  if shuffle:
    ds = shuffle_dataset(ds, shuffle_seed)
  if repeat:
    ds = ds.repeat()
  decode = transforms.DecodeAugment(
      modalities=modalities, bands=info.bands, image_size=data_cfg.image_size,
      random_resized_crop=data_cfg.random_resized_crop, flips=data_cfg.flips, rot90=data_cfg.rot90,
      augment=augment, rrc_scale=tuple(data_cfg.get("rrc_scale", (0.2, 1.0))), labels=info.labels,
      on_bad=data_cfg.on_bad, default_bands=info.stored_bands, record_transform=record_transform)
  # Per-record RNG: Philox keyed by (seed, index); the process index is folded in so processes differ.
  aug_seed = int(np.random.SeedSequence([seed, process_index, 0x5EED]).generate_state(1)[0])
  ds = ds.random_map(decode, seed=aug_seed)
  read_threads = int(data_cfg.get("read_threads", 2))
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(2 * batch_size, 16)))
  it = _DropBadIterDataset(it)

  def batch(it):
    it = it.batch(batch_size, drop_remainder=drop_remainder,
                  batch_fn=None if drop_remainder else transforms.PadToBatch(batch_size))
    return it.map(HostNormalize(info.normalizer)) if normalize == "host" else it

  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain workers read absl flags; outside absl.app.run (pytest, notebooks) use their defaults.
      logging.info("absl flags not parsed (not under absl.app.run): using flag defaults for grain workers.")
      flags.FLAGS.mark_as_parsed()
    # Workers batch their own records (fast: shared memory). A single pass (repeat=False) batches in this process
    # instead, so the epoch splits into exactly ceil(n / batch) batches, not one short batch per worker.
    it = batch(it) if repeat else it
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=int(data_cfg.get("worker_buffer_size", 2))),
                        worker_init_fn=worker_init)
    it = it if repeat else batch(it)
  else:
    tune_malloc()
    it = batch(it)
    prefetch = int(data_cfg.get("thread_prefetch", 2))
    if prefetch > 0:  # overlap host work with the device step
      it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
  pins = dict(workers=workers, process_index=process_index, process_count=process_count, batch_size=batch_size,
              shuffle_seed=shuffle_seed, seed=seed, num_records=len(source), shuffle=shuffle, repeat=repeat)
  iterator = PipelineIterator(iter(it), pins)
  return Pipeline(iterator, info.normalizer, info.bands, info.stats, info.manifest, len(source), batch_size,
                  info.labels)
