"""data_prep.eurosat on tiny 13-band images in the EuroSATallBands.zip layout (class folders, B8A last in the file)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import convert, eurosat
from mmrs import bands
from mmrs.data import label_sets

from shard_reader import read_split

N = 16  # image side (64 in the real data)
NESTED = os.path.join("ds", "images", "remote_sensing", "otherDatasets", "sentinel_2", "tif")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = {"AnnualCrop": 3, "Forest": 2, "SeaLake": 2}


def write_tif(path, arr, dtype="uint16"):
  c, h, w = arr.shape
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=dtype, crs="EPSG:32632",
                     transform=rasterio.Affine(10, 0, 300000, 0, -10, 5300000)) as f:
    f.write(arr.astype(dtype))


def image(k, count=13, n=N):
  """File band j holds 100 * (j + 1) + k."""
  return np.stack([np.full((n, n), 100 * (j + 1) + k) for j in range(count)])


def make_tree(root):
  base = os.path.join(root, NESTED)
  for cls, count in IMAGES.items():
    for i in range(1, count + 1):
      write_tif(os.path.join(base, cls, f"{cls}_{i}.tif"), image(i))
  os.makedirs(os.path.join(base, "__MACOSX"))
  lists = {"train": ["AnnualCrop_1", "AnnualCrop_3", "Forest_1", "SeaLake_2"], "val": ["AnnualCrop_2", "Forest_2"],
           "test": ["SeaLake_1"]}
  for split, names in lists.items():
    with open(os.path.join(root, f"eurosat-{split}.txt"), "w") as f:
      f.writelines(f"{n}.jpg\n" for n in names)  # the published lists name the RGB .jpg files
  return root




@pytest.fixture(scope="module")
def src(tmp_path_factory):
  return make_tree(str(tmp_path_factory.mktemp("eurosat")))


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "ds")
  return out, eurosat.convert(src, out, num_shards=1, image_size=N)


def test_splits_labels_and_manifest(converted):
  out, m = converted
  got = {s: sorted(read_split(out, s)) for s in m["splits"]}
  assert got == {"train": ["AnnualCrop_1", "AnnualCrop_3", "Forest_1", "SeaLake_2"],
                 "val": ["AnnualCrop_2", "Forest_2"], "test": ["SeaLake_1"]}
  assert m["counts"]["s2_only"] == 7 and m["counts"]["pairs"] == 0 and m["licence"] == "MIT"
  ls = m["label_sets"]["eurosat"]
  assert ls["kind"] == "class" and ls["names"] == list(label_sets.EUROSAT_CLASSES) and len(ls["names"]) == 10
  assert m["eurosat"]["ignored_folders"] == ["__MACOSX"]
  assert "Highway" in m["eurosat"]["missing_classes"] and m["eurosat"]["unlisted"] == 0
  recs = read_split(out, "train")
  assert recs["Forest_1"]["labels"] == {"eurosat": 1} and recs["SeaLake_2"]["labels"] == {"eurosat": 9}
  assert recs["AnnualCrop_1"]["labels"] == {"eurosat": 0} and recs["Forest_1"]["meta"]["class_name"] == "Forest"


def test_band_order_b8a_moved(converted):
  out, _ = converted
  r = read_split(out, "test")["SeaLake_1"]
  assert r["s2"].shape == (N, N, 13) and r["s2_bands"] == bands.S2_L1C_BANDS and "s1" not in r
  file_order = eurosat.FILE_BANDS
  for name in ("B02", "B08", "B8A", "B09", "B12"):  # value = 100 * (position in the file + 1) + 1
    assert int(r["s2"][0, 0, bands.S2_L1C_BANDS.index(name)]) == 100 * (file_order.index(name) + 1) + 1
  assert int(r["s2"][0, 0, bands.S2_L1C_BANDS.index("B8A")]) == 1301


def test_hash_split_without_lists(src, tmp_path):
  m = eurosat.convert(src, str(tmp_path / "h"), splits_dir="none", split="hash:0.6,0.2,0.2", num_shards=1,
                      image_size=N)
  ids = [rid for s in m["splits"] for rid in read_split(str(tmp_path / "h"), s)]
  assert sorted(ids) == sorted(f"{c}_{i}" for c, n in IMAGES.items() for i in range(1, n + 1))
  assert set(m["splits"]) <= {"train", "val", "test"} and m["eurosat"]["splits_dir"] is None
  again = eurosat.convert(src, str(tmp_path / "h2"), splits_dir="none", split="hash:0.6,0.2,0.2", num_shards=1,
                          image_size=N)
  assert again["splits"] == m["splits"] and again["records_per_shard"] == m["records_per_shard"]
  with pytest.raises(ValueError, match=r"--splits_dir=.*nowhere is not a directory .*eurosat-\{train,val,test\}\.txt"):
    eurosat.convert(src, str(tmp_path / "h3"), splits_dir=str(tmp_path / "nowhere"), num_shards=1, image_size=N)
  assert not os.path.exists(tmp_path / "h3")  # refused before anything is written


def test_bad_images_fail_and_skip(src, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  base = os.path.join(bad, NESTED)
  write_tif(os.path.join(base, "Forest", "Forest_2.tif"), image(2, count=12))  # a band missing
  write_tif(os.path.join(base, "SeaLake", "SeaLake_1.tif"), image(1, n=2 * N))  # wrong grid
  with pytest.raises(convert.ConversionError, match="Forest_2.tif: has 12 bands, expected 13"):
    eurosat.convert(bad, str(tmp_path / "o1"), num_shards=1, image_size=N)
  m = eurosat.convert(bad, str(tmp_path / "o2"), num_shards=1, image_size=N, on_bad="skip")
  assert m["counts"]["skipped"] == 2 and m["counts"]["records"] == 5
  reasons = {s["item"]: s["reason"] for s in m["skipped_items"]}
  assert "grid (32, 32) differs from the expected (16, 16)" in reasons["SeaLake_1"]


def test_cli(src, tmp_path):
  out = str(tmp_path / "cli")
  ok = subprocess.run([sys.executable, "-m", "data_prep.eurosat", f"--src={src}", f"--out={out}", "--workers=0",
                       f"--image_size={N}", "--num_shards=1"], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  with open(os.path.join(out, "manifest.json")) as f:
    assert json.load(f)["counts"]["records"] == 7
  bad = subprocess.run([sys.executable, "-m", "data_prep.eurosat", f"--src={tmp_path}", f"--out={out}2"],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "No EuroSAT class folder" in bad.stderr
