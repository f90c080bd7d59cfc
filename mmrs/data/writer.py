"""Writes a dataset directory of ArrayRecord shards + manifest.json + stats.json, atomically and deterministically.

Layout: `{split}.{group}-{i:05d}-of-{n:05d}.array_record` (group = paired | s2_only | s1_only, from the record's
modalities), `group_size:1` so any record can be read by index. Shards are uncompressed by default: reading a
BigEarthNet record takes ~135 us uncompressed vs ~730 us with zstd (measured by benchmarks/data_throughput.py), which
decides whether a host keeps up with its accelerators; files are ~1.7x larger. `compression="zstd"` trades back. Records go round-robin to the shards of their
(split, group) in the order they are added, so the same input gives byte-identical output.

The manifest lists every shard's size and sha256 (`files`), so a copy (e.g. staged from a bucket to a pod host,
mmrs/data/staging.py) can be verified.

Atomicity: everything is written into a sibling temporary directory; `close()` swaps it in with two renames, so a
failed or interrupted conversion leaves the previous dataset (or nothing) behind, never a half-written shard.
"""
from __future__ import annotations

import collections
import hashlib
import os
import shutil
import uuid

from array_record.python import array_record_module

from mmrs import atomic_io
from mmrs.data.band_stats import BandStats
from mmrs.data import records
from mmrs.data import shard_groups as shard_groups_lib

FORMAT = "mmrs-records-v1"
GROUPS = {("s1", "s2"): "paired", ("s2",): "s2_only", ("s1",): "s1_only"}
COUNT_KEYS = {"paired": "pairs", "s2_only": "s2_only", "s1_only": "s1_only"}
_STANDARD_KEYS = ("format", "counts", "skipped_reasons", "skipped_items", "splits", "records_per_shard", "bands",
                  "stats_from_split", "files", "shard_groups", "shard_groups_unsplittable")


def shard_name(split: str, group: str, i: int, n: int) -> str:
  return f"{split}.{group}-{i:05d}-of-{n:05d}.array_record"


def _file_entry(path: str) -> dict:
  """{"bytes", "sha256"} of a shard file: what staging (mmrs/data/staging.py) verifies a copy against."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(8 << 20), b""):
      h.update(chunk)
  return {"bytes": os.path.getsize(path), "sha256": h.hexdigest()}


def _check_replaceable(out_dir: str) -> None:
  if os.path.isfile(out_dir):
    raise FileExistsError(f"{out_dir} is a file, not a dataset directory; choose another --out.")
  if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.exists(os.path.join(out_dir, "manifest.json")):
    raise FileExistsError(f"{out_dir} exists, is not empty and holds no manifest.json: it is not an mmrs "
                          "dataset; refusing to replace it. Choose another --out or empty it.")


class DatasetWriter:
  """`add()` records, `skip()` bad items, `close()` to commit; use as a context manager to abort on errors."""

  def __init__(self, out_dir: str, *, num_shards: int = 1, source: str = "", licence: str = "",
               created_by: str = "", args: dict | None = None, label_sets: dict | None = None,
               stats_split: str = "train", compression: str = "uncompressed", extra: dict | None = None, extra_counts: dict | None = None,
               shard_groups: int = 0):
    """`extra`: more manifest sections (e.g. {"pairing": {...}}); `extra_counts`: more entries of the manifest's
    `counts` (e.g. {"unmatched_s1": 3}). Both are read at close(), so a converter may fill the dicts it passed
    while records are added. `shard_groups`: G recorded in the manifest (mmrs.data.shard_groups: a host reads only
    its groups' shards); num_shards must be a multiple of it. 0: not recorded (readers use one group)."""
    if num_shards < 1:
      raise ValueError(f"num_shards must be >= 1, got {num_shards}.")
    shard_groups_lib.check_shard_count(num_shards, int(shard_groups), f"DatasetWriter(num_shards={num_shards})")
    self.shard_groups = int(shard_groups)
    self.out_dir = os.path.abspath(out_dir)
    _check_replaceable(self.out_dir)  # fail before the conversion, not after hours of it
    parent = os.path.dirname(self.out_dir)
    os.makedirs(parent, exist_ok=True)
    self.tmp_dir = os.path.join(parent, f".{os.path.basename(self.out_dir)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(self.tmp_dir)
    self.num_shards = num_shards
    self.info = dict(source=source, licence=licence, created_by=created_by, args=args or {},
                     label_sets=label_sets or {})
    self.stats_split = stats_split
    if compression not in ("uncompressed", "zstd", "snappy", "brotli"):
      raise ValueError(f"compression must be uncompressed|zstd|snappy|brotli, got {compression!r}.")
    self._options = "group_size:1" + ("" if compression == "brotli" else f",{compression}")
    self.info["compression"] = compression
    self.extra = extra if extra is not None else {}
    self.extra_counts = extra_counts if extra_counts is not None else {}
    self._writers: dict[tuple[str, str, int], array_record_module.ArrayRecordWriter] = {}
    self._counts: dict[tuple[str, str], int] = collections.Counter()
    self._per_shard: dict[tuple[str, str, int], int] = collections.Counter()
    self._stats: dict[str, dict[str, BandStats]] = collections.defaultdict(dict)
    self._bands: dict[str, tuple[str, ...]] = {}
    self.skipped: dict[str, int] = collections.Counter()
    self.skipped_items: list[dict] = []
    self._closed = False

  def add(self, record: dict, split: str = "train") -> None:
    problems = records.validate(record)
    if problems:
      raise records.RecordError("; ".join(problems))
    mods = records.modalities(record)
    group = GROUPS[mods]
    for m in mods:
      names = tuple(record.get(f"{m}_bands") or ())
      if self._bands.setdefault(m, names) != names:
        raise records.RecordError(f"{record['id']}: {m} bands {list(names)} differ from earlier records' "
                                  f"{list(self._bands[m])}; one dataset has one band order.")
      st = self._stats[split].get(m) or self._stats[split].setdefault(m, BandStats(names, m))
      st.add(record[m], record.get("s1_valid") if m == "s1" else None)
    data = records.encode(record)
    i = self._counts[(split, group)] % self.num_shards
    self._counts[(split, group)] += 1
    key = (split, group, i)
    if key not in self._writers:
      path = os.path.join(self.tmp_dir, f"{split}.{group}-{i:05d}.partial")
      self._writers[key] = array_record_module.ArrayRecordWriter(path, self._options)
    self._writers[key].write(data)
    self._per_shard[key] += 1

  def skip(self, item: str, reason: str) -> None:
    self.skipped[reason.split(":")[0][:80]] += 1
    self.skipped_items.append({"item": item, "reason": reason})

  def abort(self) -> None:
    for w in self._writers.values():
      w.close()
    self._writers.clear()
    shutil.rmtree(self.tmp_dir, ignore_errors=True)
    self._closed = True

  def close(self) -> dict:
    for w in self._writers.values():
      w.close()
    splits: dict[str, dict[str, list[str]]] = collections.defaultdict(dict)
    per_file, files = {}, {}
    for (split, group), count in sorted(self._counts.items()):
      n = min(self.num_shards, count)
      names = []
      for i in range(n):
        name = shard_name(split, group, i, n)
        path = os.path.join(self.tmp_dir, name)
        os.replace(os.path.join(self.tmp_dir, f"{split}.{group}-{i:05d}.partial"), path)
        per_file[name] = self._per_shard[(split, group, i)]
        files[name] = _file_entry(path)
        names.append(name)
      splits[split][group] = names
    counts = {"records": sum(self._counts.values()), "skipped": sum(self.skipped.values())}
    for group, key in COUNT_KEYS.items():
      counts[key] = sum(c for (_, g), c in self._counts.items() if g == group)
    clash = (set(self.extra_counts) & set(counts)) | (set(self.extra) & (set(self.info) | set(_STANDARD_KEYS)))
    if clash:
      raise ValueError(f"DatasetWriter extra manifest keys {sorted(clash)} clash with standard manifest keys.")
    counts.update(self.extra_counts)
    stats = self._merged_stats()
    manifest = dict(format=FORMAT, **self.info, **self.extra, counts=counts,
                    skipped_reasons=dict(sorted(self.skipped.items())), skipped_items=self.skipped_items[:1000],
                    splits=dict(splits), records_per_shard=per_file, files=files,
                    bands={m: list(b) for m, b in sorted(self._bands.items())},
                    stats_from_split=self.stats_split if self.stats_split in self._stats else "all")
    if self.shard_groups:
      # num_shards is a multiple of G (checked at construction), so only a (split, group) with fewer records than
      # shards, hence fewer files, can have a file count G does not split: e.g. Sen1Floods11's 15-chip Bolivia test
      # split. Single passes (evaluation) read no groups, so it is written; training on it with groups is refused
      # at start-up (mmrs.data.shard_groups.make_layout). Listed in the manifest.
      small = sorted(f"{split}.{group}" for split, per_group in splits.items() for group, names in per_group.items()
                     if len(names) % self.shard_groups)
      manifest["shard_groups"] = self.shard_groups
      if small:
        manifest["shard_groups_unsplittable"] = small
    atomic_io.write_json(os.path.join(self.tmp_dir, "stats.json"), stats)
    atomic_io.write_json(os.path.join(self.tmp_dir, "manifest.json"), manifest)
    self._swap_in()
    self._closed = True
    return manifest

  def _merged_stats(self) -> dict:
    chosen = [self._stats[self.stats_split]] if self.stats_split in self._stats else list(self._stats.values())
    merged: dict[str, BandStats] = {}
    for per_mod in chosen:
      for m, st in per_mod.items():
        if m in merged:
          merged[m].merge(st)
        else:
          merged[m] = st
    return {m: st.to_json() for m, st in sorted(merged.items())}

  def _swap_in(self) -> None:
    old = None
    if os.path.exists(self.out_dir):
      try:
        _check_replaceable(self.out_dir)
      except FileExistsError:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        raise
      old = f"{self.tmp_dir}.old"
      os.replace(self.out_dir, old)
    os.replace(self.tmp_dir, self.out_dir)
    if old:
      shutil.rmtree(old, ignore_errors=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and not self._closed:
      self.abort()
    return False
