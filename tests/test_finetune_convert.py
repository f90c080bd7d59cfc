"""Checkpoint conversion (encoder only, band selection, modalities, patch resize) and the public encoder API."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import mmrs
from mmrs import bands as B
from mmrs.finetune import convert
from mmrs.models import vit
from mmrs.train import checkpoint as ckpt_lib
from timeouts import HANG_GUARD_S

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, SIZE = 4, 8  # patch 4, 8 px images: a 2 x 2 grid
ENC = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def _encoder(in_channels, patch=P):
  return vit.ViTEncoder(**ENC, patch_size=patch, in_channels=in_channels)


def _random_params(module, method=None, **example):
  """Random, well-scaled ViT params without compiling init; non-zero biases, so no mapping error hides behind 0s."""
  init = (lambda: module.init(jax.random.key(0), **example)) if method is None else (
      lambda: module.init(jax.random.key(0), example, method=method))
  abstract = jax.eval_shape(lambda: nn.meta.unbox(init())["params"])
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    noise = rng.normal(size=leaf.shape)
    if path[-1].key == "kernel":
      return noise / np.sqrt(leaf.shape[0])
    return (1.0 if path[-1].key == "scale" else 0.0) + 0.1 * noise

  return jax.tree_util.tree_map_with_path(lambda p, x: np.asarray(draw(p, x), np.float32), abstract)


def _stats():
  mean = {b: 1000.0 + 10 * i for i, b in enumerate(B.S2_L1C_BANDS)}
  return {"s2": {"bands": list(B.S2_L1C_BANDS), "mean": list(mean.values()), "std": [500.0 + i for i in range(13)]},
          "s1": {"bands": ["VV", "VH"], "mean": [-12.0, -19.0], "std": [5.0, 6.0]}}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  """A MixMAE-like checkpoint (L1C S2 + S1 entry layers, a decoder, optimizer state) in the train loop's format."""
  workdir = tmp_path_factory.mktemp("pretrain")
  module = _encoder({"s2": 13, "s1": 2})
  enc = _random_params(module, s2=jnp.zeros((1, SIZE, SIZE, 13)), s1=jnp.zeros((1, SIZE, SIZE, 2)))
  params = {"encoder": enc, "decoder_s2": {"head": {"kernel": jnp.ones((32, 4))}}}
  state = {"params": params, "opt_state": optax.adamw(1e-3).init(params), "method_state": {}}
  meta = {"seed": 0, "tasks": ["mixmae"], "stats": {"mixmae": _stats()},
          "config": {"method": "mixmae", "bands": {"s2": ",".join(B.S2_L1C_BANDS), "s1": "VV,VH"}},
          "bands": {"mixmae": {"s2": list(B.S2_L1C_BANDS), "s1": ["VV", "VH"]}}}
  cp = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=2)
  cp.save(12, state, {}, meta)
  cp.close()
  return str(workdir), _Jitted(module), {"params": enc}


class _Jitted:
  """module.apply, jit-compiled (eager flax runs op by op: slow)."""

  def __init__(self, module):
    self.module = module
    self._apply = jax.jit(module.apply, static_argnames=("method",))

  def apply(self, variables, *args, **kwargs):
    return self._apply(variables, *args, **kwargs)


def _x(channels, seed=0, b=2):
  return np.random.default_rng(seed).normal(size=(b, SIZE, SIZE, channels)).astype(np.float32)


def test_l2a_conversion_equals_the_l1c_model_with_b10_at_its_mean(pretrained, tmp_path):
  workdir, module, variables = pretrained
  meta = convert.convert_checkpoint(workdir, str(tmp_path), modalities="s2", image_size=SIZE,
                                    bands=",".join(B.S2_L2A_BANDS))
  enc = mmrs.load_encoder(str(tmp_path))
  assert enc.bands == {"s2": B.S2_L2A_BANDS}
  x12 = _x(12)
  got = np.asarray(enc.embed(s2=x12))
  b10 = B.S2_L1C_BANDS.index("B10")
  want = module.apply(variables, s2=jnp.asarray(np.insert(x12, b10, 0.0, axis=-1)))
  other = module.apply(variables, s2=jnp.asarray(np.insert(x12, b10, 1.0, axis=-1)))
  assert got.shape == (2, 1 + (SIZE // P) ** 2, 32)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert np.abs(got - np.asarray(other)).max() > 1e-3  # B10's weights were really there and really dropped
  # Metadata: the L2A bands' pretraining statistics, the source run; decoders and optimizer state are gone.
  stats = _stats()["s2"]
  assert meta["normalization"]["s2"]["mean"] == [stats["mean"][B.S2_L1C_BANDS.index(b)] for b in B.S2_L2A_BANDS]
  assert meta["source"]["step"] == 12 and meta["source"]["method"] == "mixmae" and meta["source"]["config_digest"]
  assert meta["image_size"] == SIZE and meta["patch_size"] == P
  from safetensors.numpy import load_file
  keys = load_file(str(tmp_path / "encoder.safetensors")).keys()
  assert not any("decoder" in k or "patch_embed_s1" in k for k in keys)


def test_band_reordering_follows_the_names(pretrained, tmp_path):
  workdir, module, variables = pretrained
  convert.convert_checkpoint(workdir, str(tmp_path), modalities="s2", image_size=SIZE, bands="B04,B03,B02")
  enc = mmrs.load_encoder(str(tmp_path))
  rgb = _x(3, seed=1)
  full = np.zeros(rgb.shape[:3] + (13,), np.float32)
  for c, name in enumerate(("B04", "B03", "B02")):
    full[..., B.S2_L1C_BANDS.index(name)] = rgb[..., c]
  np.testing.assert_allclose(enc.embed(s2=rgb), module.apply(variables, s2=jnp.asarray(full)), atol=1e-5)


def test_load_encoder_embeds_s2_s1_and_both_and_normalizes(pretrained, tmp_path):
  workdir, module, variables = pretrained
  convert.convert_checkpoint(workdir, str(tmp_path), modalities="s1,s2", image_size=SIZE)
  enc = mmrs.load_encoder(str(tmp_path))
  s2, s1 = _x(13, 2), _x(2, 3)
  for kwargs in ({"s2": s2}, {"s1": s1}, {"s2": s2, "s1": s1}):
    want = module.apply(variables, **{k: jnp.asarray(v) for k, v in kwargs.items()})
    np.testing.assert_allclose(enc.embed(**kwargs), want, atol=1e-5)
  raw = np.full((1, SIZE, SIZE, 13), 1500, np.uint16)
  norm = enc.normalize(s2=raw, s1=np.full((1, SIZE, SIZE, 2), -99.0, np.float32))
  st = _stats()
  np.testing.assert_allclose(norm["s2"][0, 0, 0], (1500 - np.array(st["s2"]["mean"])) / np.array(st["s2"]["std"]),
                             rtol=1e-5)
  np.testing.assert_allclose(norm["s1"][0, 0, 0], (-50.0 - np.array([-12.0, -19.0])) / np.array([5.0, 6.0]),
                             rtol=1e-5)  # S1 clipped to the documented dB range first
  with pytest.raises(ValueError, match=r"\(B, H, W, 13\)"):
    enc.embed(s2=_x(12))


def test_unknown_band_or_modality_is_a_clear_error(pretrained, tmp_path):
  workdir, _, variables = pretrained
  l2a_stats = {"s2": {"bands": list(B.S2_L2A_BANDS), "mean": [0.0] * 12, "std": [1.0] * 12}}
  s2_only = {k: v for k, v in variables["params"].items() if "s1" not in k}
  s2_only["patch_embed_s2"] = {"kernel": np.ones((P * P * 12, 32), np.float32), "bias": np.zeros(32, np.float32)}
  with pytest.raises(convert.ConversionError, match=r"B10.*never saw"):
    convert.convert({"encoder": s2_only}, {}, trained_bands={"s2": B.S2_L2A_BANDS}, normalization=l2a_stats,
                    modalities="s2", image_size=SIZE, bands="B02,B10")
  with pytest.raises(convert.ConversionError, match=r"s1.*pretrained on \['s2'\]"):
    convert.convert({"encoder": s2_only}, {}, trained_bands={"s2": B.S2_L2A_BANDS}, normalization=l2a_stats,
                    modalities="s1,s2", image_size=SIZE)
  with pytest.raises(convert.ConversionError, match="not a multiple of the patch size"):
    convert.convert_checkpoint(workdir, str(tmp_path), modalities="s2", image_size=SIZE + 2)
  with pytest.raises(FileNotFoundError, match="no checkpoint found"):
    convert.convert_checkpoint(str(tmp_path / "nothing"), str(tmp_path), modalities="s2", image_size=SIZE)


def test_patch_resize_is_exact_for_upsampled_patches(pretrained):
  _, module, variables = pretrained
  enc = variables["params"]
  new, _ = convert.convert_vit(enc, {"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS}, ("s2",), {"s2": B.S2_L1C_BANDS},
                               image_size=2 * P, patch_size=2 * P)
  big = _encoder({"s2": 13}, patch=2 * P)
  x = _x(13, 4)[:, :P, :P]  # one old-size patch per image
  up = jax.image.resize(jnp.asarray(x), (2, 2 * P, 2 * P, 13), "bilinear", antialias=False)
  want = module.apply(variables, {"s2": jnp.asarray(x)}, method="embed")["s2"]
  got = jax.jit(big.apply, static_argnames="method")({"params": new}, {"s2": up}, method="embed")["s2"]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_learned_position_embeddings_are_interpolated():
  g = np.arange(4, dtype=np.float32)
  field = (g[:, None] + 10 * g[None, :]).reshape(1, 16, 1)  # linear in row and column
  pos = np.concatenate([np.full((1, 1, 1), 5.0, np.float32), field], axis=1)
  assert convert.interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
  out = convert.interpolate_pos_embed(pos, (4, 4), (8, 8))
  assert out.shape == (1, 65, 1) and out[0, 0, 0] == 5.0
  grid = out[0, 1:, 0].reshape(8, 8)
  np.testing.assert_array_less(0, np.diff(grid, axis=0))  # still increasing along rows (bicubic: see
  np.testing.assert_array_less(0, np.diff(grid, axis=1))  # tests/test_finetune_recipe.py)


def test_convert_checkpoint_command_line(pretrained, tmp_path):
  workdir, _, _ = pretrained
  out = tmp_path / "enc"
  cmd = [sys.executable, "-m", "launch.convert_checkpoint", f"--checkpoint={workdir}", f"--out={out}",
         "--modalities=s2", f"--image_size={SIZE}", "--bands=B02,B03,B04,B08"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  meta = json.loads((out / "encoder.json").read_text())
  assert meta["bands"] == {"s2": ["B02", "B03", "B04", "B08"]} and meta["modalities"] == ["s2"]
  bad = subprocess.run(cmd[:-1] + ["--bands=B02,XX"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert bad.returncode != 0 and "Unknown band name(s) ['XX']" in bad.stderr


def test_jointmae_plain_checkpoint_converts_to_an_encoder_that_computes_the_plain_one():
  """The plain baseline's single entry layer `patch_embed_s1s2` (S1 channels first) splits into S1 and S2 entry
  layers: S1+S2 with fusion=sum is the plain encoder exactly; S2 alone is it with S1 at its mean (0)."""
  plain = _encoder({"s1s2": 15})
  enc = _random_params(plain, lambda mod, x: mod.encode(mod.embed(x)["s1s2"]), s1s2=jnp.zeros((1, SIZE, SIZE, 15)))
  x1, x2 = _x(2, seed=3), _x(13, seed=4)

  def run_plain(images):
    return plain.apply({"params": enc}, plain.apply({"params": enc}, images, method="embed")["s1s2"],
                       method="encode")

  trained = {"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS}
  both, _ = convert.convert({"encoder": enc}, {}, trained_bands=trained, normalization=_stats(),
                            modalities="s1,s2", image_size=SIZE)
  split = _encoder({"s2": 13, "s1": 2})
  got = split.apply({"params": both["params"]}, s2=x2, s1=x1, fusion="sum")
  np.testing.assert_allclose(got, run_plain({"s1s2": np.concatenate([x1, x2], -1)}), rtol=1e-4, atol=1e-5)
  s2_only, _ = convert.convert({"encoder": enc}, {}, trained_bands=trained, normalization=_stats(),
                               modalities="s2", image_size=SIZE)
  got = _encoder({"s2": 13}).apply({"params": s2_only["params"]}, s2=x2)
  np.testing.assert_allclose(got, run_plain({"s1s2": np.concatenate([0 * x1, x2], -1)}), rtol=1e-4, atol=1e-5)


def test_encoder_json_records_the_token_layout_and_finetuning_follows_it(tmp_path):
  """The plain baseline's encoder (one channel-concatenation entry layer) records token_layout "sum", an encoder
  with per-modality entry layers "concat"; finetune.fusion defaults to it and a contradicting choice is refused."""
  from configs.finetune import sen12ms  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import method as method_lib  # pylint: disable=g-import-not-at-top
  trained = {"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS}
  plain = _encoder({"s1s2": 15})
  plain_params = _random_params(plain, lambda mod, x: mod.encode(mod.embed(x)["s1s2"]),
                                s1s2=jnp.zeros((1, SIZE, SIZE, 15)))
  joint_params = _random_params(_encoder({"s2": 13, "s1": 2}), s2=jnp.zeros((1, SIZE, SIZE, 13)),
                                s1=jnp.zeros((1, SIZE, SIZE, 2)))
  dirs = {}
  for name, params in (("plain", plain_params), ("joint", joint_params)):
    variables, meta = convert.convert({"encoder": params}, {}, trained_bands=trained, normalization=_stats(),
                                      modalities="s1,s2", image_size=32)
    dirs[name] = str(tmp_path / name)
    convert.save(dirs[name], variables, meta)
  assert json.load(open(os.path.join(dirs["plain"], "encoder.json")))["token_layout"] == "sum"
  assert json.load(open(os.path.join(dirs["joint"], "encoder.json")))["token_layout"] == "concat"

  def build(arg):
    return method_lib.build(sen12ms.get_config("tiny" + (f",{arg}" if arg else "")))  # S1 + S2

  assert build(f"init_from={dirs['plain']}").fusion == "sum"
  assert build(f"init_from={dirs['joint']}").fusion == "concat"
  assert build("fusion=sum").fusion == "sum" and build("").fusion == "concat"  # random init: any layout
  with pytest.raises(ValueError, match="pretrained with the 'sum' token layout"):
    build(f"init_from={dirs['plain']},fusion=concat")
  with pytest.raises(ValueError, match="pretrained with the 'concat' token layout"):
    build(f"init_from={dirs['joint']},fusion=sum")
  assert build(f"init_from={dirs['plain']},modalities=s2,fusion=concat").fusion == "concat"  # one modality: moot
