"""Per-band statistics computed from the data while shards are written: mean/std/min/max and percentiles.

Exact streaming sums (float64) for mean/std; percentiles from fixed histograms (S2: one bin per uint16 value, so they
are exact; S1: 0.01 dB bins over `bands.S1_DB_CLIP`), so the result does not depend on record order.
"""
from __future__ import annotations

import numpy as np

from mmrs import bands as bands_lib

PERCENTILES = (1, 2, 50, 98, 99)
_S1_BIN_DB = 0.01


class BandStats:
  def __init__(self, band_names, kind: str):
    self.bands = tuple(band_names)
    self.kind = kind  # "s2" (uint16) or "s1" (dB)
    c = len(self.bands)
    self.n = 0
    self.sum = np.zeros(c, np.float64)
    self.sumsq = np.zeros(c, np.float64)
    self.min = np.full(c, np.inf)
    self.max = np.full(c, -np.inf)
    lo, hi = bands_lib.S1_DB_CLIP
    self.nbins = 65536 if kind == "s2" else int(round((hi - lo) / _S1_BIN_DB)) + 1
    self.hist = np.zeros((c, self.nbins), np.int64)

  def add(self, array: np.ndarray, valid: np.ndarray | None = None):
    x = array.reshape(-1, array.shape[-1])
    if valid is not None:
      x = x[valid.reshape(-1).astype(bool)]
    if not len(x):
      return
    xf = x.astype(np.float64)
    self.n += len(x)
    self.sum += xf.sum(0)
    self.sumsq += (xf * xf).sum(0)
    self.min = np.minimum(self.min, xf.min(0))
    self.max = np.maximum(self.max, xf.max(0))
    for c in range(x.shape[1]):
      self.hist[c] += np.bincount(self._bins(x[:, c]), minlength=self.nbins)

  def _bins(self, v):
    if self.kind == "s2":
      return v.astype(np.int64)
    lo, hi = bands_lib.S1_DB_CLIP
    return np.rint((np.clip(v, lo, hi) - lo) / _S1_BIN_DB).astype(np.int64)

  def merge(self, other: "BandStats"):
    assert other.bands == self.bands and other.kind == self.kind
    self.n += other.n
    self.sum += other.sum
    self.sumsq += other.sumsq
    self.min = np.minimum(self.min, other.min)
    self.max = np.maximum(self.max, other.max)
    self.hist += other.hist

  def to_json(self) -> dict:
    if self.n == 0:
      return {}
    mean = self.sum / self.n
    std = np.sqrt(np.maximum(self.sumsq / self.n - mean * mean, 0.0))
    out = {"bands": list(self.bands), "pixels": int(self.n), "mean": mean.round(4).tolist(),
           "std": std.round(4).tolist(), "min": self.min.tolist(), "max": self.max.tolist()}
    cdf = np.cumsum(self.hist, axis=1) / self.n
    lo = bands_lib.S1_DB_CLIP[0]
    for p in PERCENTILES:
      idx = (cdf < p / 100.0).sum(axis=1)
      vals = idx if self.kind == "s2" else lo + idx * _S1_BIN_DB
      out[f"p{p}"] = np.round(np.asarray(vals, np.float64), 4).tolist()
    return out
