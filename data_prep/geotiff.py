"""GeoTIFF band reading for the converters (rasterio), with resampling of 20 m / 60 m bands to the 10 m grid.

Resampling: nearest neighbour by exact integer pixel replication (a 60x60 20 m band -> 120x120 by repeating each
pixel 2x2). It keeps the measured values and the uint16 dtype (no invented reflectances), is deterministic and
cheap; the models see 8-16 px patches, so a 60 m pixel spanning 6x6 output pixels is what the sensor measured.
"""
from __future__ import annotations

import os

import numpy as np

from data_prep.convert import BadInput


def read(path: str, band: int | None = None) -> tuple[np.ndarray, dict]:
  """Returns (array (H, W) for one band or (H, W, C) for all, info dict with crs, bounds, transform, nodata)."""
  import rasterio  # imported lazily: converters run it in worker processes

  if not os.path.exists(path):
    raise BadInput(f"missing file {path}")
  try:
    with rasterio.open(path) as src:
      arr = src.read(band) if band else np.moveaxis(src.read(), 0, -1)
      b = src.bounds
      info = dict(crs=src.crs.to_string() if src.crs else None, bounds=[b.left, b.bottom, b.right, b.top],
                  nodata=src.nodata, shape=(src.height, src.width), count=src.count,
                  descriptions=list(src.descriptions or ()))
  except BadInput:
    raise
  except Exception as e:
    raise BadInput(f"cannot read GeoTIFF {path}: {e}") from None
  return arr, info


def to_grid(arr: np.ndarray, size: tuple[int, int], path: str = "") -> np.ndarray:
  """Upsamples (H, W[, C]) by an exact integer factor to `size` (nearest neighbour); errors otherwise."""
  h, w = arr.shape[:2]
  th, tw = size
  if (h, w) == (th, tw):
    return arr
  if th % h or tw % w or th // h != tw // w:
    raise BadInput(f"{path or 'band'} has shape {(h, w)}, which is not an integer fraction of the {size} 10 m grid")
  f = th // h
  return np.repeat(np.repeat(arr, f, axis=0), f, axis=1)


def stack_bands(paths: dict[str, str], size: tuple[int, int], dtype=np.uint16) -> np.ndarray:
  """Reads one single-band GeoTIFF per band name (in the dict's order) onto the 10 m grid: (H, W, C)."""
  out = np.empty((*size, len(paths)), dtype)
  for c, (name, path) in enumerate(paths.items()):
    arr, _ = read(path, 1)
    if np.dtype(dtype) == np.uint16 and arr.dtype != np.uint16:
      if not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0 or arr.max() > 65535:
        raise BadInput(f"{path}: band {name} has dtype {arr.dtype} with values outside uint16; expected "
                       "Sentinel-2 reflectance x 1e4")
    out[..., c] = to_grid(arr, size, path)
  return out
