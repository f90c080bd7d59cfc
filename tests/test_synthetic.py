"""Synthetic scenes: valid records, plausible values, S1/S2/labels tied to one land-cover map, always marked."""
import json
import os

import numpy as np
import pytest

from mmrs import bands as bands_lib
from mmrs.data import records, synthetic


@pytest.fixture(scope="module")
def recs():
  rng = np.random.default_rng(0)
  return [synthetic.synthetic_record(rng, size=48) for _ in range(6)]


def test_records_are_valid_and_round_trip(recs):
  for r in recs:
    assert records.validate(r) == []
    assert r["s2"].dtype == np.uint16 and r["s2"].shape == (48, 48, 13)
    assert r["s1"].dtype == np.float32 and r["s1"].shape == (48, 48, 2)
    assert r["mask"].dtype == np.int16 and r["mask"].shape == (48, 48)
    back = records.decode(records.encode(r), meta=True)
    np.testing.assert_array_equal(back["s2"], r["s2"])
    assert back["meta"]["source"] == "synthetic"


def test_always_marked_synthetic(recs):
  for r in recs:
    assert r["id"].startswith("synthetic-") and r["meta"]["source"] == "synthetic"
    assert synthetic.is_synthetic(r)
  named = synthetic.synthetic_record(np.random.default_rng(1), 16, record_id="abc")
  assert named["id"] == "synthetic-abc"


def test_values_are_plausible(recs):
  s2 = np.concatenate([r["s2"].reshape(-1, 13) for r in recs]).astype(np.float64)
  means = dict(zip(bands_lib.S2_L1C_BANDS, s2.mean(0)))
  assert 300 < means["B04"] < 4000 and 300 < means["B08"] < 5000
  assert means["B10"] < 200  # cirrus band: dark
  s1 = np.concatenate([r["s1"].reshape(-1, 2) for r in recs])
  lo, hi = bands_lib.S1_DB_CLIP
  assert lo <= s1.min() and s1.max() <= hi
  assert -25 < s1[:, 0].mean() < -3 and s1[:, 1].mean() < s1[:, 0].mean()  # VH below VV


def test_modalities_and_labels_follow_the_same_segments(recs):
  water, forest = synthetic.CLASSES.index("water"), synthetic.CLASSES.index("forest")
  vv = {water: [], forest: []}
  nir = {water: [], forest: []}
  for r in recs:
    for c in vv:
      sel = r["mask"] == c
      vv[c].extend(r["s1"][..., 0][sel].tolist())
      nir[c].extend(r["s2"][..., 7][sel].tolist())  # B08
    frac = np.bincount(r["mask"].ravel(), minlength=len(synthetic.CLASSES)) / r["mask"].size
    assert r["labels"]["synthetic_ml"] == np.flatnonzero(frac >= 0.05).tolist()
    assert r["labels"]["synthetic_class"] == int(np.argmax(frac))
    assert len(np.unique(r["mask"])) >= 1
  assert vv[water] and vv[forest], "fixture scenes should contain water and forest"
  assert np.mean(vv[water]) < np.mean(vv[forest]) - 5  # water is dark in SAR
  assert np.mean(nir[water]) < np.mean(nir[forest]) / 2  # and in the near infrared


def test_deterministic_and_band_subset():
  a = synthetic.synthetic_record(np.random.default_rng(7), 32, s2_bands=("B04", "B03", "B02"), with_s1=False)
  b = synthetic.synthetic_record(np.random.default_rng(7), 32, s2_bands=("B04", "B03", "B02"), with_s1=False)
  np.testing.assert_array_equal(a["s2"], b["s2"])
  assert a["s2"].shape == (32, 32, 3) and a["s2_bands"] == ("B04", "B03", "B02") and "s1" not in a
  with pytest.raises(ValueError, match="both False"):
    synthetic.synthetic_record(np.random.default_rng(0), 8, with_s1=False, with_s2=False)


def test_write_synthetic_dataset(tmp_path):
  out = str(tmp_path / "syn")
  m = synthetic.write_synthetic_dataset(out, n_pairs=5, n_s2_only=3, size=16, num_shards=2, seed=3, n_val=2)
  assert m["counts"]["pairs"] == 7 and m["counts"]["s2_only"] == 3 and m["source"] == "synthetic"
  assert len(m["splits"]["train"]["paired"]) == 2 and len(m["splits"]["train"]["s2_only"]) == 2
  assert m["splits"]["val"]["paired"] == [f"val.paired-0000{i}-of-00002.array_record" for i in range(2)]
  assert set(m["label_sets"]) == {"synthetic_ml", "synthetic_class", "synthetic_mask"}
  stats = json.load(open(os.path.join(out, "stats.json")))
  assert stats["s2"]["bands"] == list(bands_lib.S2_L1C_BANDS) and stats["s1"]["bands"] == ["VV", "VH"]
  again = synthetic.write_synthetic_dataset(str(tmp_path / "again"), 5, 3, 16, 2, 3, n_val=2)
  assert again["records_per_shard"] == m["records_per_shard"]
  for f in m["records_per_shard"]:
    assert open(os.path.join(out, f), "rb").read() == open(tmp_path / "again" / f, "rb").read()
