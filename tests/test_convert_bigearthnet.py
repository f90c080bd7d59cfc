"""BigEarthNet-MM converter on the bundled real sample, its bad-input handling and splits, and the 43->19 labels."""
import json
import os
import shutil

import numpy as np
import pytest
import rasterio

from data_prep import bigearthnet_mm, inspect
from data_prep.convert import ConversionError
from mmrs import bands
from mmrs.data import bigearthnet_labels as bl
from timeouts import HANG_GUARD_S

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "bigearthnet_mm")
S1_ROOT, S2_ROOT = os.path.join(SAMPLE, "BigEarthNet-S1"), os.path.join(SAMPLE, "BigEarthNet-S2")
PAIR_S1 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48"
PAIR_S2 = "S2A_MSIL2A_20170613T101031_87_48"
LONELY_S1 = "S1A_IW_GRDH_1SDV_20170613T165043_33UUP_61_39"  # its S2 partner is not in the sample
LONELY_S2 = "S2B_MSIL2A_20180421T114349_41_4"


def read_all(out_dir):
  m = inspect.load_manifest(out_dir)
  return {rec["id"]: (split_of(m, shard), rec) for shard, _, rec in inspect.iter_records(out_dir, m)}


def split_of(manifest, shard):
  return next(s for s, groups in manifest["splits"].items() for names in groups.values() if shard in names)


def tif(path):
  with rasterio.open(path) as f:
    return f.read(1)


@pytest.fixture(scope="module")
def sample_out(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("ben") / "out")
  manifest = bigearthnet_mm.convert_dataset(SAMPLE, out, num_shards=2, workers=0)
  return out, manifest, read_all(out)


def test_sample_counts_and_manifest(sample_out):
  out, m, recs = sample_out
  c = m["counts"]
  assert (c["pairs"], c["s1_only"], c["s2_only"], c["records"], c["skipped"]) == (6, 3, 8, 17, 0)
  assert c["no_ben19_labels"] == 0
  assert m["warnings"] == {"s1_partner_missing": 3}
  assert m["source"] == "BigEarthNet-MM v1" and m["licence"] == "CDLA-Permissive-1.0"
  assert m["label_sets"]["corine43"]["names"] == list(bl.CORINE43_NAMES)
  assert m["label_sets"]["ben19"]["names"] == list(bl.BEN19_NAMES)
  assert m["label_sets"]["ben19"]["kind"] == "multi_label"
  assert m["bands"] == {"s1": ["VV", "VH"], "s2": list(bands.S2_L2A_BANDS)}
  assert len(recs) == 17
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  assert stats["s2"]["bands"] == list(bands.S2_L2A_BANDS) and stats["s2"]["pixels"] == 14 * 120 * 120


def test_pair_record_arrays_match_the_geotiffs(sample_out):
  _, _, recs = sample_out
  split, r = recs[PAIR_S2]
  assert split == "train"
  assert r["s2"].shape == (120, 120, 12) and r["s2"].dtype == np.uint16
  assert r["s1"].shape == (120, 120, 2) and r["s1"].dtype == np.float32
  d2 = os.path.join(S2_ROOT, PAIR_S2)
  for c, b in enumerate(bands.S2_L2A_BANDS):
    raw = tif(os.path.join(d2, f"{PAIR_S2}_{b}.tif"))
    f = 120 // raw.shape[0]  # 1 (10 m), 2 (20 m), 6 (60 m)
    assert f == bands.BANDS[b].resolution_m // 10
    np.testing.assert_array_equal(r["s2"][..., c], np.repeat(np.repeat(raw, f, 0), f, 1), err_msg=b)
  d1 = os.path.join(S1_ROOT, PAIR_S1)
  np.testing.assert_array_equal(r["s1"][..., 0], tif(os.path.join(d1, f"{PAIR_S1}_VV.tif")))
  np.testing.assert_array_equal(r["s1"][..., 1], tif(os.path.join(d1, f"{PAIR_S1}_VH.tif")))
  assert r["s2_bands"] == bands.S2_L2A_BANDS and r["s1_bands"] == ("VV", "VH")


def test_pair_record_labels_and_metadata(sample_out):
  _, _, recs = sample_out
  r = recs[PAIR_S2][1]
  with open(os.path.join(S2_ROOT, PAIR_S2, f"{PAIR_S2}_labels_metadata.json")) as f:
    names = json.load(f)["labels"]
  assert [bl.CORINE43_NAMES[i] for i in r["labels"]["corine43"]] == names  # file order is the official order
  assert [bl.BEN19_NAMES[i] for i in r["labels"]["ben19"]] == [
      "Arable land", "Land principally occupied by agriculture, with significant areas of natural vegetation"]
  m = r["meta"]
  assert m["id"] == PAIR_S2 and m["s2_id"] == PAIR_S2 and m["s1_id"] == PAIR_S1
  assert m["crs"] == "EPSG:32633"
  assert m["bounds"] == [404400.0, 5341200.0, 405600.0, 5342400.0]
  assert m["lon"] == pytest.approx(13.7209, abs=1e-3) and m["lat"] == pytest.approx(48.2223, abs=1e-3)
  assert m["s1_time"] == "2017-06-13T16:50:43Z" and m["s2_time"] == "2017-06-13T10:10:31Z"
  assert m["source"] == "BigEarthNet-MM v1" and m["licence"] == "CDLA-Permissive-1.0"


def test_leftovers_keep_their_own_modality_and_names(sample_out):
  _, _, recs = sample_out
  r1 = recs[LONELY_S1][1]
  assert r1.get("s2") is None and r1["s1"].shape == (120, 120, 2)
  assert r1["meta"]["s1_id"] == LONELY_S1 and r1["meta"]["s2_id_missing"] == "S2A_MSIL2A_20170613T101031_61_39"
  assert r1["meta"]["bounds"] == [373200.0, 5352000.0, 374400.0, 5353200.0]  # S1 metadata spells it 'lly'
  assert "Inland waters" in [bl.BEN19_NAMES[i] for i in r1["labels"]["ben19"]]
  r2 = recs[LONELY_S2][1]
  assert r2.get("s1") is None and r2["s2"].shape == (120, 120, 12) and r2["meta"]["s2_id"] == LONELY_S2
  assert "s1_id" not in r2["meta"]


def test_workers_give_byte_identical_shards(sample_out, tmp_path):
  out, _, _ = sample_out
  out2 = str(tmp_path / "w2")
  bigearthnet_mm.convert_dataset(SAMPLE, out2, num_shards=2, workers=2)
  names = sorted(n for n in os.listdir(out) if n.endswith(".array_record"))
  assert names == sorted(n for n in os.listdir(out2) if n.endswith(".array_record"))
  for n in names + ["stats.json"]:
    with open(os.path.join(out, n), "rb") as a, open(os.path.join(out2, n), "rb") as b:
      assert a.read() == b.read(), n


# ---------------------------------------------------------------- bad input, on a one-pair copy of the sample

@pytest.fixture
def one_pair(tmp_path):
  src = tmp_path / "src"
  shutil.copytree(os.path.join(S1_ROOT, PAIR_S1), src / "BigEarthNet-S1" / PAIR_S1)
  shutil.copytree(os.path.join(S2_ROOT, PAIR_S2), src / "BigEarthNet-S2" / PAIR_S2)
  shutil.copytree(os.path.join(S2_ROOT, LONELY_S2), src / "BigEarthNet-S2" / LONELY_S2)
  return src


def rewrite(path, fn):
  with rasterio.open(path) as f:
    profile, data = f.profile, f.read(1)
  data = fn(data)
  profile.update(dtype=data.dtype.name, height=data.shape[0], width=data.shape[1])
  with rasterio.open(path, "w", **profile) as f:
    f.write(data, 1)


def s2_file(src, band, patch=PAIR_S2):
  return str(src / "BigEarthNet-S2" / patch / f"{patch}_{band}.tif")


def s1_file(src, pol):
  return str(src / "BigEarthNet-S1" / PAIR_S1 / f"{PAIR_S1}_{pol}.tif")


def set_labels(path, labels):
  with open(path) as f:
    meta = json.load(f)
  meta["labels"] = labels
  with open(path, "w") as f:
    json.dump(meta, f)


BAD_CASES = {
    "missing_band": (lambda src: os.remove(s2_file(src, "B8A")), "B8A.tif"),
    "wrong_shape": (lambda src: rewrite(s2_file(src, "B05"), lambda a: a[:50, :50]), "B05.tif"),
    "wrong_dtype": (lambda src: rewrite(s2_file(src, "B03"), lambda a: a.astype(np.float32)), "B03.tif"),
    "all_zero_s2": (lambda src: [rewrite(s2_file(src, b), np.zeros_like) for b in bands.S2_L2A_BANDS],
                    "S2 bands are zero"),
    "unknown_label": (lambda src: set_labels(os.path.join(src, "BigEarthNet-S2", PAIR_S2,
                                                          f"{PAIR_S2}_labels_metadata.json"), ["Moon dust"]),
                      "labels_metadata.json"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_fails_naming_the_file_or_is_skipped_and_counted(one_pair, tmp_path, case):
  damage, needle = BAD_CASES[case]
  damage(one_pair)
  with pytest.raises(ConversionError, match=needle.replace(".", r"\.")):
    bigearthnet_mm.convert_dataset(str(one_pair), str(tmp_path / "fail"), num_shards=1)
  assert not os.path.exists(tmp_path / "fail")
  assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
  m = bigearthnet_mm.convert_dataset(str(one_pair), str(tmp_path / "skip"), num_shards=1, on_bad="skip")
  assert (m["counts"]["skipped"], m["counts"]["records"], m["counts"]["s2_only"]) == (1, 1, 1)
  assert m["skipped_items"][0]["item"] == PAIR_S2 and needle in m["skipped_items"][0]["reason"]


def test_a_little_nan_in_s1_is_cleaned_and_flagged(one_pair, tmp_path):
  rewrite(s1_file(one_pair, "VV"), lambda a: np.where(np.eye(*a.shape, dtype=bool), np.nan, a).astype(np.float32))
  out = str(tmp_path / "out")
  bigearthnet_mm.convert_dataset(str(one_pair), out, num_shards=1)
  r = read_all(out)[PAIR_S2][1]
  assert np.isfinite(r["s1"]).all()
  np.testing.assert_array_equal(r["s1_valid"], 1 - np.eye(120, dtype=np.uint8))
  assert (r["s1"][..., 0][np.eye(120, dtype=bool)] == bands.S1_NODATA_FILL_DB).all()


def test_mostly_nan_s1_counts_as_s1_missing_and_the_pair_keeps_its_s2(one_pair, tmp_path):
  rewrite(s1_file(one_pair, "VH"), lambda a: np.where(
      np.arange(a.size).reshape(a.shape) < a.size * 0.6, np.nan, a).astype(np.float32))
  out = str(tmp_path / "out")
  m = bigearthnet_mm.convert_dataset(str(one_pair), out, num_shards=1)
  assert (m["counts"]["pairs"], m["counts"]["s2_only"], m["counts"]["s1_dropped"]) == (0, 2, 1)
  r = read_all(out)[PAIR_S2][1]
  assert r.get("s1") is None and "60% of the S1 pixels are no-data" in r["meta"]["s1_dropped"]


def test_patch_with_no_19_class_label_is_kept_and_counted(one_pair, tmp_path):
  set_labels(os.path.join(one_pair, "BigEarthNet-S2", LONELY_S2, f"{LONELY_S2}_labels_metadata.json"),
             ["Burnt areas", "Airports"])
  out = str(tmp_path / "out")
  m = bigearthnet_mm.convert_dataset(str(one_pair), out, num_shards=1)
  assert m["counts"]["no_ben19_labels"] == 1 and m["counts"]["records"] == 2
  labels = read_all(out)[LONELY_S2][1]["labels"]
  assert labels == {"corine43": [5, 32], "ben19": []}


def test_pairing_follows_the_s1_metadata_not_the_folder_names(one_pair, tmp_path):
  new = "S2X_renamed_patch"
  old_dir, new_dir = one_pair / "BigEarthNet-S2" / PAIR_S2, one_pair / "BigEarthNet-S2" / new
  old_dir.rename(new_dir)
  for f in os.listdir(new_dir):
    os.rename(new_dir / f, new_dir / f.replace(PAIR_S2, new))
  path = os.path.join(one_pair, "BigEarthNet-S1", PAIR_S1, f"{PAIR_S1}_labels_metadata.json")
  with open(path) as f:
    meta = json.load(f)
  meta["corresponding_s2_patch"] = new
  with open(path, "w") as f:
    json.dump(meta, f)
  m = bigearthnet_mm.convert_dataset(str(one_pair), str(tmp_path / "out"), num_shards=1)
  assert (m["counts"]["pairs"], m["counts"]["s2_only"], m["counts"]["s1_only"]) == (1, 1, 0)
  assert read_all(str(tmp_path / "out"))[new][1]["meta"]["s1_id"] == PAIR_S1


# ---------------------------------------------------------------- splits

def test_official_split_lists(tmp_path):
  d = tmp_path / "splits"
  d.mkdir()
  (d / "train.csv").write_text(f"{PAIR_S2}\nS2B_MSIL2A_20180421T114349_47_56\n")
  (d / "val.csv").write_text(f"{LONELY_S2}\nS2A_MSIL2A_20170613T101031_61_39\n")  # the lonely S1's partner name
  (d / "test.csv").write_text("S2A_MSIL2A_20170617T113321_4_55\n")
  out = str(tmp_path / "out")
  m = bigearthnet_mm.convert_dataset(SAMPLE, out, num_shards=1, splits_dir=str(d))
  recs = read_all(out)
  assert {k: v[0] for k, v in recs.items()} == {
      PAIR_S2: "train", "S2B_MSIL2A_20180421T114349_47_56": "train", LONELY_S2: "val", LONELY_S1: "val",
      "S2A_MSIL2A_20170617T113321_4_55": "test"}
  assert m["warnings"]["not_in_splits"] == 17 - 5
  # Official lists: the records found per split beside the published v1 split sizes and the lists' rows.
  p = m["published"]
  assert p["expected"] == {"train": 269_695, "val": 123_723, "test": 125_866} == bigearthnet_mm.PUBLISHED_V1
  assert p["found"] == {"train": 2, "val": 2, "test": 1} and p["listed"] == {"train": 2, "val": 2, "test": 1}
  assert "val: 2 records found (2 listed), 123723 published: not the full dataset" in p["warnings"]
  assert m["bigearthnet"]["splits"] == "official v1 lists train.csv / val.csv / test.csv"
  m2 = bigearthnet_mm.convert_dataset(SAMPLE, str(tmp_path / "all"), num_shards=1, splits_dir=str(d),
                                      unlisted_split="extra")
  assert len(read_all(str(tmp_path / "all"))) == 17
  assert m2["splits"]["extra"] and "not_in_splits" not in m2["warnings"]


def test_hash_split_is_stable_and_complete(tmp_path):
  a = bigearthnet_mm.list_items(SAMPLE, split="hash:0.5,0.5")[0]
  b = bigearthnet_mm.list_items(SAMPLE, split="hash:0.5,0.5")[0]
  assert [(i.name, i.split) for i in a] == [(i.name, i.split) for i in b]
  assert len(a) == 17 and {i.split for i in a} == {"train", "val"}


# ---------------------------------------------------------------- the 43 -> 19 nomenclature

# Sumbul et al. 2020 by name (as bigearthnet-common's OLD2NEW_LABELS_DICT); None = dropped from the 19 classes.
EXPECTED_BY_NAME = {
    "Continuous urban fabric": "Urban fabric", "Discontinuous urban fabric": "Urban fabric",
    "Industrial or commercial units": "Industrial or commercial units",
    "Road and rail networks and associated land": None, "Port areas": None, "Airports": None,
    "Mineral extraction sites": None, "Dump sites": None, "Construction sites": None, "Green urban areas": None,
    "Sport and leisure facilities": None,
    "Non-irrigated arable land": "Arable land", "Permanently irrigated land": "Arable land",
    "Rice fields": "Arable land",
    "Vineyards": "Permanent crops", "Fruit trees and berry plantations": "Permanent crops",
    "Olive groves": "Permanent crops", "Annual crops associated with permanent crops": "Permanent crops",
    "Pastures": "Pastures", "Complex cultivation patterns": "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation":
        "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas": "Agro-forestry areas", "Broad-leaved forest": "Broad-leaved forest",
    "Coniferous forest": "Coniferous forest", "Mixed forest": "Mixed forest",
    "Natural grassland": "Natural grassland and sparsely vegetated areas",
    "Sparsely vegetated areas": "Natural grassland and sparsely vegetated areas",
    "Moors and heathland": "Moors, heathland and sclerophyllous vegetation",
    "Sclerophyllous vegetation": "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland/shrub": "Transitional woodland, shrub", "Beaches, dunes, sands": "Beaches, dunes, sands",
    "Bare rock": None, "Burnt areas": None, "Intertidal flats": None,
    "Inland marshes": "Inland wetlands", "Peatbogs": "Inland wetlands",
    "Salt marshes": "Coastal wetlands", "Salines": "Coastal wetlands",
    "Water courses": "Inland waters", "Water bodies": "Inland waters",
    "Coastal lagoons": "Marine waters", "Estuaries": "Marine waters", "Sea and ocean": "Marine waters",
}


def test_43_to_19_mapping_matches_the_official_nomenclature():
  assert len(bl.CORINE43_NAMES) == 43 == len(set(bl.CORINE43_NAMES)) == len(EXPECTED_BY_NAME)
  assert len(bl.BEN19_NAMES) == 19 == len(set(bl.BEN19_NAMES))
  for old, new in EXPECTED_BY_NAME.items():
    got = bl.CORINE43_TO_BEN19[bl.CORINE43_NAMES.index(old)]
    assert (None if got is None else bl.BEN19_NAMES[got]) == new, old
  assert bl.CORINE43_UNMAPPED == tuple(n for n in bl.CORINE43_NAMES if EXPECTED_BY_NAME[n] is None)
  assert len(bl.CORINE43_UNMAPPED) == 11
  # official index order (label_indices.json): spot checks at both ends and the middle
  assert (bl.CORINE43_NAMES[0], bl.CORINE43_NAMES[20], bl.CORINE43_NAMES[42]) == (
      "Continuous urban fabric",
      "Land principally occupied by agriculture, with significant areas of natural vegetation", "Sea and ocean")
  assert (bl.BEN19_NAMES[0], bl.BEN19_NAMES[13], bl.BEN19_NAMES[18]) == (
      "Urban fabric", "Transitional woodland, shrub", "Marine waters")


def test_label_helpers():
  assert bl.labels_from_names(["Sea and ocean", "Estuaries", "Bare rock"]) == {"corine43": [30, 41, 42],
                                                                                "ben19": [18]}
  with pytest.raises(ValueError, match="Moon dust"):
    bl.corine43_indices(["Moon dust"])
  np.testing.assert_array_equal(bl.multi_hot([0, 2], 4), [1, 0, 1, 0])


def test_command_line(tmp_path):
  import subprocess
  import sys
  out = str(tmp_path / "cli")
  res = subprocess.run([sys.executable, "-m", "data_prep.bigearthnet_mm", f"--src={SAMPLE}", f"--out={out}",
                        "--num_shards=1", "--workers=0", "--split=hash:0.8,0.2"],
                       cwd=os.path.join(SAMPLE, "..", "..", ".."), capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr
  assert "wrote 17 records (pairs=6, s1_only=3, s2_only=8, skipped=0)" in res.stderr
  m = inspect.load_manifest(out)
  assert m["args"]["split"] == "hash:0.8,0.2" and set(m["splits"]) == {"train", "val"}
