"""grain pipelines with one GLOBAL sample order: source -> seeded global shuffle per epoch -> repeat -> global
batches, of which each process reads only its rows -> decode+augment -> stack -> `mp_prefetch` workers.

    pipe = make_pipeline(config.data.paired, modalities=("s1", "s2"), global_batch_size=256, seed=0,
                         rows=batch_rows(mesh, 256))   # default: this process's contiguous block
    batch = next(pipe.iterator)                       # {"s2": uint16 (b,S,S,C), "s1": float32 (b,S,S,2) dB, ...}
    batch = normalize_batch(batch, pipe.normalizer)   # inside the jit step (normalize="device", the default)

The sample order is global (DESIGN.md §8): global position g holds record `perm_{seed, e}[g mod N]` of epoch
e = g // N (one seeded permutation of all N records per epoch), and global batch k is positions [k*B, (k+1)*B).
A process reads the rows of each global batch that its devices hold (`rows`, sorted indices in [0, B); they come
from the batch sharding, `mmrs.train.data.batch_rows`). Per-record augmentation randomness is keyed by (seed,
global position), never by process or worker. So global batch k holds the same records, identically augmented,
whatever the number of processes, devices or grain workers: a run can resume on another process count (elastic
resume) and stays exactly one run.

Shard groups (`data.shard_groups` or the manifest's, mmrs/data/shard_groups.py; docs/DESIGN_data.md): with G > 1
the dataset's shards are dealt into G fixed groups, rows [j*B/G, (j+1)*B/G) of every global batch read group j, and
row r = j*B/G + s of batch k reads group j's record at position q = k*B/G + s of its own order (a seeded permutation
per (group, epoch)); augmentation stays keyed by the global position k*B + r. A process then stages, opens and reads
only the shards of the groups its rows fall in (1/P of the dataset when P divides G), and the global batches are
still independent of the process count. G = 1 (the default) is the single global permutation above.

Why not grain's `ElasticIterator` (grain 0.2.18, `grain._src.python.dataset.elastic_iterator`), the other route
to elastic resume: it also keeps global batch k = positions [k*B, (k+1)*B) and a process-count-free state
(`global_next_index`), but process i takes positions i, i+P, i+2P, ... of each batch. The batch sharding puts
process i's rows elsewhere (contiguous blocks per device, in the mesh's device order), so the same record would sit
in another row of the global array on another process count, and everything drawn per row (MAE masks, MixMAE's
k positions, JointMAE's scenario groups, dropout) would change: same records, different losses. Reading exactly the
rows the sharding assigns keeps the resumed run equal to the uninterrupted one row for row (tests/test_multihost.py
checks record ids per row and losses). It also forbids filters and the padded last batch, which `data.on_bad=skip`
and finetune evaluation need. What it offers that this does not: resuming with another global batch size (refused
here; the order is defined per batch).

Batching happens at the `MapDataset` level (element k = this process's rows of global batch k, read with
`read_threads` threads, decoded, augmented and stacked), so `mp_prefetch` workers (which split the elements
round-robin and hand them back in order) cannot change the data, and the iterator state is just the number of
global batches consumed (plus bad-record counters and pins of what defines the order: seed, global batch size,
number of records, shuffle/repeat). Restoring rebuilds the dataset from that batch offset. The state is the same on
every process and for any worker count: the worker-count pin of earlier versions (needed when grain's own
per-worker iterator state was saved) is gone; a change of seed, batch size or dataset is still refused.

Bad records (`data.on_bad`): "fail" raises naming shard and record; "skip" replaces the record deterministically,
in a way that does not depend on the process count: in a padded pass (drop_remainder=False) its row becomes
padding (`valid` False); otherwise the slot takes the next good record of the global order (positions g+1, g+2,
...). Either way it is counted (the counters are summed over processes; `Pipeline.skipped()` is this process's
share) and logged.

Every batch also carries `record_key` (a string array "shard:index" per row, "" for padding), so what a step saw can
be traced; it never reaches the device (`mmrs.train.data.numeric_arrays` drops strings).
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import sys
from typing import Any, Callable, Sequence

from absl import flags
from absl import logging
import grain
import numpy as np

from mmrs import bands as bands_lib
from mmrs.data import normalize as normalize_lib
from mmrs.data import shard_groups as shard_groups_lib
from mmrs.data import sources
from mmrs.data import staging
from mmrs.data import transforms

NORMALIZE = ("device", "host", "none")
_STATE_KEY = "mmrs_pipeline"
_SKIPPED_KEY = "mmrs_skipped"
_BATCHES_KEY = "global_batches"
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


def describe(data_cfg, modalities: Sequence[str], split: str | None = None,
             files: Sequence[str] | None = None, read: str = "record") -> DatasetInfo:
  """Opens `data_cfg.shards` and resolves bands, normalization and labels (cheap: reads only metadata).

  Useful before `make_pipeline` when a `record_transform` needs the normalizer (e.g. BYOL views). files: the shard
  files to stage and open (this process's shard groups); default: all of the split and groups. read: "record" (the
  source yields encoded record bytes, for callers that read records themselves) or "crop" (record dicts whose
  pixel arrays are read on slicing: mmrs.data.crop_read; `make_pipeline` uses data.read, default "crop").
  """
  modalities = tuple(modalities)
  split = split or data_cfg.get("split", "train")
  groups = tuple(data_cfg.get("groups", None) or sources.default_groups(modalities))
  # A remote URL (gs://...) is copied to local disk first (ArrayRecord reads local files): mmrs.data.staging.
  info = sources.open_source(staging.resolve(data_cfg, split, groups, files), split, groups, files, read=read)
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
    normalizer = normalize_lib.Normalizer.from_published(
        bands, s2_level=bands_lib.s2_level_of(info.bands["s2"]) if "s2" in bands else None)
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
  reaches the checkpoint. The training process stops its workers itself (grain: stop event, join, SIGKILL); if it
  dies first (kill -9), the workers exit too (mmrs/parent_watch.py)."""
  import signal  # pylint: disable=g-import-not-at-top
  from mmrs import parent_watch  # pylint: disable=g-import-not-at-top
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent_watch.exit_with_parent()
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


class _NormalizeFirst:
  """Applies a batch map to the batch of a (batch, bad records) element."""

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, element):
    batch, bad = element
    return self.fn(batch), bad


class HostNormalize:
  """Per-batch host normalization (normalize='host'); a picklable map for grain workers."""

  def __init__(self, normalizer: normalize_lib.Normalizer):
    self.normalizer = normalizer

  def __call__(self, batch):
    return normalize_lib.normalize_batch(batch, self.normalizer)


class GlobalBatches(grain.MapDataset):
  """Element k = this process's `rows` of global batch `start + k`: a tuple (batch dict, bad records replaced).

  `groups` maps a shard group j to its records in its own order (group position -> (shard, index, payload)); row
  r of global batch k reads group j = r // rows_per_group at group position k * rows_per_group + r mod
  rows_per_group (one group holding every row: the global position k * B + r). `limit` is the number of positions
  of a single pass (None: repeated, endless; one group only). Positions at or beyond `limit` are padding rows
  (`pad`: zeros, `valid` False). Row r of batch k is decoded with a generator keyed by (aug_seed, global position
  k * B + r): the same row gets the same augmentation in any process and any worker.
  """

  def __init__(self, groups: dict[int, grain.MapDataset], decode: transforms.DecodeAugment, *,
               global_batch_size: int, rows: np.ndarray, aug_seed: int, limit: int | None, pad: bool,
               start: int = 0, read_threads: int = 1, rows_per_group: int | None = None):
    first = groups[min(groups)]
    super().__init__(first)
    self._groups, self._records, self._decode = dict(groups), first, decode
    self._per_group = int(rows_per_group or global_batch_size)
    self._batch, self._rows = int(global_batch_size), np.asarray(rows, np.int64)
    self._aug_seed, self._limit, self._pad, self._start = int(aug_seed), limit, bool(pad), int(start)
    self._threads = max(1, int(read_threads))
    self._pool = None
    self._template = None
    if limit is None:
      self._len = sys.maxsize
    else:
      total = -(-limit // self._batch) if pad else limit // self._batch
      self._len = max(0, total - self._start)

  def __len__(self) -> int:
    return self._len

  def _rng(self, position: int, attempt: int) -> np.random.Generator:
    return np.random.default_rng([self._aug_seed, position, attempt])  # PCG64 via SeedSequence (~2x Philox's speed)

  def _row(self, batch_row: tuple[int, int]):
    """(decoded record or None for padding, [bad records replaced on the way], "shard:index" or "")."""
    k, r = batch_row
    position = k * self._batch + r  # the global position: keys the augmentation
    if self._limit is not None and position >= self._limit:
      return None, [], ""
    group, slot = divmod(r, self._per_group)
    records, at = self._groups[group], k * self._per_group + slot
    bad = []
    for attempt in range(_MAX_CONSECUTIVE_BAD):
      # Replacement j of a bad record is the record at group position + j (the next of its group's order),
      # decoded with the slot's own generator: deterministic, and the same in every process.
      element = records[at + attempt]
      out = self._decode(element, self._rng(position, attempt))
      if not isinstance(out, transforms.BadRecord):
        return out, bad, f"{element[0]}:{element[1]}"
      bad.append(tuple(out))
      if self._pad:  # a padded pass marks the row invalid instead of reading ahead
        return None, bad, ""
    raise transforms.BadRecordError(
        f"{len(bad)} consecutive bad records from global position {position} (last: {bad[-1][0]} record "
        f"{bad[-1][1]}: {bad[-1][2]}); the dataset or the pipeline settings are broken, not a few records. Fix "
        "them instead of skipping.")

  def _zeros(self, like: dict) -> dict:
    return {k: np.zeros_like(v) for k, v in like.items()}

  def _template_row(self) -> dict:
    """A zero row of the right shapes for padding (from the first good record of the order)."""
    if self._template is None:
      for position in range(min(_MAX_CONSECUTIVE_BAD, len(self._records))):
        out = self._decode(self._records[position], self._rng(position, 0))
        if not isinstance(out, transforms.BadRecord):
          self._template = self._zeros(out)
          break
      else:
        raise transforms.BadRecordError("No readable record to take the batch shapes from; every record tried "
                                        "was bad.")
    return self._template

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    k = self._start + int(index)
    positions = [(k, int(r)) for r in self._rows]
    if self._threads > 1 and len(positions) > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads)
      rows = list(self._pool.map(self._row, positions))
    else:
      rows = [self._row(p) for p in positions]
    bad = tuple(b for _, bs, _ in rows for b in bs)
    valid = np.asarray([out is not None for out, _, _ in rows])
    template = self._template_row() if not valid.all() else None
    batch = transforms.stack([template if out is None else out for out, _, _ in rows])
    batch["record_key"] = np.asarray([key for _, _, key in rows])
    if self._pad:
      batch["valid"] = valid
    return batch, bad

  def __getstate__(self):  # thread pools do not pickle (grain workers get a copy of the dataset)
    state = dict(self.__dict__)
    state["_pool"] = None
    return state

  def __str__(self):
    return (f"GlobalBatches(batch={self._batch}, rows={len(self._rows)}, groups={sorted(self._groups)}, "
            f"start={self._start})")


class PipelineIterator(grain.DatasetIterator):
  """The pipeline's iterator. State = {pins, global batches consumed, bad-record counter}: the same on every process
  (but the counter) and for every worker count; `set_state` rebuilds the dataset at that batch offset."""

  def __init__(self, build: Callable[[int], Any], pins: dict):
    super().__init__()
    self._build, self._pins = build, dict(pins)
    self._it = None
    self._consumed = 0
    self._skipped = 0

  def __next__(self):
    if self._it is None:
      self._it = self._build(self._consumed)
    batch, bad = next(self._it)
    self._consumed += 1
    for shard, index, reason in bad:
      self._skipped += 1
      if self._skipped <= 10 or self._skipped % 1000 == 0:
        logging.warning("Skipping bad record: %s record %d (%s); %d skipped so far on this process "
                        "(data.on_bad='skip').", shard, index, reason, self._skipped)
    return batch

  def get_state(self) -> dict:
    return {_STATE_KEY: dict(self._pins), _BATCHES_KEY: self._consumed, _SKIPPED_KEY: self._skipped}

  def set_state(self, state: dict) -> None:
    pins = state.get(_STATE_KEY) if isinstance(state, dict) else None
    if pins is None:
      raise ValueError("This data-iterator state was not written by an mmrs pipeline (no "
                       f"{_STATE_KEY!r} entry); it cannot be restored here.")
    if _BATCHES_KEY not in state:
      raise ValueError("This data-iterator state was written by an older mmrs pipeline (per-process sample order, "
                       "grain's own iterator state); this version orders samples globally and cannot continue it. "
                       "Resume with the mmrs version that wrote it, or start the data afresh.")
    pins = {"shard_groups": 1, **pins}  # states from before shard groups: one group
    diff = {k: (pins.get(k), v) for k, v in self._pins.items() if pins.get(k) != v}
    if diff:
      detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
      raise ValueError(f"Refusing to restore the data-iterator state: it defines another sample order ({detail}). "
                       "Resume with the saved settings (seed, config.batch_size, the same dataset and subset), or "
                       "start the data afresh.")
    self.close()
    self._consumed = int(state[_BATCHES_KEY])
    self._skipped = int(state.get(_SKIPPED_KEY, 0))

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None


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
  batch_size: int  # per process: len(rows)
  labels: tuple[transforms.LabelSpec, ...] = ()
  rows: np.ndarray | None = None  # the rows of each global batch this process reads
  shard_groups: int = 1  # G (mmrs.data.shard_groups)
  served_groups: tuple[int, ...] = (0,)  # the groups this process reads
  shard_files: tuple[str, ...] = ()  # the shard files this process opened (empty: a tfds: source)

  def skipped(self) -> int:
    """Bad records replaced so far in this process's rows (data.on_bad='skip'); survives checkpoint/restore."""
    return skipped_in_state(self.iterator.get_state())

  def close(self) -> None:
    self.iterator.close()


def default_rows(global_batch_size: int, process_index: int = 0, process_count: int = 1) -> np.ndarray:
  """The contiguous block of rows [p*B/P, (p+1)*B/P) of a global batch (a mesh whose devices are ordered by
  process); pass the sharding's rows (`mmrs.train.data.batch_rows`) when they may differ."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by the {process_count} processes; "
                     "choose config.batch_size as a multiple of the process count.")
  b = global_batch_size // process_count
  return np.arange(process_index * b, (process_index + 1) * b)


def make_pipeline(data_cfg, *, modalities: tuple[str, ...], global_batch_size: int, seed: int,
                  process_index: int = 0, process_count: int = 1, rows: Sequence[int] | None = None,
                  record_transform: Callable[[dict, np.random.Generator], dict] | None = None,
                  normalize: str = "device", split: str | None = None, shuffle: bool = True, repeat: bool = True,
                  drop_remainder: bool = True, augment: bool | None = None) -> Pipeline:
  """Builds this process's view of the global pipeline for one dataset entry of the config.

  rows: the sorted rows of each global batch this process reads (what its devices hold); default: the contiguous
  block of `process_index` among `process_count`. normalize: "device" (raw uint16/float32 batches; apply
  `normalize_batch(batch, pipe.normalizer)` in the jit step), "host" (float32 normalized batches), "none" (raw).
  augment: random crops/flips/rot90 as data_cfg says; None = same as `shuffle` (evaluation pipelines get centre
  crops). drop_remainder=False pads the last global batch to the fixed size and adds a `valid` (b,) bool to every
  batch. Optional data_cfg keys: split ("train"), groups (from modalities), label_set (comma-separated), rrc_scale
  ((0.2, 1.0)), read_threads (2), worker_buffer_size (2), thread_prefetch (2 batches, workers=0 only), indices
  (record indices to read, e.g. a label-fraction subset; empty = all).
  """
  if normalize not in NORMALIZE:
    raise ValueError(f"normalize={normalize!r}: use one of {NORMALIZE}.")
  rows = default_rows(global_batch_size, process_index, process_count) if rows is None else np.asarray(rows)
  if (rows.ndim != 1 or not len(rows) or np.any(np.diff(rows) <= 0) or rows[0] < 0
      or rows[-1] >= global_batch_size):
    raise ValueError(f"rows={rows.tolist()} must be sorted distinct row indices in [0, {global_batch_size}).")
  batch_size = len(rows)
  workers = int(data_cfg.workers)
  augment = shuffle if augment is None else augment
  layout = _group_layout(data_cfg, modalities, split, global_batch_size, repeat=repeat)
  served = layout.served(rows) if layout else (0,)
  info = describe(data_cfg, modalities, split, files=layout.files_of(served) if layout else None,
                  read=str(data_cfg.get("read", "crop")))

  shuffle_seed = (seed + int(data_cfg.shuffle_seed_offset)) % 2**32
  if layout is None:  # one group: a seeded permutation of all records per epoch
    source = info.source
    if data_cfg.get("indices"):  # a subset of the records (finetuning label fractions), in this index space
      source = sources.IndexedSource(source, data_cfg.indices)
    n = len(source)
    if n < global_batch_size and drop_remainder and not repeat:
      raise ValueError(f"{data_cfg.shards}: {n} records are fewer than one global batch of {global_batch_size}, "
                       "and drop_remainder=True would yield nothing.")
    group_sources = {0: source}
  else:  # G groups: each its own permutation per epoch, over the files this process opened
    n = sum(layout.records)
    group_sources, start = {}, 0
    for j in served:
      group_sources[j] = shard_groups_lib.RangeSource(info.source, start, start + layout.records[j])
      start += layout.records[j]
  groups = {}
  for j, source in group_sources.items():
    records = grain.MapDataset.source(source)
    if shuffle:
      records = shuffle_dataset(records, shuffle_seed if layout is None else
                                shard_groups_lib.group_seed(shuffle_seed, j))
    groups[j] = records.repeat()  # positions past one pass read the next epoch (and replace bad records)
  decode = transforms.DecodeAugment(
      modalities=modalities, bands=info.bands, image_size=data_cfg.image_size,
      random_resized_crop=data_cfg.random_resized_crop, flips=data_cfg.flips, rot90=data_cfg.rot90,
      augment=augment, rrc_scale=tuple(data_cfg.get("rrc_scale", (0.2, 1.0))), labels=info.labels,
      on_bad=data_cfg.on_bad, default_bands=info.stored_bands, record_transform=record_transform,
      missing_s1=data_cfg.get("missing_s1", "error"))  # 'fill' + groups=(paired, s2_only): S2-only fallback
  # Per-record RNG keyed by (seed, global position); never by process or worker.
  aug_seed = int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])
  read_threads = int(data_cfg.get("read_threads", 2))
  host_normalize = HostNormalize(info.normalizer) if normalize == "host" else None
  if workers > 0 and not flags.FLAGS.is_parsed():
    # grain workers read absl flags; outside absl.app.run (pytest, notebooks) use their defaults.
    logging.info("absl flags not parsed (not under absl.app.run): using flag defaults for grain workers.")
    flags.FLAGS.mark_as_parsed()

  def build(start: int):
    """The iterator of global batches start, start+1, ... (a restore rebuilds from its offset)."""
    ds = GlobalBatches(groups, decode, global_batch_size=global_batch_size, rows=rows, aug_seed=aug_seed,
                       limit=None if repeat else n, pad=not drop_remainder, start=start, read_threads=read_threads,
                       rows_per_group=layout.rows_per_group if layout else None)
    if host_normalize is not None:
      ds = ds.map(_NormalizeFirst(host_normalize))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if workers > 0:
      # Each worker builds whole batches k = w, w + W, ...; grain hands them back in order.
      it = it.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=int(data_cfg.get("worker_buffer_size", 2))),
                          worker_init_fn=worker_init)
    else:
      tune_malloc()
      prefetch = int(data_cfg.get("thread_prefetch", 2))
      if prefetch > 0:  # overlap host work with the device step
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=prefetch)
    return iter(it)

  pins = dict(seed=seed, shuffle_seed=shuffle_seed, global_batch_size=global_batch_size, num_records=n,
              shuffle=shuffle, repeat=repeat, drop_remainder=drop_remainder,
              shard_groups=layout.num_groups if layout else 1)
  iterator = PipelineIterator(build, pins)
  return Pipeline(iterator, info.normalizer, info.bands, info.stats, info.manifest, n, batch_size, info.labels,
                  rows=rows, shard_groups=layout.num_groups if layout else 1, served_groups=tuple(served),
                  shard_files=tuple(getattr(info.source, "paths", ())))


def _group_layout(data_cfg, modalities, split, global_batch_size: int, *,
                  repeat: bool) -> shard_groups_lib.Layout | None:
  """The shard-group layout of a training pipeline (None: one group, the plain global order). Reads only the
  manifest (local or remote), so a host knows its files before staging or opening any."""
  configured = int(data_cfg.get("shard_groups", 0) or 0)
  shards = data_cfg.shards
  subset = bool(data_cfg.get("indices"))
  if configured > 1 and (not repeat or subset or shards.startswith("tfds:")):
    why = "a single pass (evaluation)" if not repeat else "an index subset" if subset else "a tfds: source"
    raise shard_groups_lib.ShardGroupError(
        f"data.shard_groups={configured} with {why}: shard groups are for repeating training pipelines over an "
        "mmrs dataset directory; leave data.shard_groups at 0 here.")
  if not repeat or subset or shards.startswith("tfds:"):
    return None
  if staging.is_remote(shards):
    manifest = staging.read_manifest(shards)[1]
  else:
    manifest = sources.read_manifest(shards)
  where = f"{shards}/manifest.json"
  count = shard_groups_lib.resolve_count(configured, manifest, where)
  if count == 1:
    return None
  split = split or data_cfg.get("split", "train")
  groups = tuple(data_cfg.get("groups", None) or sources.default_groups(modalities))
  return shard_groups_lib.make_layout(manifest, split, groups, count, global_batch_size, where)
