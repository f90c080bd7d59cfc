"""BigEarthNet label nomenclatures: the 43 CORINE Land Cover level-3 classes of BigEarthNet v1 and the 19-class
nomenclature of Sumbul et al. 2020 ("BigEarthNet-MM: A large-scale multi-modal multi-label benchmark archive").

Order and mapping are those of the official `label_indices.json` (keys `original_labels`, `BigEarthNet-19_labels`,
`label_conversion`) distributed with the BigEarthNet-19 models (git.tu-berlin.de/rsim); the `bigearthnet-common`
package's `OLD2NEW_LABELS_DICT` is the same mapping by name. Eleven of the 43 classes map to none of the 19 (they
were dropped as too rare or not recognisable from a single image): see `CORINE43_UNMAPPED`. A patch whose labels are
all among them has an empty 19-class label set (57 such patches in BigEarthNet v1).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

CORINE43_NAMES: tuple[str, ...] = (
    "Continuous urban fabric",  # 0
    "Discontinuous urban fabric",  # 1
    "Industrial or commercial units",  # 2
    "Road and rail networks and associated land",  # 3
    "Port areas",  # 4
    "Airports",  # 5
    "Mineral extraction sites",  # 6
    "Dump sites",  # 7
    "Construction sites",  # 8
    "Green urban areas",  # 9
    "Sport and leisure facilities",  # 10
    "Non-irrigated arable land",  # 11
    "Permanently irrigated land",  # 12
    "Rice fields",  # 13
    "Vineyards",  # 14
    "Fruit trees and berry plantations",  # 15
    "Olive groves",  # 16
    "Pastures",  # 17
    "Annual crops associated with permanent crops",  # 18
    "Complex cultivation patterns",  # 19
    "Land principally occupied by agriculture, with significant areas of natural vegetation",  # 20
    "Agro-forestry areas",  # 21
    "Broad-leaved forest",  # 22
    "Coniferous forest",  # 23
    "Mixed forest",  # 24
    "Natural grassland",  # 25
    "Moors and heathland",  # 26
    "Sclerophyllous vegetation",  # 27
    "Transitional woodland/shrub",  # 28
    "Beaches, dunes, sands",  # 29
    "Bare rock",  # 30
    "Sparsely vegetated areas",  # 31
    "Burnt areas",  # 32
    "Inland marshes",  # 33
    "Peatbogs",  # 34
    "Salt marshes",  # 35
    "Salines",  # 36
    "Intertidal flats",  # 37
    "Water courses",  # 38
    "Water bodies",  # 39
    "Coastal lagoons",  # 40
    "Estuaries",  # 41
    "Sea and ocean",  # 42
)

BEN19_NAMES: tuple[str, ...] = (
    "Urban fabric",  # 0
    "Industrial or commercial units",  # 1
    "Arable land",  # 2
    "Permanent crops",  # 3
    "Pastures",  # 4
    "Complex cultivation patterns",  # 5
    "Land principally occupied by agriculture, with significant areas of natural vegetation",  # 6
    "Agro-forestry areas",  # 7
    "Broad-leaved forest",  # 8
    "Coniferous forest",  # 9
    "Mixed forest",  # 10
    "Natural grassland and sparsely vegetated areas",  # 11
    "Moors, heathland and sclerophyllous vegetation",  # 12
    "Transitional woodland, shrub",  # 13
    "Beaches, dunes, sands",  # 14
    "Inland wetlands",  # 15
    "Coastal wetlands",  # 16
    "Inland waters",  # 17
    "Marine waters",  # 18
)

# label_conversion: for each of the 19 classes, the 43-class indices it merges.
BEN19_FROM_CORINE43: tuple[tuple[int, ...], ...] = (
    (0, 1),  # Urban fabric <- Continuous + Discontinuous urban fabric
    (2,),  # Industrial or commercial units
    (11, 12, 13),  # Arable land <- Non-irrigated arable, Permanently irrigated, Rice fields
    (14, 15, 16, 18),  # Permanent crops <- Vineyards, Fruit trees.., Olive groves, Annual crops w/ permanent crops
    (17,),  # Pastures
    (19,),  # Complex cultivation patterns
    (20,),  # Land principally occupied by agriculture, ...
    (21,),  # Agro-forestry areas
    (22,),  # Broad-leaved forest
    (23,),  # Coniferous forest
    (24,),  # Mixed forest
    (25, 31),  # Natural grassland and sparsely vegetated areas
    (26, 27),  # Moors, heathland and sclerophyllous vegetation
    (28,),  # Transitional woodland, shrub
    (29,),  # Beaches, dunes, sands
    (33, 34),  # Inland wetlands <- Inland marshes, Peatbogs
    (35, 36),  # Coastal wetlands <- Salt marshes, Salines
    (38, 39),  # Inland waters <- Water courses, Water bodies
    (40, 41, 42),  # Marine waters <- Coastal lagoons, Estuaries, Sea and ocean
)

# 43-class index -> 19-class index, or None for the classes the 19-class nomenclature drops.
CORINE43_TO_BEN19: tuple[int | None, ...] = tuple(
    next((new for new, olds in enumerate(BEN19_FROM_CORINE43) if old in olds), None) for old in range(43))
CORINE43_UNMAPPED: tuple[str, ...] = tuple(n for n, m in zip(CORINE43_NAMES, CORINE43_TO_BEN19) if m is None)

_CORINE43_INDEX = {n: i for i, n in enumerate(CORINE43_NAMES)}

# The manifest's `label_sets` entry for datasets with these labels (same keys as mmrs.data.label_sets).
LABEL_SETS = {
    "corine43": {"kind": "multi_label", "names": list(CORINE43_NAMES), "num_classes": 43,
                 "source": "BigEarthNet v1 CORINE Land Cover 2018 level-3 classes (Sumbul et al. 2019)"},
    "ben19": {"kind": "multi_label", "names": list(BEN19_NAMES), "num_classes": 19,
              "source": "BigEarthNet 19-class nomenclature (Sumbul et al. 2020), from the 43 classes"},
}


# BigEarthNet v2.0 (reBEN) ships the 19-class names directly in metadata.parquet; it has no 43-class labels.
LABEL_SETS_V2 = {
    "ben19": {"kind": "multi_label", "names": list(BEN19_NAMES), "num_classes": 19,
              "source": "BigEarthNet v2.0 (reBEN, Clasen et al. 2024) 19-class labels from metadata.parquet"},
}
_BEN19_INDEX = {n: i for i, n in enumerate(BEN19_NAMES)}


def ben19_indices(names: Iterable[str]) -> list[int]:
  """19-class names (as in reBEN's metadata.parquet `labels`) -> sorted unique indices into BEN19_NAMES."""
  out = set()
  for n in names:
    if n not in _BEN19_INDEX:
      raise ValueError(f"Unknown BigEarthNet 19-class label {n!r}; expected one of "
                       "mmrs.data.bigearthnet_labels.BEN19_NAMES.")
    out.add(_BEN19_INDEX[n])
  return sorted(out)


def corine43_indices(names: Iterable[str]) -> list[int]:
  """Class names as written in BigEarthNet's labels_metadata.json -> sorted unique 43-class indices."""
  out = set()
  for n in names:
    if n not in _CORINE43_INDEX:
      raise ValueError(f"Unknown BigEarthNet CORINE label {n!r}; expected one of the 43 level-3 names "
                       "in mmrs.data.bigearthnet_labels.CORINE43_NAMES.")
    out.add(_CORINE43_INDEX[n])
  return sorted(out)


def to_ben19(corine43: Iterable[int]) -> list[int]:
  """43-class indices -> sorted unique 19-class indices (classes without a 19-class counterpart are dropped)."""
  return sorted({CORINE43_TO_BEN19[i] for i in corine43} - {None})


def labels_from_names(names: Iterable[str]) -> dict[str, list[int]]:
  """{"corine43": [...], "ben19": [...]} for a record, from the label names of a BigEarthNet patch."""
  c43 = corine43_indices(names)
  return {"corine43": c43, "ben19": to_ben19(c43)}


def multi_hot(indices: Sequence[int], num_classes: int) -> np.ndarray:
  """Class indices -> (num_classes,) float32 multi-hot vector (the target of multi-label classification)."""
  out = np.zeros(num_classes, np.float32)
  out[list(indices)] = 1.0
  return out
