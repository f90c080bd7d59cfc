"""Sentinel band registry: names in a fixed order, resolutions, units, and published normalization statistics.

Records store raw values (S2 uint16 reflectance x 1e4, S1 float32 backscatter in dB); the pipeline normalizes
with the `stats.json` computed from the shards. The statistics below are the published defaults used when a
dataset has no `stats.json` of its own (and as a sanity reference); each set names its source.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Band:
  name: str
  resolution_m: int
  unit: str
  wavelength_nm: float | None = None


_S2 = [
    Band("B01", 60, "reflectance x 1e4", 443), Band("B02", 10, "reflectance x 1e4", 490),
    Band("B03", 10, "reflectance x 1e4", 560), Band("B04", 10, "reflectance x 1e4", 665),
    Band("B05", 20, "reflectance x 1e4", 705), Band("B06", 20, "reflectance x 1e4", 740),
    Band("B07", 20, "reflectance x 1e4", 783), Band("B08", 10, "reflectance x 1e4", 842),
    Band("B8A", 20, "reflectance x 1e4", 865), Band("B09", 60, "reflectance x 1e4", 945),
    Band("B10", 60, "reflectance x 1e4", 1375), Band("B11", 20, "reflectance x 1e4", 1610),
    Band("B12", 20, "reflectance x 1e4", 2190),
]
_S1 = [Band("VV", 10, "dB"), Band("VH", 10, "dB")]

BANDS: dict[str, Band] = {b.name: b for b in _S2 + _S1}
S2_L1C_BANDS: tuple[str, ...] = tuple(b.name for b in _S2)  # 13 bands, top of atmosphere
S2_L2A_BANDS: tuple[str, ...] = tuple(n for n in S2_L1C_BANDS if n != "B10")  # 12 bands, bottom of atmosphere
S2_RGB_BANDS: tuple[str, ...] = ("B04", "B03", "B02")
S2_10_20M_BANDS: tuple[str, ...] = tuple(b.name for b in _S2 if b.resolution_m <= 20)  # RS-BYOL's 10 bands
S1_BANDS: tuple[str, ...] = ("VV", "VH")
MODALITY_BANDS = {"s2": S2_L1C_BANDS, "s1": S1_BANDS}

# S1 backscatter (dB) is clipped to this range before standardization; values outside it are speckle / no-data.
S1_DB_CLIP = (-50.0, 30.0)
# Replacement for non-finite / no-data S1 pixels (dB): the noise floor, flagged in the record's `s1_valid`.
S1_NODATA_FILL_DB = -50.0


@dataclasses.dataclass(frozen=True)
class Stats:
  bands: tuple[str, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  source: str

  def for_bands(self, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    idx = band_indices(self.bands, names)
    return np.asarray(self.mean, np.float32)[idx], np.asarray(self.std, np.float32)[idx]


# SSL4EO-S12 (Wang et al. 2022, github.com/zhu-xlab/SSL4EO-S12, its S1/S2 normalization constants, rounded).
SSL4EO_S2_L1C = Stats(
    S2_L1C_BANDS,
    (1612.9, 1397.6, 1322.3, 1373.1, 1561.0, 2108.4, 2390.7, 2318.7, 2581.0, 837.7, 22.0, 2195.2, 1537.4),
    (791.0, 854.3, 878.7, 1144.9, 1127.5, 1164.2, 1276.0, 1249.5, 1345.9, 577.5, 51.2, 1336.6, 1136.3),
    "SSL4EO-S12 S2 L1C (Wang et al. 2022)")
SSL4EO_S1 = Stats(S1_BANDS, (-12.55, -20.19), (5.26, 5.91), "SSL4EO-S12 S1 GRD dB (Wang et al. 2022)")
# BigEarthNet v1 (Sumbul et al.; the per-band constants distributed with bigearthnet-common / BigEarthNet-MM code).
BIGEARTHNET_S2_L2A = Stats(
    S2_L2A_BANDS,
    (340.8, 429.9, 614.2, 590.2, 950.7, 1792.5, 2075.5, 2218.9, 2266.5, 2246.1, 1594.4, 1009.3),
    (554.8, 572.4, 582.9, 675.9, 729.9, 1096.0, 1273.5, 1365.5, 1356.1, 1302.3, 1079.2, 818.9),
    "BigEarthNet-S2 L2A (Sumbul et al. 2019)")
BIGEARTHNET_S1 = Stats(S1_BANDS, (-12.62, -19.29), (5.12, 5.46), "BigEarthNet-S1 dB (Sumbul et al. 2021)")


def s2_bands_for_level(level: str) -> tuple[str, ...]:
  level = level.upper()
  if level == "L1C":
    return S2_L1C_BANDS
  if level == "L2A":
    return S2_L2A_BANDS
  raise ValueError(f"Unknown Sentinel-2 processing level {level!r}: use 'L1C' (13 bands) or 'L2A' (12 bands, no B10).")


def parse_band_list(spec: str | Sequence[str] | None) -> tuple[str, ...] | None:
  """'B02,B03,B04' -> ('B02', 'B03', 'B04'); None/'' -> None. Names are validated against the registry."""
  if spec is None or spec == "" or spec == ():
    return None
  names = tuple(s.strip() for s in spec.split(",")) if isinstance(spec, str) else tuple(spec)
  unknown = [n for n in names if n not in BANDS]
  if unknown:
    raise ValueError(f"Unknown band name(s) {unknown}; known bands: {list(BANDS)}.")
  if len(set(names)) != len(names):
    raise ValueError(f"Band list {list(names)} names a band twice.")
  return names


def band_indices(available: Sequence[str], wanted: Sequence[str]) -> list[int]:
  """Indices into `available` that give `wanted`, in the order of `wanted`; a clear error for missing bands."""
  available = list(available)
  missing = [b for b in wanted if b not in available]
  if missing:
    raise ValueError(f"Band(s) {missing} are not available; the data has {available}. "
                     "Choose bands the data has (e.g. an L2A product has no B10).")
  return [available.index(b) for b in wanted]


def select_bands(array: np.ndarray, available: Sequence[str], wanted: Sequence[str]) -> np.ndarray:
  """Selects/reorders the last (channel) axis of `array` from `available` band names to `wanted`."""
  if array.shape[-1] != len(available):
    raise ValueError(f"Array has {array.shape[-1]} channels but {len(available)} band names {list(available)}.")
  idx = band_indices(available, wanted)
  if idx == list(range(len(available))):
    return array
  return array[..., idx]
