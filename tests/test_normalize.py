"""Normalizer: band selection from stats.json, clear mismatch errors, identical results on host and device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmrs import bands as bands_lib
from mmrs.data.normalize import Normalizer, denormalize_batch, normalize_batch

STATS = {
    "s2": {"bands": ["B02", "B03", "B04", "B08"], "mean": [100.0, 200.0, 300.0, 400.0],
           "std": [10.0, 20.0, 30.0, 40.0]},
    "s1": {"bands": ["VV", "VH"], "mean": [-12.0, -20.0], "std": [5.0, 6.0]},
}


def test_from_stats_selects_bands_by_name_in_requested_order():
  n = Normalizer.from_stats(STATS, {"s2": ("B08", "B02"), "s1": ("VV", "VH")})
  np.testing.assert_array_equal(n.mean["s2"], np.float32([400, 100]))
  np.testing.assert_array_equal(n.std["s2"], np.float32([40, 10]))
  assert n.mean["s2"].dtype == np.float32 and n.bands["s2"] == ("B08", "B02")


def test_stats_that_do_not_match_the_bands_name_the_file_and_bands():
  with pytest.raises(ValueError, match=r"/data/x/stats\.json.*B11"):
    Normalizer.from_stats(STATS, {"s2": ("B02", "B11")}, source="/data/x/stats.json")
  with pytest.raises(ValueError, match=r"stats\.json has no statistics for modality 's1'"):
    Normalizer.from_stats({"s2": STATS["s2"]}, {"s1": ("VV", "VH")}, source="stats.json")


def test_zero_std_is_replaced_so_constant_bands_stay_finite():
  stats = {"s2": {"bands": ["B10"], "mean": [22.0], "std": [0.0]}}
  n = Normalizer.from_stats(stats, {"s2": ("B10",)})
  out = normalize_batch({"s2": np.full((1, 2, 2, 1), 22, np.uint16)}, n)["s2"]
  assert np.isfinite(out).all() and (out == 0).all()


def test_normalize_numpy_matches_jit_and_round_trips():
  n = Normalizer.from_stats(STATS, {"s2": ("B02", "B03", "B04", "B08"), "s1": ("VV", "VH")})
  rng = np.random.default_rng(0)
  batch = {"s2": rng.integers(0, 1000, (2, 4, 4, 4)).astype(np.uint16),
           "s1": rng.uniform(-30, 0, (2, 4, 4, 2)).astype(np.float32), "label_x": np.arange(2, dtype=np.int32)}
  host = normalize_batch(batch, n)
  device = jax.jit(lambda b: normalize_batch(b, n))({k: jnp.asarray(v) for k, v in batch.items()})
  for k in batch:
    np.testing.assert_allclose(np.asarray(device[k]), host[k], rtol=1e-5, atol=1e-5)
  assert host["s2"].dtype == np.float32 and device["s2"].dtype == jnp.float32
  np.testing.assert_array_equal(host["label_x"], batch["label_x"])  # non-image keys pass through
  np.testing.assert_allclose(host["s2"][..., 1], (batch["s2"][..., 1] - 200.0) / 20.0, rtol=1e-5)
  back = denormalize_batch(host, n)
  np.testing.assert_allclose(back["s2"], batch["s2"], atol=1e-2)
  np.testing.assert_allclose(back["s1"], batch["s1"], atol=1e-4)


def test_s1_is_clipped_to_the_documented_range_before_standardizing():
  n = Normalizer.from_stats(STATS, {"s1": ("VV", "VH")})
  out = normalize_batch({"s1": np.float32([[[[-300.0, 90.0]]]])}, n)["s1"]
  lo, hi = bands_lib.S1_DB_CLIP
  np.testing.assert_allclose(out[0, 0, 0], [(lo + 12) / 5, (hi + 20) / 6], rtol=1e-6)


def test_channel_count_mismatch_is_an_error():
  n = Normalizer.from_stats(STATS, {"s2": ("B02", "B03")})
  with pytest.raises(ValueError, match="3 channels but the normalizer has 2 bands"):
    normalize_batch({"s2": np.zeros((1, 2, 2, 3), np.uint16)}, n)


def test_json_round_trip_and_published_fallback():
  n = Normalizer.from_stats(STATS, {"s2": ("B04",), "s1": ("VV", "VH")})
  m = Normalizer.from_json(n.to_json())
  assert m.bands == n.bands
  np.testing.assert_array_equal(m.std["s2"], n.std["s2"])
  pub = Normalizer.from_published({"s2": bands_lib.S2_L2A_BANDS, "s1": bands_lib.S1_BANDS})
  np.testing.assert_allclose(pub.mean["s1"], [-12.54847273, -20.19237134])
  assert pub.mean["s2"].shape == (12,) and "SSL4EO-S12 S2 L2A" in pub.source


def test_published_statistics_follow_the_processing_level_and_their_source():
  # Values as zhu-xlab/SSL4EO-S12 ssl4eo_dataset.py publishes them (one release: S2C_*, S2A_*, S1_*).
  l1c = Normalizer.from_published({"s2": bands_lib.S2_L1C_BANDS})
  assert l1c.mean["s2"][0] == np.float32(1605.57504906) and l1c.std["s2"][10] == np.float32(51.15431158)
  l2a = Normalizer.from_published({"s2": ("B02", "B03", "B04")}, s2_level="L2A")
  np.testing.assert_allclose(l2a.mean["s2"], [884.29673756, 1144.16202635, 1297.47289228])
  toa = Normalizer.from_published({"s2": ("B02", "B03", "B04")}, s2_level="L1C")  # same bands, other level
  np.testing.assert_allclose(toa.mean["s2"], [1390.78157673, 1314.8729939, 1363.52445545])
  ben = Normalizer.from_published({"s2": bands_lib.S2_L2A_BANDS, "s1": bands_lib.S1_BANDS}, family="bigearthnet")
  assert ben.mean["s2"][1] == np.float32(429.9430203) and ben.std["s1"][0] == np.float32(5.115911777546365)
  with pytest.raises(ValueError, match="No published s2 statistics for family 'bigearthnet' at level L1C"):
    Normalizer.from_published({"s2": bands_lib.S2_L1C_BANDS}, family="bigearthnet")
  for st in (bands_lib.SSL4EO_S2_L1C, bands_lib.SSL4EO_S2_L2A, bands_lib.SSL4EO_S1, bands_lib.BIGEARTHNET_S2_L2A,
             bands_lib.BIGEARTHNET_S1, bands_lib.BIGEARTHNET_V2_S2_L2A):
    assert len(st.mean) == len(st.std) == len(st.bands) and st.source


def test_pipeline_without_stats_json_uses_the_stored_level(tmp_path):
  import os
  from configs import common as cfg_common
  from mmrs.data import pipeline
  from mmrs.data.writer import DatasetWriter
  out = str(tmp_path / "ds")
  w = DatasetWriter(out, num_shards=1, source="test")
  for i in range(2):
    w.add({"id": f"r{i}", "s2": np.full((16, 16, 12), 500 + i, np.uint16), "s2_bands": bands_lib.S2_L2A_BANDS})
  w.close()
  os.remove(os.path.join(out, "stats.json"))
  d = cfg_common.dataset_config(out, image_size=16, s2_bands="B02,B03,B04")
  info = pipeline.describe(d, ("s2",))
  assert "S2 L2A" in info.normalizer.source
