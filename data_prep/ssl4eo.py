"""SSL4EO-S12 -> mmrs shards: one record per (location, season), S1 GRD paired with S2 L1C or L2A.

    python -m data_prep.ssl4eo --src=DIR --out=DIR [--s2_level=L1C|L2A] [--max_days=92] [--split=train]
        [--num_shards=N] [--shard_groups=G] [--on_bad=fail|skip] [--workers=N]

Expected layout (the extracted mediaTUM archives s1.tar.gz, s2_l1c.tar.gz, s2_l2a.tar.gz; Wang et al. 2022):

    SRC/s1/<location>/<S1 product id>/VV.tif, VH.tif          float32 dB, 264 x 264 (10 m)
    SRC/s2c/<location>/<S2 product id>/B1.tif ... B12.tif, B8A.tif   L1C, 13 bands, uint16
    SRC/s2a/<location>/<S2 product id>/ (same, no B10)        L2A, 12 bands
                                                    10 m bands 264 x 264, 20 m 132 x 132, 60 m 44 x 44

The files are as SSL4EO-S12's downloader (src/download_data/ssl4eo_s12_downloader.py) writes them: one GeoTIFF per
band in `+proj=latlong` coordinates over the same footprint, and a `metadata.json` (the Earth Engine image
properties) per product folder, which this converter does not need. Earth Engine's `sampleRectangle` sometimes
returns a pixel more or less than the nominal 264/132/44: such chips are resampled onto the 264 x 264 10 m grid
bilinearly (half-pixel centres), as the reference loader (ssl4eo_dataset.py: cv2.resize to 264, INTER_LINEAR_EXACT)
does; bands at their nominal size are repeated onto it exactly. `meta.resampled` lists the resampled bands and
`counts.resampled_chips` counts the records (`--grid` sets the nominal 10 m size).

`<location>` is a 7-digit id (0000000 ... 0251078; some ids are void), each holding four seasonal acquisitions;
product ids carry the acquisition time, e.g. `S1A_IW_GRDH_1SDV_20200607T010800_...` and
`20200604T055639_20200604T060009_T42SXH` (the first `YYYYMMDDTHHMMSS` in the name is the acquisition time).
Zero-padded band names (`B01.tif`) are accepted too. A `metadata.json` next to the bands is ignored.

Records: S2 bands in `mmrs.bands` order on the 10 m grid (20/60 m bands repeated 2x/6x, `geotiff.to_grid`), S1
(VV, VH) dB cleaned with `records.clean_s1`. Season = rank of the S2 acquisition in time at its location (0..3).
Pairing, per location: each S2 acquisition takes the S1 acquisition nearest in time, one S1 per S2, closest pairs
first, at most `--max_days` apart (default 92, one season; use 7 for the MixMAE paper's rule). Without parseable
times the i-th S2 pairs with the i-th S1. An S2 acquisition without a partner becomes an S2-only record; an S1
acquisition without one is not written; the manifest's `pairing` section counts acquisitions, matches and the
unmatched of each side (matched before reading pixels: `counts.pairs` is what was written). An S1 chip with more
than half no-data pixels is dropped from its record (kept S2-only; `meta.s1_dropped` says why).
Metadata: location, season, product ids, acquisition times, pair gap (days), CRS, bounds, lon/lat of the centre.
Split: SSL4EO-S12 defines none: `--split=train` (default) or `hash:0.8,0.1,0.1` by location id.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re

import numpy as np
from absl import flags

from launch import cli

from data_prep import convert as convert_lib
from data_prep import chip_io, geotiff
from data_prep.convert import BadInput
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import transforms

SOURCE = "SSL4EO-S12 (Wang et al. 2022), https://mediatum.ub.tum.de/1660427"
LICENCE = "CC-BY-4.0"
S2_DIRS = {"L1C": "s2c", "L2A": "s2a"}
GRID = 264  # nominal 10 m chip size (132 at 20 m, 44 at 60 m)
# zhu-xlab/SSL4EO-S12 README.md: patch triplets "from 251079 locations across the globe", four seasonal time stamps
# each, "some void IDs" among them. An upper bound, not an exact count: the manifest's `pairing` section sets it
# beside the `locations` found (a full download has somewhat fewer), without a warning.
PUBLISHED_LOCATIONS = 251_079
_TIME = re.compile(r"(\d{8}T\d{6})")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # "<location>/season<k>", for progress and error messages
  location: str
  season: int
  s2_dir: str
  s1_dir: str | None
  s2_level: str
  split: str
  gap_days: float | None
  grid: int = GRID


def acquisition_time(folder: str) -> dt.datetime | None:
  m = _TIME.search(os.path.basename(folder))
  if not m:
    return None
  try:
    return dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%S")
  except ValueError:
    return None


def _acquisitions(root: str, location: str) -> list[str]:
  d = os.path.join(root, location)
  if not os.path.isdir(d):
    return []
  dirs = [os.path.join(d, n) for n in os.listdir(d) if os.path.isdir(os.path.join(d, n))]
  return sorted(dirs, key=lambda p: (acquisition_time(p) or dt.datetime.min, os.path.basename(p)))


def pair(s2_dirs: list[str], s1_dirs: list[str], max_days: float) -> dict[int, tuple[int, float | None]]:
  """S2 index -> (S1 index, gap in days): nearest in time, closest pairs first, each S1 used once."""
  t2 = [acquisition_time(p) for p in s2_dirs]
  t1 = [acquisition_time(p) for p in s1_dirs]
  if None in t2 or None in t1:
    return {i: (i, None) for i in range(min(len(s2_dirs), len(s1_dirs)))}
  cands = sorted((abs((a - b).total_seconds()) / 86400.0, i, j) for i, a in enumerate(t2) for j, b in enumerate(t1))
  out, used = {}, set()
  for gap, i, j in cands:
    if gap <= max_days and i not in out and j not in used:
      out[i] = (j, round(gap, 3))
      used.add(j)
  return out


def list_items(src: str, s2_level: str = "L1C", max_days: float = 92.0,
               split: str = "train", grid: int = GRID) -> tuple[list[Item], dict]:
  """Every (location, season) S2 acquisition, with its S1 partner; plus a pairing summary for the manifest."""
  level = s2_level.upper()
  if level not in S2_DIRS:
    raise ValueError(f"--s2_level={s2_level!r}: use L1C (folder s2c) or L2A (folder s2a).")
  s2_root, s1_root = os.path.join(src, S2_DIRS[level]), os.path.join(src, "s1")
  if not os.path.isdir(s2_root):
    raise ValueError(f"{s2_root} does not exist: --src must be the SSL4EO-S12 root holding s1/ and "
                     f"{S2_DIRS[level]}/ (see `python -m data_prep.ssl4eo --help`).")
  spec = convert_lib.parse_split_spec(split)
  locations = sorted(set(os.listdir(s2_root)) | (set(os.listdir(s1_root)) if os.path.isdir(s1_root) else set()))
  items, summary = [], dict(locations=0, s2_acquisitions=0, s1_acquisitions=0, matched=0, s2_unmatched=0,
                            s1_unmatched=0, s1_only_locations=0, max_days=max_days,
                            published_locations=PUBLISHED_LOCATIONS)
  for loc in locations:
    s2s, s1s = _acquisitions(s2_root, loc), _acquisitions(s1_root, loc)
    if not s2s and not s1s:
      continue
    summary["locations"] += 1
    summary["s1_only_locations"] += not s2s
    matches = pair(s2s, s1s, max_days)
    summary["s2_acquisitions"] += len(s2s)
    summary["s1_acquisitions"] += len(s1s)
    summary["matched"] += len(matches)
    summary["s2_unmatched"] += len(s2s) - len(matches)
    summary["s1_unmatched"] += len(s1s) - len(matches)
    for season, s2_dir in enumerate(s2s):
      j, gap = matches.get(season, (None, None))
      items.append(Item(f"{loc}/season{season}", loc, season, s2_dir, s1s[j] if j is not None else None, level,
                        convert_lib.split_of(loc, spec), gap, grid))
  return items, summary


def _band_file(folder: str, band: str) -> str:
  short = f"B{int(band[1:])}" if band[1:].isdigit() else band  # B01 -> B1, B8A stays
  path = os.path.join(folder, f"{short}.tif")
  if not os.path.exists(path) and os.path.exists(os.path.join(folder, f"{band}.tif")):
    return os.path.join(folder, f"{band}.tif")
  return path


def _on_grid(arr: np.ndarray, band: str, grid: int, path: str, resampled: list[str]) -> np.ndarray:
  """A band onto the (grid, grid) 10 m grid: exact repetition at its nominal size, else bilinear resampling (as the
  reference loader), noted in `resampled`."""
  native = grid * 10 // bands_lib.BANDS[band].resolution_m
  if arr.shape == (native, native):
    return geotiff.to_grid(arr, (grid, grid), path)
  if min(arr.shape) < native // 2 or max(arr.shape) > 2 * native:
    raise BadInput(f"{path}: band {band} is {arr.shape} px, far from its nominal {native} x {native}; is this an "
                   "SSL4EO-S12 chip (or set --grid)?")
  resampled.append(band)
  return transforms.resize(arr, grid)


def build(item: Item) -> list[tuple[str, dict]]:
  names = bands_lib.s2_bands_for_level(item.s2_level)
  size, resampled = (item.grid, item.grid), []
  _, info = geotiff.read(_band_file(item.s2_dir, "B02"), 1)
  s2 = np.empty((*size, len(names)), np.uint16)
  for c, b in enumerate(names):
    path = _band_file(item.s2_dir, b)
    arr, _ = geotiff.read(path, 1)
    arr, _ = chip_io.as_uint16(arr, path)
    s2[..., c] = _on_grid(arr, b, item.grid, path, resampled)
  chip_io.check_s2(s2, item.s2_dir)
  meta = dict(dataset="SSL4EO-S12", location=item.location, season=item.season, s2_level=item.s2_level,
              s2_product=os.path.basename(item.s2_dir), s2_time=_iso(item.s2_dir), source=SOURCE,
              licence=LICENCE, **chip_io.geo_meta(info))
  record = dict(id=f"{item.location}_{item.season}", s2=s2, s2_bands=names, meta=meta)
  if item.s1_dir is not None:
    layers = []
    for pol in bands_lib.S1_BANDS:
      path = os.path.join(item.s1_dir, f"{pol}.tif")
      arr, _ = geotiff.read(path, 1)
      if arr.shape != size:
        if min(arr.shape) < item.grid // 2 or max(arr.shape) > 2 * item.grid:
          raise BadInput(f"{path}: grid {arr.shape} is far from the Sentinel-2 grid {size} of {item.s2_dir}")
        resampled.append(pol)  # NaN spreads to the blended pixels, which clean_s1 then flags as no-data
        arr = transforms.resize(arr.astype(np.float32), item.grid)
      layers.append(arr.astype(np.float32))
    s1, valid, dropped = chip_io.clean_s1(np.stack(layers, axis=-1), item.s1_dir)
    meta.update(s1_product=os.path.basename(item.s1_dir), s1_time=_iso(item.s1_dir), pair_gap_days=item.gap_days)
    chip_io.attach_s1(record, s1, valid, dropped)
  if resampled:
    meta["resampled"] = resampled
  return [(item.split, record)]


def _iso(folder: str) -> str | None:
  t = acquisition_time(folder)
  return t.isoformat() if t else None


def convert(src: str, out: str, *, s2_level: str = "L1C", max_days: float = 92.0, split: str = "train",
            num_shards: int = 4, on_bad: str = "fail", workers: int = 0, grid: int = GRID,
            shard_groups: int = 0) -> dict:
  """Converts an SSL4EO-S12 folder; returns the manifest (with a `pairing` section). shard_groups: G recorded in
  the manifest (mmrs/data/shard_groups.py: each host then reads 1/P of the dataset); num_shards must be a multiple."""
  items, summary = list_items(src, s2_level, max_days, split, grid)
  if not items:
    raise ValueError(f"No Sentinel-2 acquisitions found under {src}/{S2_DIRS[s2_level.upper()]}/<location>/"
                     "<product>/: is --src the SSL4EO-S12 root?")
  args = dict(src=os.path.abspath(src), s2_level=s2_level.upper(), max_days=max_days, split=split,
              num_shards=num_shards, on_bad=on_bad, grid=grid)
  counts = {"s1_dropped": 0, "resampled_chips": 0}

  def on_record(_, rec):
    chip_io.count_s1_dropped(counts, rec)
    counts["resampled_chips"] += "resampled" in rec["meta"]

  writer = DatasetWriter(out, num_shards=num_shards, source=SOURCE, licence=LICENCE, created_by="data_prep.ssl4eo",
                         args=args, extra={"pairing": summary}, extra_counts=counts, shard_groups=shard_groups)
  return convert_lib.run(items, build, writer, on_bad=on_bad, workers=workers, desc="ssl4eo",
                         on_record=on_record)


def _define_flags():
  convert_lib.define_common_flags()
  flags.DEFINE_string("src", None, "SSL4EO-S12 root holding s1/, s2c/ and/or s2a/.")
  flags.DEFINE_enum("s2_level", "L1C", ["L1C", "L2A"], "Sentinel-2 product: L1C (s2c/, 13 bands) or L2A (s2a/, 12).")
  flags.DEFINE_float("max_days", 92.0, "Largest S1-S2 acquisition gap (days) for a pair.")
  flags.DEFINE_string("split", "train", "Split name for every record, or hash:0.8,0.1,0.1 by location id.")
  flags.DEFINE_integer("grid", GRID, "Nominal 10 m chip size in pixels (SSL4EO-S12: 264); other sizes are "
                       "resampled onto it and counted.")
  flags.mark_flag_as_required("src")


def main(argv):
  del argv
  f = flags.FLAGS
  convert_lib.run_cli("ssl4eo", "convert", src=f.src, out=f.out, s2_level=f.s2_level, max_days=f.max_days,
                      split=f.split, num_shards=f.num_shards, on_bad=f.on_bad, workers=f.workers, grid=f.grid)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
