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


# Published statistics, each set exactly as its source publishes it (one source per set, no mixing of releases).
# SSL4EO-S12 (Wang et al. 2022): github.com/zhu-xlab/SSL4EO-S12, src/benchmark/pretrain_ssl/datasets/SSL4EO/
# ssl4eo_dataset.py, S2C_MEAN/S2C_STD (L1C), S2A_MEAN/S2A_STD (L2A), S1_MEAN/S1_STD ("calculated from 50k data"),
# the statistics its pretraining loader normalizes with. (src/download_data/convert_rgb.py of the same repository
# holds an earlier, rounded set, e.g. S1 VV -12.59: not used here.)
SSL4EO_S2_L1C = Stats(
    S2_L1C_BANDS,
    (1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991, 2091.74883118, 2371.7172463,
     2299.90463006, 2560.29504086, 830.06605044, 22.10351321, 2177.07172323, 1524.06546312),
    (786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652, 1161.59187054, 1274.39184232,
     1248.42891965, 1345.52684884, 577.31607053, 51.15431158, 1336.09932639, 1136.53823676),
    "SSL4EO-S12 S2 L1C (Wang et al. 2022; zhu-xlab/SSL4EO-S12 ssl4eo_dataset.py S2C_MEAN/S2C_STD)")
SSL4EO_S2_L2A = Stats(
    S2_L2A_BANDS,
    (752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062, 2194.6423161, 2422.21248945,
     2517.76053101, 2581.64687018, 2645.51888987, 2368.51236873, 1805.06846033),
    (1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037, 1355.55390699, 1416.51487101,
     1474.78900051, 1439.3086061, 1582.28010962, 1455.52084939, 1343.48379601),
    "SSL4EO-S12 S2 L2A (Wang et al. 2022; zhu-xlab/SSL4EO-S12 ssl4eo_dataset.py S2A_MEAN/S2A_STD)")
SSL4EO_S1 = Stats(S1_BANDS, (-12.54847273, -20.19237134), (5.25697717, 5.91150917),
                  "SSL4EO-S12 S1 GRD dB (Wang et al. 2022; zhu-xlab/SSL4EO-S12 ssl4eo_dataset.py S1_MEAN/S1_STD)")
# BigEarthNet v1 (Sumbul et al. 2019/2021): the per-band constants of bigearthnet-common's BAND_STATS (the
# BigEarthNet-S2 "bands10/20/60_mean/std" of the official BigEarthNet models), over BigEarthNet-MM.
BIGEARTHNET_S2_L2A = Stats(
    S2_L2A_BANDS,
    (340.76769064, 429.9430203, 614.21682446, 590.23569706, 950.68368468, 1792.46290469, 2075.46795189,
     2218.94553375, 2266.46036911, 2246.0605464, 1594.42694882, 1009.32729131),
    (554.81258967, 572.41639287, 582.87945694, 675.88746967, 729.89827633, 1096.01480586, 1273.45393088,
     1365.45589904, 1356.13789355, 1302.3292881, 1079.19066363, 818.86747235),
    "BigEarthNet-S2 v1 L2A (Sumbul et al. 2019; bigearthnet-common BAND_STATS)")
BIGEARTHNET_S1 = Stats(S1_BANDS, (-12.619993741972035, -19.29044597721542), (5.115911777546365, 5.464428464912864),
                       "BigEarthNet-S1 v1 dB (Sumbul et al. 2021; bigearthnet-common BAND_STATS)")
# BigEarthNet v2.0 (reBEN, Clasen et al. 2024): ConfigILM configilm/extra/BENv2_utils.py means/stds
# ["120_nearest"] (official train split, 20/60 m bands upsampled to 120 px by nearest neighbour, as here).
BIGEARTHNET_V2_S2_L2A = Stats(
    S2_L2A_BANDS,
    (361.0767822265625, 438.3720703125, 614.0556640625, 588.4096069335938, 942.8433227539062, 1769.931640625,
     2049.551513671875, 2193.2919921875, 2235.556640625, 2241.455322265625, 1568.226806640625, 997.7324829101562),
    (575.0687255859375, 607.02685546875, 603.2968139648438, 684.56884765625, 738.4326782226562, 1100.4560546875,
     1275.805419921875, 1369.3717041015625, 1356.5440673828125, 1316.393310546875, 1070.1612548828125,
     813.5276489257812),
    "BigEarthNet v2.0 S2 L2A (Clasen et al. 2024; ConfigILM BENv2_utils 120_nearest)")

# Which published set `Normalizer.from_published` uses: (family, modality, processing level) -> Stats.
PUBLISHED = {
    ("ssl4eo", "s2", "L1C"): SSL4EO_S2_L1C, ("ssl4eo", "s2", "L2A"): SSL4EO_S2_L2A, ("ssl4eo", "s1", None): SSL4EO_S1,
    ("bigearthnet", "s2", "L2A"): BIGEARTHNET_S2_L2A, ("bigearthnet", "s1", None): BIGEARTHNET_S1,
    ("bigearthnet_v2", "s2", "L2A"): BIGEARTHNET_V2_S2_L2A, ("bigearthnet_v2", "s1", None): BIGEARTHNET_S1,
}


def s2_level_of(stored_bands: Sequence[str]) -> str:
  """Processing level of S2 data from the bands it stores: L1C has B10 (cirrus, top of atmosphere); L2A products
  drop it. Pass the bands a dataset *stores*, not a selection of them."""
  return "L1C" if "B10" in stored_bands else "L2A"


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
