"""BigEarthNet -> mmrs shards: v1 (BigEarthNet-MM, 2019/2021) and v2.0 (reBEN, 2024, what bigearth.net ships today).
S1+S2 pairs, S1-only and S2-only leftovers, 19-class labels (v1 also the 43 CORINE classes).

    python -m data_prep.bigearthnet_mm --src=DIR --out=DIR [--num_shards=N] [--shard_groups=G] [--on_bad=fail|skip]
        [--workers=N] [--split=official | --split=train | --split=hash:0.8,0.1,0.1]
        [--splits_dir=DIR [--unlisted_split=NAME]] [--keep_cloudy] [--exclude_lists=DIR]

The version is detected from the layout (`detect`), never guessed from folder names alone:
  v2.0 (reBEN; layout of bigearth.net's download, torchgeo's BigEarthNetV2 and ConfigILM's BENv2 loader):
    SRC/metadata.parquet [+ SRC/metadata_for_patches_with_snow_cloud_or_shadow.parquet]
    SRC/BigEarthNet-S2/<S2 product>/<patch_id>/<patch_id>_B??.tif   (12 L2A bands at 10/20/60 m)
    SRC/BigEarthNet-S1/<S1 product>/<s1_name>/<s1_name>_{VV,VH}.tif
    (e.g. BigEarthNet-S2/S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP/S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP_26_57/)
    metadata.parquet columns: patch_id, labels (list of 19-class names), split (train | validation | test),
    country, s1_name, s2v1_name, contains_seasonal_snow, contains_cloud_or_shadow (bool). Pairing is the row's
    `s1_name`; the split is the row's `split` (validation -> 'val'); labels are the 19 classes. reBEN ships the
    cloudy/snowy patches in the second parquet file, already flagged.
  v1 (BigEarthNet-MM; see data_prep/samples/bigearthnet_mm/):
    SRC/BigEarthNet-S1[-v1.0]/<s1 patch>/<s1 patch>_{VV,VH}.tif + <s1 patch>_labels_metadata.json
    SRC/BigEarthNet-S2 | BigEarthNet-v1.0/<s2 patch>/<s2 patch>_B??.tif + <s2 patch>_labels_metadata.json
    Pairing follows `corresponding_s2_patch` of the S1 metadata (never the folder names).
An S1 patch whose S2 partner is absent is kept as S1-only and counted in the manifest's `warnings`; S2 patches
nobody points to are S2-only. The manifest's `bigearthnet` section says which version was read.

Cloud, shadow and seasonal snow: excluded by default, as the dataset's authors do. v2: from the parquet flags
(counts in `counts.excluded_cloud_or_shadow` / `excluded_seasonal_snow` / `excluded`); v1: from the official
`patches_with_cloud_and_shadow.csv` and `patches_with_seasonal_snow.csv` given with `--exclude_lists=DIR` (without
them the run keeps those patches and says so in the log and in `bigearthnet.exclusion` of the manifest).
`--keep_cloudy` keeps them on purpose (e.g. for pretraining).

Records: `s2` (H, W, 12) uint16 in `mmrs.bands.S2_L2A_BANDS` order on the 10 m grid (20/60 m bands by pixel
replication, `geotiff.to_grid`), `s1` (H, W, 2) float32 dB VV,VH cleaned by `records.clean_s1`; labels
v1 {"corine43": [...], "ben19": [...]} (a pair takes the S2 patch's labels), v2 {"ben19": [...]}; meta: id (the S2
patch name for pairs and S2-only, the S1 name for S1-only), s1_id, s2_id, crs, bounds [minx, miny, maxx, maxy]
in that UTM CRS, lon/lat of the centre, s1_time/s2_time (UTC ISO 8601), source, licence (v2 also country,
s2v1_id). v1 patches whose labels all lack a 19-class counterpart are kept (empty ben19) and counted.

Splits: v2 defaults to the official `split` column. `--splits_dir` holds BigEarthNet v1's official `train.csv`,
`val.csv`, `test.csv` (patch names, one per line; every field of a row is looked up, so S2,S1 two-column lists work
too); patches in none of them are dropped and counted, or written to `--unlisted_split`. `--split=NAME` puts
everything in one split; `--split=hash:0.8,0.1,0.1` splits by a stable hash of the patch's *tile* (spatially
blocked, so neighbouring patches never straddle train and test; see `block_key`).
With official splits (v2's column, v1's lists) the manifest's `published` section sets the records found per split
beside the published split sizes (`PUBLISHED_V2` / `PUBLISHED_V1`, sources next to them) and what the metadata or
lists name (`listed`), with a warning for every split that came out smaller (a partial download, a truncated file).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import multiprocessing
import os
import re

import numpy as np
from absl import app, flags, logging

from launch import cli

from data_prep import convert, geotiff
from data_prep.convert import BadInput
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import bigearthnet_labels, records

SOURCE = "BigEarthNet-MM v1"
SOURCE_V2 = "BigEarthNet v2.0 (reBEN)"
LICENCE = "CDLA-Permissive-1.0"
S1_DIRS = ("BigEarthNet-S1", "BigEarthNet-S1-v1.0")
S2_DIRS = ("BigEarthNet-S2", "BigEarthNet-v1.0", "BigEarthNet-S2-v1.0")
V2_METADATA = "metadata.parquet"
V2_METADATA_FLAGGED = "metadata_for_patches_with_snow_cloud_or_shadow.parquet"
# The columns this converter reads, as reBEN's metadata.parquet names them (checked against ConfigILM's
# mock_data/BENv2/metadata.parquet, a row subset of the released file: patch_id, labels, split, country, s1_name,
# s2v1_name as strings/list<string>, the two flags as bool).
V2_COLUMNS = ("patch_id", "labels", "split", "country", "s1_name", "s2v1_name", "contains_seasonal_snow",
              "contains_cloud_or_shadow")
V2_SPLITS = {"train": "train", "validation": "val", "test": "test"}
# v1's official exclusion lists (bigearth.net "patches_with_cloud_and_shadow.csv" / "patches_with_seasonal_snow.csv").
V1_EXCLUDE_FILES = {"cloud_or_shadow": "patches_with_cloud_and_shadow.csv",
                    "seasonal_snow": "patches_with_seasonal_snow.csv"}
# More S1 no-data than this and the patch counts as S1-missing: a pair keeps its S2 (meta.s1_dropped, counted in
# counts.s1_dropped), an S1-only patch is bad input.
MAX_INVALID_S1_FRACTION = records.MAX_S1_NODATA_FRACTION
GRID_TOLERANCE_M = 10.0  # S1 and S2 bounds of a pair may differ by at most one 10 m pixel
SPLIT_FILES = ("train", "val", "test")
# Published split sizes, for the manifest's `published` section (expected vs found; a warning per short split).
# v2.0 (reBEN): rows of each `split` in the released metadata.parquet, which holds only the patches without cloud,
# shadow or seasonal snow (those 69,450 rows are in metadata_for_patches_with_snow_cloud_or_shadow.parquet). The
# reBEN paper (Clasen et al., IGARSS 2025, arXiv:2407.03653) gives the total, 549,488 pairs, and no per-split table;
# the per-split counts are those of the released file as two independent public reports count them (237,871 /
# 122,342 / 119,825 = 480,038), and 480,038 + 69,450 = 549,488 matches the paper's total.
PUBLISHED_V2 = {"train": 237_871, "val": 122_342, "test": 119_825}
PUBLISHED_V2_FLAGGED = 69_450
PUBLISHED_V2_TOTAL = 549_488
PUBLISHED_V2_SOURCE = ("rows per split of reBEN's metadata.parquet (Zenodo record 10891137); total 549,488 with the "
                       "69,450 flagged rows: Clasen et al., arXiv:2407.03653")
# v1: rows of the official train.csv / val.csv / test.csv (git.tu-berlin.de/rsim/BigEarthNet-MM_19-classes_models,
# splits/, the lists torchgeo's BigEarthNet dataset downloads), which already leave out the cloudy and snowy
# patches: 269,695 / 123,723 / 125,866 = 519,284 of the 590,326 pairs (Sumbul et al. 2021, arXiv:2105.07921).
PUBLISHED_V1 = {"train": 269_695, "val": 123_723, "test": 125_866}
PUBLISHED_V1_SOURCE = ("rows of BigEarthNet v1's official train/val/test.csv (BigEarthNet-MM_19-classes_models "
                       "splits/); 590,326 pairs in all: Sumbul et al. 2021, arXiv:2105.07921")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # the record id
  split: str
  s1_dir: str | None = None
  s2_dir: str | None = None
  s2_ref: str | None = None  # S1-only: the S2 patch its metadata names (absent from the S2 folder)
  version: str = "v1"
  labels: tuple[str, ...] | None = None  # v2: the 19-class names from metadata.parquet
  meta: tuple[tuple[str, str], ...] = ()  # v2: extra metadata (country, s2v1_id)


@dataclasses.dataclass(frozen=True)
class Layout:
  """What `detect` found: the version and the roots of the two modalities (either may be None)."""
  version: str  # "v1" | "v2"
  s1_root: str | None
  s2_root: str | None
  metadata: tuple[str, ...] = ()  # v2: the parquet files found


def _has_band_files(d: str) -> bool:
  return any(n.endswith(".tif") for n in os.listdir(d))


def _first_subdir(root: str) -> str | None:
  for n in sorted(os.listdir(root)):
    if os.path.isdir(os.path.join(root, n)):
      return os.path.join(root, n)
  return None


def detect(src: str) -> Layout:
  """v1 or v2 from the layout: v2 has metadata.parquet and product/patch nesting, v1 flat patch folders with
  `*_labels_metadata.json`. Anything else is a one-line error naming the folder."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"--src={src} is not a directory; point it at the extracted BigEarthNet folder.")
  s1_root, s2_root = _find_root(src, S1_DIRS), _find_root(src, S2_DIRS)
  parquets = tuple(os.path.join(src, n) for n in (V2_METADATA, V2_METADATA_FLAGGED)
                   if os.path.exists(os.path.join(src, n)))
  roots = [r for r in (s2_root, s1_root) if r]
  if not roots:
    raise FileNotFoundError(f"--src={src} holds neither an S1 folder {S1_DIRS} nor an S2 folder {S2_DIRS}; point "
                            "it at the directory that contains the extracted BigEarthNet archives (v1 or v2.0).")
  first = _first_subdir(roots[0])
  if first is None:
    raise FileNotFoundError(f"{roots[0]} holds no patch folders; is the BigEarthNet archive fully extracted?")
  flat = _has_band_files(first)  # v1: <root>/<patch>/*.tif; v2: <root>/<product>/<patch>/*.tif
  nested = not flat and (inner := _first_subdir(first)) is not None and _has_band_files(inner)
  if flat and not parquets:
    return Layout("v1", s1_root, s2_root)
  if nested and parquets:
    if os.path.join(src, V2_METADATA) not in parquets:
      raise FileNotFoundError(f"{src} has {V2_METADATA_FLAGGED} but no {V2_METADATA}; download both parquet "
                              "files of BigEarthNet v2.0 into that folder.")
    return Layout("v2", s1_root, s2_root, parquets)
  if nested:
    raise FileNotFoundError(f"{src} has the BigEarthNet v2.0 product/patch folders but no {V2_METADATA}; download "
                            f"it (and {V2_METADATA_FLAGGED}) from bigearth.net into {src}.")
  raise FileNotFoundError(f"{src} is neither BigEarthNet v1 (flat patch folders like {first}) without parquet files "
                          f"nor v2.0 (<product>/<patch>/ folders with {V2_METADATA}); fix the folder layout.")


def block_key(name: str) -> str:
  """The spatial block a patch belongs to, for `--split=hash:`: its Sentinel-2 tile (v2 patch ids end in
  `_T<tile>_<row>_<col>`; S1 names in `_<tile>_<row>_<col>`); v1 S2 names carry no tile, so their block is the S2
  product (one tile acquisition). Patches of one block always share a split."""
  parts = name.split("_")
  if len(parts) >= 3 and parts[-1].isdigit() and parts[-2].isdigit():
    tile = parts[-3]
    if re.fullmatch(r"T?\d{2}[A-Z]{3}", tile):
      return tile.lstrip("T")
    return "_".join(parts[:-2])
  return name


def _find_root(src: str, names: tuple[str, ...]) -> str | None:
  for n in names:
    if os.path.isdir(os.path.join(src, n)):
      return os.path.join(src, n)
  return None


def _patch_dirs(root: str | None) -> dict[str, str]:
  if root is None:
    return {}
  return {n: os.path.join(root, n) for n in sorted(os.listdir(root)) if os.path.isdir(os.path.join(root, n))}


def _metadata_path(patch_dir: str) -> str:
  return os.path.join(patch_dir, f"{os.path.basename(patch_dir)}_labels_metadata.json")


def read_metadata(patch_dir: str) -> dict:
  path = _metadata_path(patch_dir)
  if not os.path.exists(path):
    raise BadInput(f"missing file {path}")
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadInput(f"cannot parse {path}: {e}") from None
  if not isinstance(meta, dict) or not isinstance(meta.get("labels"), list):
    raise BadInput(f"{path} has no 'labels' list; is this a BigEarthNet labels_metadata.json?")
  return meta


def _partner(s1_dir: str) -> str | None:
  """The S1 patch's `corresponding_s2_patch`, or None when its metadata is unreadable (build then reports it)."""
  try:
    return read_metadata(s1_dir).get("corresponding_s2_patch") or None
  except BadInput:
    return None


def read_split_lists(splits_dir: str) -> dict[str, str]:
  """patch name -> split from `{train,val,test}.csv` in splits_dir."""
  lookup: dict[str, str] = {}
  found = [s for s in SPLIT_FILES if os.path.exists(os.path.join(splits_dir, f"{s}.csv"))]
  if not found:
    raise FileNotFoundError(f"--splits_dir={splits_dir} holds none of {[f'{s}.csv' for s in SPLIT_FILES]}.")
  for split in found:
    path = os.path.join(splits_dir, f"{split}.csv")
    with open(path, newline="") as f:
      for row_no, row in enumerate(csv.reader(f), 1):
        for name in (c.strip() for c in row):
          if not name:
            continue
          if lookup.setdefault(name, split) != split:
            raise ValueError(f"{path} row {row_no}: patch {name} is also listed in {lookup[name]}.csv; "
                             "a patch belongs to one split.")
  return lookup


def split_list_rows(splits_dir: str) -> dict[str, int]:
  """Non-empty rows of each official split list in splits_dir (one patch, or an S2,S1 pair, per row)."""
  out = {}
  for split in SPLIT_FILES:
    path = os.path.join(splits_dir, f"{split}.csv")
    if os.path.exists(path):
      with open(path, newline="") as f:
        out[split] = sum(1 for row in csv.reader(f) if any(c.strip() for c in row))
  return out


def read_v2_metadata(paths: tuple[str, ...]) -> list[dict]:
  """Rows of reBEN's parquet files (the flagged-patches file appended), checked for the expected columns."""
  import pyarrow.parquet as pq  # lazy: only v2 needs it

  rows: list[dict] = []
  for path in paths:
    try:
      table = pq.read_table(path)
    except Exception as e:
      raise ValueError(f"cannot read {path}: {e}") from None
    missing = [c for c in V2_COLUMNS if c not in table.column_names]
    if missing:
      raise ValueError(f"{path} lacks column(s) {missing} (it has {table.column_names}); expected BigEarthNet "
                       f"v2.0's {list(V2_COLUMNS)}: download the parquet file again from bigearth.net.")
    rows.extend(table.select(list(V2_COLUMNS)).to_pylist())
  return rows


def read_exclude_lists(exclude_dir: str) -> dict[str, set[str]]:
  """v1's official lists: flag -> patch names (first field of each row; a header line names no patch)."""
  out = {}
  for flag, fname in V1_EXCLUDE_FILES.items():
    path = os.path.join(exclude_dir, fname)
    if os.path.exists(path):
      with open(path, newline="") as f:
        out[flag] = {row[0].strip() for row in csv.reader(f) if row and row[0].strip()}
  if not out:
    raise FileNotFoundError(f"--exclude_lists={exclude_dir} holds none of {sorted(V1_EXCLUDE_FILES.values())}; "
                            "download them from bigearth.net (BigEarthNet v1 downloads).")
  return out


class _Splitter:
  """The split of a patch: official (v2 column / v1 lists), one name, or a tile-blocked hash."""

  def __init__(self, split: str | None, splits_dir: str | None, unlisted_split: str, version: str):
    self.lookup = read_split_lists(splits_dir) if splits_dir else None
    self.official = (split in (None, "", "official")) and self.lookup is None and version == "v2"
    if split == "official" and version == "v1" and self.lookup is None:
      raise ValueError("--split=official needs --splits_dir with v1's train.csv/val.csv/test.csv (v2 carries its "
                       "splits in metadata.parquet).")
    self.spec = None if (self.official or self.lookup is not None) else convert.parse_split_spec(
        "train" if split in (None, "", "official") else split)
    self.unlisted_split = unlisted_split
    self.warnings: dict[str, int] = collections.Counter()

  def __call__(self, *names, block: str, official: str | None = None):
    if self.official:
      return official
    if self.lookup is None:
      return convert.split_of(block_key(block), self.spec)
    for n in names:
      if n and n in self.lookup:
        return self.lookup[n]
    if self.unlisted_split:
      return self.unlisted_split
    self.warnings["not_in_splits"] += 1
    return None


def list_items(src: str, *, split: str | None = None, splits_dir: str | None = None, unlisted_split: str = "",
               workers: int = 0, keep_cloudy: bool = False, exclude_lists: str | None = None
               ) -> tuple[list[Item], dict]:
  """Pairs the patches of `src`; returns (items sorted by id, report: warnings, version, exclusion counts)."""
  layout = detect(src)
  splitter = _Splitter(split, splits_dir, unlisted_split, layout.version)
  if layout.version == "v2":
    if exclude_lists:
      raise ValueError("--exclude_lists is for BigEarthNet v1; v2.0's metadata.parquet flags cloudy and snowy "
                       "patches itself.")
    items, exclusion = _list_v2(layout, splitter, keep_cloudy)
  else:
    items, exclusion = _list_v1(layout, splitter, workers, keep_cloudy, exclude_lists)
  items.sort(key=lambda it: it.name)
  report = {"version": layout.version, "warnings": dict(sorted(splitter.warnings.items())), "exclusion": exclusion,
            "official_splits": splitter.official, "listed": {}}
  if splits_dir:
    report["listed"] = split_list_rows(splits_dir)
  elif splitter.official:
    report["listed"] = exclusion.pop("metadata_split_rows")
  exclusion.pop("metadata_split_rows", None)
  return items, report


def describe(report: dict, *, split: str | None = None, splits_dir: str | None = None) -> dict:
  """The `bigearthnet` section of the manifest (and of the TFDS builder's metadata): the release read, its layout,
  where the splits came from and the cloud/shadow/snow exclusion applied (its counts go to `counts`)."""
  v2 = report["version"] == "v2"
  if splits_dir:
    splits = "official v1 lists train.csv / val.csv / test.csv"
  elif report.get("official_splits"):
    splits = "official metadata.parquet split (validation -> val)"
  elif split in (None, "", "official"):
    splits = "everything in 'train' (no official split lists given)"
  else:
    splits = f"--split={split}"
  return {"version": "2.0" if v2 else "1.0",
          "layout": "reBEN metadata.parquet + nested product/patch folders" if v2 else
                    "BigEarthNet-MM per-patch labels_metadata.json",
          "splits": splits,
          "exclusion": {k: v for k, v in report["exclusion"].items() if not k.startswith(("excluded", "kept_flagged"))}}


def published_counts(report: dict) -> convert.PublishedCounts | None:
  """Expected vs found split sizes when the run uses official splits (v2's metadata split, v1's lists); None
  otherwise (a hash or single split of a subset has no published size)."""
  if report["listed"] and report["version"] == "v2" and report.get("official_splits"):
    return convert.PublishedCounts(PUBLISHED_V2, PUBLISHED_V2_SOURCE, listed=report["listed"])
  if report["listed"] and report["version"] == "v1":
    return convert.PublishedCounts(PUBLISHED_V1, PUBLISHED_V1_SOURCE, listed=report["listed"])
  return None


def _exclusion_report(flag_sets: dict[str, set[str]], keep_cloudy: bool, source: str):
  """(is_excluded(names) -> bool, report dict with counts filled in as patches are checked)."""
  report = {"applied": not keep_cloudy, "source": source, "excluded_cloud_or_shadow": 0, "excluded_seasonal_snow": 0,
            "excluded": 0, "kept_flagged": 0}

  def check(*names) -> bool:
    hits = {flag for flag, s in flag_sets.items() for n in names if n and n in s}
    if not hits:
      return False
    if keep_cloudy:
      report["kept_flagged"] += 1
      return False
    for flag in hits:
      report[f"excluded_{flag}"] += 1
    report["excluded"] += 1
    return True

  return check, report


def _tree(root: str | None, nested: bool) -> dict[str, str]:
  """patch name -> folder: v1 <root>/<patch>, v2 <root>/<product>/<patch>."""
  if root is None:
    return {}
  if not nested:
    return _patch_dirs(root)
  out = {}
  for product in sorted(os.listdir(root)):
    out.update(_patch_dirs(os.path.join(root, product)) if os.path.isdir(os.path.join(root, product)) else {})
  return out


def _list_v2(layout: Layout, split_for: _Splitter, keep_cloudy: bool) -> tuple[list[Item], dict]:
  rows = read_v2_metadata(layout.metadata)
  if keep_cloudy and os.path.join(os.path.dirname(layout.metadata[0]), V2_METADATA_FLAGGED) not in layout.metadata:
    logging.warning("BigEarthNet v2.0: --keep_cloudy without %s: the cloudy/snowy patches have no metadata row and "
                    "cannot be kept; download that file next to %s.", V2_METADATA_FLAGGED, V2_METADATA)
  s1, s2 = _tree(layout.s1_root, True), _tree(layout.s2_root, True)
  logging.info("BigEarthNet v2.0: %d metadata rows, %d S1 and %d S2 patch folders", len(rows), len(s1), len(s2))
  flagged = {"cloud_or_shadow": {r["patch_id"] for r in rows if r["contains_cloud_or_shadow"]},
             "seasonal_snow": {r["patch_id"] for r in rows if r["contains_seasonal_snow"]}}
  excluded, exclusion = _exclusion_report(flagged, keep_cloudy, "metadata parquet flags")
  # The published split sizes count metadata.parquet's rows, i.e. the patches without any flag.
  exclusion["metadata_split_rows"] = dict(sorted(collections.Counter(
      V2_SPLITS.get(r["split"], r["split"]) for r in rows
      if not (r["contains_cloud_or_shadow"] or r["contains_seasonal_snow"])).items()))
  warnings = split_for.warnings
  items, seen = [], set()
  for r in rows:
    pid, s1_name = r["patch_id"], r["s1_name"]
    if pid in seen:
      raise ValueError(f"{layout.metadata[0]}: patch_id {pid} appears twice in the metadata; download the parquet "
                       "files again.")
    seen.add(pid)
    if excluded(pid):
      continue
    official = V2_SPLITS.get(r["split"])
    if split_for.official and official is None:
      raise ValueError(f"{layout.metadata[0]}: patch {pid} has split {r['split']!r}, not one of {sorted(V2_SPLITS)}.")
    split = split_for(pid, s1_name, r["s2v1_name"], block=pid, official=official)  # v1 lists name s2v1_name
    if split is None:
      continue
    meta = (("country", r["country"]), ("s2v1_id", r["s2v1_name"]))
    labels = tuple(r["labels"] or ())
    s1_dir, s2_dir = s1.get(s1_name), s2.get(pid)
    if s2_dir is None and s1_dir is None:
      warnings["in_metadata_but_no_folder"] += 1
      continue
    if s2_dir is None:
      warnings["s2_patch_missing"] += 1
      items.append(Item(s1_name, split, s1_dir, None, pid, "v2", labels, meta))
      continue
    if s1_dir is None:
      warnings["s1_partner_missing"] += 1
    items.append(Item(pid, split, s1_dir, s2_dir, None, "v2", labels, meta))
  listed_s1 = {r["s1_name"] for r in rows}
  for name in s2:
    if name not in seen:
      warnings["s2_folder_not_in_metadata"] += 1
  for name in s1:
    if name not in listed_s1:
      warnings["s1_folder_not_in_metadata"] += 1
  exclusion["flagged_in_metadata"] = len(flagged["cloud_or_shadow"] | flagged["seasonal_snow"])
  return items, exclusion


def _list_v1(layout: Layout, split_for: _Splitter, workers: int, keep_cloudy: bool,
             exclude_lists: str | None) -> tuple[list[Item], dict]:
  s1, s2 = _patch_dirs(layout.s1_root), _patch_dirs(layout.s2_root)
  logging.info("BigEarthNet-MM: %d S1 and %d S2 patch folders; reading S1 metadata for the pairing", len(s1), len(s2))
  dirs = list(s1.values())
  if workers and len(dirs) > 256:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      partners = pool.map(_partner, dirs, chunksize=256)
  else:
    partners = [_partner(d) for d in dirs]

  if exclude_lists:
    lists = read_exclude_lists(exclude_lists)
    known = set(s1) | set(s2) | {p for p in partners if p}
    if not any(n in known for s in lists.values() for n in s):
      raise ValueError(f"the exclusion lists in {exclude_lists} name none of the {len(known)} patches under the "
                       "source; are they BigEarthNet v1's lists for this data?")
    excluded, exclusion = _exclusion_report(lists, keep_cloudy, f"official v1 lists in {exclude_lists}")
  else:
    excluded, exclusion = _exclusion_report({}, keep_cloudy, "none")
    if not keep_cloudy:
      exclusion["applied"] = False
      exclusion["warning"] = ("BigEarthNet v1 without --exclude_lists: patches with cloud, shadow or seasonal snow "
                              "are KEPT; pass --exclude_lists=DIR with the official patches_with_cloud_and_shadow.csv "
                              "and patches_with_seasonal_snow.csv to drop them (or --keep_cloudy to keep them on "
                              "purpose).")
      logging.warning("BigEarthNet-MM: %s", exclusion["warning"])

  warnings = split_for.warnings
  items, claimed = [], set()
  for (s1_name, s1_dir), partner in zip(s1.items(), partners):
    if partner and partner in s2 and partner not in claimed:
      claimed.add(partner)
      if excluded(partner, s1_name):
        continue
      item = Item(partner, split_for(partner, s1_name, block=partner), s1_dir, s2[partner])
    else:
      if excluded(s1_name, partner):
        continue
      if partner in claimed:
        warnings["s2_patch_named_by_several_s1"] += 1
      elif partner:
        warnings["s1_partner_missing"] += 1
      item = Item(s1_name, split_for(s1_name, partner, block=partner or s1_name), s1_dir, None, partner)
    if item.split is not None:
      items.append(item)
  for s2_name, s2_dir in s2.items():
    if s2_name not in claimed and not excluded(s2_name):
      item = Item(s2_name, split_for(s2_name, block=s2_name), None, s2_dir)
      if item.split is not None:
        items.append(item)
  return items, exclusion


def _read_s2(patch_dir: str) -> tuple[np.ndarray, dict]:
  name = os.path.basename(patch_dir)
  paths = {b: os.path.join(patch_dir, f"{name}_{b}.tif") for b in bands_lib.S2_L2A_BANDS}
  ref, info = geotiff.read(paths["B02"], 1)  # B02 (10 m) defines the grid
  size = ref.shape
  out = np.empty((*size, len(paths)), np.uint16)
  for c, (band, path) in enumerate(paths.items()):
    arr = ref if band == "B02" else geotiff.read(path, 1)[0]
    factor = bands_lib.BANDS[band].resolution_m // 10
    want = (size[0] // factor, size[1] // factor)
    if arr.shape != want or size[0] % factor or size[1] % factor:
      raise BadInput(f"{path}: band {band} has shape {arr.shape}, expected {want} for a "
                     f"{bands_lib.BANDS[band].resolution_m} m band of a {size} patch (from its B02)")
    if arr.dtype != np.uint16:
      if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
        raise BadInput(f"{path}: band {band} has dtype {arr.dtype}, expected uint16 (L2A reflectance x 1e4)")
      arr = arr.astype(np.uint16)  # integer files (some v2 tools write int16) with reflectances in range
    out[..., c] = geotiff.to_grid(arr, size, path)
  if not out.any():
    raise BadInput(f"{patch_dir}: all 12 S2 bands are zero (no data)")
  return out, info


def _read_s1(patch_dir: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
  name = os.path.basename(patch_dir)
  arrs, info = [], None
  for pol in bands_lib.S1_BANDS:
    path = os.path.join(patch_dir, f"{name}_{pol}.tif")
    arr, band_info = geotiff.read(path, 1)
    if not np.issubdtype(arr.dtype, np.floating):
      raise BadInput(f"{path}: dtype {arr.dtype}, expected float32 backscatter in dB")
    arr = arr.astype(np.float32, copy=False)
    if arrs and arr.shape != arrs[0].shape:
      raise BadInput(f"{path}: shape {arr.shape} differs from the VV band's {arrs[0].shape}")
    arrs.append(arr)
    info = info or band_info
  s1, valid = records.clean_s1(np.stack(arrs, axis=-1))
  if valid is not None and 1.0 - valid.mean() > MAX_INVALID_S1_FRACTION:
    return None, None, info, (f"{patch_dir}: {100 * (1 - valid.mean()):.0f}% of the S1 pixels are no-data "
                              f"(NaN/inf) in {name}_VV.tif/{name}_VH.tif")
  return s1, valid, info, ""


def _attach_s1(item: Item, record: dict, meta: dict) -> dict | None:
  """Reads the item's S1 into the record; returns its GeoTIFF info, or None when the S1 was dropped as mostly
  no-data (the pair stays S2-only; an S1-only patch is bad input)."""
  s1, valid, info, dropped = _read_s1(item.s1_dir)
  if s1 is None:
    if not item.s2_dir:
      raise BadInput(dropped)
    meta["s1_dropped"] = dropped
    return None
  record["s1"], record["s1_bands"] = s1, bands_lib.S1_BANDS
  if valid is not None:
    record["s1_valid"] = valid
  return info


def _epsg(wkt: str, path: str) -> int:
  codes = re.findall(r'AUTHORITY\["EPSG",\s*"(\d+)"\]', wkt or "")
  if not codes:
    raise BadInput(f"{path}: 'projection' holds no EPSG code")
  return int(codes[-1])  # the outermost AUTHORITY is the last one: the projected CRS


def _bounds(coords: dict, path: str) -> list[float]:
  try:  # BigEarthNet-S1 metadata spells the lower-right y 'lly'
    lry = coords["lry"] if "lry" in coords else coords["lly"]
    return [float(coords["ulx"]), float(lry), float(coords["lrx"]), float(coords["uly"])]
  except (KeyError, TypeError, ValueError):
    raise BadInput(f"{path}: 'coordinates' must hold ulx, uly, lrx, lry; got {coords!r}") from None


def _iso_utc(t: str | None) -> str | None:
  return t.strip().replace(" ", "T") + "Z" if t else None  # BigEarthNet times are UTC without a zone


def _lonlat(epsg: int, bounds: list[float]) -> tuple[float, float]:
  from rasterio import warp
  from rasterio.crs import CRS
  lon, lat = warp.transform(CRS.from_epsg(epsg), CRS.from_epsg(4326), [(bounds[0] + bounds[2]) / 2],
                            [(bounds[1] + bounds[3]) / 2])
  return round(lon[0], 6), round(lat[0], 6)


def _time_from_name(name: str | None) -> str | None:
  """'S2A_MSIL2A_20170613T101031_...' -> '2017-06-13T10:10:31Z' (v2 has no per-patch JSON; names carry the
  product's sensing start in UTC)."""
  m = re.search(r"_(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})_", name or "")
  return "{}-{}-{}T{}:{}:{}Z".format(*m.groups()) if m else None


def build(item: Item) -> list[tuple[str, dict]]:
  """One BigEarthNet patch (or pair) -> [(split, record)]; raises BadInput naming the file on bad data."""
  if item.version == "v2":
    return _build_v2(item)
  record: dict = {"id": item.name}
  meta: dict = {"id": item.name, "source": SOURCE, "licence": LICENCE}
  geo_meta = geo_path = None
  s1_info = s2_info = None
  if item.s2_dir:
    s2_meta, geo_path = read_metadata(item.s2_dir), _metadata_path(item.s2_dir)
    geo_meta = s2_meta
    record["s2"], s2_info = _read_s2(item.s2_dir)
    record["s2_bands"] = bands_lib.S2_L2A_BANDS
    meta["s2_id"] = os.path.basename(item.s2_dir)
    meta["s2_time"] = _iso_utc(s2_meta.get("acquisition_date"))
  if item.s1_dir:
    s1_meta = read_metadata(item.s1_dir)
    if geo_meta is None:
      geo_meta, geo_path = s1_meta, _metadata_path(item.s1_dir)
    s1_info = _attach_s1(item, record, meta)
    meta["s1_id"] = os.path.basename(item.s1_dir)
    meta["s1_time"] = _iso_utc(s1_meta.get("acquisition_time"))
    if item.s2_ref and not item.s2_dir:
      meta["s2_id_missing"] = item.s2_ref
  _check_pair(item, record, s1_info, s2_info)
  try:
    record["labels"] = bigearthnet_labels.labels_from_names(geo_meta["labels"])
  except ValueError as e:
    raise BadInput(f"{geo_path}: {e}") from None
  epsg = _epsg(geo_meta.get("projection"), geo_path)
  meta["crs"] = f"EPSG:{epsg}"
  meta["bounds"] = _bounds(geo_meta.get("coordinates") or {}, geo_path)
  meta["lon"], meta["lat"] = _lonlat(epsg, meta["bounds"])
  record["meta"] = meta
  return [(item.split, record)]


def _check_pair(item: Item, record: dict, s1_info: dict | None, s2_info: dict | None) -> None:
  if "s1" not in record or "s2" not in record:
    return
  if record["s1"].shape[:2] != record["s2"].shape[:2]:
    raise BadInput(f"{item.s1_dir}: S1 grid {record['s1'].shape[:2]} differs from the S2 grid "
                   f"{record['s2'].shape[:2]} of {item.s2_dir}")
  if s1_info["crs"] != s2_info["crs"] or np.abs(np.subtract(s1_info["bounds"], s2_info["bounds"])).max() > \
      GRID_TOLERANCE_M:
    raise BadInput(f"{item.s1_dir}: S1 footprint {s1_info['crs']} {s1_info['bounds']} differs from its S2 "
                   f"partner's {s2_info['crs']} {s2_info['bounds']} ({item.s2_dir})")


def _build_v2(item: Item) -> list[tuple[str, dict]]:
  """A reBEN patch: pixels from the GeoTIFFs, labels/country from the metadata row, CRS and bounds from the
  GeoTIFF (v2 ships no per-patch JSON), times from the product names."""
  from data_prep import chip_io  # lazy: rasterio's warp only in workers

  record: dict = {"id": item.name}
  meta: dict = {"id": item.name, "source": SOURCE_V2, "licence": LICENCE, **dict(item.meta)}
  s1_info = s2_info = None
  if item.s2_dir:
    record["s2"], s2_info = _read_s2(item.s2_dir)
    record["s2_bands"] = bands_lib.S2_L2A_BANDS
    meta["s2_id"] = os.path.basename(item.s2_dir)
    meta["s2_time"] = _time_from_name(meta["s2_id"])
  if item.s1_dir:
    s1_info = _attach_s1(item, record, meta)
    meta["s1_id"] = os.path.basename(item.s1_dir)
    meta["s1_time"] = _time_from_name(meta["s1_id"])
    if item.s2_ref and not item.s2_dir:
      meta["s2_id_missing"] = item.s2_ref
  _check_pair(item, record, s1_info, s2_info)
  try:
    record["labels"] = {"ben19": bigearthnet_labels.ben19_indices(item.labels or ())}
  except ValueError as e:
    raise BadInput(f"{V2_METADATA} row {item.s2_ref or item.name}: {e}") from None
  meta.update(chip_io.geo_meta(s2_info or s1_info))
  record["meta"] = meta
  return [(item.split, record)]


def convert_dataset(src: str, out: str, *, num_shards: int = 4, on_bad: str = "fail", workers: int = 0,
                    split: str | None = None, splits_dir: str | None = None, unlisted_split: str = "",
                    keep_cloudy: bool = False, exclude_lists: str | None = None, shard_groups: int = 0) -> dict:
  """Converts a BigEarthNet v1 or v2.0 folder to a dataset directory; returns the manifest. shard_groups: see
  data_prep.convert (--shard_groups)."""
  items, report = list_items(src, split=split, splits_dir=splits_dir, unlisted_split=unlisted_split,
                             workers=workers, keep_cloudy=keep_cloudy, exclude_lists=exclude_lists)
  v2 = report["version"] == "v2"
  exclusion = report["exclusion"]
  extra_counts = {"no_ben19_labels": 0, **{k: exclusion[k] for k in ("excluded", "excluded_cloud_or_shadow",
                                                                      "excluded_seasonal_snow", "kept_flagged")}}

  extra_counts["s1_dropped"] = 0
  published = published_counts(report)

  def count(split, record):
    if not record["labels"]["ben19"]:
      extra_counts["no_ben19_labels"] += 1
    extra_counts["s1_dropped"] += "s1_dropped" in record["meta"]
    if published is not None:
      published.count(split)

  args = dict(src=os.path.abspath(src), split=split, splits_dir=splits_dir and os.path.abspath(splits_dir),
              unlisted_split=unlisted_split, num_shards=num_shards, on_bad=on_bad, keep_cloudy=keep_cloudy,
              exclude_lists=exclude_lists and os.path.abspath(exclude_lists))
  info = describe(report, split=split, splits_dir=splits_dir)
  extra = {"warnings": report["warnings"], "bigearthnet": info}
  if published is not None:
    extra["published"] = published
  writer = DatasetWriter(out, num_shards=num_shards, source=SOURCE_V2 if v2 else SOURCE, licence=LICENCE,
                         created_by="data_prep.bigearthnet_mm", args=args,
                         label_sets=bigearthnet_labels.LABEL_SETS_V2 if v2 else bigearthnet_labels.LABEL_SETS,
                         extra=extra, extra_counts=extra_counts, shard_groups=shard_groups)
  for k, v in report["warnings"].items():
    logging.warning("BigEarthNet: %s: %d patches", k, v)
  logging.info("BigEarthNet %s: %d items; excluded %d flagged patches (cloud/shadow %d, seasonal snow %d)",
               info["version"], len(items), exclusion["excluded"], exclusion["excluded_cloud_or_shadow"],
               exclusion["excluded_seasonal_snow"])
  manifest = convert.run(items, build, writer, on_bad=on_bad, workers=workers, desc="bigearthnet_mm",
                         on_record=count)
  if published is not None:
    published.log(f"BigEarthNet {info['version']}")
  return manifest


FLAGS = flags.FLAGS


def _define_flags():
  convert.define_common_flags()
  flags.DEFINE_string("src", None, "BigEarthNet root: v2.0 (metadata.parquet, BigEarthNet-S1/, BigEarthNet-S2/) or "
                      "v1 (BigEarthNet-S1[-v1.0]/ and BigEarthNet-S2/ or BigEarthNet-v1.0/).")
  flags.DEFINE_string("split", None, "'official' (default for v2: metadata.parquet's split), one split name "
                      "(default for v1: train), or 'hash:0.8,0.1,0.1' (train/val/test by a stable hash of the tile). "
                      "Ignored with --splits_dir.")
  flags.DEFINE_string("splits_dir", None, "v1: directory with the official train.csv, val.csv, test.csv lists.")
  flags.DEFINE_string("unlisted_split", "", "With --splits_dir: split for patches in none of the lists "
                      "('' = drop them; they are counted in manifest warnings.not_in_splits).")
  flags.DEFINE_bool("keep_cloudy", False, "Keep patches flagged with cloud, shadow or seasonal snow (dropped by "
                    "default, as the dataset's authors do), e.g. for pretraining.")
  flags.DEFINE_string("exclude_lists", None, "v1: directory with the official patches_with_cloud_and_shadow.csv and "
                      "patches_with_seasonal_snow.csv (v2 reads its parquet flags).")
  flags.mark_flag_as_required("src")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --src=DIR --out=DIR.")
  convert.run_cli("bigearthnet_mm", "convert_dataset", src=FLAGS.src, out=FLAGS.out, num_shards=FLAGS.num_shards,
                  on_bad=FLAGS.on_bad, workers=FLAGS.workers, split=FLAGS.split, splits_dir=FLAGS.splits_dir,
                  unlisted_split=FLAGS.unlisted_split, keep_cloudy=FLAGS.keep_cloudy,
                  exclude_lists=FLAGS.exclude_lists)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
