"""Random-access sources for the pipelines: mmrs ArrayRecord dataset directories (local or remote via etils.epath)
and TFDS datasets in array_record format (`tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR`, no TensorFlow needed).

Both yield `(shard, index, payload)`: where a record lives (for error messages) and its payload: the encoded record
bytes (ArrayRecord), a record dict (TFDS), or the exception raised while reading it, so that a corrupted record is
handled by the pipeline's `on_bad` policy instead of killing a worker.
"""
from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import json
import os
import re
from typing import Any, Sequence

from absl import logging
from etils import epath
import numpy as np

from mmrs import bands as bands_lib

GROUPS = ("paired", "s2_only", "s1_only")
MANIFEST_FORMAT = "mmrs-records-v1"


class ShardError(ValueError):
  """A shard file or dataset directory that cannot be used; the message names the file and what to do."""


@dataclasses.dataclass
class SourceInfo:
  source: Any  # random access: len(), [i] -> (shard, index, payload)
  manifest: dict
  stats: dict | None  # stats.json content; None when the dataset has none
  stats_file: str  # for error messages
  bands: dict[str, tuple[str, ...]]  # modality -> band names as stored
  label_sets: dict[str, dict]  # name -> {"kind", "names"}
  num_records: int


def default_groups(modalities: Sequence[str]) -> tuple[str, ...]:
  mods = tuple(sorted(modalities))
  if mods == ("s1", "s2"):
    return ("paired",)
  if mods == ("s2",):
    return ("paired", "s2_only")
  if mods == ("s1",):
    return ("paired", "s1_only")
  raise ValueError(f"modalities={tuple(modalities)}: use ('s2',), ('s1',) or ('s1', 's2').")


class ArrayRecordShards:
  """Concatenation of ArrayRecord shard files (one grain ArrayRecordDataSource per file, opened in parallel)."""

  def __init__(self, paths: Sequence[str], expected_counts: dict[str, int] | None = None):
    import grain  # pylint: disable=g-import-not-at-top  (heavy; only where shards are read)

    self.paths = [str(p) for p in paths]
    if not self.paths:
      raise ShardError("No shard files to read.")

    def open_one(path):
      try:
        return grain.sources.ArrayRecordDataSource([path])
      except Exception as e:  # riegeli/array_record raise various types for damaged files
        if "://" in path:
          raise ShardError(f"Cannot open shard {path}: {type(e).__name__}: {e}. The open-source array_record "
                           "reader may not read this filesystem directly: mount the bucket (e.g. gcsfuse) and set "
                           "data.shards to the mounted directory.") from None
        raise ShardError(f"Cannot open shard {path}: {type(e).__name__}: {e}. The file is truncated or "
                         "corrupted (e.g. an interrupted copy): copy it again or regenerate the dataset with "
                         "data_prep.") from None

    with concurrent.futures.ThreadPoolExecutor(min(32, len(self.paths))) as pool:
      self._sources = list(pool.map(open_one, self.paths))
    self.names = [epath.Path(p).name for p in self.paths]
    counts = [len(s) for s in self._sources]
    for name, path, n in zip(self.names, self.paths, counts):
      want = (expected_counts or {}).get(name)
      if want is not None and want != n:
        raise ShardError(f"Shard {path} holds {n} records but manifest.json says {want}: the file was truncated "
                         "or replaced. Copy it again or regenerate the dataset with data_prep.")
    self._ends = list(np.cumsum(counts).tolist())

  def __len__(self) -> int:
    return self._ends[-1]

  def __getitem__(self, index) -> tuple[str, int, Any]:
    index = int(index)
    i = bisect.bisect_right(self._ends, index)
    pos = index - (self._ends[i - 1] if i else 0)
    try:
      payload = self._sources[i][pos]
    except Exception as e:  # a damaged chunk: let on_bad decide
      payload = e
    return self.names[i], pos, payload

  def __repr__(self):
    return f"ArrayRecordShards({len(self.paths)} files, {len(self)} records)"


READ = ("crop", "record")


def _open_shards(paths: list[str], manifest: dict, read: str):
  if read not in READ:
    raise ShardError(f"data.read={read!r}: use one of {READ}.")
  counts = manifest.get("records_per_shard") or {}
  names = [epath.Path(p).name for p in paths]
  if (read == "crop" and manifest.get("compression", "uncompressed") == "uncompressed"
      and all(n in counts for n in names) and not any("://" in p for p in paths)):
    from mmrs.data import crop_read  # pylint: disable=g-import-not-at-top
    files = manifest.get("files") or {}
    # The crop reader reads no footer and no chunk hashes: only files of the size the manifest gives qualify
    # (others, e.g. truncated or rewritten ones, go through ArrayRecord's reader, which checks them).
    changed = [p for p, n in zip(paths, names)
               if files.get(n, {}).get("bytes") is not None and os.path.getsize(p) != int(files[n]["bytes"])]
    if changed:
      logging.warning("%s differs in size from manifest.json: reading whole records through ArrayRecord.", changed[0])
      return ArrayRecordShards(paths, counts)
    try:
      return crop_read.CropReadShards(paths, [counts[n] for n in names])
    except (crop_read.NotCropReadable, OSError) as e:
      logging.warning("data.read='crop' cannot read %s (%s): reading whole records through ArrayRecord.", paths[0],
                      e)
  return ArrayRecordShards(paths, counts)


def _read_json(path: epath.Path) -> dict | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ShardError(f"{path} is not valid JSON ({e}); regenerate the dataset with data_prep.") from None


def read_manifest(directory: str) -> dict:
  """The manifest of a dataset directory written by data_prep, checked for existence and format."""
  root = epath.Path(directory)
  if not root.exists():
    raise ShardError(f"data.shards={directory!r} does not exist; point it at a dataset directory written by "
                     "data_prep (with manifest.json) or use tfds:NAME@DATA_DIR.")
  manifest = _read_json(root / "manifest.json")
  if manifest is None:
    raise ShardError(f"{root / 'manifest.json'} is missing: {directory} is not a complete mmrs dataset (data_prep "
                     "writes the manifest last, so the conversion did not finish). Rerun the conversion.")
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ShardError(f"{root / 'manifest.json'} has format {manifest.get('format')!r}, expected "
                     f"{MANIFEST_FORMAT!r}; regenerate the dataset with this version of data_prep.")
  return manifest


def open_directory(directory: str, split: str, groups: Sequence[str],
                   only: Sequence[str] | None = None, read: str = "record") -> SourceInfo:
  """A dataset directory written by data_prep (manifest.json + stats.json + shards) -> SourceInfo.

  only: the shard files to open, in this order (this process's shard groups, mmrs.data.shard_groups); default:
  every file of (split, groups). Files not opened need not be present (a host stages only its share).
  read: "crop" reads only the rows a crop needs from uncompressed shards (mmrs.data.crop_read; other shards fall
  back to "record"), "record" reads whole records through ArrayRecord."""
  root = epath.Path(directory)
  manifest = read_manifest(directory)
  unknown = [g for g in groups if g not in GROUPS]
  if unknown:
    raise ShardError(f"data.groups has unknown group(s) {unknown}; choose from {GROUPS}.")
  splits = manifest.get("splits", {})
  if split not in splits:
    raise ShardError(f"{root / 'manifest.json'} has no split {split!r} (it has {sorted(splits)}); set data.split.")
  files = [name for g in groups for name in splits[split].get(g, [])]
  if only is not None:
    outside = [n for n in only if n not in files]
    if outside:
      raise ShardError(f"{directory}: shard file(s) {outside[:3]} are not in split {split!r} groups {list(groups)}.")
    files = list(only)
  if not files:
    raise ShardError(f"{directory}: split {split!r} has no records in groups {list(groups)} (it has "
                     f"{ {g: len(v) for g, v in splits[split].items()} } shard files per group). Choose other "
                     "modalities or data.groups.")
  missing = [f for f in files if not (root / f).exists()]
  if missing:
    raise ShardError(f"{directory}: shard file(s) {missing[:3]}{'...' if len(missing) > 3 else ''} listed in "
                     "manifest.json are missing; copy the whole dataset directory again.")
  source = _open_shards([str(root / f) for f in files], manifest, read)
  stats_file = str(root / "stats.json")
  stats = _read_json(root / "stats.json")
  bands = {m: tuple(b) for m, b in manifest.get("bands", {}).items()}
  return SourceInfo(source, manifest, stats, stats_file, bands, manifest.get("label_sets", {}), len(source))


_TFDS_SPEC = re.compile(r"tfds:(?P<name>[^:@]+)(:(?P<split>[^@]+))?(@(?P<data_dir>.+))?")


def parse_tfds_spec(spec: str) -> tuple[str, str | None, str | None]:
  """'tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR' -> (name, split or None, data_dir or None)."""
  m = _TFDS_SPEC.fullmatch(spec.strip())
  if not m:
    raise ShardError(f"data.shards={spec!r}: a TFDS source is written tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR.")
  return m["name"], m["split"], m["data_dir"]


class TfdsRecords:
  """Adapts a `tfds.data_source` (feature keys id, s2, s1, mask, label_<set>) to mmrs record dicts."""

  def __init__(self, data_source, name: str, bands: dict[str, tuple[str, ...]]):
    self._ds = data_source
    self.name = name
    self.bands = bands

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index) -> tuple[str, int, Any]:
    index = int(index)
    try:
      ex = self._ds[index]
    except Exception as e:  # a damaged record: let on_bad decide
      return self.name, index, e
    rid = ex.get("id", index)
    rec = {"id": rid.decode() if isinstance(rid, bytes) else str(rid), "labels": {}}
    for m in ("s2", "s1"):
      if ex.get(m) is not None:
        rec[m] = np.asarray(ex[m])
        rec[f"{m}_bands"] = self.bands.get(m)
    if ex.get("mask") is not None:
      rec["mask"] = np.asarray(ex["mask"])
    for k, v in ex.items():
      if k.startswith("label_"):
        rec["labels"][k[len("label_"):]] = np.asarray(v).tolist()
    return self.name, index, rec

  def __repr__(self):
    return f"TfdsRecords({self.name}, {len(self)} records)"


def _import_tfds(spec: str):
  """tensorflow-datasets is an optional dependency (`pip install "mmrs[tfds]"`): only `tfds:` sources need it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ShardError(f"data.shards={spec!r} is a TFDS source, which needs tensorflow-datasets ({e}): "
                     "pip install \"mmrs[tfds]\" (or tensorflow-datasets==4.9.10).") from None
  return tfds


def _tfds_label_sets(features, metadata: dict) -> dict[str, dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (open_tfds imported it already)

  sets = dict(metadata.get("label_sets") or {})
  for key, feat in features.items():
    if not key.startswith("label_") or key[len("label_"):] in sets:
      continue
    name = key[len("label_"):]
    if isinstance(feat, tfds.features.ClassLabel):
      sets[name] = {"kind": "class", "names": list(feat.names)}
    elif isinstance(feat, tfds.features.Sequence) and isinstance(feat.feature, tfds.features.ClassLabel):
      sets[name] = {"kind": "multi_label", "names": list(feat.feature.names)}
  return sets


def _infer_bands(features, metadata: dict) -> dict[str, tuple[str, ...]]:
  bands = {m: tuple(b) for m, b in (metadata.get("bands") or {}).items()}
  if "s2" in features and "s2" not in bands:
    c = features["s2"].shape[-1]
    by_count = {13: bands_lib.S2_L1C_BANDS, 12: bands_lib.S2_L2A_BANDS}
    if c not in by_count:
      raise ShardError(f"TFDS feature 's2' has {c} channels and the dataset metadata names no bands; add "
                       "metadata={'bands': {'s2': [...]}} to the builder's DatasetInfo.")
    bands["s2"] = by_count[c]
  if "s1" in features and "s1" not in bands:
    bands["s1"] = bands_lib.S1_BANDS
  return bands


def open_tfds(spec: str, split: str) -> SourceInfo:
  """`tfds:NAME[/CONFIG][:SPLIT]@DATA_DIR` -> SourceInfo (the spec's SPLIT wins over `split`)."""
  tfds = _import_tfds(spec)

  name, spec_split, data_dir = parse_tfds_spec(spec)
  split = spec_split or split
  try:
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:
    raise ShardError(f"data.shards={spec!r}: cannot open TFDS dataset {name!r} split {split!r} in "
                     f"{data_dir or 'the default data_dir'} ({type(e).__name__}: {e}). Prepare it first "
                     "(download_and_prepare with file_format='array_record').") from None
  info = ds.dataset_info
  metadata = dict(info.metadata or {})
  bands = _infer_bands(info.features, metadata)
  stats = metadata.get("stats")
  stats_file = f"{spec} (DatasetInfo.metadata['stats'])"
  if stats is None:
    stats_path = epath.Path(info.data_dir) / "stats.json"
    stats, stats_file = _read_json(stats_path), str(stats_path)
  manifest = {"format": "tfds", "source": spec, "licence": metadata.get("licence", ""),
              "bands": {m: list(b) for m, b in bands.items()}, "label_sets": _tfds_label_sets(info.features, metadata),
              "counts": {"records": len(ds)}, "splits": {split: {"tfds": [name]}}}
  logging.info("Opened %s split %s: %d records", name, split, len(ds))
  return SourceInfo(TfdsRecords(ds, name, bands), manifest, stats, stats_file, bands, manifest["label_sets"], len(ds))


def open_source(shards: str, split: str, groups: Sequence[str], only: Sequence[str] | None = None,
                read: str = "record") -> SourceInfo:
  """Dispatches on `data.shards`: a dataset directory (local path or gs://...) or a tfds: spec. `only`, `read`: see
  `open_directory` (directories only)."""
  if not shards:
    raise ShardError("data.shards is empty: set it to a dataset directory written by data_prep, or "
                     "tfds:NAME[:SPLIT]@DATA_DIR.")
  if shards.startswith("tfds:"):
    return open_tfds(shards, split)
  return open_directory(shards, split, groups, only, read)


class IndexedSource:
  """A random-access source restricted to `indices` (`data.<name>.indices`: a label-fraction subset)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    if len(self._indices) and (self._indices.min() < 0 or self._indices.max() >= len(source)):
      raise ValueError(f"data indices must lie in [0, {len(source)}) for {source!r}.")

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i):
    return self._source[int(self._indices[int(i)])]

  def __repr__(self):
    return f"IndexedSource({len(self)} of {self._source!r})"
