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
  np.testing.assert_allclose(pub.mean["s1"], [-12.55, -20.19])
  assert pub.mean["s2"].shape == (12,) and "SSL4EO" in pub.source
