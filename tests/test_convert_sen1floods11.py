"""data_prep.sen1floods11 on tiny chips in the v1.1 bucket layout (HandLabeled/{S1Hand,S2Hand,LabelHand} + splits)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import convert, sen1floods11
from mmrs import bands

from shard_reader import read_split

N = 32  # chip side (512 in the real data)
SPLITS = {"train": ["Ghana_1", "Mekong_6"], "valid": ["Ghana_2"], "test": ["India_3", "Peru_9"],
          "bolivia": ["Bolivia_4"]}  # Peru_9 is listed but has no files; Spain_5 is in no list


def write_tif(path, arr, dtype):
  """As the released chips (cloudtostreet/Sen1Floods11 v1.1, docs/README.md and the files themselves): EPSG:4326
  with ~10 m pixels in degrees (8.983e-5 deg), one file per chip and kind."""
  arr = np.asarray(arr)
  arr = arr[None] if arr.ndim == 2 else arr
  c, h, w = arr.shape
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=dtype, crs="EPSG:4326",
                     transform=rasterio.Affine(8.983e-5, 0, -1.2345, 0, -8.983e-5, 8.4321)) as f:
    f.write(arr.astype(dtype))


def label(seed):
  """Top-left quadrant no data (-1); the rest a water/not-water pattern."""
  rng = np.random.default_rng(seed)
  m = rng.integers(0, 2, (N, N)).astype(np.int16)
  m[:N // 2, :N // 2] = -1
  return m


def write_chip(hand, chip, seed, s1_nan=0, s2_float=False):
  s2 = np.stack([np.full((N, N), 100 * (i + 1) + seed) for i in range(13)])
  s2[:, -1, :] = 0  # S2Hand no-data: 0 in every band (the files are int16)
  s2_dtype = "int16"
  if s2_float:
    s2 = s2.astype(np.float32)
    s2[:, 0, 0] = np.nan
    s2_dtype = "float32"
  write_tif(os.path.join(hand, "S2Hand", f"{chip}_S2Hand.tif"), s2, s2_dtype)
  s1 = np.stack([np.full((N, N), -9.0 - seed, np.float32), np.full((N, N), -16.0 - seed, np.float32)])
  s1.reshape(2, -1)[:, N * N - s1_nan:] = np.nan
  write_tif(os.path.join(hand, "S1Hand", f"{chip}_S1Hand.tif"), s1, "float32")
  write_tif(os.path.join(hand, "LabelHand", f"{chip}_LabelHand.tif"), label(seed), "int16")


def make_tree(root):
  hand = os.path.join(root, "v1.1", "data", "flood_events", "HandLabeled")
  for seed, chip in enumerate(["Ghana_1", "Ghana_2", "India_3", "Bolivia_4", "Spain_5", "Mekong_6"]):
    write_chip(hand, chip, seed, s1_nan={"Ghana_1": 5, "Mekong_6": N * N * 3 // 4}.get(chip, 0),
               s2_float=chip == "India_3")
  sd = os.path.join(root, "v1.1", "splits", "flood_handlabeled")
  os.makedirs(sd)
  for name, chips in SPLITS.items():
    with open(os.path.join(sd, f"flood_{name}_data.csv"), "w") as f:
      f.writelines(f"{c}_S1Hand.tif,{c}_LabelHand.tif\n" for c in chips)
  return os.path.join(root, "v1.1")




@pytest.fixture(scope="module")
def src(tmp_path_factory):
  return make_tree(str(tmp_path_factory.mktemp("s1f11")))


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "ds")
  return out, sen1floods11.convert(src, out, num_shards=1)


def test_splits_from_csv_files(converted):
  out, m = converted
  got = {s: sorted(read_split(out, s)) for s in m["splits"]}
  assert got == {"train": ["Ghana_1", "Mekong_6"], "val": ["Ghana_2"], "test": ["India_3"], "bolivia": ["Bolivia_4"],
                 "unlisted": ["Spain_5"]}
  sf = m["split_files"]
  assert sf["listed_but_missing"] == ["Peru_9"] and sf["unlisted"] == 1
  assert sf["splits_dir"].endswith("flood_handlabeled")
  assert m["label_sets"]["sen1floods11"]["kind"] == "mask"
  assert m["label_sets"]["sen1floods11"]["names"] == ["not water", "water"] and m["licence"] == "CC-BY-4.0"


def test_record_arrays(converted):
  out, _ = converted
  r = read_split(out, "val")["Ghana_2"]
  np.testing.assert_array_equal(r["mask"], label(1))
  assert r["s2"].dtype == np.uint16 and [int(v) for v in r["s2"][3, 3]] == [100 * (i + 1) + 1 for i in range(13)]
  assert not r["s2"][-1].any() and r["meta"]["crs"] == "EPSG:4326"  # int16 no-data 0 stays 0
  assert r["s2_bands"] == bands.S2_L1C_BANDS and r["group"] == "paired"
  np.testing.assert_allclose(r["s1"][0, 0], [-10.0, -17.0])
  assert r["meta"]["region"] == "Ghana" and r["meta"]["splits"] == ["val"] and "lon" in r["meta"]
  india = read_split(out, "test")["India_3"]  # float S2 with a NaN pixel -> rounded uint16, NaN -> 0
  assert india["s2"].dtype == np.uint16 and not india["s2"][0, 0].any() and india["meta"]["s2_nodata_filled"] == 1


def test_s1_nan_flagged_mask_kept_and_mostly_nodata_dropped(converted):
  out, m = converted
  train = read_split(out, "train")
  g = train["Ghana_1"]
  assert g["s1_valid"].sum() == N * N - 5 and not g["s1_valid"][-1, -1] and np.isfinite(g["s1"]).all()
  np.testing.assert_array_equal(g["mask"], label(0))  # the hand label is not changed where S1 is missing
  mk = train["Mekong_6"]
  assert mk["group"] == "s2_only" and "75% of the Sentinel-1 pixels" in mk["meta"]["s1_dropped"]
  np.testing.assert_array_equal(mk["mask"], label(5))
  assert m["counts"]["s1_dropped"] == 1 and m["counts"]["s2_only"] == 1 and m["counts"]["pairs"] == 5
  # Coverage beside the published counts: an S1+S2 evaluation of train would score 1 of its 2 chips.
  assert m["coverage"]["train"] == {"chips": 2, "chips_with_s1": 1, "s1_dropped_chips": ["Mekong_6"],
                                    "published_chips": 252}
  assert m["coverage"]["test"] == {"chips": 1, "chips_with_s1": 1, "s1_dropped_chips": [], "published_chips": 90}
  assert "published_chips" not in m["coverage"]["unlisted"]


def test_manifest_sets_found_chips_beside_the_published_split_sizes(converted):
  _, m = converted
  p = m["published"]
  assert p["expected"] == {"train": 252, "val": 89, "test": 90, "bolivia": 15} == sen1floods11.PUBLISHED_CHIPS
  assert sum(p["expected"].values()) == sen1floods11.PUBLISHED_TOTAL  # the 446 hand-labelled chips
  assert p["unit"] == "chips" and "flood_" in p["source"]
  # found: chips written per split (whatever their S1); listed: rows of each split file (Peru_9 has no files).
  assert p["found"] == {"train": 2, "val": 1, "test": 1, "bolivia": 1}
  assert p["listed"] == {"train": 2, "val": 1, "test": 2, "bolivia": 1}
  assert "test: 1 chips found (2 listed), 90 published: not the full dataset" in p["warnings"]
  assert len(p["warnings"]) == 4  # every split of this fixture is smaller than published


def test_full_split_files_give_no_published_warning():
  full = convert.PublishedCounts(sen1floods11.PUBLISHED_CHIPS, "x", unit="chips",
                                 listed=dict(sen1floods11.PUBLISHED_CHIPS))
  for split, n in sen1floods11.PUBLISHED_CHIPS.items():
    full.set_found(split, n)
  assert full["warnings"] == []
  full.set_found("test", 89)  # one test chip lost (e.g. a missing S2Hand file skipped with --on_bad=skip)
  assert full["warnings"] == ["test: 89 chips found (90 listed), 90 published: not the full dataset"]
  other = convert.PublishedCounts({"test": 90}, "x", listed={"test": 91})
  other.set_found("test", 91)
  assert other["warnings"] == ["test: the source lists 91 records, 90 published: another release?"]


def test_tiles_drop_unlabelled_and_hash_split_keeps_chip_together(src, tmp_path):
  hand = os.path.join(src, "data", "flood_events", "HandLabeled")  # --src may be the HandLabeled folder too
  m = sen1floods11.convert(hand, str(tmp_path / "t"), tile=16, splits_dir="none", split="hash:0.5,0.5",
                           num_shards=1)
  recs = {}
  for s in m["splits"]:
    recs.update({k: (s, v) for k, v in read_split(str(tmp_path / "t"), s).items()})
  assert len(recs) == 6 * 3  # the top-left tile of every chip is all no-data
  assert "Ghana_2_y0_x0" not in recs and "Ghana_2_y16_x16" in recs
  split, t = recs["Ghana_2_y0_x16"]
  np.testing.assert_array_equal(t["mask"], label(1)[:16, 16:])
  assert t["s2"].shape == (16, 16, 13) and t["meta"]["window"] == [0, 16, 16, 16]
  events = {}
  for rid, (s, _) in recs.items():  # spatially blocked: every tile of every chip of an event in one split
    events.setdefault(rid.split("_")[0], set()).add(s)
  assert all(len(s) == 1 for s in events.values()) and m["split_files"]["splits_dir"] is None
  assert len(events) == 5 and len({next(iter(s)) for s in events.values()}) == 2


def test_bad_chips_fail_and_skip(src, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  hand = os.path.join(bad, "data", "flood_events", "HandLabeled")
  s2_path = os.path.join(hand, "S2Hand", "Ghana_2_S2Hand.tif")
  write_tif(s2_path, np.ones((13, N // 2, N // 2)), "uint16")  # wrong grid
  lab = label(3)
  lab[0, 0] = 7
  write_tif(os.path.join(hand, "LabelHand", "Bolivia_4_LabelHand.tif"), lab, "int16")  # invalid class value
  with pytest.raises(convert.ConversionError, match="Bolivia_4_LabelHand.tif: label values"):  # sorted: first
    sen1floods11.convert(bad, str(tmp_path / "o1"), num_shards=1)
  m = sen1floods11.convert(bad, str(tmp_path / "o2"), num_shards=1, on_bad="skip")
  assert m["counts"]["skipped"] == 2 and m["counts"]["records"] == 4
  reasons = {s["item"]: s["reason"] for s in m["skipped_items"]}
  assert "grid (16, 16)" in reasons["Ghana_2"] and "label values" in reasons["Bolivia_4"]


def test_cli(src, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "cli")
  ok = subprocess.run([sys.executable, "-m", "data_prep.sen1floods11", f"--src={src}", f"--out={out}", "--tile=16",
                       "--workers=0", "--num_shards=1"], cwd=repo, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["counts"]["records"] == 6 * 3
