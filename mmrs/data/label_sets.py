"""Label sets of the downstream datasets: class names in index order, their kind, and the source-scheme mappings.

A label set is written into a dataset's manifest.json (`label_sets`: {name: {"kind", "names", ...}}) by the
converter that produced the records; the pipeline and the finetune code resolve label indices through it.
Kinds: "class" (record `labels[name]` = one int), "multi_label" (record `labels[name]` = list of ints),
"mask" (the record's `mask` (H, W) int16 array; -1 = ignore / no data).

Schemes here:
- EuroSAT (Helber et al. 2019): 10 classes, the dataset's folder names in alphabetical order (the usual indices,
  e.g. torchgeo's).
- DFC2020 / simplified IGBP (IEEE GRSS Data Fusion Contest 2020, Yokoya et al.): 10 classes. The contest files
  number them 1..10; we store 0..9 (file value - 1). SEN12MS's 17-class MODIS IGBP maps onto them exactly as the
  contest organisers' baseline does (`IGBP17_TO_DFC10`).
- Sen1Floods11 (Bonafilia et al. 2020): LabelHand values 0 = not water, 1 = water, -1 = no data (ignore).
"""
from __future__ import annotations

import dataclasses

import numpy as np

KINDS = ("class", "multi_label", "mask")
IGNORE_INDEX = -1


@dataclasses.dataclass(frozen=True)
class LabelSet:
  name: str
  kind: str
  names: tuple[str, ...]
  source: str = ""

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Label set {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}.")

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def to_manifest(self) -> dict:
    out = {"kind": self.kind, "names": list(self.names), "num_classes": self.num_classes, "source": self.source}
    if self.kind == "mask":
      out["ignore_index"] = IGNORE_INDEX
    return out


EUROSAT_CLASSES = ("AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake")

# Simplified IGBP / DFC2020 classes, index = DFC2020 file value - 1.
DFC10_CLASSES = ("Forest", "Shrubland", "Savanna", "Grassland", "Wetlands", "Croplands", "Urban/Built-up",
                 "Snow/Ice", "Barren", "Water")

# MODIS IGBP (SEN12MS `lc_*` band 1), index = file value - 1.
IGBP17_CLASSES = (
    "Evergreen Needleleaf Forests", "Evergreen Broadleaf Forests", "Deciduous Needleleaf Forests",
    "Deciduous Broadleaf Forests", "Mixed Forests", "Closed Shrublands", "Open Shrublands", "Woody Savannas",
    "Savannas", "Grasslands", "Permanent Wetlands", "Croplands", "Urban and Built-up Lands",
    "Cropland/Natural Vegetation Mosaics", "Permanent Snow and Ice", "Barren", "Water Bodies")

# IGBP file value (0..17; 0 is unused = no data) -> DFC10 index (0..9) or -1. Forests 1-5 -> Forest; shrublands
# 6-7 -> Shrubland; (woody) savannas 8-9 -> Savanna; 10 Grassland; 11 Wetlands; 12 Croplands and 14 cropland/natural
# mosaic -> Croplands; 13 Urban; 15 Snow/Ice; 16 Barren; 17 Water (the DFC2020 baseline's IGBP->DFC table).
IGBP17_TO_DFC10 = np.array([-1, 0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 4, 5, 6, 5, 7, 8, 9], np.int16)

SEN1FLOODS11_CLASSES = ("not water", "water")

EUROSAT = LabelSet("eurosat", "class", EUROSAT_CLASSES, "EuroSAT-MS (Helber et al. 2019), folder names")
SEN1FLOODS11 = LabelSet("sen1floods11", "mask", SEN1FLOODS11_CLASSES,
                        "Sen1Floods11 LabelHand (Bonafilia et al. 2020); -1 = no data")
SEN12MS_SCENE = LabelSet("sen12ms", "class", DFC10_CLASSES,
                         "SEN12MS IGBP mapped to the 10 simplified classes; majority class of the patch")
SEN12MS_MULTI = LabelSet("sen12ms_multi", "multi_label", DFC10_CLASSES,
                         "SEN12MS IGBP mapped to the 10 simplified classes; classes covering >= a fraction")
SEN12MS_MASK = LabelSet("sen12ms_lc", "mask", DFC10_CLASSES,
                        "SEN12MS MODIS IGBP land cover (500 m, on the 10 m grid) mapped to the 10 simplified classes")
DFC2020 = LabelSet("dfc2020", "mask", DFC10_CLASSES, "IEEE GRSS DFC2020 labels (file value 1..10 -> 0..9)")

REGISTRY: dict[str, LabelSet] = {s.name: s for s in (EUROSAT, SEN1FLOODS11, SEN12MS_SCENE, SEN12MS_MULTI,
                                                     SEN12MS_MASK, DFC2020)}


def get(name: str) -> LabelSet:
  if name not in REGISTRY:
    raise KeyError(f"Unknown label set {name!r}; known: {sorted(REGISTRY)} (mmrs/data/label_sets.py).")
  return REGISTRY[name]


def manifest_entry(*sets: LabelSet) -> dict:
  """{name: manifest dict} for DatasetWriter(label_sets=...)."""
  return {s.name: s.to_manifest() for s in sets}


def igbp_to_dfc10(igbp: np.ndarray) -> np.ndarray:
  """MODIS IGBP values (1..17) -> simplified 10-class indices (0..9) as int16; anything else -> -1."""
  v = np.asarray(igbp).astype(np.int64)
  ok = (v >= 0) & (v < len(IGBP17_TO_DFC10))
  return np.where(ok, IGBP17_TO_DFC10[np.where(ok, v, 0)], IGNORE_INDEX).astype(np.int16)


def dfc_to_index(dfc: np.ndarray) -> np.ndarray:
  """DFC2020 label values (1..10) -> 0..9 as int16; anything else (0, 255, ...) -> -1."""
  v = np.asarray(dfc).astype(np.int64)
  return np.where((v >= 1) & (v <= len(DFC10_CLASSES)), v - 1, IGNORE_INDEX).astype(np.int16)


def class_fractions(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Fraction of the labelled (>= 0) pixels in each class; all zeros when nothing is labelled."""
  m = np.asarray(mask).reshape(-1)
  m = m[m >= 0]
  if not m.size:
    return np.zeros(num_classes, np.float64)
  return np.bincount(m, minlength=num_classes)[:num_classes] / m.size
