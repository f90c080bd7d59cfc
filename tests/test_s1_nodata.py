"""S1 no-data end to end: a chip with NaN patches keeps its validity mask through crop/flip/rot90 and the shards,
normalization sets its pixels to 0, every reconstruction loss leaves them out, and a mostly-invalid S1 counts as
missing."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import auxmae, common as cfg_common, jointmae, mixmae
from mmrs import bands, methods
from mmrs.data import normalize, pipeline, records, transforms
from mmrs.data.writer import DatasetWriter
from mmrs.methods import mae as mae_lib

fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
N = 48


def nan_chip(seed=0, holes=((5, 9, 30, 41), (20, 33, 2, 8))):
  """An S1 chip (dB, -25..-5) with rectangular NaN holes (y0, y1, x0, x1), as Sentinel-1 border/no-data areas."""
  rng = np.random.default_rng(seed)
  s1 = rng.uniform(-25, -5, (N, N, 2)).astype(np.float32)
  for y0, y1, x0, x1 in holes:
    s1[y0:y1, x0:x1, rng.integers(2)] = np.nan
  return s1


def record(seed=0, **kw):
  s1, valid = records.clean_s1(nan_chip(seed, **kw))
  s2 = np.random.default_rng(seed).integers(1, 5000, (N, N, 12)).astype(np.uint16)
  rec = {"id": f"r{seed}", "s1": s1, "s1_bands": bands.S1_BANDS, "s2": s2, "s2_bands": bands.S2_L2A_BANDS}
  if valid is not None:
    rec["s1_valid"] = valid
  return rec


@pytest.mark.parametrize("rrc", [False, True])
def test_mask_follows_the_pixels_through_crop_flip_and_rot90(rrc):
  rec = record()
  t = transforms.DecodeAugment(modalities=("s1", "s2"), bands={"s1": bands.S1_BANDS, "s2": bands.S2_L2A_BANDS},
                               image_size=32, random_resized_crop=rrc, rrc_scale=(0.3, 0.9))
  seen_invalid = 0
  for seed in range(12):
    out = t(("shard", 0, rec), np.random.default_rng(seed))
    v = out["s1_valid"]
    assert v.shape == (32, 32) and v.dtype == np.uint8
    filled = (out["s1"] <= bands.S1_NODATA_FILL_DB + 1e-3).any(-1)
    if rrc:  # blended pixels: a pixel that touched the fill value is never marked valid
      assert not (out["s1"][v.astype(bool)] < -25.001).any()
    else:
      np.testing.assert_array_equal(v == 0, filled)
    seen_invalid += int((v == 0).sum())
  assert seen_invalid > 0


def test_record_without_nodata_gets_an_all_valid_mask_and_mostly_invalid_s1_counts_as_missing():
  t = transforms.DecodeAugment(modalities=("s1",), bands={"s1": bands.S1_BANDS}, image_size=16, on_bad="skip")
  clean = record(holes=())
  assert "s1_valid" not in clean
  assert t(("shard", 0, clean), np.random.default_rng(0))["s1_valid"].all()
  mostly = record(holes=((0, 40, 0, 48),))  # 83% of the pixels
  bad = t(("shard", 3, mostly), np.random.default_rng(0))
  assert isinstance(bad, transforms.BadRecord) and "counts as S1-missing" in bad.reason
  s2_task = transforms.DecodeAugment(modalities=("s2",), bands={"s2": bands.S2_L2A_BANDS}, image_size=16)
  assert "s1_valid" not in s2_task(("shard", 3, mostly), np.random.default_rng(0))  # S2 tasks still use it


def test_normalization_zeroes_invalid_pixels_on_host_and_device():
  norm = normalize.Normalizer.from_published({"s1": bands.S1_BANDS})
  rec = record()
  batch = {"s1": rec["s1"][None].copy(), "s1_valid": rec["s1_valid"][None]}
  host = normalize.normalize_batch(batch, norm)["s1"]
  dev = jax.jit(lambda b: normalize.normalize_batch(b, norm)["s1"])(batch)
  invalid = rec["s1_valid"][None] == 0
  for y in (host, np.asarray(dev)):
    assert (y[invalid] == 0).all() and np.abs(y).max() < 5  # the -50 dB fill would be about -7 sigma
    np.testing.assert_allclose(y[~invalid], ((rec["s1"][None] - norm.mean["s1"]) / norm.std["s1"])[~invalid],
                               rtol=1e-5, atol=1e-5)


def test_patch_mse_leaves_invalid_pixels_out():
  k1, k2 = jax.random.split(jax.random.key(0))
  pred, target = jax.random.normal(k1, (2, 9, 16)), jax.random.normal(k2, (2, 9, 16))
  scored = jnp.arange(18).reshape(2, 9) % 3 == 0
  for norm_pix in (False, True):
    ones = jnp.ones_like(pred)
    np.testing.assert_allclose(mae_lib.patch_mse(pred, target, scored, norm_pix, ones),
                               mae_lib.patch_mse(pred, target, scored, norm_pix), rtol=1e-5)
    w = (jnp.arange(16) % 4 != 0).astype(jnp.float32) * ones  # a quarter of each patch is no-data
    wild = jnp.where(w > 0, target, 1e4)
    np.testing.assert_allclose(mae_lib.patch_mse(pred, wild, scored, norm_pix, w),
                               mae_lib.patch_mse(pred, target, scored, norm_pix, w), rtol=1e-5)
  assert mae_lib.pixel_weights({"s2": jnp.zeros((1, 8, 8, 3))}, "s2", 4) is None


CASES = {"mixmae": (mixmae, 0), "auxmae_s2_to_s1": (auxmae, 1), "jointmae": (jointmae, 0)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_s1_reconstruction_loss_ignores_no_data_targets(name):
  module, task = CASES[name]
  method = methods.build(module.get_config("tiny"))
  k2, k1 = jax.random.split(jax.random.key(0))
  b, size = 2, 32
  valid = jnp.ones((b, size, size), jnp.uint8).at[:, 8:20, 4:30].set(0)
  batch = {"s2": jax.random.normal(k2, (b, size, size, 12)), "s1": jax.random.normal(k1, (b, size, size, 2)),
           "s1_valid": valid}
  params, state = fast_jit(method.init)(jax.random.key(1), batch)
  params = nn.meta.unbox(params)
  for m in ("s1", "s2"):  # pixels reach the loss only as targets
    key = f"patch_embed_{m}"
    if key in params["encoder"]:
      params["encoder"][key]["kernel"] = jnp.zeros_like(params["encoder"][key]["kernel"])
  loss = fast_jit(functools.partial(method.tasks[task].loss_fn, train=True))
  rng = jax.random.key(3)
  base = float(loss(params, state, batch, rng)[0])
  wild = dict(batch, s1=jnp.where(valid[..., None] == 0, 40.0, batch["s1"]))
  assert float(loss(params, state, wild, rng)[0]) == pytest.approx(base, rel=1e-5)
  all_valid = dict(wild, s1_valid=jnp.ones_like(valid))
  assert abs(float(loss(params, state, all_valid, rng)[0]) - base) > 1e-2  # without the mask they count


def test_shards_carry_the_mask_to_normalized_batches(tmp_path):
  out = str(tmp_path / "ds")
  with DatasetWriter(out, num_shards=1, source="test") as w:
    for i in range(4):
      w.add(record(i), "train")
    w.close()
  d = cfg_common.dataset_config(out, image_size=32)
  pipe = pipeline.make_pipeline(d, modalities=("s1", "s2"), global_batch_size=4, seed=0, shuffle=False,
                                repeat=False, drop_remainder=False)
  batch = next(pipe.iterator)
  pipe.close()
  v = batch["s1_valid"][batch["valid"]]
  assert v.shape == (4, 32, 32) and 0 < (v == 0).sum() < v.size
  y = normalize.normalize_batch(batch, pipe.normalizer)["s1"][batch["valid"]]
  assert (y[v == 0] == 0).all() and np.abs(y).max() < 6


def test_s2_only_fallback_fills_an_all_invalid_s1_that_normalizes_to_zero(tmp_path):
  out = str(tmp_path / "ds")
  w = DatasetWriter(out, num_shards=1, source="test")
  w.add(record(0), "test")
  s2_only = record(1)
  for k in ("s1", "s1_bands", "s1_valid"):
    s2_only.pop(k)
  w.add(s2_only, "test")
  w.close()
  d = cfg_common.dataset_config(out, image_size=32, groups=("paired", "s2_only"), missing_s1="fill")
  pipe = pipeline.make_pipeline(d, modalities=("s1", "s2"), global_batch_size=2, seed=0, shuffle=False,
                                repeat=False, drop_remainder=False, split="test", augment=False)
  batch = next(pipe.iterator)
  pipe.close()
  assert batch["valid"].sum() == 2 and batch["s1"].shape == (2, 32, 32, 2)
  empty = [i for i in range(2) if not batch["s1_valid"][i].any()]
  assert len(empty) == 1  # the S2-only record, evaluated with its S1 masked out
  y = normalize.normalize_batch(batch, pipe.normalizer)["s1"]
  assert (y[empty[0]] == 0).all()
  with pytest.raises(ValueError, match="missing_s1"):
    transforms.DecodeAugment(modalities=("s1",), bands={"s1": bands.S1_BANDS}, image_size=8, missing_s1="zero")
