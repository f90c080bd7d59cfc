"""Pairs a catalog of Sentinel-1 and Sentinel-2 GeoTIFF chips by place and time (the MixMAE paper's procedure) and
writes mmrs shards: S1+S2 pairs, the S2 chips without a partner as S2-only (AuxMAE's `s2_mae` task reads them).

    python -m data_prep.pair_catalog --catalog=FILE --out=DIR [--max_days=7] [--place_tol_m=10] [--exclusive_s1]
        [--write_s1_only] [--split=train|hash:0.8,0.1,0.1] [--num_shards=N] [--shard_groups=G]
        [--on_bad=fail|skip] [--workers=N]

Catalog: CSV with a header row, or JSON (a list of objects, or {"chips": [...]}), one chip per row:
  path      the GeoTIFF, absolute or relative to the catalog file
  modality  s1 | s2
  time      acquisition time, ISO 8601 (2022-06-01T10:30:00Z, 2022-06-01T10:30:00+02:00; no zone = UTC)
  place     lon, lat (chip centre, WGS84 degrees)  and/or  minx, miny, maxx, maxy, crs (footprint, e.g. EPSG:32633)
  id        optional record id (default: the path relative to the catalog folder without extension; the file
            name for paths outside that folder). Paths and ids must be unique.
A row with a missing or invalid field stops the run with an error naming the row (CSV: its line number).
Chips: S2 = one multi-band uint16 GeoTIFF (band names from the GeoTIFF band descriptions when they are Sentinel-2
band names, else by count: 13 = L1C, 12 = L2A); S1 = 2-band float VV,VH in dB (descriptions may say VH,VV). A chip
that is missing, unreadable or has other bands is bad input: --on_bad=fail stops naming it, skip counts it.

Pairing, for each S2 chip:
  1. same place: when both chips give footprints in the same CRS, every edge within --place_tol_m (converted to
     degrees for geographic CRSs); otherwise centres (lon/lat, or the footprint's centre) within --place_tol_m;
  2. same grid: equal pixel size (height, width) and, when both files are georeferenced, the same CRS and bounds
     within the tolerance; candidates failing this are rejected (counted as `different_grid`);
  3. within --max_days of the S2 acquisition, inclusive (7.0 days apart pairs, 7 days + 1 s does not);
  4. nearest in time wins; ties go to the earlier S1 chip, then the smaller path.
As in the paper, each S2 chip picks its S1 chip independently, so one S1 chip may serve several S2 chips (S2
revisits of one place); --exclusive_s1 instead matches one-to-one, greedily by smallest time difference. S1 chips
never chosen are counted (`counts.unmatched_s1`) and written as S1-only only with --write_s1_only.
manifest.json gets `counts.unmatched_s1` and a `pairing` section (settings, why S2 chips stayed unpaired, rejected
candidates, time differences).

S2 processing baseline 04.00 (products from 25 January 2022 on, and the reprocessed Collection-1 archive) stores
DN = 10000 * reflectance + 1000 (ESA's BOA_ADD_OFFSET / RADIO_ADD_OFFSET = -1000). Records keep the pre-04.00 scale,
so such chips are harmonized: DN - 1000 for measured pixels (kept >= 1, so a dark pixel never turns into the
no-data value 0), 0 stays 0. The offset is read, per S2 row, from an optional catalog column `add_offset` (e.g.
-1000; also spelled boa_add_offset / radio_add_offset), else `processing_baseline` (e.g. 04.00, 5.09, N0400), else
the `_N<baseline>_` field of an S2 product name in the path or id. Without any of them a chip is left as is
(`--harmonize=date` instead assumes the offset for acquisitions from 2022-01-25); `pairing.harmonization` counts how
each chip was decided, and `meta.s2_offset_removed` marks harmonized records.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as dt
import json
import math
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
from mmrs.data import records

EARTH_RADIUS_M = 6_371_008.8
METRES_PER_DEGREE = 111_320.0
MAX_INVALID_S1_FRACTION = 0.5
BOUNDS_KEYS = ("minx", "miny", "maxx", "maxy", "crs")
BASELINE_04_START = dt.datetime(2022, 1, 25, tzinfo=dt.timezone.utc)  # first products with the +1000 DN offset
S2_OFFSET_DN = 1000
OFFSET_KEYS = ("add_offset", "boa_add_offset", "radio_add_offset")
_PRODUCT_BASELINE = re.compile(r"_N(\d{2})(\d{2})(?=[_./]|$)")


class CatalogError(ValueError):
  """A catalog row with a missing or invalid field; the message names the row."""


@dataclasses.dataclass(frozen=True)
class Chip:
  row: str  # where it came from, for messages: "catalog.csv line 3"
  path: str  # absolute
  rel: str  # as written in the catalog
  id: str
  modality: str
  time: dt.datetime  # UTC
  lon: float | None = None
  lat: float | None = None
  bounds: tuple[float, float, float, float] | None = None
  crs: str | None = None
  baseline: float | None = None  # S2 processing baseline from the catalog (4.0 = 04.00)
  add_offset: float | None = None  # S2 DN offset from the catalog (-1000 from baseline 04.00)


@dataclasses.dataclass(frozen=True)
class Probe:
  """What the GeoTIFF header says (read before pairing, so unreadable chips never win a pairing)."""
  shape: tuple[int, int]
  count: int
  dtype: str
  crs: str | None
  bounds: tuple[float, float, float, float] | None
  bands: tuple[str, ...]  # canonical names, in file order


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # record id
  split: str
  s2: Chip | None = None
  s2_probe: Probe | None = None
  s1: Chip | None = None
  s1_probe: Probe | None = None
  s2_offset: int = 0  # DN removed from the S2 chip to harmonize baseline >= 04.00 to the old scale


# ---------------------------------------------------------------- catalog

def _parse_time(value, row: str) -> dt.datetime:
  try:
    t = dt.datetime.fromisoformat(str(value).strip())
  except ValueError:
    raise CatalogError(f"{row}: time {value!r} is not ISO 8601 (e.g. 2022-06-01T10:30:00Z).") from None
  return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _float(row_dict: dict, key: str, row: str) -> float:
  try:
    v = float(row_dict[key])
  except (TypeError, ValueError):
    raise CatalogError(f"{row}: {key}={row_dict[key]!r} is not a number.") from None
  if not math.isfinite(v):
    raise CatalogError(f"{row}: {key}={row_dict[key]!r} is not finite.")
  return v


def _chip(r: dict, row: str, base: str) -> Chip:
  r = {k.strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
  present = {k for k, v in r.items() if v not in (None, "")}
  for key in ("path", "modality", "time"):
    if key not in present:
      raise CatalogError(f"{row}: the {key!r} field is missing or empty.")
  modality = str(r["modality"]).lower()
  if modality not in ("s1", "s2"):
    raise CatalogError(f"{row}: modality {r['modality']!r} must be 's1' or 's2'.")
  kw = {}
  if "lon" in present or "lat" in present:
    if not {"lon", "lat"} <= present:
      raise CatalogError(f"{row}: give both lon and lat (or neither).")
    kw["lon"], kw["lat"] = _float(r, "lon", row), _float(r, "lat", row)
    if not (-180 <= kw["lon"] <= 180 and -90 <= kw["lat"] <= 90):
      raise CatalogError(f"{row}: lon/lat ({kw['lon']}, {kw['lat']}) is outside WGS84 degrees.")
  given = present & set(BOUNDS_KEYS)
  if given:
    if given != set(BOUNDS_KEYS):
      raise CatalogError(f"{row}: a footprint needs all of {list(BOUNDS_KEYS)}; missing "
                         f"{sorted(set(BOUNDS_KEYS) - given)}.")
    b = tuple(_float(r, k, row) for k in BOUNDS_KEYS[:4])
    if not (b[0] < b[2] and b[1] < b[3]):
      raise CatalogError(f"{row}: footprint {b} needs minx < maxx and miny < maxy.")
    kw["bounds"], kw["crs"] = b, _canonical_crs(str(r["crs"]), row)
  if not kw:
    raise CatalogError(f"{row}: no place: give lon,lat or minx,miny,maxx,maxy,crs.")
  off = next((k for k in OFFSET_KEYS if k in present), None)
  if off:
    kw["add_offset"] = _float(r, off, row)
  if "processing_baseline" in present:
    kw["baseline"] = _baseline(str(r["processing_baseline"]), row)
  rel = str(r["path"])
  path = os.path.normpath(os.path.join(base, rel))
  rid = str(r["id"]) if "id" in present else _default_id(path, base)
  return Chip(row, path, rel, rid, modality, _parse_time(r["time"], row), **kw)


def _baseline(value: str, row: str) -> float:
  """'04.00' | '4.0' | 'N0400' -> 4.0."""
  v = value.strip().upper()
  m = re.fullmatch(r"N?(\d{2})(\d{2})", v)
  try:
    return float(f"{m.group(1)}.{m.group(2)}") if m else float(v)
  except ValueError:
    raise CatalogError(f"{row}: processing_baseline {value!r} is not a baseline like 04.00 or N0400.") from None


def s2_offset(chip: Chip, mode: str = "auto") -> tuple[int, str]:
  """(DN to remove, how it was decided) for an S2 chip: catalog offset, catalog baseline, product name, or (mode
  'date') the acquisition date; 'unknown' when nothing says."""
  if mode == "off":
    return 0, "off"
  if chip.add_offset is not None:
    return int(round(-chip.add_offset)) if chip.add_offset < 0 else 0, "catalog add_offset"
  if chip.baseline is not None:
    return (S2_OFFSET_DN if chip.baseline >= 4.0 else 0), "catalog processing_baseline"
  m = _PRODUCT_BASELINE.search(chip.rel) or _PRODUCT_BASELINE.search(chip.id)
  if m:
    return (S2_OFFSET_DN if int(m.group(1)) >= 4 else 0), "product name"
  if mode == "date" and chip.time >= BASELINE_04_START:
    return S2_OFFSET_DN, "acquisition date"
  return 0, "unknown"


def _default_id(path: str, base: str) -> str:
  rel = os.path.relpath(path, base)
  return os.path.splitext(os.path.basename(path) if rel.startswith("..") else rel)[0]


def _canonical_crs(s: str, row: str) -> str:
  from rasterio.crs import CRS
  try:
    crs = CRS.from_user_input(s)
  except Exception as e:
    raise CatalogError(f"{row}: crs {s!r} is not a known CRS ({e}).") from None
  return crs.to_string()


def read_catalog(path: str) -> list[Chip]:
  base = os.path.dirname(os.path.abspath(path))
  name = os.path.basename(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--catalog={path} does not exist.")
  if path.lower().endswith(".json"):
    with open(path) as f:
      data = json.load(f)
    rows = data.get("chips") if isinstance(data, dict) else data
    if not isinstance(rows, list):
      raise CatalogError(f"{name}: expected a JSON list of chips or {{\"chips\": [...]}}.")
    labelled = [(f"{name} entry {i + 1}", r) for i, r in enumerate(rows)]
    for row, r in labelled:
      if not isinstance(r, dict):
        raise CatalogError(f"{row}: expected an object with path, modality, time and a place, got {r!r}.")
  else:
    with open(path, newline="") as f:
      reader = csv.DictReader(f)
      labelled = [(f"{name} line {reader.line_num}", r) for r in reader]
    for row, r in labelled:
      if None in r:
        raise CatalogError(f"{row}: more fields than the header has columns.")
  chips = [_chip(r, row, base) for row, r in labelled]
  seen: dict[tuple[str, str], str] = {}
  for c in chips:
    for key in (("path", c.path), ("id", c.id)):
      if key in seen:
        raise CatalogError(f"{c.row}: {key[0]} {key[1]!r} is already used by {seen[key]}; one row per chip.")
      seen[key] = c.row
  return chips


# ---------------------------------------------------------------- GeoTIFF headers

def _band_name(desc: str | None) -> str | None:
  if not desc:
    return None
  d = desc.strip().upper()
  if d in bands_lib.BANDS:
    return d
  if d.startswith("B") and d[1:].isdigit():  # B2 -> B02
    return f"B{int(d[1:]):02d}" if f"B{int(d[1:]):02d}" in bands_lib.BANDS else None
  return None


def probe(chip: Chip) -> Probe | str:
  """Reads the chip's GeoTIFF header; returns a Probe, or a rejection reason 'kind: detail'."""
  import rasterio
  if not os.path.exists(chip.path):
    return f"missing_file: {chip.path} ({chip.row})"
  try:
    with rasterio.open(chip.path) as src:
      b = src.bounds
      crs = src.crs.to_string() if src.crs else None
      info = dict(shape=(src.height, src.width), count=src.count, dtype=src.dtypes[0], crs=crs,
                  bounds=(b.left, b.bottom, b.right, b.top) if crs else None)
      descs = [_band_name(d) for d in src.descriptions]
  except Exception as e:
    return f"unreadable: {chip.path}: {e} ({chip.row})"
  if chip.modality == "s2":
    if all(descs) and len(set(descs)) == len(descs) and all(d in bands_lib.S2_L1C_BANDS for d in descs):
      names = tuple(descs)
    elif info["count"] == 13:
      names = bands_lib.S2_L1C_BANDS
    elif info["count"] == 12:
      names = bands_lib.S2_L2A_BANDS
    else:
      return (f"bad_bands: {chip.path} has {info['count']} bands without Sentinel-2 band descriptions; expected 13 "
              f"(L1C) or 12 (L2A) ({chip.row})")
    if info["dtype"] != "uint16":
      return f"bad_dtype: {chip.path} is {info['dtype']}; S2 chips must be uint16 reflectance x 1e4 ({chip.row})"
  else:
    if info["count"] != 2:
      return f"bad_bands: {chip.path} has {info['count']} bands; S1 chips must have 2 (VV, VH in dB) ({chip.row})"
    names = tuple(descs) if set(descs) == {"VV", "VH"} else bands_lib.S1_BANDS
    if not info["dtype"].startswith("float"):
      return f"bad_dtype: {chip.path} is {info['dtype']}; S1 chips must be float backscatter in dB ({chip.row})"
  return Probe(bands=names, **info)


def probe_all(chips: list[Chip], workers: int) -> list[Probe | str]:
  if workers and len(chips) > 64:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      return pool.map(probe, chips, chunksize=64)
  return [probe(c) for c in chips]


# ---------------------------------------------------------------- pairing

def _centres(chips: list[Chip]) -> np.ndarray:
  """(N, 2) lon/lat of each chip's centre: its lon/lat, else its footprint's centre reprojected."""
  from rasterio import warp
  out = np.full((len(chips), 2), np.nan)
  by_crs = collections.defaultdict(list)
  for i, c in enumerate(chips):
    if c.lon is not None:
      out[i] = c.lon, c.lat
    else:
      by_crs[c.crs].append(i)
  for crs, idx in by_crs.items():
    xs = [(chips[i].bounds[0] + chips[i].bounds[2]) / 2 for i in idx]
    ys = [(chips[i].bounds[1] + chips[i].bounds[3]) / 2 for i in idx]
    lon, lat = warp.transform(crs, "EPSG:4326", xs, ys)
    out[idx, 0], out[idx, 1] = lon, lat
  return out


def _unit_vectors(lonlat: np.ndarray) -> np.ndarray:
  lon, lat = np.radians(lonlat[:, 0]), np.radians(lonlat[:, 1])
  return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _tolerance_in_crs_units(crs: str, tol_m: float) -> float:
  from rasterio.crs import CRS
  c = CRS.from_user_input(crs)
  return tol_m / METRES_PER_DEGREE if c.is_geographic else tol_m


def _near(a: tuple, b: tuple, tol: float) -> bool:
  return max(abs(x - y) for x, y in zip(a, b)) <= tol


class _Places:
  """Finds the S1 chips at the place of an S2 chip: a 3-D grid of unit vectors, cells of the search radius."""

  def __init__(self, chips: list[Chip], tol_m: float):
    self.chips, self.tol_m = chips, tol_m
    self.vec = _unit_vectors(_centres(chips)) if chips else np.zeros((0, 3))
    self.cell = 2 * tol_m / EARTH_RADIUS_M  # footprint matches may have centres up to ~1.4 tol apart
    self.grid = collections.defaultdict(list)
    for i, v in enumerate(self.vec):
      self.grid[tuple(np.floor(v / self.cell).astype(np.int64))].append(i)
    self._tol_cache: dict[str, float] = {}

  def at(self, chip: Chip, vec: np.ndarray) -> list[int]:
    key = np.floor(vec / self.cell).astype(np.int64)
    found = []
    for d in np.ndindex(3, 3, 3):
      for i in self.grid.get(tuple(key + np.array(d) - 1), ()):
        if self._same_place(chip, vec, i):
          found.append(i)
    return sorted(found)

  def _same_place(self, chip: Chip, vec: np.ndarray, i: int) -> bool:
    other = self.chips[i]
    if chip.bounds is not None and other.bounds is not None and chip.crs == other.crs:
      tol = self._tol_cache.get(chip.crs)
      if tol is None:
        tol = self._tol_cache[chip.crs] = _tolerance_in_crs_units(chip.crs, self.tol_m)
      return _near(chip.bounds, other.bounds, tol)
    return float(np.linalg.norm(self.vec[i] - vec)) * EARTH_RADIUS_M <= self.tol_m


def same_grid(a: Probe, b: Probe, tol_m: float) -> bool:
  if a.shape != b.shape:
    return False
  if a.crs is None or b.crs is None:
    return True
  return a.crs == b.crs and _near(a.bounds, b.bounds, _tolerance_in_crs_units(a.crs, tol_m))


def pair(s2: list[tuple[Chip, Probe]], s1: list[tuple[Chip, Probe]], *, max_days: float = 7.0,
         place_tol_m: float = 10.0, exclusive_s1: bool = False) -> tuple[dict[int, int], dict]:
  """Returns ({s2 index: s1 index}, report) following the module docstring's rules."""
  window = dt.timedelta(days=max_days)
  places = _Places([c for c, _ in s1], place_tol_m)
  s2_vec = _unit_vectors(_centres([c for c, _ in s2])) if s2 else np.zeros((0, 3))
  unpaired_why: dict[int, str] = {}
  different_grid = 0
  edges = []  # (|dt|, s1 time, s1 path, s2 position, s1 position)
  for j, (chip, pr) in enumerate(s2):
    here = places.at(chip, s2_vec[j])
    in_time = [i for i in here if abs(s1[i][0].time - chip.time) <= window]
    ok = [i for i in in_time if same_grid(pr, s1[i][1], place_tol_m)]
    different_grid += len(in_time) - len(ok)
    if not ok:
      unpaired_why[j] = ("no_s1_at_place" if not here else "no_s1_within_max_days" if not in_time
                         else "s1_grid_differs")
    edges += [(abs(s1[i][0].time - chip.time), s1[i][0].time, s1[i][0].path, j, i) for i in ok]
  edges.sort(key=lambda e: (e[0], e[1], e[2], s2[e[3]][0].path))
  chosen: dict[int, int] = {}
  used = set()
  for _, _, _, j, i in edges:  # smallest time difference first: for each S2 chip its nearest S1
    if j in chosen or (exclusive_s1 and i in used):
      continue
    chosen[j] = i
    used.add(i)
  for j in range(len(s2)):
    if j not in chosen and j not in unpaired_why:
      unpaired_why[j] = "s1_already_used"
  deltas = [abs((s1[i][0].time - s2[j][0].time).total_seconds()) / 86400 for j, i in chosen.items()]
  report = {
      "pairs": len(chosen),
      "s2_unpaired": dict(sorted(collections.Counter(unpaired_why.values()).items())),
      "rejected_candidates": {"different_grid": different_grid},
      "unmatched_s1": len(s1) - len(set(chosen.values())),
      "s1_used_by_several_s2": sum(1 for n in collections.Counter(chosen.values()).values() if n > 1),
      "dt_days": {"max": round(max(deltas), 4), "mean": round(float(np.mean(deltas)), 4)} if deltas else {},
  }
  return chosen, report


# ---------------------------------------------------------------- records

def _iso(t: dt.datetime) -> str:
  return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _read_s2(chip: Chip, pr: Probe) -> np.ndarray:
  arr, _ = geotiff.read(chip.path)
  if arr.shape[:2] != pr.shape or arr.dtype != np.uint16:
    raise BadInput(f"{chip.path}: read {arr.shape} {arr.dtype}, header said {pr.shape} uint16")
  order = [pr.bands.index(b) for b in bands_lib.S2_L1C_BANDS if b in pr.bands]  # registry order
  arr = arr[..., order] if order != list(range(len(order))) else arr
  if not arr.any():
    raise BadInput(f"{chip.path}: S2 chip is all zero (no data)")
  return np.ascontiguousarray(arr)


def harmonize(arr: np.ndarray, offset: int) -> np.ndarray:
  """Removes a baseline >= 04.00 DN offset: measured pixels DN - offset (at least 1), no-data 0 stays 0."""
  if not offset:
    return arr
  return np.where(arr == 0, 0, np.maximum(arr.astype(np.int32) - offset, 1)).astype(np.uint16)


def _read_s1(chip: Chip, pr: Probe) -> tuple[np.ndarray, np.ndarray | None]:
  arr, _ = geotiff.read(chip.path)
  arr = arr[..., [pr.bands.index(b) for b in bands_lib.S1_BANDS]]
  s1, valid = records.clean_s1(arr)
  if valid is not None and 1.0 - valid.mean() > MAX_INVALID_S1_FRACTION:
    raise BadInput(f"{chip.path}: {100 * (1 - valid.mean()):.0f}% of the S1 pixels are no-data (NaN/inf)")
  return s1, valid


def build(item: Item, source: str = "", licence: str = "") -> list[tuple[str, dict]]:
  """One S2 chip (with its S1 partner) or one S1 chip -> [(split, record)]."""
  record: dict = {"id": item.name}
  meta: dict = {"id": item.name, "source": source, "licence": licence}
  main, main_probe = (item.s2, item.s2_probe) if item.s2 else (item.s1, item.s1_probe)
  if item.s2:
    record["s2"] = harmonize(_read_s2(item.s2, item.s2_probe), item.s2_offset)
    if item.s2_offset:
      meta["s2_offset_removed"] = item.s2_offset
    record["s2_bands"] = tuple(b for b in bands_lib.S2_L1C_BANDS if b in item.s2_probe.bands)
    meta.update(s2_id=item.s2.id, s2_path=item.s2.rel, s2_time=_iso(item.s2.time))
  if item.s1:
    record["s1"], valid = _read_s1(item.s1, item.s1_probe)
    if valid is not None:
      record["s1_valid"] = valid
    record["s1_bands"] = bands_lib.S1_BANDS
    meta.update(s1_id=item.s1.id, s1_path=item.s1.rel, s1_time=_iso(item.s1.time))
  if item.s1 and item.s2:
    meta["dt_days"] = round((item.s1.time - item.s2.time).total_seconds() / 86400, 6)  # S1 minus S2
  if main_probe.crs:
    meta["crs"], meta["bounds"] = main_probe.crs, list(main_probe.bounds)
  elif main.bounds:
    meta["crs"], meta["bounds"] = main.crs, list(main.bounds)
  lonlat = _centres([main])[0]
  meta["lon"], meta["lat"] = round(float(lonlat[0]), 6), round(float(lonlat[1]), 6)
  record["meta"] = meta
  return [(item.split, record)]


# ---------------------------------------------------------------- driver

def convert_catalog(catalog: str, out: str, *, max_days: float = 7.0, place_tol_m: float = 10.0,
                    exclusive_s1: bool = False, write_s1_only: bool = False, split: str = "train",
                    num_shards: int = 4, on_bad: str = "fail", workers: int = 0, source: str = "",
                    licence: str = "unknown", harmonize: str = "auto", shard_groups: int = 0) -> dict:
  """Reads, pairs and converts a catalog; returns the manifest."""
  if harmonize not in ("auto", "date", "off"):
    raise ValueError(f"--harmonize={harmonize!r}: use auto (catalog column / product name), date or off.")
  if max_days < 0 or place_tol_m <= 0:
    raise ValueError(f"--max_days must be >= 0 and --place_tol_m > 0, got {max_days} and {place_tol_m}.")
  spec = convert.parse_split_spec(split)
  chips = read_catalog(catalog)
  logging.info("pair_catalog: %d chips in %s; reading GeoTIFF headers", len(chips), catalog)
  probes = probe_all(chips, workers)
  rejected = [(c, p) for c, p in zip(chips, probes) if isinstance(p, str)]
  if rejected and on_bad == "fail":
    raise convert.ConversionError(f"Bad input: {rejected[0][1]}. Fix or remove it, or rerun with --on_bad=skip to "
                                  f"skip such chips ({len(rejected)} in all) and count them in manifest.json.")
  good = [(c, p) for c, p in zip(chips, probes) if not isinstance(p, str)]
  s2 = sorted([g for g in good if g[0].modality == "s2"], key=lambda g: g[0].path)
  s1 = sorted([g for g in good if g[0].modality == "s1"], key=lambda g: g[0].path)
  chosen, report = pair(s2, s1, max_days=max_days, place_tol_m=place_tol_m, exclusive_s1=exclusive_s1)

  items, how = [], collections.Counter()
  for j, (chip, pr) in enumerate(s2):
    i = chosen.get(j)
    partner = s1[i] if i is not None else (None, None)
    offset, why = s2_offset(chip, harmonize)
    how[f"{why}: {'offset removed' if offset else 'unchanged'}"] += 1
    if why == "unknown" and chip.time >= BASELINE_04_START:
      how["unknown baseline after 2022-01-25"] += 1
    items.append(Item(chip.id, convert.split_of(chip.id, spec), chip, pr, *partner, s2_offset=offset))
  if how["unknown baseline after 2022-01-25"]:
    logging.warning("pair_catalog: %d S2 chips from 2022-01-25 on have no processing baseline in the catalog; they "
                    "may carry the +1000 DN offset of baseline 04.00. Add a processing_baseline or add_offset "
                    "column, or use --harmonize=date.", how["unknown baseline after 2022-01-25"])
  if write_s1_only:
    used = set(chosen.values())
    items += [Item(c.id, convert.split_of(c.id, spec), s1=c, s1_probe=p)
              for i, (c, p) in enumerate(s1) if i not in used]
  items.sort(key=lambda it: it.name)

  pairing = {"catalog": os.path.abspath(catalog), "max_days": max_days, "place_tol_m": place_tol_m,
             "exclusive_s1": exclusive_s1, "write_s1_only": write_s1_only,
             "chips": {"s1": sum(c.modality == "s1" for c in chips), "s2": sum(c.modality == "s2" for c in chips)},
             "rejected_chips": dict(sorted(collections.Counter(p.split(":")[0] for _, p in rejected).items())),
             "harmonization": {"mode": harmonize, **dict(sorted(how.items()))}, **report}
  args = dict(catalog=os.path.abspath(catalog), max_days=max_days, place_tol_m=place_tol_m,
              exclusive_s1=exclusive_s1, write_s1_only=write_s1_only, split=split, num_shards=num_shards,
              on_bad=on_bad, harmonize=harmonize)
  writer = DatasetWriter(out, num_shards=num_shards, source=source, licence=licence,
                         created_by="data_prep.pair_catalog", args=args, extra={"pairing": pairing},
                         extra_counts={"unmatched_s1": report["unmatched_s1"]},
                         shard_groups=shard_groups)
  for chip, reason in rejected:
    writer.skip(chip.rel, reason)
  logging.info("pair_catalog: %d pairs, %d S2-only, %d unmatched S1, %d rejected chips", report["pairs"],
               len(s2) - report["pairs"], report["unmatched_s1"], len(rejected))
  return convert.run(items, _Build(source, licence), writer, on_bad=on_bad, workers=workers, desc="pair_catalog")


@dataclasses.dataclass(frozen=True)
class _Build:  # picklable build(item) with the record's source/licence
  source: str
  licence: str

  def __call__(self, item: Item):
    return build(item, self.source, self.licence)


FLAGS = flags.FLAGS


def _define_flags():
  convert.define_common_flags()
  flags.DEFINE_string("catalog", None, "CSV or JSON catalog of S1/S2 chips (see the module docstring).")
  flags.DEFINE_float("max_days", 7.0, "Largest |S1 time - S2 time| of a pair, in days (inclusive).")
  flags.DEFINE_float("place_tol_m", 10.0, "Same-place tolerance in metres (footprint edges, or centres).")
  flags.DEFINE_bool("exclusive_s1", False, "Use each S1 chip in at most one pair (default: as the paper, each S2 "
                    "chip takes its nearest S1 chip, which may be shared).")
  flags.DEFINE_bool("write_s1_only", False, "Write S1 chips that paired with nothing as S1-only records.")
  flags.DEFINE_string("split", "train", "One split name, or 'hash:0.8,0.1,0.1' (stable hash of the record id).")
  flags.DEFINE_string("source", "S1/S2 chip catalog", "Source tag written into manifest and record metadata.")
  flags.DEFINE_string("licence", "unknown", "Licence tag of the imagery (e.g. 'Copernicus Sentinel data terms').")
  flags.DEFINE_enum("harmonize", "auto", ["auto", "date", "off"], "S2 baseline >= 04.00 offset removal: auto (from "
                    "the catalog's add_offset / processing_baseline column or the product name), date (also assume "
                    "it from 2022-01-25 on), off.")
  flags.mark_flag_as_required("catalog")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; use --catalog=FILE --out=DIR.")
  convert.run_cli("pair_catalog", "convert_catalog", catalog=FLAGS.catalog, out=FLAGS.out,
                  max_days=FLAGS.max_days, place_tol_m=FLAGS.place_tol_m, exclusive_s1=FLAGS.exclusive_s1,
                  write_s1_only=FLAGS.write_s1_only, split=FLAGS.split, num_shards=FLAGS.num_shards,
                  on_bad=FLAGS.on_bad, workers=FLAGS.workers, source=FLAGS.source, licence=FLAGS.licence,
                  harmonize=FLAGS.harmonize)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
