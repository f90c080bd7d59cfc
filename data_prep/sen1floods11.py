"""Sen1Floods11 (hand-labelled flood chips) -> mmrs shards: S1 + S2 + water mask per chip (or per tile).

    python -m data_prep.sen1floods11 --src=DIR --out=DIR [--tile=256] [--splits_dir=auto|none|DIR]
        [--split=train] [--num_shards=N] [--shard_groups=G] [--on_bad=fail|skip] [--workers=N]

Expected layout (the `sen1floods11` bucket, v1.1; --src may be the v1.1 folder or its HandLabeled folder):

    v1.1/data/flood_events/HandLabeled/S1Hand/<Region>_<id>_S1Hand.tif      2 bands VV, VH, float32 dB, 512 x 512,
                                                                             NaN where there is no measurement
    v1.1/data/flood_events/HandLabeled/S2Hand/<Region>_<id>_S2Hand.tif      13 bands L1C (B1..B8, B8A, B9..B12)
    v1.1/data/flood_events/HandLabeled/LabelHand/<Region>_<id>_LabelHand.tif  int16: 0 not water, 1 water, -1 no data
    v1.1/splits/flood_handlabeled/flood_{train,valid,test,bolivia}_data.csv
                                     rows "<Region>_<id>_S1Hand.tif,<Region>_<id>_LabelHand.tif", no header

Chips are those with a LabelHand file (sorted); each needs its S1Hand and S2Hand (else bad input).
Splits: from the split CSVs when found (`--splits_dir=auto` looks in <src>/splits/flood_handlabeled, the v1.1
root's splits/flood_handlabeled, and <src>/splits): train, val (flood_valid), test, bolivia (the held-out
Bolivia event); a chip listed in several files is written to each; a chip in none goes to split `unlisted`.
Without split files (or with --splits_dir=none): `--split` (a name, or hash:0.8,0.1,0.1 by flood *event*, the
region prefix of the chip id (Bolivia, Ghana, ...): chips of one event are neighbours, so they share a split, and so
do the tiles of a chip).
Files as released (cloudtostreet/Sen1Floods11, docs/README.md): every chip in EPSG:4326; S2Hand int16 with 0 where
there is no data (chip_io.as_uint16 keeps 0, Sentinel-2's own no-data value); S1Hand float32 dB with NaN no-data.
Evaluation coverage: the manifest's `coverage` counts, per split, the chips and those whose S1 was dropped (they are
in the s2_only group: an S1+S2 evaluation reading only the paired group would silently skip them), beside the
published count (90 test chips in flood_test_data.csv). With split files, the manifest's `published` section sets
the chips found per split beside the published sizes (`PUBLISHED_CHIPS`: 252 / 89 / 90 / 15, sources next to it)
and the rows of each split file (`listed`), with a warning for every split that came out smaller.

Decisions:
- S1 NaN/inf pixels are filled and flagged in `s1_valid` (records.clean_s1). The mask is NOT changed there: it is
  the hand label, valid whatever the input modality; an S1 model can ignore flagged pixels through `s1_valid`.
  When more than half of a record's S1 pixels are no-data, S1 is dropped from that record (kept S2 + mask,
  `meta.s1_dropped` says why) rather than losing a hand-labelled chip.
- S2 float input is rounded to uint16; its NaN become 0 (Sentinel-2's no-data value).
- `--tile=T` cuts each 512 x 512 chip into non-overlapping T x T tiles (a remainder is dropped); tiles with no
  labelled pixel (mask all -1) are not written. Untiled chips are always written.
Label set "sen1floods11" (kind mask: 0 not water, 1 water, -1 ignore). S2-only usage (the MixMAE paper drops S1)
is a pipeline choice: read the s2 modality of these records.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import flags, logging

from launch import cli

from data_prep import chip_io, splitting
from data_prep import convert as convert_lib
from data_prep.convert import BadInput
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import label_sets, records

SOURCE = "Sen1Floods11 v1.1 hand-labelled chips (Bonafilia et al. 2020), https://github.com/cloudtostreet/Sen1Floods11"
LICENCE = "CC-BY-4.0"
# Rows of the v1.1 split files splits/flood_handlabeled/flood_{train,valid,test,bolivia}_data.csv: 252 / 89 / 90 /
# 15. They add up to the 446 hand-labelled chips of cloudtostreet/Sen1Floods11 docs/README.md ("LabelHand/: 446
# labeled chips"); the MixMAE paper (Linial et al., Table 1) trains on the 252 and tests on the 90; the row counts
# are as public surveys of the gs://sen1floods11 bucket report them (the CSVs are not in the GitHub repository).
PUBLISHED_CHIPS = {"train": 252, "val": 89, "test": 90, "bolivia": 15}
PUBLISHED_TOTAL = 446
PUBLISHED_SOURCE = ("rows of the v1.1 splits/flood_handlabeled/flood_*_data.csv; 446 hand-labelled chips in all "
                    "(cloudtostreet/Sen1Floods11 docs/README.md)")
SPLIT_FILES = {"train": "flood_train_data.csv", "val": "flood_valid_data.csv",
               "test": "flood_test_data.csv", "bolivia": "flood_bolivia_data.csv"}
_SUFFIXES = ("_S1Hand", "_S2Hand", "_LabelHand")


@dataclasses.dataclass(frozen=True)
class Item:
  name: str  # chip id, e.g. Bolivia_103757
  hand_dir: str
  splits: tuple[str, ...]
  tile: int = 0


def hand_dir_of(src: str) -> str:
  for cand in (src, os.path.join(src, "data", "flood_events", "HandLabeled"),
               os.path.join(src, "v1.1", "data", "flood_events", "HandLabeled")):
    if os.path.isdir(os.path.join(cand, "LabelHand")):
      return cand
  raise ValueError(f"No LabelHand/ folder under {src}: --src must be the Sen1Floods11 v1.1 folder or its "
                   "data/flood_events/HandLabeled folder (holding S1Hand/, S2Hand/, LabelHand/).")


def find_splits_dir(src: str, hand_dir: str) -> str | None:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(hand_dir))))  # HandLabeled -> v1.1
  for cand in (os.path.join(src, "splits", "flood_handlabeled"), os.path.join(root, "splits", "flood_handlabeled"),
               os.path.join(src, "splits"), src):
    if any(os.path.exists(os.path.join(cand, f)) for f in SPLIT_FILES.values()):
      return cand
  return None


def chip_id(file_name: str) -> str:
  s = splitting.stem(file_name)
  for suffix in _SUFFIXES:
    if s.endswith(suffix):
      return s[:-len(suffix)]
  return s


def event_of(chip: str) -> str:
  """The flood event of a chip id: its region prefix ('Bolivia_103757' -> 'Bolivia'; Sen1Floods11 has one event per
  region)."""
  return chip.split("_")[0]


def list_items(src: str, *, tile: int = 0, splits_dir: str = "auto", split: str = "train") -> tuple[list[Item], dict]:
  """One item per labelled chip, with its split(s); plus a split summary for the manifest."""
  hand = hand_dir_of(src)
  chips = sorted(chip_id(n) for n in os.listdir(os.path.join(hand, "LabelHand")) if n.endswith("_LabelHand.tif"))
  splits_dir = convert_lib.resolve_splits_dir(splits_dir, lambda: find_splits_dir(src, hand),
                                              ", ".join(SPLIT_FILES.values()))
  summary = {"splits_dir": splits_dir, "listed_but_missing": [], "unlisted": 0, "listed": {}}
  if splits_dir is None:
    spec = convert_lib.parse_split_spec(split)
    return [Item(c, hand, (convert_lib.split_of(event_of(c), spec),), tile) for c in chips], summary
  listed: dict[str, list[str]] = {}
  for name, fname in SPLIT_FILES.items():
    path = os.path.join(splits_dir, fname)
    if os.path.exists(path):
      names = dict.fromkeys(chip_id(n) for n in splitting.load_name_list(path))
      summary["listed"][name] = len(names)
      for c in names:
        listed.setdefault(c, []).append(name)
  known = set(chips)
  summary["listed_but_missing"] = sorted(c for c in listed if c not in known)
  summary["unlisted"] = sum(c not in listed for c in chips)
  return [Item(c, hand, tuple(listed.get(c, ["unlisted"])), tile) for c in chips], summary


def published_counts(summary: dict) -> convert_lib.PublishedCounts | None:
  """Chips found per split beside the published split sizes, when the official split files were read."""
  if not summary["splits_dir"]:
    return None
  return convert_lib.PublishedCounts(PUBLISHED_CHIPS, PUBLISHED_SOURCE, unit="chips", listed=summary["listed"])


def build(item: Item) -> list[tuple[str, dict]]:
  def path(kind):
    return os.path.join(item.hand_dir, kind, f"{item.name}_{kind}.tif")

  label, info = chip_io.read_mask(path("LabelHand"))
  size = label.shape
  values = np.unique(label)
  if not np.isin(values, (-1, 0, 1)).all():
    raise BadInput(f"{path('LabelHand')}: label values {values.tolist()} outside -1 (no data), 0, 1")
  if item.tile > min(size):
    raise BadInput(f"{path('LabelHand')}: --tile={item.tile} is larger than the chip {size}")
  mask = label.astype(np.int16)
  s2, s2_info = chip_io.read_s2(path("S2Hand"), bands_lib.S2_L1C_BANDS, bands_lib.S2_L1C_BANDS, size)
  raw_s1, _ = chip_io.read_s1_db(path("S1Hand"), size)
  s1_full, valid_full = records.clean_s1(raw_s1)
  base_meta = dict(dataset="Sen1Floods11", chip=item.name, region=item.name.split("_")[0], splits=list(item.splits),
                   source=SOURCE, licence=LICENCE, **chip_io.geo_meta(info))
  if s2_info["s2_nodata_filled"]:
    base_meta["s2_nodata_filled"] = s2_info["s2_nodata_filled"]
  out = []
  for y, x, h, w in chip_io.windows(*size, item.tile):
    win = (slice(y, y + h), slice(x, x + w))
    m = mask[win]
    if item.tile and not (m >= 0).any():
      continue  # nothing labelled in this tile: nothing to learn or score
    s2_t = s2[win]
    if not s2_t.any():
      raise BadInput(f"{path('S2Hand')}: Sentinel-2 is all zero in the window y={y}, x={x}, {h}x{w}")
    meta = dict(base_meta, window=[y, x, h, w])
    rid = item.name if (h, w) == size else f"{item.name}_y{y}_x{x}"
    rec = dict(id=rid, s2=np.ascontiguousarray(s2_t), s2_bands=bands_lib.S2_L1C_BANDS,
               mask=np.ascontiguousarray(m), meta=meta)
    v = None if valid_full is None else valid_full[win]
    bad = 0.0 if v is None else 1.0 - float(v.mean())
    if bad > chip_io.MAX_S1_NODATA_FRACTION:
      meta["s1_dropped"] = f"{path('S1Hand')}: {100 * bad:.0f}% of the Sentinel-1 pixels are no-data (NaN/inf)"
    else:
      rec.update(s1=np.ascontiguousarray(s1_full[win]), s1_bands=bands_lib.S1_BANDS)
      if bad > 0:
        rec["s1_valid"] = np.ascontiguousarray(v)
        meta["s1_nodata_fraction"] = round(bad, 6)
    out.extend((split, rec) for split in item.splits)
  return out


def convert(src: str, out: str, *, tile: int = 0, splits_dir: str = "auto", split: str = "train",
            num_shards: int = 4, on_bad: str = "fail", workers: int = 0, shard_groups: int = 0) -> dict:
  """Converts the Sen1Floods11 hand-labelled chips; returns the manifest (with a `split_files` section)."""
  if tile < 0:
    raise ValueError(f"--tile={tile}: give a tile size in pixels, or 0 for whole chips.")
  items, summary = list_items(src, tile=tile, splits_dir=splits_dir, split=split)
  if not items:
    raise ValueError(f"No *_LabelHand.tif chips under {hand_dir_of(src)}/LabelHand.")
  args = dict(src=os.path.abspath(src), tile=tile, splits_dir=summary["splits_dir"], split=split,
              num_shards=num_shards, on_bad=on_bad)
  counts = {"s1_dropped": 0}
  chips: dict[str, tuple[set, set]] = {}
  coverage: dict[str, dict] = {}  # filled as records are written; the writer puts it in the manifest at close
  published = published_counts(summary)

  def on_record(split, rec):
    chip_io.count_s1_dropped(counts, rec)
    seen, dropped = chips.setdefault(split, (set(), set()))
    seen.add(rec["meta"]["chip"])
    if "s1_dropped" in rec["meta"]:
      dropped.add(rec["meta"]["chip"])
    coverage[split] = {"chips": len(seen), "chips_with_s1": len(seen - dropped), "s1_dropped_chips": sorted(dropped)}
    if summary["splits_dir"] and split in PUBLISHED_CHIPS:
      coverage[split]["published_chips"] = PUBLISHED_CHIPS[split]
    if published is not None:
      published.set_found(split, len(seen))

  extra = {"split_files": summary, "coverage": coverage}
  if published is not None:
    extra["published"] = published
  writer = DatasetWriter(out, num_shards=num_shards, source=SOURCE, licence=LICENCE,
                         created_by="data_prep.sen1floods11", args=args,
                         label_sets=label_sets.manifest_entry(label_sets.SEN1FLOODS11),
                         extra=extra, extra_counts=counts, shard_groups=shard_groups)
  manifest = convert_lib.run(items, build, writer, on_bad=on_bad, workers=workers, desc="sen1floods11",
                             on_record=on_record)
  if published is not None:
    published.log("Sen1Floods11")
  for split, c in sorted(coverage.items()):
    if c["chips_with_s1"] < c["chips"] or c["chips"] < c.get("published_chips", 0):
      logging.warning("Sen1Floods11 %s: %d chips written (published: %s), %d with S1: an S1+S2 evaluation of the "
                      "paired group scores %d; read the s2_only group too (S2-only fallback) to score all.", split,
                      c["chips"], c.get("published_chips", "-"), c["chips_with_s1"], c["chips_with_s1"])
  return manifest


def _define_flags():
  convert_lib.define_common_flags()
  flags.DEFINE_string("src", None, "Sen1Floods11 v1.1 folder, or its data/flood_events/HandLabeled folder.")
  flags.DEFINE_integer("tile", 0, "Cut chips into non-overlapping tiles of this size (0 = whole 512 px chips).")
  flags.DEFINE_string("splits_dir", "auto", "Folder of flood_*_data.csv split files; auto = look for it; "
                      "none = ignore them and use --split.")
  flags.DEFINE_string("split", "train", "Without split files: a split name, or hash:0.8,0.1,0.1 by flood event.")
  flags.mark_flag_as_required("src")


def main(argv):
  del argv
  f = flags.FLAGS
  convert_lib.run_cli("sen1floods11", "convert", src=f.src, out=f.out, tile=f.tile, splits_dir=f.splits_dir,
                      split=f.split, num_shards=f.num_shards, on_bad=f.on_bad, workers=f.workers)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
