"""DatasetWriter + convert.run: shard layout, atomic replacement, byte-identical re-runs, stats against numpy,
--on_bad accounting, split specs and extra manifest sections."""
import dataclasses
import json
import os

import numpy as np
import pytest
from array_record.python import array_record_module

from data_prep import convert
from data_prep.convert import BadInput, ConversionError
from mmrs.data.writer import DatasetWriter
from mmrs import bands
from mmrs.data import records

H = 8


def make_record(i: int, mods=("s1", "s2")) -> dict:
  rng = np.random.default_rng(i)
  rec = {"id": f"r{i:03d}", "labels": {"class": i % 3}, "meta": {"n": i}}
  if "s2" in mods:
    rec["s2"] = rng.integers(1, 4000, (H, H, 13)).astype(np.uint16)
    rec["s2_bands"] = bands.S2_L1C_BANDS
  if "s1" in mods:
    s1 = rng.normal(-15, 4, (H, H, 2)).astype(np.float32)
    if i % 3 == 0:
      s1[i % H, :, i % 2] = np.nan
    rec["s1"], valid = records.clean_s1(s1)
    if valid is not None:
      rec["s1_valid"] = valid
    rec["s1_bands"] = bands.S1_BANDS
  return rec


MODS = [("s1", "s2"), ("s2",), ("s1",)]


@dataclasses.dataclass(frozen=True)
class Build:
  """Item i -> one record (modalities cycle pair/s2/s1; every 4th goes to val); items in `bad` raise BadInput."""
  bad: tuple = ()

  def __call__(self, i):
    if i in self.bad:
      raise BadInput(f"item {i}: broken band file b{i}.tif")
    return [("val" if i % 4 == 3 else "train", make_record(i, MODS[i % 3]))]


def write(out, n=12, num_shards=2, **kw):
  writer = DatasetWriter(out, num_shards=num_shards, source="test", licence="none")
  return convert.run(list(range(n)), kw.pop("build", Build()), writer, **kw)


def snapshot(d):
  out = {}
  for name in sorted(os.listdir(d)):
    with open(os.path.join(d, name), "rb") as f:
      out[name] = f.read()
  return out


def temp_leftovers(parent):
  return [n for n in os.listdir(parent) if ".tmp-" in n]


def read_shard(path):
  r = array_record_module.ArrayRecordReader(path)
  try:
    return [records.decode(b)["id"] for b in r.read_all()]
  finally:
    r.close()


def test_layout_groups_and_round_robin(tmp_path):
  out = str(tmp_path / "ds")
  m = write(out)
  c = m["counts"]
  assert (c["records"], c["pairs"], c["s2_only"], c["s1_only"], c["skipped"]) == (12, 4, 4, 4, 0)
  assert m["splits"]["train"]["paired"] == ["train.paired-00000-of-00002.array_record",
                                            "train.paired-00001-of-00002.array_record"]
  assert m["splits"]["val"]["paired"] == ["val.paired-00000-of-00001.array_record"]  # 1 record: 1 shard
  # pairs in train are items 0, 6, 9 (3 is val): round-robin over the 2 shards in order
  assert read_shard(os.path.join(out, "train.paired-00000-of-00002.array_record")) == ["r000", "r009"]
  assert read_shard(os.path.join(out, "train.paired-00001-of-00002.array_record")) == ["r006"]
  assert sum(m["records_per_shard"].values()) == 12
  assert set(os.listdir(out)) == set(m["records_per_shard"]) | {"manifest.json", "stats.json"}
  assert m["bands"] == {"s1": ["VV", "VH"], "s2": list(bands.S2_L1C_BANDS)}


def test_rerun_is_byte_identical_and_idempotent(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  write(a)
  first = snapshot(a)
  write(a)  # over itself
  assert snapshot(a) == first
  write(b)
  second = snapshot(b)
  assert [k for k in first if first[k] != second[k]] == []
  assert temp_leftovers(tmp_path) == []


def test_failure_keeps_the_previous_dataset_and_leaves_no_temp_dir(tmp_path):
  out = str(tmp_path / "ds")
  write(out)
  before = snapshot(out)
  with pytest.raises(ConversionError, match=r"Bad input in 7: item 7: broken band file b7\.tif.*--on_bad=skip"):
    write(out, n=12, num_shards=3, build=Build(bad=(7,)))
  assert snapshot(out) == before
  assert temp_leftovers(tmp_path) == []

  class Boom(RuntimeError):
    pass

  with pytest.raises(Boom):  # any exception inside the writer's context aborts it
    with DatasetWriter(out, num_shards=1) as w:
      w.add(make_record(1))
      raise Boom()
  assert snapshot(out) == before and temp_leftovers(tmp_path) == []


def test_refuses_to_replace_a_directory_that_is_not_a_dataset(tmp_path):
  out = tmp_path / "precious"
  out.mkdir()
  (out / "thesis.tex").write_text("do not delete")
  with pytest.raises(FileExistsError, match="not an mmrs dataset"):
    DatasetWriter(str(out))
  assert (out / "thesis.tex").read_text() == "do not delete" and temp_leftovers(tmp_path) == []


def test_on_bad_skip_counts_and_lists_the_items(tmp_path):
  m = write(str(tmp_path / "ds"), on_bad="skip", build=Build(bad=(2, 5)))
  assert m["counts"]["skipped"] == 2 and m["counts"]["records"] == 10
  assert m["skipped_reasons"] == {"item 2": 1, "item 5": 1}
  assert [s["item"] for s in m["skipped_items"]] == ["2", "5"]
  assert "b5.tif" in m["skipped_items"][1]["reason"]


def test_a_record_with_another_band_order_is_bad(tmp_path):
  recs = [make_record(0, ("s2",)), make_record(1, ("s2",))]
  recs[1]["s2"] = recs[1]["s2"][..., :12].copy()
  recs[1]["s2_bands"] = bands.S2_L2A_BANDS
  writer = DatasetWriter(str(tmp_path / "ds"), num_shards=1)
  m = convert.run([0, 1], ListBuild(tuple(recs)), writer, on_bad="skip")
  assert m["counts"]["records"] == 1 and m["counts"]["skipped"] == 1
  assert "one band order" in m["skipped_items"][0]["reason"]


@dataclasses.dataclass(frozen=True)
class ListBuild:
  recs: tuple

  def __call__(self, i):
    return [("train", self.recs[i])]


def test_stats_match_numpy_on_the_train_split(tmp_path):
  out = str(tmp_path / "ds")
  write(out, n=24)
  with open(os.path.join(out, "stats.json")) as f:
    stats = json.load(f)
  train = [make_record(i, MODS[i % 3]) for i in range(24) if i % 4 != 3]
  s2 = np.concatenate([r["s2"].reshape(-1, 13) for r in train if "s2" in r])
  s1 = np.concatenate([r["s1"].reshape(-1, 2)[r["s1_valid"].reshape(-1) == 1] if "s1_valid" in r
                       else r["s1"].reshape(-1, 2) for r in train if "s1" in r])
  assert stats["s2"]["pixels"] == len(s2) and stats["s1"]["pixels"] == len(s1)
  for key, ref, tol in (("s2", s2, 1e-3), ("s1", s1.astype(np.float64), 1e-3)):
    st = stats[key]
    np.testing.assert_allclose(st["mean"], ref.mean(0), atol=tol)
    np.testing.assert_allclose(st["std"], ref.std(0), atol=tol)
    np.testing.assert_allclose(st["min"], ref.min(0), atol=1e-6)
    np.testing.assert_allclose(st["max"], ref.max(0), atol=1e-6)
  for p in (1, 50, 99):
    np.testing.assert_array_equal(stats["s2"][f"p{p}"], np.percentile(s2, p, axis=0, method="inverted_cdf"))
    np.testing.assert_allclose(stats["s1"][f"p{p}"], np.percentile(s1, p, axis=0, method="inverted_cdf"),
                               atol=0.0051)
  assert not np.isnan(stats["s1"]["mean"]).any()  # the NaN pixels (flagged in s1_valid) are left out


def test_extra_manifest_sections_and_counts(tmp_path):
  counts = {"unmatched_s1": 0}
  writer = DatasetWriter(str(tmp_path / "ds"), num_shards=1, extra={"pairing": {"max_days": 7}},
                         extra_counts=counts, label_sets={"class": {"kind": "class", "names": ["a", "b", "c"]}})
  seen = []

  def on_record(split, rec):
    seen.append((split, rec["id"]))
    counts["unmatched_s1"] += 1

  m = convert.run([0, 1, 2, 3], Build(), writer, on_record=on_record)
  assert m["pairing"] == {"max_days": 7} and m["counts"]["unmatched_s1"] == 4
  assert seen == [("train", "r000"), ("train", "r001"), ("train", "r002"), ("val", "r003")]
  assert m["label_sets"]["class"]["names"] == ["a", "b", "c"]
  with pytest.raises(ValueError, match="clash"):
    with DatasetWriter(str(tmp_path / "ds2"), extra_counts={"pairs": 1}) as w:
      w.add(make_record(0))
      w.close()
  assert not os.path.exists(tmp_path / "ds2") and temp_leftovers(tmp_path) == []


def test_split_specs():
  assert convert.parse_split_spec("train") == ("train",)
  spec = convert.parse_split_spec("hash:0.8,0.1,0.1")
  assert spec == (("train", 0.8), ("val", 0.1), ("test", 0.1))
  assert convert.parse_split_spec("hash:train=0.9,holdout=0.1") == (("train", 0.9), ("holdout", 0.1))
  ids = [f"patch_{i}" for i in range(3000)]
  splits = [convert.split_of(i, spec) for i in ids]
  assert splits == [convert.split_of(i, spec) for i in ids]  # stable
  frac = {s: splits.count(s) / len(ids) for s in ("train", "val", "test")}
  assert abs(frac["train"] - 0.8) < 0.03 and abs(frac["val"] - 0.1) < 0.03
  assert convert.split_of("anything", ("train",)) == "train"
  for bad in ("hash:0.5,0.4", "hash:a,b", "hash:", "tr ain", "hash:1.5,-0.5"):
    with pytest.raises(ValueError, match="--split"):
      convert.parse_split_spec(bad)
