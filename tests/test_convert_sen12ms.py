"""data_prep.sen12ms (--dataset=sen12ms|dfc2020) on tiny patches in the real SEN12MS / DFC2020 layouts."""
import collections
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import convert, sen12ms, splitting
from mmrs import bands
from mmrs.data import label_sets

from shard_reader import read_split

N = 20  # patch side (256 in the real data)


def write_tif(path, arr, dtype):
  arr = np.asarray(arr)
  arr = arr[None] if arr.ndim == 2 else arr
  c, h, w = arr.shape
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=dtype, crs="EPSG:32631",
                     transform=rasterio.Affine(10, 0, 600000, 0, -10, 5600000)) as f:
    f.write(arr.astype(dtype))


def igbp_patch():
  """Rows: 50% grassland (10), 30% croplands (12), 10% mosaic (14 -> croplands), 5% forest (1), 5% water (17)."""
  lc = np.empty((N, N), np.int64)
  lc[:10], lc[10:16], lc[16:18], lc[18], lc[19] = 10, 12, 14, 1, 17
  return lc


def write_patch(root, roi, scene, patch, kinds=("s1", "s2", "lc"), folder_suffix=None, seed=0, label=None):
  def path(kind):
    return os.path.join(root, roi, f"{kind}_{folder_suffix or scene}", f"{roi}_{kind}_{scene}_p{patch}.tif")

  if "s2" in kinds:
    write_tif(path("s2"), np.stack([np.full((N, N), 50 * (i + 1) + seed) for i in range(13)]), "uint16")
  if "s1" in kinds:
    write_tif(path("s1"), np.stack([np.full((N, N), -8.0 - seed), np.full((N, N), -15.0 - seed)]), "float32")
  if "lc" in kinds:
    lc = igbp_patch() if label is None else label
    write_tif(path("lc"), np.stack([lc, lc, lc, lc]), "uint16")
  if "dfc" in kinds:
    write_tif(path("dfc"), label, "uint16")
  return path


def make_tree(root):
  write_patch(root, "ROIs1158_spring", "1", 10, seed=1)
  write_patch(root, "ROIs1158_spring", "1", 2, seed=2)
  no_data_rows = np.repeat(np.where(np.arange(N) < 5, 0, 17)[:, None], N, 1)  # IGBP 0 in 5 rows, water elsewhere
  write_patch(root, "ROIs1158_spring", "12", 3, seed=3, label=no_data_rows)
  write_patch(root, "ROIs1868_summer", "5", 1, seed=4)
  dfc = (np.arange(N * N).reshape(N, N) % 12).astype(np.int64)  # 0..11: 0 and 11 are not classes
  write_patch(root, "ROIs0000_validation", "0", 0, ("s1", "s2", "lc", "dfc"), "validation", seed=5, label=dfc)
  write_patch(root, "ROIs0000_test", "0", 7, ("s1", "s2", "lc", "dfc"), None, seed=6, label=dfc)
  return root




@pytest.fixture(scope="module")
def src(tmp_path_factory):
  return make_tree(str(tmp_path_factory.mktemp("sen12ms")))


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "ds")
  return out, sen12ms.convert(src, out, num_shards=1)


def test_sen12ms_records_and_scene_labels(converted):
  out, m = converted
  recs = read_split(out, "train")
  # Natural order of scenes/patches; DFC2020's ROIs0000_* are not part of SEN12MS.
  assert list(recs) == ["ROIs1158_spring_1_p2", "ROIs1158_spring_1_p10", "ROIs1158_spring_12_p3",
                        "ROIs1868_summer_5_p1"]
  assert m["counts"]["pairs"] == 4 and m["licence"] == "CC-BY-4.0" and "SEN12MS" in m["source"]
  assert set(m["label_sets"]) == {"sen12ms", "sen12ms_multi", "sen12ms_lc"}
  assert m["label_sets"]["sen12ms"]["names"][3] == "Grassland"
  assert m["label_sets"]["sen12ms_multi"]["kind"] == "multi_label"
  r = recs["ROIs1158_spring_1_p10"]
  expected = label_sets.igbp_to_dfc10(igbp_patch())
  np.testing.assert_array_equal(r["mask"], expected)
  assert r["mask"][0, 0] == 3 and r["mask"][12, 0] == 5 and r["mask"][17, 0] == 5 and r["mask"][19, 0] == 9
  assert r["labels"] == {"sen12ms": 3, "sen12ms_multi": [3, 5]}  # grassland 0.5, croplands 0.4 (12 + 14)
  assert r["meta"]["class_fractions"] == pytest.approx([0.05, 0, 0, 0.5, 0, 0.4, 0, 0, 0, 0.05])
  assert r["meta"]["season"] == "spring" and r["meta"]["scene"] == "1" and r["meta"]["patch"] == 10
  assert [int(v) for v in r["s2"][0, 0]] == [50 * (i + 1) + 1 for i in range(13)]
  np.testing.assert_allclose(r["s1"][0, 0], [-9.0, -16.0])
  z = recs["ROIs1158_spring_12_p3"]  # IGBP 0 (no data) -> -1, ignored by the scene label
  assert (z["mask"][:5] == -1).all() and z["labels"] == {"sen12ms": 9, "sen12ms_multi": [9]}


def test_multi_label_fraction_and_hash_split_by_scene(src, tmp_path):
  m = sen12ms.convert(src, str(tmp_path / "h"), num_shards=1, split="hash:0.5,0.5", min_fraction=0.05,
                      splits_dir="none")
  where = {}
  for s in m["splits"]:
    for rid, r in read_split(str(tmp_path / "h"), s).items():
      where.setdefault(rid.rsplit("_p", 1)[0], set()).add(s)
      if rid == "ROIs1158_spring_1_p10":
        assert r["labels"]["sen12ms_multi"] == [0, 3, 5, 9]
  assert len(where) == 3 and all(len(v) == 1 for v in where.values())


def test_split_lists_pickle_and_text(src, tmp_path):
  sd = tmp_path / "lists"
  sd.mkdir()
  with open(sd / "train_list.pkl", "wb") as f:
    pickle.dump(["ROIs1158_spring_s2_1_p10.tif", "ROIs1868_summer_s2_5_p1.tif"], f)
  (sd / "test_list.txt").write_text("ROIs1158_spring_s2_12_p3.tif\n")
  m = sen12ms.convert(src, str(tmp_path / "o"), num_shards=1, splits_dir=str(sd))
  got = {s: sorted(read_split(str(tmp_path / "o"), s)) for s in m["splits"]}
  assert got == {"train": ["ROIs1158_spring_1_p10", "ROIs1868_summer_5_p1"], "test": ["ROIs1158_spring_12_p3"],
                 "unlisted": ["ROIs1158_spring_1_p2"]}
  assert m["split_lists"]["unlisted"] == 1
  with open(sd / "train_list.pkl", "wb") as f:
    pickle.dump(collections.OrderedDict(a=1), f)  # a pickle that would construct an object is refused
  with pytest.raises(ValueError, match="refusing to load"):
    splitting.load_name_list(str(sd / "train_list.pkl"))


def test_dfc2020_splits_by_folder_and_mask(src, tmp_path):
  m = sen12ms.convert(src, str(tmp_path / "dfc"), dataset="dfc2020", num_shards=1)
  assert set(m["splits"]) == {"val", "test"} and set(m["label_sets"]) == {"dfc2020"}
  assert "Data Fusion Contest 2020" in m["source"]
  assert list(read_split(str(tmp_path / "dfc"), "test")) == ["ROIs0000_test_0_p7"]
  r = read_split(str(tmp_path / "dfc"), "val")["ROIs0000_validation_0_p0"]
  v = np.arange(N * N).reshape(N, N) % 12
  np.testing.assert_array_equal(r["mask"], np.where((v >= 1) & (v <= 10), v - 1, -1))
  assert r["labels"] == {} and r["s2_bands"] == bands.S2_L1C_BANDS and "s1" in r


def test_bad_patches_fail_and_skip(src, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  s2 = os.path.join(bad, "ROIs1158_spring", "s2_1", "ROIs1158_spring_s2_1_p10.tif")
  write_tif(s2, np.zeros((13, N, N)), "uint16")  # all-zero S2
  os.remove(os.path.join(bad, "ROIs1868_summer", "s1_5", "ROIs1868_summer_s1_5_p1.tif"))  # missing S1
  with pytest.raises(convert.ConversionError, match="ROIs1158_spring_s2_1_p10.tif: Sentinel-2 chip is all zero"):
    sen12ms.convert(bad, str(tmp_path / "o1"), num_shards=1)
  m = sen12ms.convert(bad, str(tmp_path / "o2"), num_shards=1, on_bad="skip")
  assert m["counts"]["skipped"] == 2 and m["counts"]["records"] == 2
  reasons = {s["item"]: s["reason"] for s in m["skipped_items"]}
  assert "all zero" in reasons["ROIs1158_spring_1_p10"]
  assert "has no s1 file (ROIs1868_summer_s1_5_p1.tif)" in reasons["ROIs1868_summer_5_p1"]


def test_cli(src, tmp_path):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = str(tmp_path / "cli")
  ok = subprocess.run([sys.executable, "-m", "data_prep.sen12ms", "--dataset=dfc2020", f"--src={src}", f"--out={out}",
                       "--workers=0", "--num_shards=1"], cwd=repo, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["counts"]["records"] == 2


def test_igbp_to_simplified_table():
  expected = {**{v: "Forest" for v in range(1, 6)}, 6: "Shrubland", 7: "Shrubland", 8: "Savanna", 9: "Savanna",
              10: "Grassland", 11: "Wetlands", 12: "Croplands", 13: "Urban/Built-up", 14: "Croplands",
              15: "Snow/Ice", 16: "Barren", 17: "Water"}
  got = label_sets.igbp_to_dfc10(np.arange(19))
  assert got[0] == -1 and got[18] == -1 and got.dtype == np.int16
  assert {v: label_sets.DFC10_CLASSES[got[v]] for v in range(1, 18)} == expected
