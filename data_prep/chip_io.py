"""Reading multi-band Sentinel chips (one GeoTIFF per chip: SEN12MS, DFC2020, Sen1Floods11, EuroSAT) and the
checks every converter of chips applies: band count, grid, S2 as uint16 reflectance x 1e4, S1 dB cleaning.

Each problem raises `BadInput` naming the file, so `--on_bad=fail` stops with it and `--on_bad=skip` counts it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from data_prep import geotiff
from data_prep.convert import BadInput
from mmrs import bands as bands_lib
from mmrs.data import records

# A record's S1 with more than this fraction of no-data pixels is dropped (the record keeps its S2 and labels):
# the same threshold `records.validate` and the pipeline enforce.
MAX_S1_NODATA_FRACTION = records.MAX_S1_NODATA_FRACTION


def as_uint16(arr: np.ndarray, path: str) -> tuple[np.ndarray, int]:
  """S2 reflectance x 1e4 as uint16. Integer input must lie in 0..65535; float input is rounded, and its NaN/inf
  pixels become 0, Sentinel-2's own no-data value. Returns (array, number of pixels filled)."""
  if arr.dtype == np.uint16:
    return arr, 0
  filled = 0
  if np.issubdtype(arr.dtype, np.floating):
    bad = ~np.isfinite(arr)
    filled = int(bad.any(axis=-1).sum()) if arr.ndim == 3 else int(bad.sum())
    arr = np.where(bad, 0, np.rint(arr))
  elif not np.issubdtype(arr.dtype, np.integer):
    raise BadInput(f"{path}: Sentinel-2 data has dtype {arr.dtype}; expected integer reflectance x 1e4")
  if arr.size and (arr.min() < 0 or arr.max() > 65535):
    raise BadInput(f"{path}: Sentinel-2 values span {arr.min()}..{arr.max()}, outside uint16; expected "
                   "reflectance x 1e4 (not scaled to 0..1, not in dB)")
  return arr.astype(np.uint16), filled


def check_s2(s2: np.ndarray, path: str) -> None:
  if not s2.any():
    raise BadInput(f"{path}: Sentinel-2 chip is all zero (no data)")


def read_s2(path: str, file_bands: Sequence[str], out_bands: Sequence[str],
            size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
  """A multi-band S2 GeoTIFF whose bands are `file_bands` (in file order) -> (H, W, len(out_bands)) uint16 in
  `out_bands` order. `size` (H, W), when given, is the expected grid."""
  arr, info = geotiff.read(path)
  if arr.shape[-1] != len(file_bands):
    raise BadInput(f"{path}: has {arr.shape[-1]} bands, expected {len(file_bands)} ({', '.join(file_bands)})")
  if size is not None and arr.shape[:2] != tuple(size):
    raise BadInput(f"{path}: grid {arr.shape[:2]} differs from the expected {tuple(size)}")
  arr, filled = as_uint16(arr, path)
  arr = bands_lib.select_bands(arr, file_bands, out_bands)
  check_s2(arr, path)
  info["s2_nodata_filled"] = filled
  return np.ascontiguousarray(arr), info


def clean_s1(s1_db: np.ndarray, path: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """(H, W, 2) S1 dB -> (s1, s1_valid, reason). Non-finite pixels are filled and flagged (`records.clean_s1`);
  when more than half are no-data, returns (None, None, reason): the caller keeps the record without S1."""
  s1, valid = records.clean_s1(s1_db)
  if valid is not None:
    bad = 1.0 - float(valid.mean())
    if bad > MAX_S1_NODATA_FRACTION:
      return None, None, f"{path}: {100 * bad:.0f}% of the Sentinel-1 pixels are no-data (NaN/inf)"
  return s1, valid, ""


def attach_s1(record: dict, s1: np.ndarray | None, valid: np.ndarray | None, dropped: str) -> None:
  """Adds `clean_s1`'s result to a record: the S1 array (+ `s1_valid` when pixels were filled), or, when S1 was
  dropped for too much no-data, the reason in `meta.s1_dropped` (the record stays S2-only)."""
  if s1 is None:
    record["meta"]["s1_dropped"] = dropped
    return
  record.update(s1=s1, s1_bands=bands_lib.S1_BANDS)
  if valid is not None:
    record["s1_valid"] = valid


def read_s1_db(path: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
  """A 2-band (VV, VH) S1 GeoTIFF in dB -> (float32 (H, W, 2), NaN/inf kept; info). Clean with `clean_s1`."""
  arr, info = geotiff.read(path)
  if arr.shape[-1] != 2:
    raise BadInput(f"{path}: has {arr.shape[-1]} bands, expected 2 (VV, VH in dB)")
  if size is not None and arr.shape[:2] != tuple(size):
    raise BadInput(f"{path}: grid {arr.shape[:2]} differs from the expected grid {tuple(size)}")
  return arr.astype(np.float32), info


def read_mask(path: str, size: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
  """Band 1 of a label GeoTIFF, checked against the image grid."""
  arr, info = geotiff.read(path, 1)
  if size is not None and arr.shape != tuple(size):
    raise BadInput(f"{path}: label grid {arr.shape} differs from the image grid {tuple(size)}")
  return arr, info


def center_lonlat(info: dict) -> tuple[float, float] | None:
  """Lon/lat (WGS84) of the chip centre from `geotiff.read`'s info; None without a CRS."""
  if not info.get("crs"):
    return None
  from rasterio.warp import transform  # lazy: runs in worker processes

  left, bottom, right, top = info["bounds"]
  try:
    xs, ys = transform(info["crs"], "EPSG:4326", [(left + right) / 2], [(bottom + top) / 2])
  except Exception:  # an unusual CRS should not fail the conversion; the bounds + CRS stay in the metadata
    return None
  return round(float(xs[0]), 6), round(float(ys[0]), 6)


def geo_meta(info: dict) -> dict:
  out = {"crs": info.get("crs"), "bounds": info.get("bounds")}
  ll = center_lonlat(info)
  if ll is not None:
    out["lon"], out["lat"] = ll
  return out


def windows(height: int, width: int, tile: int) -> list[tuple[int, int, int, int]]:
  """(y, x, h, w) of the non-overlapping tile x tile windows (a remainder narrower than `tile` is dropped);
  the whole chip when tile <= 0."""
  if tile <= 0:
    return [(0, 0, height, width)]
  return [(y, x, tile, tile) for y in range(0, height - tile + 1, tile) for x in range(0, width - tile + 1, tile)]


def count_s1_dropped(counts: dict, record: dict) -> None:
  """`on_record` hook of `convert.run`: counts records whose S1 was dropped (into the manifest's counts)."""
  counts["s1_dropped"] += "s1_dropped" in record.get("meta", {})
