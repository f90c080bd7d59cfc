"""BigEarthNet v2.0 (reBEN) in its released layout, v1 under its archive folder names, version detection, the
cloud/shadow/seasonal-snow exclusion (v2 parquet flags, v1 official lists) and tile-blocked hash splits."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import bigearthnet_mm, inspect
from mmrs.data import bigearthnet_labels as bl
from timeouts import HANG_GUARD_S

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "bigearthnet_mm")
REPO = os.path.join(os.path.dirname(__file__), "..")

# (v1 S1 patch, v1 S2 patch, v2 S2 product, v2 S1 product, split, country, snow, cloud) for the sample's 6 pairs.
V2_ROWS = [
    ("S1A_IW_GRDH_1SDV_20170613T165043_33UUP_87_48", "S2A_MSIL2A_20170613T101031_87_48",
     "S2A_MSIL2A_20170613T101031_N9999_R022_T33UUP", "train", "Austria", False, False),
    ("S1A_IW_GRDH_1SDV_20170617T064724_29UPU_36_85", "S2A_MSIL2A_20170617T113321_36_85",
     "S2A_MSIL2A_20170617T113321_N9999_R080_T29UPU", "train", "Ireland", False, False),
    ("S1A_IW_GRDH_1SDV_20170617T064724_29UPU_4_55", "S2A_MSIL2A_20170617T113321_4_55",
     "S2A_MSIL2A_20170617T113321_N9999_R080_T29UPU", "validation", "Ireland", False, False),
    ("S1A_IW_GRDH_1SDV_20171221T064238_29SND_56_35", "S2A_MSIL2A_20171221T112501_56_35",
     "S2A_MSIL2A_20171221T112501_N9999_R037_T29SND", "test", "Portugal", False, False),
    ("S1A_IW_GRDH_1SDV_20170925T043256_35VPK_69_24", "S2B_MSIL2A_20170924T93020_69_24",
     "S2B_MSIL2A_20170924T093019_N9999_R136_T35VPK", "train", "Finland", False, True),
    ("S1A_IW_GRDH_1SDV_20180204T043253_35VPK_57_38", "S2B_MSIL2A_20180204T94161_57_38",
     "S2B_MSIL2A_20180204T094159_N9999_R036_T35VPK", "test", "Finland", True, False),
]
EXTRA_S2 = ("S2B_MSIL2A_20180421T114349_41_4", "S2B_MSIL2A_20180421T114349_N9999_R123_T29UPU")  # not in metadata


def _patch_id(product, v1_name):
  return product + "_" + "_".join(v1_name.split("_")[-2:])


def _copy_patch(src_dir, dst_dir, old, new):
  os.makedirs(dst_dir)
  for f in os.listdir(src_dir):
    if f.endswith(".tif"):
      shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f.replace(old, new)))


def _v1_labels_19(s1_name):
  with open(os.path.join(SAMPLE, "BigEarthNet-S1", s1_name, f"{s1_name}_labels_metadata.json")) as f:
    c43 = bl.corine43_indices(json.load(f)["labels"])
  return [bl.BEN19_NAMES[i] for i in bl.to_ben19(c43)]


def write_parquet(path, rows):
  """reBEN's metadata.parquet schema: string columns, `labels` list<string>, two bool flags, and the pandas index
  column the released files carry (`__index_level_0__`), which a reader must ignore."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  cols = {c: [r[c] for r in rows] for c in bigearthnet_mm.V2_COLUMNS}
  schema = pa.schema([("patch_id", pa.string()), ("labels", pa.list_(pa.string())), ("split", pa.string()),
                      ("country", pa.string()), ("s1_name", pa.string()), ("s2v1_name", pa.string()),
                      ("contains_seasonal_snow", pa.bool_()), ("contains_cloud_or_shadow", pa.bool_()),
                      ("__index_level_0__", pa.int64())])
  cols["__index_level_0__"] = list(range(len(rows)))
  pq.write_table(pa.table(cols, schema=schema), path)


def make_v2(root):
  """A BigEarthNet v2.0 (reBEN) folder as bigearth.net releases it, built from the bundled v1 sample's real pixels.

  Layout checked against: torchgeo tests/data/bigearthnet/v2/data.py (BigEarthNet-S2/<product>/<patch_id>/
  <patch_id>_B??.tif, BigEarthNet-S1/<product>/<s1_name>/<s1_name>_{VV,VH}.tif, metadata.parquet next to them) and
  ConfigILM configilm/extra/mock_data/BENv2/metadata.parquet + metadata_for_patches_with_snow_cloud_or_shadow.parquet
  (a row subset of the released files: columns patch_id, labels list<string>, split train|validation|test, country,
  s1_name, s2v1_name, contains_seasonal_snow bool, contains_cloud_or_shadow bool; flagged patches live in the second
  file). Band files keep their native 10/20/60 m grids as in v1 (ConfigILM's BENv2 loader interpolates them).
  """
  root = str(root)
  clean, flagged = [], []
  for s1, s2v1, product, split, country, snow, cloud in V2_ROWS:
    pid = _patch_id(product, s2v1)
    s1_product = "_".join(s1.split("_")[:5])
    _copy_patch(os.path.join(SAMPLE, "BigEarthNet-S2", s2v1), os.path.join(root, "BigEarthNet-S2", product, pid),
                s2v1, pid)
    _copy_patch(os.path.join(SAMPLE, "BigEarthNet-S1", s1), os.path.join(root, "BigEarthNet-S1", s1_product, s1),
                s1, s1)
    row = dict(patch_id=pid, labels=_v1_labels_19(s1), split=split, country=country, s1_name=s1, s2v1_name=s2v1,
               contains_seasonal_snow=snow, contains_cloud_or_shadow=cloud)
    (flagged if snow or cloud else clean).append(row)
  pid = _patch_id(EXTRA_S2[1], EXTRA_S2[0])
  _copy_patch(os.path.join(SAMPLE, "BigEarthNet-S2", EXTRA_S2[0]), os.path.join(root, "BigEarthNet-S2", EXTRA_S2[1],
                                                                               pid), EXTRA_S2[0], pid)
  write_parquet(os.path.join(root, bigearthnet_mm.V2_METADATA), clean)
  write_parquet(os.path.join(root, bigearthnet_mm.V2_METADATA_FLAGGED), flagged)
  return root


def read_all(out_dir):
  m = inspect.load_manifest(out_dir)
  split_of = {n: s for s, groups in m["splits"].items() for names in groups.values() for n in names}
  return {rec["id"]: (split_of[shard], rec) for shard, _, rec in inspect.iter_records(out_dir, m)}


@pytest.fixture(scope="module")
def v2_src(tmp_path_factory):
  return make_v2(tmp_path_factory.mktemp("ben2") / "BigEarthNet-V2")


def pid_of(i):
  return _patch_id(V2_ROWS[i][2], V2_ROWS[i][1])


def test_v2_command_line_end_to_end(v2_src, tmp_path):
  out = str(tmp_path / "out")
  res = subprocess.run([sys.executable, "-m", "data_prep.bigearthnet_mm", f"--src={v2_src}", f"--out={out}",
                        "--num_shards=1", "--workers=0"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr
  assert "wrote 4 records (pairs=4, s1_only=0, s2_only=0, skipped=0)" in res.stderr
  m = inspect.load_manifest(out)
  assert m["bigearthnet"]["version"] == "2.0" and m["source"] == bigearthnet_mm.SOURCE_V2
  assert m["bigearthnet"]["exclusion"]["applied"] is True
  c = m["counts"]
  assert (c["excluded"], c["excluded_cloud_or_shadow"], c["excluded_seasonal_snow"], c["kept_flagged"]) == (2, 1, 1, 0)
  assert m["warnings"] == {"s2_folder_not_in_metadata": 1}
  assert list(m["label_sets"]) == ["ben19"] and m["label_sets"]["ben19"]["num_classes"] == 19
  recs = read_all(out)
  assert {k: v[0] for k, v in recs.items()} == {pid_of(0): "train", pid_of(1): "train", pid_of(2): "val",
                                                pid_of(3): "test"}
  # Expected vs found: the published split sizes beside metadata.parquet's rows and the records written.
  p = m["published"]
  assert p["expected"] == {"train": 237_871, "val": 122_342, "test": 119_825}
  assert p["listed"] == p["found"] == {"train": 2, "val": 1, "test": 1}
  assert "test: 1 records found (1 listed), 119825 published: not the full dataset" in p["warnings"]
  assert "test: 1 records found" in res.stderr  # and in the log


def test_published_v2_split_sizes_add_up_to_the_paper_total():
  # metadata.parquet (clean rows) + the flagged file = the 549,488 pairs of the reBEN paper.
  assert sum(bigearthnet_mm.PUBLISHED_V2.values()) + bigearthnet_mm.PUBLISHED_V2_FLAGGED == \
      bigearthnet_mm.PUBLISHED_V2_TOTAL == 549_488
  assert sum(bigearthnet_mm.PUBLISHED_V1.values()) == 519_284  # v1 lists: 590,326 pairs less the flagged ones


def test_v2_record_pixels_labels_and_metadata(v2_src, tmp_path):
  out = str(tmp_path / "out")
  bigearthnet_mm.convert_dataset(v2_src, out, num_shards=1)
  split, r = read_all(out)[pid_of(0)]
  s1, s2v1, product = V2_ROWS[0][:3]
  d2 = os.path.join(v2_src, "BigEarthNet-S2", product, pid_of(0))
  with rasterio.open(os.path.join(d2, f"{pid_of(0)}_B05.tif")) as f:  # a 20 m band, replicated 2x2
    b05 = f.read(1)
  np.testing.assert_array_equal(r["s2"][..., 4], np.repeat(np.repeat(b05, 2, 0), 2, 1))
  with rasterio.open(os.path.join(v2_src, "BigEarthNet-S1", "S1A_IW_GRDH_1SDV_20170613T165043", s1,
                                  f"{s1}_VH.tif")) as f:
    np.testing.assert_array_equal(r["s1"][..., 1], f.read(1))
  assert [bl.BEN19_NAMES[i] for i in r["labels"]["ben19"]] == sorted(_v1_labels_19(s1), key=bl.BEN19_NAMES.index)
  assert "corine43" not in r["labels"]
  m = r["meta"]
  assert (m["s1_id"], m["s2_id"], m["s2v1_id"], m["country"]) == (s1, pid_of(0), s2v1, "Austria")
  assert m["s2_time"] == "2017-06-13T10:10:31Z" and m["s1_time"] == "2017-06-13T16:50:43Z"
  assert m["crs"] == "EPSG:32633" and m["bounds"] == [404400.0, 5341200.0, 405600.0, 5342400.0]
  assert m["lon"] == pytest.approx(13.7209, abs=1e-3) and m["source"] == "BigEarthNet v2.0 (reBEN)"


def test_v2_keep_cloudy_keeps_the_flagged_patches_with_their_official_split(v2_src, tmp_path):
  items, report = bigearthnet_mm.list_items(v2_src, keep_cloudy=True)
  assert {i.name: i.split for i in items} == {pid_of(0): "train", pid_of(1): "train", pid_of(2): "val",
                                              pid_of(3): "test", pid_of(4): "train", pid_of(5): "test"}
  assert report["exclusion"]["kept_flagged"] == 2 and report["exclusion"]["excluded"] == 0


def test_v2_parquet_without_expected_columns_is_a_one_line_error(v2_src, tmp_path):
  src = str(tmp_path / "src")
  shutil.copytree(v2_src, src)
  import pyarrow.parquet as pq
  path = os.path.join(src, bigearthnet_mm.V2_METADATA)
  pq.write_table(pq.read_table(path).drop(["s1_name"]), path)
  res = subprocess.run([sys.executable, "-m", "data_prep.bigearthnet_mm", f"--src={src}", f"--out={tmp_path}/o",
                        "--workers=0"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert res.returncode != 0 and not os.path.exists(tmp_path / "o")
  last = res.stderr.strip().splitlines()[-1]
  assert "metadata.parquet lacks column(s) ['s1_name']" in last and "Traceback" not in res.stderr


def test_layout_detection_errors_name_the_folder(v2_src, tmp_path):
  nested_only = tmp_path / "nested"
  shutil.copytree(os.path.join(v2_src, "BigEarthNet-S2"), nested_only / "BigEarthNet-S2")
  with pytest.raises(FileNotFoundError, match=f"{nested_only}.*no metadata.parquet"):
    bigearthnet_mm.detect(str(nested_only))
  odd = tmp_path / "odd" / "BigEarthNet-S2" / "some_dir" / "deeper" / "deepest"
  odd.mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="neither BigEarthNet v1"):
    bigearthnet_mm.detect(str(tmp_path / "odd"))
  with pytest.raises(FileNotFoundError, match="holds neither an S1 folder"):
    bigearthnet_mm.detect(str(tmp_path))
  assert bigearthnet_mm.detect(v2_src).version == "v2" and bigearthnet_mm.detect(SAMPLE).version == "v1"


def test_v1_archive_folder_names_and_official_exclusion_lists(tmp_path):
  src = tmp_path / "v1"
  shutil.copytree(os.path.join(SAMPLE, "BigEarthNet-S1"), src / "BigEarthNet-S1-v1.0")
  shutil.copytree(os.path.join(SAMPLE, "BigEarthNet-S2"), src / "BigEarthNet-v1.0")
  items, report = bigearthnet_mm.list_items(str(src))
  assert report["version"] == "v1" and len(items) == 17
  assert report["exclusion"]["applied"] is False and "KEPT" in report["exclusion"]["warning"]
  # Official v1 lists (one S2 patch name per line, as bigearth.net ships them): a pair and an S2-only patch.
  lists = tmp_path / "lists"
  lists.mkdir()
  (lists / "patches_with_cloud_and_shadow.csv").write_text("S2A_MSIL2A_20170613T101031_87_48\n")
  (lists / "patches_with_seasonal_snow.csv").write_text("S2B_MSIL2A_20180421T114349_41_4\nS2X_not_here_1_1\n")
  m = bigearthnet_mm.convert_dataset(str(src), str(tmp_path / "out"), num_shards=1, exclude_lists=str(lists))
  c = m["counts"]
  assert (c["records"], c["pairs"], c["s2_only"], c["excluded"]) == (15, 5, 7, 2)
  assert (c["excluded_cloud_or_shadow"], c["excluded_seasonal_snow"]) == (1, 1)
  assert m["bigearthnet"]["version"] == "1.0" and m["bigearthnet"]["exclusion"]["applied"] is True
  assert "S2A_MSIL2A_20170613T101031_87_48" not in read_all(str(tmp_path / "out"))
  # Lists that name no patch of this source are the wrong lists: an error, nothing written.
  (lists / "patches_with_cloud_and_shadow.csv").write_text("S2X_other_1_1\n")
  (lists / "patches_with_seasonal_snow.csv").write_text("S2X_other_2_2\n")
  with pytest.raises(ValueError, match="name none of the"):
    bigearthnet_mm.convert_dataset(str(src), str(tmp_path / "bad"), num_shards=1, exclude_lists=str(lists))
  assert not os.path.exists(tmp_path / "bad")


def test_hash_split_is_blocked_by_tile(v2_src):
  assert bigearthnet_mm.block_key(pid_of(1)) == bigearthnet_mm.block_key(pid_of(2)) == "29UPU"
  assert bigearthnet_mm.block_key("S1A_IW_GRDH_1SDV_20170617T064724_29UPU_4_55") == "29UPU"
  assert bigearthnet_mm.block_key("S2A_MSIL2A_20170617T113321_4_55") == "S2A_MSIL2A_20170617T113321"
  for spec in ("hash:0.5,0.5", "hash:0.34,0.33,0.33"):
    items, _ = bigearthnet_mm.list_items(v2_src, split=spec, keep_cloudy=True)
    by_block = {}
    for it in items:
      by_block.setdefault(bigearthnet_mm.block_key(it.name), set()).add(it.split)
    assert all(len(s) == 1 for s in by_block.values()) and len(by_block) == 4
  items, _ = bigearthnet_mm.list_items(SAMPLE, split="hash:0.5,0.5")
  split_of = {i.name: i.split for i in items}
  assert split_of["S2A_MSIL2A_20170617T113321_36_85"] == split_of["S2A_MSIL2A_20170617T113321_4_55"]


def test_tfds_builder_drops_listed_patches_and_rejects_foreign_lists(tmp_path):
  from data_prep.tfds import common
  from data_prep.tfds.bigearthnet_mm import MmrsBigearthnetMm
  import tensorflow_datasets as tfds
  manual = tmp_path / "manual"
  shutil.copytree(SAMPLE, manual)
  (manual / "exclude_lists").mkdir()
  (manual / "exclude_lists" / "patches_with_cloud_and_shadow.csv").write_text("S2A_MSIL2A_20170613T101031_87_48\n")
  common.prepare(MmrsBigearthnetMm, str(manual), str(tmp_path / "tfds"))
  ds = tfds.data_source("mmrs_bigearthnet_mm", split="train", data_dir=str(tmp_path / "tfds"))
  ids = {ds[i]["id"].decode() for i in range(len(ds))}
  assert len(ids) == 5 and "S2A_MSIL2A_20170613T101031_87_48" not in ids  # 6 sample pairs, one listed
  (manual / "exclude_lists" / "patches_with_cloud_and_shadow.csv").write_text("S2X_other_1_1\n")
  with pytest.raises(ValueError, match="name none of the"):
    common.prepare(MmrsBigearthnetMm, str(manual), str(tmp_path / "tfds2"))


def test_v2_with_v1_split_lists_matches_through_s2v1_name(v2_src, tmp_path):
  d = tmp_path / "splits"
  d.mkdir()
  (d / "train.csv").write_text(f"{V2_ROWS[0][1]}\n")
  (d / "test.csv").write_text(f"{V2_ROWS[3][1]}\n")
  items, report = bigearthnet_mm.list_items(v2_src, splits_dir=str(d))
  assert {i.name: i.split for i in items} == {pid_of(0): "train", pid_of(3): "test"}
  assert report["warnings"]["not_in_splits"] == 2


def test_tfds_builder_reads_v2_official_splits_without_flagged_patches(v2_src, tmp_path):
  """`data_prep.tfds.prepare` on a v2 folder: the v2 config is detected (the converter's `detect`), splits are the
  parquet's, labels the 19 classes, S1 from s1_name, cloudy/snowy patches left out unless keep_cloudy."""
  from data_prep.tfds import common
  from data_prep.tfds.bigearthnet_mm import MmrsBigearthnetMm
  import tensorflow_datasets as tfds

  data_dir = str(tmp_path / "tfds")
  res = subprocess.run([sys.executable, "-m", "data_prep.tfds.prepare", "--dataset=mmrs_bigearthnet_mm",
                        f"--manual_dir={v2_src}", f"--data_dir={data_dir}"], cwd=REPO, capture_output=True,
                       text=True, timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr
  assert f"tfds:mmrs_bigearthnet_mm/v2:SPLIT@{data_dir}" in res.stdout

  def read(split, d=data_dir):
    ds = tfds.data_source("mmrs_bigearthnet_mm/v2", split=split, data_dir=d)
    return {ds[i]["id"].decode(): ds[i] for i in range(len(ds))}, ds.dataset_info.metadata

  got = {s: read(s)[0] for s in ("train", "val", "test")}
  assert {s: sorted(g) for s, g in got.items()} == {"train": sorted([pid_of(0), pid_of(1)]), "val": [pid_of(2)],
                                                    "test": [pid_of(3)]}
  _, md = read("train")
  assert md["source"] == bigearthnet_mm.SOURCE_V2 and list(md["label_sets"]) == ["ben19"]
  ben = md["bigearthnet"]
  assert ben["version"] == "2.0" and ben["exclusion"]["applied"] is True and ben["keep_cloudy"] is False
  assert ben["counts"]["excluded"] == 2 and ben["counts"]["excluded_cloud_or_shadow"] == 1
  assert md["published"]["found"] == {"train": 2, "val": 1, "test": 1}
  assert md["published"]["expected"] == bigearthnet_mm.PUBLISHED_V2
  # The same pixels, S1 partner and 19-class labels as the converter's record.
  item = next(i for i in bigearthnet_mm.list_items(v2_src)[0] if i.name == pid_of(0))
  (_, rec), = bigearthnet_mm.build(item)
  ex = got["train"][pid_of(0)]
  np.testing.assert_array_equal(ex["s2"], rec["s2"])
  np.testing.assert_array_equal(ex["s1"], rec["s1"])
  assert list(ex["label_ben19"]) == rec["labels"]["ben19"] and len(rec["labels"]["ben19"]) > 0
  assert "label_corine43" not in ex
  # keep_cloudy keeps the flagged patches, in their official split, and says so.
  kept = str(tmp_path / "kept")
  common.prepare(MmrsBigearthnetMm, v2_src, kept, keep_cloudy=True)
  train, md = read("train", kept)
  assert pid_of(4) in train and pid_of(5) in read("test", kept)[0]
  assert md["bigearthnet"]["keep_cloudy"] is True and md["bigearthnet"]["exclusion"]["applied"] is False
  assert md["bigearthnet"]["counts"]["kept_flagged"] == 2
  # The v1 config on v2 data is a one-line error that names the config to build.
  with pytest.raises(ValueError, match="holds BigEarthNet v2 but this build is config 'v1'.*config 'v2'"):
    common.prepare(MmrsBigearthnetMm, v2_src, str(tmp_path / "wrong"), config="v1")
