"""The shared TFDS builder: a data_prep converter's `list_items` / `build` turned into a `GeneratorBasedBuilder`.

Each dataset module sets the converter, its list_items arguments and the features; this base does the rest:
- `manual_dir` holds the user's downloaded archives, extracted in the layout the converter's docstring gives;
- splits are the converter's (an item listed in several splits is written to each);
- features: `id` (Text), `s2` uint16 (H, W, C), `s1` float32 (H, W, 2) dB, `mask` int16 (H, W) with -1 = ignore,
  `label_<set>` (ClassLabel, or Sequence(ClassLabel) for multi-label sets); fixed shapes (no encoding), so the
  array_record files read as raw bytes;
- DatasetInfo.metadata: `bands`, `stats` (per-band mean/std/percentiles of the train split, the same numbers as a
  shard directory's stats.json; the pipeline normalizes with them), `label_sets`, `source`, `licence`, and
  `skipped` (counts: bad input skipped with on_bad="skip", records lacking a modality the features need); a builder
  may add what its converter's listing reports (`listing_metadata`, e.g. BigEarthNet's release and exclusion) and
  `published` (`published_counts`: the published split sizes beside the examples written, with a warning per
  split that came out smaller, as the converters' manifests have it);
- a builder with one config per release of its dataset picks it from manual_dir (`config_for_manual_dir`) when
  `prepare` gets no config;
Bad input fails the build with the item named (on_bad="fail", the default), or is skipped and counted
(`tfds.builder(NAME, on_bad="skip")` / `Builder(on_bad="skip")`). Works without TensorFlow: prepare with
`file_format="array_record"` and read with `tfds.data_source` (or the pipeline's `tfds:NAME[:SPLIT]@DATA_DIR`).
"""
from __future__ import annotations

import collections
import inspect
import multiprocessing
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import utils as tfds_utils

from data_prep.convert import BadInput
from mmrs.data.band_stats import BandStats
from mmrs import bands as bands_lib
from mmrs.data import records

FILE_FORMAT = "array_record"


def image_features(size: int, s2_bands: tuple[str, ...] | None, s1: bool, mask: bool) -> dict:
  out: dict[str, Any] = {"id": tfds.features.Text()}
  if s2_bands:
    out["s2"] = tfds.features.Tensor(shape=(size, size, len(s2_bands)), dtype=np.uint16)
  if s1:
    out["s1"] = tfds.features.Tensor(shape=(size, size, 2), dtype=np.float32)
  if mask:
    out["mask"] = tfds.features.Tensor(shape=(size, size), dtype=np.int16)
  return out


def label_features(label_sets: dict[str, dict]) -> dict:
  out = {}
  for name, spec in label_sets.items():
    if spec["kind"] == "class":
      out[f"label_{name}"] = tfds.features.ClassLabel(names=list(spec["names"]))
    elif spec["kind"] == "multi_label":
      out[f"label_{name}"] = tfds.features.Sequence(tfds.features.ClassLabel(names=list(spec["names"])))
  return out


def _splits(item) -> tuple[str, ...]:
  """The split(s) a converter item goes to (`splits` tuple, or BigEarthNet's single `split`)."""
  return tuple(item.splits) if hasattr(item, "splits") else (item.split,)


def _build_one(args):
  build, item = args
  try:
    return "ok", item, build(item)
  except (BadInput, records.RecordError) as e:
    return "bad", item, str(e)
  except Exception as e:  # library errors on corrupted files: name the item
    return "bad", item, f"{type(e).__name__}: {e}"


class ConverterBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Subclasses set: VERSION, RELEASE_NOTES, MANUAL_DOWNLOAD_INSTRUCTIONS, `converter` (a data_prep module),
  `features_for(config) -> (features dict, bands dict, label_sets dict)`, optionally `list_kwargs(config)`."""
  converter: Any = None
  stats_split = "train"

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds 4.9.10 resolves a packaged builder's path through `importlib_resources`, which Python 3.11 installs
    # lack (ModuleNotFoundError): use the class's file, tfds' own fallback.
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, on_bad: str = "fail", workers: int = 0, **kwargs):
    if on_bad not in ("fail", "skip"):
      raise ValueError(f"on_bad={on_bad!r}: use 'fail' or 'skip'.")
    self.on_bad, self.workers = on_bad, workers
    super().__init__(**kwargs)

  # --- to implement ---------------------------------------------------------------------------------------
  def features_for(self, config) -> tuple[dict, dict, dict]:
    raise NotImplementedError

  def list_kwargs(self, config) -> dict:
    """Arguments of the converter's list_items (`self._manual_dir` is set)."""
    return {}

  def listing_metadata(self, report) -> dict:
    """Entries for DatasetInfo.metadata from the second value list_items returns."""
    return {}

  def published_counts(self, report):
    """A data_prep.convert.PublishedCounts of the splits this build makes, or None when none is published."""
    return None

  def source_for(self, config) -> str:
    return getattr(self.converter, "SOURCE", "")

  @classmethod
  def config_for_manual_dir(cls, manual_dir: str) -> str | None:
    """The config `prepare` builds when given none (None: the builder's default)."""
    return None

  # --- tfds ------------------------------------------------------------------------------------------------
  def _info(self) -> tfds.core.DatasetInfo:
    features, bands, label_sets = self.features_for(self.builder_config)
    conv = self.converter
    source = self.source_for(self.builder_config)
    metadata = tfds.core.MetadataDict(
        bands={m: list(b) for m, b in bands.items()}, label_sets=label_sets,
        source=source, licence=getattr(conv, "LICENCE", ""))
    return tfds.core.DatasetInfo(builder=self, description=(self.__doc__ or "").strip(),
                                 features=tfds.features.FeaturesDict(features), metadata=metadata,
                                 homepage=source)

  def _split_generators(self, dl_manager):
    self._manual_dir = str(dl_manager.manual_dir)
    items, report = self.converter.list_items(self._manual_dir, **self.list_kwargs(self.builder_config))
    if not items:
      raise ValueError(f"{self.name}: no items found under {dl_manager.manual_dir}; see the manual download "
                       "instructions for the expected layout.")
    splits = sorted({s for it in items for s in _splits(it)})
    self._stats: dict[str, dict[str, BandStats]] = {}
    self._skipped: dict[str, collections.Counter] = {}
    self.info.metadata.update(self.listing_metadata(report))
    self._published = self.published_counts(report)
    return {s: self._generate_examples(items, s) for s in splits}

  def _built(self, items) -> Iterator[tuple[str, Any, Any]]:
    jobs = [(self.converter.build, it) for it in items]
    if self.workers and len(jobs) > 1:
      with multiprocessing.get_context("spawn").Pool(min(self.workers, len(jobs))) as pool:
        yield from pool.imap(_build_one, jobs, chunksize=4)
    else:
      yield from map(_build_one, jobs)

  def _generate_examples(self, items, split: str):
    features = self.info.features
    feature_keys = set(features.keys())
    bands = self.info.metadata["bands"]
    stats = self._stats.setdefault(split, {m: BandStats(bands[m], m) for m in bands})
    skipped = self._skipped.setdefault(split, collections.Counter())
    for status, item, out in self._built([it for it in items if split in _splits(it)]):
      if status == "bad":
        if self.on_bad == "fail":
          raise ValueError(f"{self.name}: bad input in {getattr(item, 'name', item)}: {out}. Fix or remove it, or "
                           "build with on_bad='skip' to skip and count such items.")
        logging.warning("%s: skipping %s: %s", self.name, getattr(item, "name", item), out)
        skipped["bad_input"] += 1
        continue
      for rec_split, rec in out:
        if rec_split != split:
          continue
        missing = [m for m in ("s2", "s1") if m in feature_keys and rec.get(m) is None]
        if missing:
          skipped[f"missing_{'_'.join(missing)}"] += 1
          continue
        for m in bands:
          if list(rec.get(f"{m}_bands") or bands[m]) != list(bands[m]):
            raise ValueError(f"{self.name}: record {rec['id']} has {m} bands {rec.get(f'{m}_bands')}, the "
                             f"features say {bands[m]}.")
          stats[m].add(rec[m], rec.get("s1_valid") if m == "s1" else None)
        yield rec["id"], self._example(rec, feature_keys)
        if self._published is not None:
          self._published.count(split)
    self._finish_split(split)

  def _example(self, rec: dict, keys: set) -> dict:
    ex = {"id": rec["id"]}
    for k in ("s2", "s1", "mask"):
      if k in keys:
        ex[k] = rec[k]
    labels = rec.get("labels") or {}
    for k in keys:
      if k.startswith("label_"):
        name = k[len("label_"):]
        if name not in labels:
          raise ValueError(f"{self.name}: record {rec['id']} has no {name!r} labels (it has {sorted(labels)}).")
        ex[k] = labels[name]
    return ex

  def _finish_split(self, split: str) -> None:
    """Stats come from the train split (or the first split finished when there is none); skips are per split."""
    md = self.info.metadata
    md["skipped"] = {s: dict(c) for s, c in self._skipped.items() if c}
    if split == self.stats_split or "stats" not in md:
      md["stats"] = {m: st.to_json() for m, st in self._stats[split].items() if st.n}
      md["stats_from_split"] = split
    for s, c in self._skipped.items():
      if c:
        logging.warning("%s split %s: skipped %s", self.name, s, dict(c))
    if self._published is not None:  # plain JSON types: the metadata is saved as JSON
      md["published"] = {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
                         for k, v in self._published.items()}
      for w in self._published["warnings"]:
        if w.startswith(f"{split}:"):
          logging.warning("%s: %s (published: %s)", self.name, w, self._published["source"])


def prepare(builder_cls, manual_dir: str, data_dir: str, config: str | None = None, **kwargs):
  """Builds `builder_cls` from `manual_dir` into `data_dir` (array_record); returns the builder."""
  if config is None:
    config = builder_cls.config_for_manual_dir(manual_dir)
  builder = builder_cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT, **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


S2_L1C = bands_lib.S2_L1C_BANDS
S2_L2A = bands_lib.S2_L2A_BANDS
S1 = bands_lib.S1_BANDS
