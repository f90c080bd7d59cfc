"""TFDS builders (array_record, no TensorFlow): build from small fixtures in each dataset's layout, read back with
`tfds.data_source`, and compare with the converters' records."""
import os

import numpy as np
import pytest
import rasterio
import tensorflow_datasets as tfds

from data_prep import bigearthnet_mm, sen1floods11
from data_prep.tfds import common
from data_prep.tfds.bigearthnet_mm import MmrsBigearthnetMm
from data_prep.tfds.eurosat import MmrsEurosatMs
from data_prep.tfds.sen12ms import MmrsSen12ms
from data_prep.tfds.sen1floods11 import MmrsSen1floods11
from mmrs import bands as B
from mmrs.data import label_sets

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "bigearthnet_mm")


def write_tif(path, arr, dtype):
  arr = np.asarray(arr)
  arr = arr[None] if arr.ndim == 2 else arr
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", height=arr.shape[1], width=arr.shape[2], count=arr.shape[0],
                     dtype=dtype, crs="EPSG:32630", transform=rasterio.Affine(10, 0, 400000, 0, -10, 1000000)) as f:
    f.write(arr.astype(dtype))


def band_stack(n, seed, count=13):
  """Band i holds 100 * (i + 1) + seed, so the band order can be read off the pixels."""
  return np.stack([np.full((n, n), 100 * (i + 1) + seed) for i in range(count)])


def read(name, split, data_dir):
  ds = tfds.data_source(name, split=split, data_dir=data_dir)
  return {ex["id"].decode(): ex for ex in (ds[i] for i in range(len(ds)))}, ds.dataset_info.metadata


def test_bigearthnet_sample_round_trip(tmp_path):
  data_dir = str(tmp_path / "tfds")
  common.prepare(MmrsBigearthnetMm, SAMPLE, data_dir)
  got, md = read("mmrs_bigearthnet_mm", "train", data_dir)
  assert len(got) == 6  # the sample's S1+S2 pairs; the unpaired patches are counted, not written
  assert md["skipped"] == {"train": {"missing_s1": 8, "missing_s2": 3}}
  assert md["bands"] == {"s2": list(B.S2_L2A_BANDS), "s1": ["VV", "VH"]}
  items, _ = bigearthnet_mm.list_items(SAMPLE)
  pair = next(it for it in items if it.s1_dir and it.s2_dir)
  (_, rec), = bigearthnet_mm.build(pair)
  ex = got[rec["id"]]
  np.testing.assert_array_equal(ex["s2"], rec["s2"])
  np.testing.assert_array_equal(ex["s1"], rec["s1"])
  assert list(ex["label_ben19"]) == rec["labels"]["ben19"] and list(ex["label_corine43"]) == rec["labels"]["corine43"]
  assert md["stats"]["s2"]["bands"] == list(B.S2_L2A_BANDS)
  np.testing.assert_allclose(md["stats"]["s1"]["mean"], np.mean([e["s1"].reshape(-1, 2) for e in got.values()],
                                                                 axis=(0, 1)), rtol=1e-3)
  # The training pipeline reads it through a tfds: spec, with multi-hot labels.
  from configs import common as cfg_common
  from mmrs.data import pipeline
  d = cfg_common.dataset_config(f"tfds:mmrs_bigearthnet_mm:train@{data_dir}", image_size=32, label_set="ben19")
  pipe = pipeline.make_pipeline(d, modalities=("s1", "s2"), global_batch_size=8, seed=0, shuffle=False,
                                repeat=False, drop_remainder=False)
  batch = next(pipe.iterator)
  pipe.close()
  assert batch["label_ben19"].shape == (8, 19) and batch["valid"].sum() == 6
  assert batch["label_ben19"][batch["valid"]].sum(1).min() >= 1


def test_eurosat_reorders_bands_and_labels_classes_and_fails_or_skips_bad_input(tmp_path):
  src = tmp_path / "EuroSAT_MS"
  for k, cls in enumerate(("Forest", "SeaLake")):
    for i in range(2):
      write_tif(str(src / cls / f"{cls}_{i + 1}.tif"), band_stack(64, 10 * k + i), "uint16")
  data_dir = str(tmp_path / "tfds")
  common.prepare(MmrsEurosatMs, str(tmp_path), data_dir)
  got, md = read("mmrs_eurosat_ms", "train", data_dir)
  assert sorted(got) == ["Forest_1", "Forest_2", "SeaLake_1", "SeaLake_2"]
  ex = got["SeaLake_2"]
  assert ex["label_eurosat"] == label_sets.EUROSAT_CLASSES.index("SeaLake") and ex["s2"].shape == (64, 64, 13)
  # File order B01..B12, B8A -> mmrs order (B8A after B08): B8A was the file's last band.
  assert ex["s2"][0, 0, B.S2_L1C_BANDS.index("B8A")] == 100 * 13 + 11
  assert ex["s2"][0, 0, B.S2_L1C_BANDS.index("B09")] == 100 * 9 + 11
  # A damaged file: named in the error, or skipped and counted.
  (src / "Forest" / "Forest_3.tif").write_bytes(b"not a tiff")
  with pytest.raises(ValueError, match="Forest_3"):
    common.prepare(MmrsEurosatMs, str(tmp_path), str(tmp_path / "tfds_fail"))
  common.prepare(MmrsEurosatMs, str(tmp_path), str(tmp_path / "tfds_skip"), on_bad="skip")
  got, md = read("mmrs_eurosat_ms", "train", str(tmp_path / "tfds_skip"))
  assert len(got) == 4 and md["skipped"] == {"train": {"bad_input": 1}}


def test_sen12ms_and_dfc2020_configs(tmp_path):
  n = 256
  dfc = (np.arange(n * n).reshape(n, n) % 12)  # 0 and 11 are not DFC classes -> -1
  igbp = np.full((n, n), 17)  # water
  igbp[:40] = 10  # grassland
  for roi, split_dir, seed in (("ROIs0000_validation", "validation", 1), ("ROIs0000_test", "test", 2)):
    for kind, arr, dtype in (("s2", band_stack(n, seed), "uint16"), ("s1", np.stack([np.full((n, n), -8.0)] * 2),
                                                                      "float32"),
                             ("lc", np.stack([igbp] * 4), "uint16"), ("dfc", dfc, "uint16")):
      write_tif(str(tmp_path / roi / f"{kind}_{split_dir}" / f"{roi}_{kind}_0_p{seed}.tif"), arr, dtype)
  for kind, arr, dtype in (("s2", band_stack(n, 3), "uint16"), ("s1", np.stack([np.full((n, n), -9.0)] * 2),
                                                                 "float32"), ("lc", np.stack([igbp] * 4), "uint16")):
    write_tif(str(tmp_path / "ROIs1158_spring" / f"{kind}_1" / f"ROIs1158_spring_{kind}_1_p5.tif"), arr, dtype)
  data_dir = str(tmp_path / "tfds")
  common.prepare(MmrsSen12ms, str(tmp_path), data_dir, config="dfc2020")
  val, md = read("mmrs_sen12ms/dfc2020", "val", data_dir)
  test, _ = read("mmrs_sen12ms/dfc2020", "test", data_dir)
  assert list(val) == ["ROIs0000_validation_0_p1"] and list(test) == ["ROIs0000_test_0_p2"]
  mask = val["ROIs0000_validation_0_p1"]["mask"]
  np.testing.assert_array_equal(mask, np.where((dfc >= 1) & (dfc <= 10), dfc - 1, -1))
  assert md["label_sets"]["dfc2020"]["kind"] == "mask"
  common.prepare(MmrsSen12ms, str(tmp_path), data_dir, config="sen12ms")
  got, md = read("mmrs_sen12ms/sen12ms", "train", data_dir)
  (ex,) = got.values()
  water, grass = label_sets.DFC10_CLASSES.index("Water"), label_sets.DFC10_CLASSES.index("Grassland")
  assert ex["label_sen12ms"] == water and sorted(ex["label_sen12ms_multi"]) == sorted([water, grass])
  assert (ex["mask"][:40] == grass).all() and ex["s1"].shape == (n, n, 2)


def test_sen1floods11_s1s2_skips_chips_without_s1_and_s2_keeps_them(tmp_path):
  n = 512
  hand = tmp_path / "v1.1" / "data" / "flood_events" / "HandLabeled"
  for seed, chip in enumerate(("Ghana_1", "India_2")):
    write_tif(str(hand / "S2Hand" / f"{chip}_S2Hand.tif"), band_stack(n, seed), "uint16")
    s1 = np.full((2, n, n), -10.0, np.float32)
    if chip == "India_2":
      s1[:, : 3 * n // 4] = np.nan  # 75% no-data: the converter drops S1 from this chip
    write_tif(str(hand / "S1Hand" / f"{chip}_S1Hand.tif"), s1, "float32")
    label = np.ones((n, n), np.int16)
    label[:10] = -1
    write_tif(str(hand / "LabelHand" / f"{chip}_LabelHand.tif"), label, "int16")
  splits = tmp_path / "v1.1" / "splits" / "flood_handlabeled"
  splits.mkdir(parents=True)
  (splits / "flood_train_data.csv").write_text("Ghana_1_S1Hand.tif,Ghana_1_LabelHand.tif\n"
                                               "India_2_S1Hand.tif,India_2_LabelHand.tif\n")
  data_dir = str(tmp_path / "tfds")
  common.prepare(MmrsSen1floods11, str(tmp_path / "v1.1"), data_dir, config="s1s2")
  got, md = read("mmrs_sen1floods11/s1s2", "train", data_dir)
  assert list(got) == ["Ghana_1"] and md["skipped"] == {"train": {"missing_s1": 1}}
  # Chips written beside the published split sizes: the S1+S2 build lost India_2 (its S1 is mostly no-data).
  pub = md["published"]
  assert pub["expected"] == sen1floods11.PUBLISHED_CHIPS and pub["listed"] == {"train": 2}
  assert pub["found"] == {"train": 1, "val": 0, "test": 0, "bolivia": 0}
  assert "train: 1 chips found (2 listed), 252 published: not the full dataset" in pub["warnings"]
  assert got["Ghana_1"]["s1"].shape == (n, n, 2) and (got["Ghana_1"]["mask"][:10] == -1).all()
  common.prepare(MmrsSen1floods11, str(tmp_path / "v1.1"), data_dir, config="s2")
  got, md = read("mmrs_sen1floods11/s2", "train", data_dir)
  assert sorted(got) == ["Ghana_1", "India_2"] and "s1" not in got["India_2"]
  assert md["bands"] == {"s2": list(B.S2_L1C_BANDS)}
  assert got["India_2"]["s2"][5, 5, 0] == 100 + 1
  assert sen1floods11.SOURCE == md["source"]
