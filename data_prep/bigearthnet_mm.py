"""BigEarthNet-MM (v1) -> mmrs shards: S1+S2 pairs, S1-only and S2-only leftovers, 43- and 19-class labels.

    python -m data_prep.bigearthnet_mm --src=DIR --out=DIR [--num_shards=N] [--on_bad=fail|skip] [--workers=N]
        [--split=train | --split=hash:0.8,0.1,0.1 | --splits_dir=DIR [--unlisted_split=NAME]]

Input layout (as distributed; see data_prep/samples/bigearthnet_mm/):
  SRC/BigEarthNet-S1[-v1.0]/<s1 patch>/<s1 patch>_{VV,VH}.tif + <s1 patch>_labels_metadata.json
  SRC/BigEarthNet-S2 | BigEarthNet-v1.0/<s2 patch>/<s2 patch>_B??.tif (12 L2A bands) + <s2 patch>_labels_metadata.json
Pairing follows `corresponding_s2_patch` of the S1 metadata (never the folder names). An S1 patch whose S2 partner
is absent is kept as S1-only and counted in the manifest's `warnings`; S2 patches nobody points to are S2-only.

Records: `s2` (H, W, 12) uint16 in `mmrs.bands.S2_L2A_BANDS` order on the 10 m grid (20/60 m bands by pixel
replication, `geotiff.to_grid`), `s1` (H, W, 2) float32 dB VV,VH cleaned by `records.clean_s1`; labels
{"corine43": [...], "ben19": [...]} (a pair takes the S2 patch's labels); meta: id (the S2 patch name for pairs and
S2-only, the S1 name for S1-only), s1_id, s2_id, crs, bounds [minx, miny, maxx, maxy] in that UTM CRS, lon/lat of
the centre, s1_time/s2_time (UTC ISO 8601), source, licence. Patches whose labels all lack a 19-class counterpart
are kept (empty ben19) and counted (`counts.no_ben19_labels`).

Splits: `--splits_dir` holds BigEarthNet's official `train.csv`, `val.csv`, `test.csv` (patch names, one per line;
every field of a row is looked up, so S2,S1 two-column lists work too); patches in none of them (the official lists
leave out cloudy and snowy patches) are dropped and counted, or written to `--unlisted_split`. Without it,
`--split=NAME` puts everything in one split, `--split=hash:0.8,0.1,0.1` splits by a stable hash of the record id.
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

from data_prep import convert, geotiff
from data_prep.convert import BadInput
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import bigearthnet_labels, records

SOURCE = "BigEarthNet-MM v1"
LICENCE = "CDLA-Permissive-1.0"
S1_DIRS = ("BigEarthNet-S1", "BigEarthNet-S1-v1.0")
S2_DIRS = ("BigEarthNet-S2", "BigEarthNet-v1.0", "BigEarthNet-S2-v1.0")
MAX_INVALID_S1_FRACTION = 0.5  # more S1 no-data than this makes the patch bad input
GRID_TOLERANCE_M = 10.0  # S1 and S2 bounds of a pair may differ by at most one 10 m pixel
SPLIT_FILES = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # the record id
  split: str
  s1_dir: str | None = None
  s2_dir: str | None = None
  s2_ref: str | None = None  # S1-only: the S2 patch its metadata names (absent from the S2 folder)


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


def list_items(src: str, *, split: str = "train", splits_dir: str | None = None, unlisted_split: str = "",
               workers: int = 0) -> tuple[list[Item], dict]:
  """Pairs the patches of `src`; returns (items sorted by id, warning counts)."""
  s1_root, s2_root = _find_root(src, S1_DIRS), _find_root(src, S2_DIRS)
  if s1_root is None and s2_root is None:
    raise FileNotFoundError(f"--src={src} holds neither an S1 folder {S1_DIRS} nor an S2 folder {S2_DIRS}; point "
                            "it at the directory that contains the extracted BigEarthNet-MM archives.")
  s1, s2 = _patch_dirs(s1_root), _patch_dirs(s2_root)
  logging.info("BigEarthNet-MM: %d S1 and %d S2 patch folders; reading S1 metadata for the pairing", len(s1), len(s2))
  dirs = list(s1.values())
  if workers and len(dirs) > 256:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      partners = pool.map(_partner, dirs, chunksize=256)
  else:
    partners = [_partner(d) for d in dirs]

  warnings: dict[str, int] = collections.Counter()
  lookup = read_split_lists(splits_dir) if splits_dir else None
  spec = convert.parse_split_spec(split)

  def split_for(*names):
    if lookup is None:
      return convert.split_of(names[0], spec)
    for n in names:
      if n and n in lookup:
        return lookup[n]
    if unlisted_split:
      return unlisted_split
    warnings["not_in_splits"] += 1
    return None

  items, claimed = [], set()
  for (s1_name, s1_dir), partner in zip(s1.items(), partners):
    if partner and partner in s2 and partner not in claimed:
      claimed.add(partner)
      item = Item(partner, split_for(partner, s1_name), s1_dir, s2[partner])
    else:
      if partner in claimed:
        warnings["s2_patch_named_by_several_s1"] += 1
      elif partner:
        warnings["s1_partner_missing"] += 1
      item = Item(s1_name, split_for(s1_name, partner), s1_dir, None, partner)
    if item.split is not None:
      items.append(item)
  for s2_name, s2_dir in s2.items():
    if s2_name not in claimed:
      item = Item(s2_name, split_for(s2_name), None, s2_dir)
      if item.split is not None:
        items.append(item)
  items.sort(key=lambda it: it.name)
  return items, dict(sorted(warnings.items()))


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
      raise BadInput(f"{path}: band {band} has dtype {arr.dtype}, expected uint16 (L2A reflectance x 1e4)")
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
    if arr.dtype != np.float32:
      raise BadInput(f"{path}: dtype {arr.dtype}, expected float32 backscatter in dB")
    if arrs and arr.shape != arrs[0].shape:
      raise BadInput(f"{path}: shape {arr.shape} differs from the VV band's {arrs[0].shape}")
    arrs.append(arr)
    info = info or band_info
  s1, valid = records.clean_s1(np.stack(arrs, axis=-1))
  if valid is not None and 1.0 - valid.mean() > MAX_INVALID_S1_FRACTION:
    raise BadInput(f"{patch_dir}: {100 * (1 - valid.mean()):.0f}% of the S1 pixels are no-data (NaN/inf) in "
                   f"{name}_VV.tif/{name}_VH.tif")
  return s1, valid, info


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


def build(item: Item) -> list[tuple[str, dict]]:
  """One BigEarthNet patch (or pair) -> [(split, record)]; raises BadInput naming the file on bad data."""
  record: dict = {"id": item.name}
  meta: dict = {"id": item.name, "source": SOURCE, "licence": LICENCE}
  geo_meta = geo_path = None
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
    record["s1"], valid, s1_info = _read_s1(item.s1_dir)
    if valid is not None:
      record["s1_valid"] = valid
    record["s1_bands"] = bands_lib.S1_BANDS
    meta["s1_id"] = os.path.basename(item.s1_dir)
    meta["s1_time"] = _iso_utc(s1_meta.get("acquisition_time"))
    if item.s2_ref and not item.s2_dir:
      meta["s2_id_missing"] = item.s2_ref
  if item.s1_dir and item.s2_dir:
    if record["s1"].shape[:2] != record["s2"].shape[:2]:
      raise BadInput(f"{item.s1_dir}: S1 grid {record['s1'].shape[:2]} differs from the S2 grid "
                     f"{record['s2'].shape[:2]} of {item.s2_dir}")
    if s1_info["crs"] != s2_info["crs"] or np.abs(np.subtract(s1_info["bounds"], s2_info["bounds"])).max() > \
        GRID_TOLERANCE_M:
      raise BadInput(f"{item.s1_dir}: S1 footprint {s1_info['crs']} {s1_info['bounds']} differs from its S2 "
                     f"partner's {s2_info['crs']} {s2_info['bounds']} ({item.s2_dir})")
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


def convert_dataset(src: str, out: str, *, num_shards: int = 4, on_bad: str = "fail", workers: int = 0,
                    split: str = "train", splits_dir: str | None = None, unlisted_split: str = "") -> dict:
  """Converts a BigEarthNet-MM folder to a dataset directory; returns the manifest."""
  items, warnings = list_items(src, split=split, splits_dir=splits_dir, unlisted_split=unlisted_split,
                               workers=workers)
  extra_counts = {"no_ben19_labels": 0}

  def count(_, record):
    if not record["labels"]["ben19"]:
      extra_counts["no_ben19_labels"] += 1

  args = dict(src=os.path.abspath(src), split=split, splits_dir=splits_dir and os.path.abspath(splits_dir),
              unlisted_split=unlisted_split, num_shards=num_shards, on_bad=on_bad)
  writer = DatasetWriter(out, num_shards=num_shards, source=SOURCE, licence=LICENCE,
                         created_by="data_prep.bigearthnet_mm", args=args,
                         label_sets=bigearthnet_labels.LABEL_SETS, extra={"warnings": warnings},
                         extra_counts=extra_counts)
  for k, v in warnings.items():
    logging.warning("BigEarthNet-MM: %s: %d patches", k, v)
  return convert.run(items, build, writer, on_bad=on_bad, workers=workers, desc="bigearthnet_mm", on_record=count)


FLAGS = flags.FLAGS


def _define_flags():
  convert.define_common_flags()
  flags.DEFINE_string("src", None, "BigEarthNet-MM root holding BigEarthNet-S1[-v1.0]/ and BigEarthNet-S2/ "
                      "(or BigEarthNet-v1.0/).")
  flags.DEFINE_string("split", "train", "One split name, or 'hash:0.8,0.1,0.1' (train/val/test by a stable hash "
                      "of the record id). Ignored with --splits_dir.")
  flags.DEFINE_string("splits_dir", None, "Directory with the official train.csv, val.csv, test.csv patch lists.")
  flags.DEFINE_string("unlisted_split", "", "With --splits_dir: split for patches in none of the lists "
                      "('' = drop them; they are counted in manifest warnings.not_in_splits).")
  flags.mark_flag_as_required("src")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --src=DIR --out=DIR.")
  convert.run_cli("bigearthnet_mm", "convert_dataset", src=FLAGS.src, out=FLAGS.out, num_shards=FLAGS.num_shards,
                  on_bad=FLAGS.on_bad, workers=FLAGS.workers, split=FLAGS.split, splits_dir=FLAGS.splits_dir,
                  unlisted_split=FLAGS.unlisted_split)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
