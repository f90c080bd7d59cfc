"""EuroSAT-MS (13-band Sentinel-2 L1C) -> mmrs shards: S2-only records with a class label.

    python -m data_prep.eurosat --src=DIR --out=DIR [--splits_dir=auto|none|DIR] [--split=train]
        [--image_size=64] [--num_shards=N] [--shard_groups=G] [--on_bad=fail|skip] [--workers=N]

Expected layout (EuroSATallBands.zip / EuroSAT_MS.zip, Helber et al. 2019; --src may be the folder holding the
class folders, or the extracted archive root with `ds/images/remote_sensing/otherDatasets/sentinel_2/tif/` or
`EuroSAT_MS/` inside):

    <ClassName>/<ClassName>_<n>.tif     64 x 64, 13 bands uint16, band order B01..B12 then B8A (the file order,
                                        phelber/EuroSAT#7; reordered here to the `mmrs.bands` order)
    classes: AnnualCrop Forest HerbaceousVegetation Highway Industrial Pasture PermanentCrop Residential River SeaLake

Labels: label set "eurosat" (kind class), index = position of the folder name in that alphabetical list. Other
folders are ignored (listed in the manifest's `eurosat.ignored_folders`); a class folder missing is reported there too.
Splits: the train/val/test lists of Neumann et al. (torchgeo's `eurosat-{train,val,test}.txt`, names with .jpg or
.tif; `--splits_dir=auto` looks in <src> and <src>/splits for `eurosat-<split>.txt` or `<split>.txt`; an image in no
list goes to split `unlisted`), else `--split` (a name, or hash:0.8,0.1,0.1 by image id).
Bad input (wrong band count, grid other than --image_size, all-zero image, unreadable file) names the file.
"""
from __future__ import annotations

import dataclasses
import os

from absl import flags

from launch import cli

from data_prep import chip_io, splitting
from data_prep import convert as convert_lib
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import label_sets

SOURCE = "EuroSAT-MS (Helber et al. 2019), https://github.com/phelber/EuroSAT"
LICENCE = "MIT"
FILE_BANDS = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B09", "B10", "B11", "B12", "B8A")
NESTED_ROOTS = (os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif"), "EuroSAT_MS",
                "EuroSATallBands")
SPLITS = ("train", "val", "test")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # the image id, e.g. AnnualCrop_1
  path: str
  label: int
  splits: tuple[str, ...]
  image_size: int = 64


def image_root(src: str) -> str:
  for cand in (src, *(os.path.join(src, n) for n in NESTED_ROOTS)):
    if os.path.isdir(cand) and any(os.path.isdir(os.path.join(cand, c)) for c in label_sets.EUROSAT_CLASSES):
      return cand
  raise ValueError(f"No EuroSAT class folder ({', '.join(label_sets.EUROSAT_CLASSES)}) under {src} or its "
                   f"{', '.join(NESTED_ROOTS)} subfolders: is --src the extracted EuroSAT-MS archive?")


def find_split_lists(src: str) -> str | None:
  for cand in (src, os.path.join(src, "splits")):
    if any(os.path.exists(p) for s in SPLITS for p in _list_paths(cand, s)):
      return cand
  return None


def _list_paths(folder: str, split: str) -> tuple[str, str]:
  return os.path.join(folder, f"eurosat-{split}.txt"), os.path.join(folder, f"{split}.txt")


def _order(file_name: str):
  tail = splitting.stem(file_name).rsplit("_", 1)[-1]
  return (int(tail) if tail.isdigit() else -1, file_name)


def list_items(src: str, *, splits_dir: str = "auto", split: str = "train",
               image_size: int = 64) -> tuple[list[Item], dict]:
  root = image_root(src)
  summary = {"image_root": root, "ignored_folders": [], "missing_classes": [], "splits_dir": None, "unlisted": 0}
  summary["ignored_folders"] = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                                      and d not in label_sets.EUROSAT_CLASSES)
  splits_dir = convert_lib.resolve_splits_dir(splits_dir, lambda: find_split_lists(src),
                                              "eurosat-{train,val,test}.txt")
  listed: dict[str, list[str]] | None = None
  if splits_dir:
    summary["splits_dir"] = splits_dir
    listed = {}
    for s in SPLITS:
      path = next((p for p in _list_paths(splits_dir, s) if os.path.exists(p)), None)
      for name in splitting.load_name_list(path) if path else ():
        if s not in listed.setdefault(splitting.stem(name), []):
          listed[splitting.stem(name)].append(s)
  spec = convert_lib.parse_split_spec(split)
  items = []
  for label, cls in enumerate(label_sets.EUROSAT_CLASSES):
    folder = os.path.join(root, cls)
    if not os.path.isdir(folder):
      summary["missing_classes"].append(cls)
      continue
    for f in sorted((f for f in os.listdir(folder) if f.lower().endswith((".tif", ".tiff"))), key=_order):
      rid = splitting.stem(f)
      if listed is None:
        splits = (convert_lib.split_of(rid, spec),)
      else:
        splits = tuple(listed.get(rid, ["unlisted"]))
        summary["unlisted"] += splits == ("unlisted",)
      items.append(Item(rid, os.path.join(folder, f), label, splits, image_size))
  return items, summary


def build(item: Item) -> list[tuple[str, dict]]:
  size = (item.image_size, item.image_size) if item.image_size else None
  s2, info = chip_io.read_s2(item.path, FILE_BANDS, bands_lib.S2_L1C_BANDS, size)
  cls = label_sets.EUROSAT_CLASSES[item.label]
  meta = dict(dataset="EuroSAT-MS", class_name=cls, file=os.path.basename(item.path), splits=list(item.splits),
              source=SOURCE, licence=LICENCE, **chip_io.geo_meta(info))
  record = dict(id=item.name, s2=s2, s2_bands=bands_lib.S2_L1C_BANDS, labels={"eurosat": item.label}, meta=meta)
  return [(split, record) for split in item.splits]


def convert(src: str, out: str, *, splits_dir: str = "auto", split: str = "train", image_size: int = 64,
            num_shards: int = 4, on_bad: str = "fail", workers: int = 0, shard_groups: int = 0) -> dict:
  """Converts EuroSAT-MS; returns the manifest (with a `eurosat` section: image root, splits, ignored folders)."""
  if image_size < 0:
    raise ValueError(f"--image_size={image_size}: give the expected side in pixels (64), or 0 to accept any.")
  items, summary = list_items(src, splits_dir=splits_dir, split=split, image_size=image_size)
  if not items:
    raise ValueError(f"No .tif images in the EuroSAT class folders under {summary['image_root']}.")
  args = dict(src=os.path.abspath(src), splits_dir=summary["splits_dir"], split=split, image_size=image_size,
              num_shards=num_shards, on_bad=on_bad)
  writer = DatasetWriter(out, num_shards=num_shards, source=SOURCE, licence=LICENCE, created_by="data_prep.eurosat",
                         args=args, label_sets=label_sets.manifest_entry(label_sets.EUROSAT),
                         extra={"eurosat": summary}, shard_groups=shard_groups)
  return convert_lib.run(items, build, writer, on_bad=on_bad, workers=workers, desc="eurosat")


def _define_flags():
  convert_lib.define_common_flags()
  flags.DEFINE_string("src", None, "EuroSAT-MS folder holding the class folders (or the extracted archive root).")
  flags.DEFINE_string("splits_dir", "auto", "Folder with eurosat-{train,val,test}.txt; auto = look in --src and "
                      "--src/splits; none = ignore them and use --split.")
  flags.DEFINE_string("split", "train", "Without split lists: a split name, or hash:0.8,0.1,0.1 by image id.")
  flags.DEFINE_integer("image_size", 64, "Expected image side in pixels; other grids are bad input (0 = any).")
  flags.mark_flag_as_required("src")


def main(argv):
  del argv
  f = flags.FLAGS
  convert_lib.run_cli("eurosat", "convert", src=f.src, out=f.out, splits_dir=f.splits_dir, split=f.split,
                      image_size=f.image_size, num_shards=f.num_shards, on_bad=f.on_bad, workers=f.workers)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
