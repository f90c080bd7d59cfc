"""RS-BYOL's host-side view sampler: band choice per variant, normalization, augmentations, determinism."""
import pickle

import ml_collections
import numpy as np
import pytest
from PIL import Image

from mmrs import bands
from mmrs.data import byol_views

S2_NAMES = bands.S2_L2A_BANDS  # 12 bands, as BigEarthNet
# Each band is a constant image whose value identifies it after normalization (mean 0, std 1 below).
S2_VALUES = {b: 100.0 * (i + 1) for i, b in enumerate(S2_NAMES)}
S1_VALUES = {"VV": -7.0, "VH": -19.0}
STATS = {"s2": {"bands": list(S2_NAMES), "mean": [0.0] * 12, "std": [1.0] * 12},
         "s1": {"bands": ["VV", "VH"], "mean": [0.0, 0.0], "std": [1.0, 1.0]}}


def _record(size=40):
  s2 = np.stack([np.full((size, size), S2_VALUES[b], np.uint16) for b in S2_NAMES], axis=-1)
  s1 = np.stack([np.full((size, size), S1_VALUES[p], np.float32) for p in ("VV", "VH")], axis=-1)
  return {"id": "r0", "s2": s2, "s2_bands": S2_NAMES, "s1": s1, "s1_bands": bands.S1_BANDS}


def _cfg(view1="one_band", view2="one_pol", plain=False, **kw):
  c = byol_views.default_views_config()
  c.view1, c.view2, c.image_size = view1, view2, 16
  if plain:  # no augmentation that changes values: constant bands stay identifiable
    c.update(blur_prob1=0.0, blur_prob2=0.0, grayscale_prob=0.0, erase_prob=0.0)
  c.update(kw)
  return c


def _band_of(value, table):
  names = [n for n, v in table.items() if np.isclose(v, value, rtol=1e-4)]
  assert len(names) == 1, value
  return names[0]


def _channel_bands(view, tables):
  return [_band_of(float(view[..., c].mean()), tables) for c in range(view.shape[-1])]


ALL = {**S2_VALUES, **S1_VALUES}


@pytest.mark.parametrize("view1,view2,c1,c2", [
    ("one_band", "one_pol", 1, 1), ("three_bands", "vv_vh_copy", 3, 3), ("rgb", "pol_two_ms", 3, 3),
    ("one_band", "vv_vh_copy", 1, 3)])
def test_views_have_the_variant_channel_counts(view1, view2, c1, c2):
  cfg = _cfg(view1, view2)
  assert byol_views.view_channels(cfg) == (c1, c2)
  out = byol_views.ViewSampler(cfg, STATS)(_record(), np.random.default_rng(0))
  assert out["view1"].shape == (16, 16, c1) and out["view2"].shape == (16, 16, c2)
  for v in out.values():
    assert v.dtype == np.float32 and np.isfinite(v).all()


def test_band_choice_per_variant():
  rng = np.random.default_rng(1)
  rec = _record()
  seen = {"one_band": set(), "one_pol": set(), "copy": set()}
  samplers = {k: byol_views.ViewSampler(_cfg(*k, plain=True), STATS)
              for k in [("one_band", "one_pol"), ("three_bands", "vv_vh_copy"), ("rgb", "pol_two_ms")]}
  for _ in range(60):
    out = samplers[("one_band", "one_pol")](rec, rng)
    seen["one_band"].add(_channel_bands(out["view1"], ALL)[0])
    seen["one_pol"].add(_channel_bands(out["view2"], ALL)[0])
    out = samplers[("three_bands", "vv_vh_copy")](rec, rng)
    three = _channel_bands(out["view1"], ALL)
    assert len(set(three)) == 3 and set(three) <= set(bands.S2_10_20M_BANDS)
    sar = _channel_bands(out["view2"], ALL)
    assert sar[:2] == ["VV", "VH"] and sar[2] in ("VV", "VH")
    seen["copy"].add(sar[2])
    out = samplers[("rgb", "pol_two_ms")](rec, rng)
    assert _channel_bands(out["view1"], ALL) == ["B04", "B03", "B02"]
    mixed = _channel_bands(out["view2"], ALL)
    assert mixed[0] in ("VV", "VH") and len(set(mixed[1:])) == 2
    assert not set(mixed[1:]) & set(bands.S2_RGB_BANDS) and set(mixed[1:]) <= set(bands.S2_10_20M_BANDS)
  # Every band of the 10 at 10/20 m is drawn, never a 60 m band; both polarisations are drawn.
  assert seen["one_band"] == set(bands.S2_10_20M_BANDS)
  assert seen["one_pol"] == {"VV", "VH"} and seen["copy"] == {"VV", "VH"}


def test_normalization_uses_each_band_stats_and_clips_s1():
  stats = {"s2": {"bands": list(S2_NAMES), "mean": [1000.0] * 12, "std": [500.0] * 12},
           "s1": {"bands": ["VV", "VH"], "mean": [-10.0, -20.0], "std": [2.0, 4.0]}}
  rec = _record()
  rec["s1"] = rec["s1"].copy()
  rec["s1"][..., 0] = 80.0  # above bands.S1_DB_CLIP: clipped to 30 dB before standardization
  out = byol_views.ViewSampler(_cfg("rgb", "vv_vh_copy", plain=True), stats)(rec, np.random.default_rng(0))
  np.testing.assert_allclose(out["view1"][0, 0], [(S2_VALUES[b] - 1000) / 500 for b in ("B04", "B03", "B02")],
                             rtol=1e-5)
  np.testing.assert_allclose(out["view2"][0, 0, :2], [(30.0 + 10) / 2, (-19.0 + 20) / 4], rtol=1e-5)


def test_grayscale_only_on_three_channel_views_and_erasing_sets_band_means():
  rng = np.random.default_rng(2)
  cfg = _cfg("three_bands", "one_pol", plain=True, grayscale_prob=1.0)
  out = byol_views.ViewSampler(cfg, STATS)(_record(), rng)
  np.testing.assert_allclose(out["view1"][..., 0], out["view1"][..., 2], rtol=1e-6)
  assert out["view2"].shape[-1] == 1
  cfg = _cfg("three_bands", "one_pol", plain=True, erase_prob=1.0)
  out = byol_views.ViewSampler(cfg, STATS)(_record(), rng)
  for v in out.values():
    erased = np.all(v == 0.0, axis=-1)
    assert 0 < erased.sum() < erased.size  # a rectangle at the band mean (0 after normalization)


def test_augmentations_vary_the_views_and_are_deterministic_per_rng():
  rng = np.random.default_rng(3)
  rec = _record(48)
  rec["s2"] = rng.integers(0, 10000, rec["s2"].shape).astype(np.uint16)
  rec["s1"] = rng.normal(-15, 5, rec["s1"].shape).astype(np.float32)
  sampler = byol_views.ViewSampler(_cfg("three_bands", "vv_vh_copy"), STATS)
  a = sampler(rec, np.random.default_rng(7))
  b = sampler(rec, np.random.default_rng(7))
  c = sampler(rec, np.random.default_rng(8))
  np.testing.assert_array_equal(a["view1"], b["view1"])
  np.testing.assert_array_equal(a["view2"], b["view2"])
  assert not np.allclose(a["view1"], c["view1"])
  # Picklable (grain workers) and usable as a grain random map.
  clone = pickle.loads(pickle.dumps(sampler))
  np.testing.assert_array_equal(clone.random_map(rec, np.random.default_rng(7))["view2"], a["view2"])


def test_resized_crop_is_bicubic_like_pil():
  rng = np.random.default_rng(4)
  image = rng.normal(size=(30, 40)).astype(np.float32)
  for box, out in [((3.0, 5.0, 37.0, 25.0), 16), ((10.0, 2.0, 18.0, 12.0), 24)]:
    left, top, right, bottom = box
    want = np.asarray(Image.fromarray(image, "F").resize((out, out), Image.BICUBIC, box=box))
    y0, y1, my = byol_views._resize_matrix(30, top, bottom - top, out)
    x0, x1, mx = byol_views._resize_matrix(40, left, right - left, out)
    np.testing.assert_allclose(my @ image[y0:y1, x0:x1] @ mx.T, want, atol=1e-4)


def test_blur_smooths_but_keeps_constants():
  blur = byol_views._blur_matrix(20, 1.5)
  np.testing.assert_allclose(blur.sum(axis=1), 1.0, rtol=1e-5)
  spike = np.zeros(20, np.float32)
  spike[10] = 1.0
  assert (blur @ spike).max() < 0.5


def test_errors_name_the_config_key():
  with pytest.raises(ValueError, match="config.views.view1"):
    byol_views.ViewSampler(_cfg("five_bands"), STATS)
  stats = {"s2": {"bands": ["B02", "B03"], "mean": [0, 0], "std": [1, 1]}}
  with pytest.raises(ValueError, match="B04"):
    byol_views.ViewSampler(_cfg("one_band"), stats)
  sampler = byol_views.ViewSampler(_cfg(), STATS)
  rec = _record()
  del rec["s1"]
  with pytest.raises(ValueError, match="r0"):
    sampler(rec, np.random.default_rng(0))
  assert isinstance(byol_views.default_views_config(), ml_collections.ConfigDict)
