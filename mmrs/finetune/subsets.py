"""Label-fraction training subsets (1 / 10 / 50 / 100 % of the labels): deterministic.

Default "random" (what the papers do: a random share of the training set, the label distribution as it is): a
record is in the subset iff hash(subset_seed, record id) / 2^64 < fraction (`random_by_id`), so the S2, S1 and
S1+S2 runs with the same seed train on the same places (their index spaces differ: S2 input also reads S2-only
records), and a 1% subset is inside the 10% one. At least one record is always chosen (the smallest hash).
Options "balanced" / "stratified" (below) choose by labels instead:

`subset_indices(labels, fraction, seed)` takes one multi-hot row per record (single-label sets as one-hot rows,
segmentation masks as "classes present in the mask" rows) and returns the sorted record indices of the subset:
  n = max(1, round(fraction * N)) records; each class c gets a quota q_c of records that contain it, then the
  records are chosen class by class, rarest class first, in one seeded random order; records already chosen count
  toward every class they contain; whatever is left of n is filled in the same random order.
Quotas (`mode`):
  "balanced"   equal quotas, capped by what a class has, the rest spread over the others (water-filling,
               so sum(q) = n): EuroSAT at 1% gets 27 images per class; a class with fewer images than its share
               gives all it has ("where possible"). For multi-label sets co-occurring labels make frequent classes
               exceed their quota: only the rare ones can be held to it.
  "stratified" q_c = max(1, round(fraction * N_c)): the label distribution of the full set, no class lost.
The same (labels, fraction, seed, mode) always gives the same indices; a different seed gives another draw.
"""
from __future__ import annotations

import hashlib

import numpy as np

from mmrs.data import sources

MODES = ("random", "balanced", "stratified")


def id_hash(record_id: str, seed: int) -> float:
  """A uniform number in [0, 1) from (seed, record id): the same on every machine and run."""
  digest = hashlib.blake2b(f"{int(seed)}:{record_id}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0 ** 64


def random_by_id(ids, fraction: float, seed: int) -> np.ndarray:
  """Sorted int64 indices of the records whose id hashes below `fraction` (at least one)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"finetune.label_fraction={fraction} must be in (0, 1] (e.g. 0.01, 0.1, 0.5, 1.0).")
  if fraction == 1.0:
    return np.arange(len(ids), dtype=np.int64)
  h = np.asarray([id_hash(i, seed) for i in ids], np.float64)
  chosen = np.flatnonzero(h < fraction)
  if not len(chosen) and len(h):
    chosen = np.asarray([int(np.argmin(h))])
  return np.sort(chosen).astype(np.int64)


def _water_fill(total: int, caps: np.ndarray) -> np.ndarray:
  """Integer quotas q <= caps, as equal as possible, summing to min(total, caps.sum())."""
  q = np.zeros_like(caps)
  left = min(total, int(caps.sum()))
  while left > 0:
    open_ = np.nonzero(q < caps)[0]
    share = max(left // len(open_), 1)
    for c in open_:
      add = min(share, caps[c] - q[c], left)
      q[c] += add
      left -= add
      if left == 0:
        break
  return q


def quotas(counts: np.ndarray, n: int, fraction: float, mode: str) -> np.ndarray:
  counts = np.asarray(counts, np.int64)
  if mode == "balanced":
    return _water_fill(n, counts)
  if mode == "stratified":
    return np.where(counts > 0, np.maximum(1, np.rint(fraction * counts)), 0).astype(np.int64)
  raise ValueError(f"finetune.subset_mode={mode!r} is unknown; choose one of {MODES}.")


def subset_indices(labels: np.ndarray, fraction: float, seed: int, mode: str = "balanced") -> np.ndarray:
  """Sorted int64 indices of a `fraction` subset of the N records whose (N, C) multi-hot labels are given."""
  labels = np.asarray(labels).astype(bool)
  if labels.ndim != 2:
    raise ValueError(f"labels must be (records, classes) multi-hot, got shape {labels.shape}.")
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"finetune.label_fraction={fraction} must be in (0, 1] (e.g. 0.01, 0.1, 0.5, 1.0).")
  num = labels.shape[0]
  if fraction == 1.0:
    return np.arange(num, dtype=np.int64)
  n = max(1, int(round(fraction * num)))
  counts = labels.sum(0)
  q = quotas(counts, n, fraction, mode)
  order = np.random.default_rng(seed).permutation(num)
  ranked = labels[order]  # rows in the random order
  selected = np.zeros(num, bool)
  have = np.zeros(labels.shape[1], np.int64)
  taken = 0
  for c in np.argsort(counts, kind="stable"):
    if counts[c] == 0:
      continue
    for i in order[ranked[:, c]]:
      if have[c] >= q[c] or taken >= n:
        break
      if not selected[i]:
        selected[i] = True
        have += labels[i]
        taken += 1
  for i in order:
    if taken >= n:
      break
    if not selected[i]:
      selected[i] = True
      taken += 1
  return np.nonzero(selected)[0].astype(np.int64)


def labels_to_multihot(values, num_classes: int) -> np.ndarray:
  """Per-record labels (int class, list of class indices, or an (H, W) mask with -1 ignore) -> (N, C) bool."""
  out = np.zeros((len(values), num_classes), bool)
  for r, v in enumerate(values):
    a = np.asarray(v)
    idx = a.ravel() if a.ndim != 2 else np.unique(a)
    idx = idx[(idx >= 0) & (idx < num_classes)].astype(np.int64)
    out[r, idx] = True
  return out


def read_label_rows(data_cfg, modalities, split: str, label_set: str) -> np.ndarray:
  """(N, C) multi-hot rows of every record the pipeline would read (same order as its index space)."""
  return read_ids_and_label_rows(data_cfg, modalities, split, label_set)[1]


def read_ids_and_label_rows(data_cfg, modalities, split: str, label_set: str) -> tuple[list[str], np.ndarray]:
  """(record ids, (N, C) multi-hot rows) of every record the pipeline would read (its index-space order).

  Reads each record once (headers and, for masks, the mask array): a one-off scan per run.
  """
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  from mmrs.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmrs.data import records  # pylint: disable=g-import-not-at-top

  cfg = data_cfg.copy_and_resolve_references()
  cfg.unlock()
  cfg.label_set = label_set
  info = pipeline.describe(cfg, tuple(modalities), split)
  spec = info.labels[0]

  def one(i):
    shard, index, payload = info.source[i]
    if isinstance(payload, Exception):
      raise ValueError(f"Cannot read {shard} record {index} for the label-fraction subset: {payload}")
    rec = records.decode(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
    rid = str(rec.get("id", f"{shard}:{index}"))
    if spec.kind == "mask":
      return rid, rec["mask"]
    return rid, rec.get("labels", {}).get(spec.name, [])

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    pairs = list(pool.map(one, range(info.num_records), chunksize=256))
  return [p[0] for p in pairs], labels_to_multihot([p[1] for p in pairs], spec.num_classes)


def training_indices(config, modalities) -> np.ndarray:
  """The label-fraction subset of config.data.train for config.finetune (label_fraction, subset_seed, subset_mode:
  random (default) | balanced | stratified), over the records that a pipeline reading `modalities` sees."""
  ft = config.finetune
  data_cfg = config.data.train
  mode = ft.get("subset_mode", "random")
  if mode not in MODES:
    raise ValueError(f"finetune.subset_mode={mode!r} is unknown; choose one of {MODES}.")
  ids, rows = read_ids_and_label_rows(data_cfg, modalities, data_cfg.get("split", "train"), ft.label_set)
  if mode == "random":
    return random_by_id(ids, float(ft.label_fraction), int(ft.get("subset_seed", 0)))
  return subset_indices(rows, float(ft.label_fraction), int(ft.get("subset_seed", 0)), mode)


# Kept importable from here for callers of the label-fraction code.
IndexedSource = sources.IndexedSource
