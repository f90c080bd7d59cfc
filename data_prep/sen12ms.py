"""SEN12MS and DFC2020 -> mmrs shards: S1 + S2 + land-cover mask per 256 x 256 patch (+ SEN12MS scene labels).

    python -m data_prep.sen12ms --dataset=sen12ms|dfc2020 --src=DIR --out=DIR [--splits_dir=auto|none|DIR]
        [--split=train] [--multi_label_min_fraction=0.1] [--num_shards=N] [--shard_groups=G]
        [--on_bad=fail|skip] [--workers=N]

Expected layout (SEN12MS from mediaTUM 1474000, Schmitt et al. 2019; DFC2020 from the contest, Yokoya et al.;
the folders may sit anywhere under --src, files are found by name):

    ROIs1158_spring/s1_<scene>/ROIs1158_spring_s1_<scene>_p<patch>.tif   2 bands VV, VH, float32 dB
    ROIs1158_spring/s2_<scene>/ROIs1158_spring_s2_<scene>_p<patch>.tif   13 bands L1C (B1..B8, B8A, B9..B12), uint16
    ROIs1158_spring/lc_<scene>/ROIs1158_spring_lc_<scene>_p<patch>.tif   4 bands: IGBP, LCCS-LC, LCCS-LU, LCCS-SH
      (seasons ROIs1158_spring, ROIs1868_summer, ROIs1970_fall, ROIs2017_winter)
    ROIs0000_validation/{s1,s2,lc,dfc}_0/ROIs0000_validation_{s1,s2,lc,dfc}_0_p<patch>.tif   DFC2020 validation
    ROIs0000_test/{s1,s2,lc,dfc}_0/ROIs0000_test_{s1,s2,lc,dfc}_0_p<patch>.tif                DFC2020 test
      (some copies name the folders s1_validation, ... — only file names matter); `dfc_*`: 1 band, classes 1..10

--dataset=sen12ms reads the ROIs of SEN12MS (every ROIs* except ROIs0000_*, which are DFC2020's); the label is
band 1 of `lc_*` (MODIS IGBP, 17 classes) mapped to the 10 simplified IGBP / DFC2020 classes
(`mmrs.data.label_sets.IGBP17_TO_DFC10`). Records carry the mask (label set "sen12ms_lc"), the scene label of the
patch = its majority class ("sen12ms", as the SEN12MS scene-classification work derives single labels), and the
classes covering >= --multi_label_min_fraction of it ("sen12ms_multi", 0.1 there too); meta.class_fractions has all.
--dataset=dfc2020 reads ROIs0000_*; the mask is the `dfc_*` label (1..10 -> 0..9, anything else -> -1), label set
"dfc2020". (RS-BYOL evaluates on 8 classes without Savanna and Snow/Ice: a finetune-time remapping.)

Splits: DFC2020 by folder (ROIs0000_validation -> val, ROIs0000_test -> test). SEN12MS: the scene-classification
split lists when found (`--splits_dir=auto` looks in <src> and <src>/splits for {train,val,test}_list.pkl or .txt,
lists of S2 patch file names; a patch in no list goes to split `unlisted`), else `--split` (a name, or
hash:0.8,0.1,0.1 by scene, so the neighbouring patches of one scene never straddle splits).
A patch needs all three files (S2, S1, label); a missing one is bad input naming the patch. S1 with more than half
no-data is dropped from its record (kept S2-only, meta.s1_dropped); S1 NaN/inf are cleaned + flagged.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
from absl import flags

from launch import cli

from data_prep import chip_io, splitting
from data_prep import convert as convert_lib
from data_prep.convert import BadInput
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import label_sets

DATASETS = {
    "sen12ms": dict(source="SEN12MS (Schmitt et al. 2019), https://mediatum.ub.tum.de/1474000",
                    licence="CC-BY-4.0", label_kind="lc",
                    label_sets=(label_sets.SEN12MS_SCENE, label_sets.SEN12MS_MULTI, label_sets.SEN12MS_MASK)),
    "dfc2020": dict(source="IEEE GRSS Data Fusion Contest 2020 (Yokoya et al.), "
                           "https://ieee-dataport.org/competitions/2020-ieee-grss-data-fusion-contest",
                    licence="CC-BY-4.0", label_kind="dfc", label_sets=(label_sets.DFC2020,)),
}
DFC_SPLITS = {"ROIs0000_validation": "val", "ROIs0000_test": "test"}
SPLIT_LISTS = ("train", "val", "test")
_FILE = re.compile(r"^(?P<roi>ROIs\d{4}_[A-Za-z]+)_(?P<kind>s1|s2|lc|dfc)_(?P<scene>[A-Za-z0-9]+)_p(?P<patch>\d+)"
                   r"\.tif$")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # <roi>_<scene>_p<patch>, e.g. ROIs1158_spring_1_p30
  dataset: str
  roi: str
  scene: str
  patch: int
  s2: str | None
  s1: str | None
  label: str | None
  splits: tuple[str, ...]
  min_fraction: float = 0.1


def parse_name(file_name: str) -> tuple[str, str, str, int] | None:
  """'ROIs1158_spring_s2_1_p30.tif' -> ('ROIs1158_spring', 's2', '1', 30); None for other files."""
  m = _FILE.match(os.path.basename(file_name.strip()))
  return (m["roi"], m["kind"], m["scene"], int(m["patch"])) if m else None


def scan(src: str) -> dict[tuple[str, str, int], dict[str, str]]:
  """(roi, scene, patch) -> {kind: path} for every SEN12MS/DFC2020 GeoTIFF under src."""
  found: dict[tuple[str, str, int], dict[str, str]] = {}
  for root, dirs, files in os.walk(src):
    dirs.sort()
    for f in sorted(files):
      p = parse_name(f)
      if p is None:
        continue
      roi, kind, scene, patch = p
      entry = found.setdefault((roi, scene, patch), {})
      if kind in entry:
        raise ValueError(f"{f} is found twice under {src}: {entry[kind]} and {os.path.join(root, f)}; "
                         "keep one copy.")
      entry[kind] = os.path.join(root, f)
  return found


def find_split_lists(src: str) -> str | None:
  for cand in (src, os.path.join(src, "splits")):
    if any(os.path.exists(os.path.join(cand, f"{s}_list{ext}")) for s in SPLIT_LISTS for ext in (".pkl", ".txt")):
      return cand
  return None


def _read_split_lists(splits_dir: str) -> dict[tuple[str, str, int], list[str]]:
  listed: dict[tuple[str, str, int], list[str]] = {}
  for split in SPLIT_LISTS:
    for ext in (".pkl", ".txt"):
      path = os.path.join(splits_dir, f"{split}_list{ext}")
      if os.path.exists(path):
        for name in splitting.load_name_list(path):
          p = parse_name(name)
          if p is None:
            raise ValueError(f"{path}: {name!r} is not a SEN12MS patch file name "
                             "(ROIs<n>_<season>_s2_<scene>_p<n>.tif)")
          key = (p[0], p[2], p[3])
          if split not in listed.setdefault(key, []):
            listed[key].append(split)
        break
  return listed


def list_items(src: str, *, dataset: str = "sen12ms", splits_dir: str = "auto", split: str = "train",
               min_fraction: float = 0.1) -> tuple[list[Item], dict]:
  if dataset not in DATASETS:
    raise ValueError(f"--dataset={dataset!r}: use one of {sorted(DATASETS)}.")
  if not os.path.isdir(src):
    raise ValueError(f"--src={src} is not a directory.")
  label_kind = DATASETS[dataset]["label_kind"]
  dfc = dataset == "dfc2020"
  found = {k: v for k, v in scan(src).items() if k[0].startswith("ROIs0000") == dfc}
  spec = convert_lib.parse_split_spec(split)
  summary: dict = {"splits_dir": None, "unlisted": 0}
  listed = None
  if not dfc:
    splits_dir = convert_lib.resolve_splits_dir(splits_dir, lambda: find_split_lists(src),
                                                "{train,val,test}_list.pkl")
    if splits_dir:
      listed = _read_split_lists(splits_dir)
      summary["splits_dir"] = splits_dir
  items = []
  for (roi, scene, patch), files in sorted(found.items(), key=lambda kv: (kv[0][0], len(kv[0][1]), kv[0])):
    if dfc:
      splits = (DFC_SPLITS.get(roi) or convert_lib.split_of(f"{roi}_{scene}", spec),)
    elif listed is not None:
      splits = tuple(listed.get((roi, scene, patch), ["unlisted"]))
      summary["unlisted"] += splits == ("unlisted",)
    else:
      splits = (convert_lib.split_of(f"{roi}_{scene}", spec),)
    items.append(Item(f"{roi}_{scene}_p{patch}", dataset, roi, scene, patch, files.get("s2"), files.get("s1"),
                      files.get(label_kind), splits, min_fraction))
  return items, summary


def build(item: Item) -> list[tuple[str, dict]]:
  label_kind = DATASETS[item.dataset]["label_kind"]
  for kind, path in (("s2", item.s2), ("s1", item.s1), (label_kind, item.label)):
    if path is None:
      raise BadInput(f"patch {item.name} has no {kind} file ({item.roi}_{kind}_{item.scene}_p{item.patch}.tif)")
  s2, info = chip_io.read_s2(item.s2, bands_lib.S2_L1C_BANDS, bands_lib.S2_L1C_BANDS)
  size = s2.shape[:2]
  raw, _ = chip_io.read_s1_db(item.s1, size)
  s1, valid, dropped = chip_io.clean_s1(raw, item.s1)
  lc, _ = chip_io.read_mask(item.label, size)
  meta = dict(dataset=item.dataset, roi=item.roi, season=item.roi.split("_", 1)[1], scene=item.scene,
              patch=item.patch, splits=list(item.splits), source=DATASETS[item.dataset]["source"],
              licence=DATASETS[item.dataset]["licence"], **chip_io.geo_meta(info))
  labels = {}
  if item.dataset == "sen12ms":
    mask = label_sets.igbp_to_dfc10(lc)
    fractions = label_sets.class_fractions(mask, len(label_sets.DFC10_CLASSES))
    if not fractions.any():
      raise BadInput(f"{item.label}: no pixel has an IGBP class 1..17, so the patch has no label")
    labels = {"sen12ms": int(np.argmax(fractions)),
              "sen12ms_multi": [int(i) for i in np.flatnonzero(fractions >= item.min_fraction)]}
    meta["class_fractions"] = [round(float(f), 6) for f in fractions]
  else:
    mask = label_sets.dfc_to_index(lc)
  record = dict(id=item.name, s2=s2, s2_bands=bands_lib.S2_L1C_BANDS, mask=mask, labels=labels, meta=meta)
  chip_io.attach_s1(record, s1, valid, dropped)
  return [(split, record) for split in item.splits]


def convert(src: str, out: str, *, dataset: str = "sen12ms", splits_dir: str = "auto", split: str = "train",
            min_fraction: float = 0.1, num_shards: int = 4, on_bad: str = "fail", workers: int = 0,
            shard_groups: int = 0) -> dict:
  """Converts SEN12MS or DFC2020 patches; returns the manifest."""
  if not 0.0 < min_fraction <= 1.0:
    raise ValueError(f"--multi_label_min_fraction={min_fraction}: give a fraction in (0, 1].")
  items, summary = list_items(src, dataset=dataset, splits_dir=splits_dir, split=split, min_fraction=min_fraction)
  if not items:
    raise ValueError(f"No {dataset} patches (ROIs*_s2_<scene>_p<n>.tif and friends"
                     f"{', ROIs0000_* only' if dataset == 'dfc2020' else ', ROIs0000_* excluded'}) under {src}.")
  d = DATASETS[dataset]
  args = dict(src=os.path.abspath(src), dataset=dataset, splits_dir=summary["splits_dir"], split=split,
              multi_label_min_fraction=min_fraction, num_shards=num_shards, on_bad=on_bad)
  counts = {"s1_dropped": 0}
  writer = DatasetWriter(out, num_shards=num_shards, source=d["source"], licence=d["licence"],
                         created_by="data_prep.sen12ms", args=args,
                         label_sets=label_sets.manifest_entry(*d["label_sets"]), extra={"split_lists": summary},
                         extra_counts=counts, shard_groups=shard_groups)
  return convert_lib.run(items, build, writer, on_bad=on_bad, workers=workers, desc=dataset,
                         on_record=lambda _, rec: chip_io.count_s1_dropped(counts, rec))


def _define_flags():
  convert_lib.define_common_flags()
  flags.DEFINE_enum("dataset", "sen12ms", sorted(DATASETS), "Which dataset to read from --src.")
  flags.DEFINE_string("src", None, "Folder holding the ROIs* season folders (SEN12MS) or ROIs0000_* (DFC2020).")
  flags.DEFINE_string("splits_dir", "auto", "SEN12MS: folder with {train,val,test}_list.pkl/.txt; auto = look in "
                      "--src and --src/splits; none = ignore them and use --split.")
  flags.DEFINE_string("split", "train", "Without split lists: a split name, or hash:0.8,0.1,0.1 by scene.")
  flags.DEFINE_float("multi_label_min_fraction", 0.1, "SEN12MS multi-label: classes covering at least this "
                     "fraction of the patch.")
  flags.mark_flag_as_required("src")


def main(argv):
  del argv
  f = flags.FLAGS
  convert_lib.run_cli("sen12ms", "convert", src=f.src, out=f.out, dataset=f.dataset, splits_dir=f.splits_dir,
                      split=f.split, min_fraction=f.multi_label_min_fraction, num_shards=f.num_shards,
                      on_bad=f.on_bad, workers=f.workers)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
