"""Synthetic S1/S2 scenes for tests, demos and benchmarks: realistic-looking, and always labelled as synthetic.

A scene is a land-cover map drawn from spatially correlated random fields (low-pass filtered noise, one field per
class, argmax), so segments have smooth, blobby shapes at a per-scene scale. S2 (uint16 top-of-atmosphere
reflectance x 1e4) comes from per-class spectra with per-scene gain, within-segment texture, sensor noise and the
coarser look of the 20 m / 60 m bands; S1 (VV/VH dB) from per-class backscatter with texture and multiplicative
speckle (gamma, ~4.4 looks as in GRD), so both modalities share the same segments. Labels derive from the map:
multi-label (classes covering >= 5%), dominant class, and the map itself as a mask.

Every record has `meta["source"] = "synthetic"` and an id starting with `synthetic-`, so synthetic data can never
pass for real data.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mmrs import bands as bands_lib

CLASSES = ("water", "forest", "cropland", "bare_soil", "urban", "wetland")
# name -> {"kind", "names"}: pass to DatasetWriter(label_sets=...); records carry "synthetic_ml"/"synthetic_class"
# in `labels` and the land-cover map as `mask`.
LABEL_SETS = {
    "synthetic_ml": {"kind": "multi_label", "names": list(CLASSES)},
    "synthetic_class": {"kind": "class", "names": list(CLASSES)},
    "synthetic_mask": {"kind": "mask", "names": list(CLASSES)},
}
LICENCE = "CC0-1.0 (synthetic)"

# Typical Sentinel-2 L1C TOA reflectance x 1e4 per class, bands in bands.S2_L1C_BANDS order
# (B01 B02 B03 B04 B05 B06 B07 B08 B8A B09 B10 B11 B12); B01/B09/B10 carry the atmosphere (aerosols, vapour, cirrus).
_SPECTRA = np.array([
    [1400, 1150, 900, 650, 550, 450, 420, 380, 330, 120, 12, 180, 120],  # water
    [1350, 1050, 850, 600, 900, 1900, 2300, 2500, 2600, 800, 15, 1500, 800],  # forest
    [1400, 1150, 1050, 900, 1300, 2200, 2600, 2800, 2900, 900, 18, 2200, 1400],  # cropland
    [1600, 1500, 1600, 1800, 2000, 2200, 2350, 2400, 2500, 900, 20, 3200, 2600],  # bare soil
    [1700, 1600, 1550, 1600, 1750, 1900, 2000, 2100, 2150, 800, 20, 2400, 2100],  # urban
    [1400, 1100, 950, 700, 900, 1400, 1600, 1700, 1750, 600, 14, 1000, 550],  # wetland
], np.float32)
# Sentinel-1 GRD backscatter (dB) per class: VV, VH.
_S1_DB = np.array([[-21.0, -28.0], [-7.5, -13.0], [-10.5, -17.0], [-13.0, -21.0], [-4.0, -11.0], [-9.0, -16.0]],
                  np.float32)
_CLASS_PRIOR = np.array([0.6, 1.0, 1.0, 0.5, 0.5, 0.4], np.float32)  # how often each class wins the argmax
_S1_LOOKS = 4.4
_WAVELENGTH = np.array([bands_lib.BANDS[b].wavelength_nm for b in bands_lib.S2_L1C_BANDS], np.float32)


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], size: int, scale_px: float) -> np.ndarray:
  """Unit-variance Gaussian random fields (leading dims x size x size), correlation length ~ `scale_px`."""
  noise = rng.standard_normal(shape + (size, size)).astype(np.float32)
  f = np.fft.fftfreq(size).astype(np.float32)
  k2 = f[:, None] ** 2 + f[None, : size // 2 + 1] ** 2
  spec = np.fft.rfft2(noise) * np.exp(-2 * (np.pi * scale_px) ** 2 * k2)
  field = np.fft.irfft2(spec, s=(size, size)).astype(np.float32)
  field -= field.mean(axis=(-2, -1), keepdims=True)
  field /= field.std(axis=(-2, -1), keepdims=True) + 1e-6
  return field


def land_cover(rng: np.random.Generator, size: int) -> np.ndarray:
  """(size, size) int16 class map with blobby segments at a per-scene scale (a few to a few dozen segments)."""
  scale = rng.uniform(size / 14, size / 5)
  fields = smooth_field(rng, (len(CLASSES),), size, scale)
  fields += 0.35 * smooth_field(rng, (len(CLASSES),), size, scale / 3)  # rougher boundaries
  bias = np.log(_CLASS_PRIOR * rng.dirichlet(np.ones(len(CLASSES)) * 0.7) + 1e-3)
  return np.argmax(fields + 0.6 * bias[:, None, None], axis=0).astype(np.int16)


def _coarsen(x: np.ndarray, factor: int) -> np.ndarray:
  """Mimics a coarser native resolution: block means repeated back onto the grid."""
  h, w = x.shape
  hp, wp = -(-h // factor) * factor, -(-w // factor) * factor
  xp = np.pad(x, ((0, hp - h), (0, wp - w)), mode="edge")
  blocks = xp.reshape(hp // factor, factor, wp // factor, factor).mean(axis=(1, 3))
  return np.repeat(np.repeat(blocks, factor, 0), factor, 1)[:h, :w]


def synthetic_record(rng: np.random.Generator, size: int = 64, s2_bands: Sequence[str] = bands_lib.S2_L1C_BANDS,
                     with_s1: bool = True, with_s2: bool = True, labels: bool = True, mask: bool = True,
                     record_id: str | None = None) -> dict:
  """One synthetic record dict, ready for `records.encode` / `DatasetWriter.add`."""
  if not (with_s1 or with_s2):
    raise ValueError("synthetic_record: with_s1 and with_s2 are both False; a record needs one modality.")
  s2_bands = tuple(s2_bands)
  lc = land_cover(rng, size)
  texture = smooth_field(rng, (2,), size, rng.uniform(1.0, 3.0))
  rid = record_id or f"{rng.integers(2**48):012x}"
  rec = {"id": rid if rid.startswith("synthetic-") else f"synthetic-{rid}"}
  if with_s2:
    idx = bands_lib.band_indices(bands_lib.S2_L1C_BANDS, s2_bands)
    gain = rng.uniform(0.85, 1.15, size=(len(CLASSES), 1)).astype(np.float32)  # season / illumination
    haze = rng.uniform(0, 250)  # additive, strongest in the blue
    s2 = np.empty((size, size, len(s2_bands)), np.float32)
    base = (_SPECTRA * gain)[lc]  # (H, W, 13)
    for c, b in enumerate(idx):
      band = base[..., b] * (1 + 0.07 * texture[0]) + haze * (443.0 / _WAVELENGTH[b]) ** 2
      res = bands_lib.BANDS[s2_bands[c]].resolution_m
      if res > 10:
        band = _coarsen(band, res // 10)
      s2[..., c] = band + rng.normal(0, 15 + 0.01 * _SPECTRA[:, b].mean(), (size, size))
    rec["s2"] = np.clip(np.rint(s2), 1, 65535).astype(np.uint16)
    rec["s2_bands"] = s2_bands
  if with_s1:
    offset = rng.normal(0, 1.0, size=(len(CLASSES), 2)).astype(np.float32)  # incidence angle / moisture
    db = (_S1_DB + offset)[lc] + 1.5 * texture[1][..., None]
    speckle = rng.gamma(_S1_LOOKS, 1 / _S1_LOOKS, size=db.shape).astype(np.float32)
    s1 = 10 * np.log10(10 ** (db / 10) * speckle)
    rec["s1"] = np.clip(s1, *bands_lib.S1_DB_CLIP).astype(np.float32)
    rec["s1_bands"] = bands_lib.S1_BANDS
  if labels:
    frac = np.bincount(lc.ravel(), minlength=len(CLASSES)) / lc.size
    rec["labels"] = {"synthetic_ml": [int(i) for i in np.flatnonzero(frac >= 0.05)],
                     "synthetic_class": int(np.argmax(frac))}
  if mask:
    rec["mask"] = lc
  rec["meta"] = {"source": "synthetic", "licence": LICENCE, "synthetic": True,
                 "lon": float(rng.uniform(-180, 180)), "lat": float(rng.uniform(-60, 70)),
                 "classes": list(CLASSES)}
  return rec


def write_synthetic_dataset(out_dir: str, n_pairs: int, n_s2_only: int = 0, size: int = 64, num_shards: int = 1,
                            seed: int = 0, *, n_s1_only: int = 0, n_val: int = 0,
                            s2_bands: Sequence[str] = bands_lib.S2_L1C_BANDS, labels: bool = True,
                            mask: bool = True, shard_groups: int = 0) -> dict:
  """Writes a synthetic dataset directory (shards + manifest.json + stats.json) with mmrs.data.writer.DatasetWriter.

  `n_pairs` S1+S2, `n_s2_only`, `n_s1_only` records in split "train", plus `n_val` pairs in split "val".
  Deterministic in `seed`. Returns the manifest.
  """
  from mmrs.data.writer import DatasetWriter  # pylint: disable=g-import-not-at-top  (array_record: only when writing)

  rng = np.random.default_rng(seed)
  plan = ([("train", True, True)] * n_pairs + [("train", False, True)] * n_s2_only
          + [("train", True, False)] * n_s1_only + [("val", True, True)] * n_val)
  args = dict(n_pairs=n_pairs, n_s2_only=n_s2_only, n_s1_only=n_s1_only, n_val=n_val, size=size, seed=seed,
              s2_bands=list(s2_bands))
  label_sets = {k: v for k, v in LABEL_SETS.items() if (mask if v["kind"] == "mask" else labels)}
  with DatasetWriter(out_dir, num_shards=num_shards, source="synthetic", licence=LICENCE,
                     created_by="mmrs.data.synthetic.write_synthetic_dataset", args=args,
                     label_sets=label_sets, shard_groups=shard_groups) as w:
    for i, (split, s1, s2) in enumerate(plan):
      rec = synthetic_record(rng, size, s2_bands, with_s1=s1, with_s2=s2, labels=labels, mask=mask,
                             record_id=f"synthetic-{seed}-{i:07d}")
      w.add(rec, split=split)
    return w.close()


def is_synthetic(record: dict) -> bool:
  meta = record.get("meta") or {}
  return str(record.get("id", "")).startswith("synthetic-") or meta.get("source") == "synthetic"

