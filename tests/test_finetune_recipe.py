"""The MAE finetune recipe: layer-wise lr decay (optimizer), drop path (ViT encoder), the paper variant's defaults,
and bicubic position-embedding resampling (checkpoint conversion)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.finetune import bigearthnet, eurosat, sen1floods11
from mmrs.finetune import convert, method as method_lib
from mmrs.models import layout, vit
from mmrs.train import optimizers

DEPTH = 3


def _encoder_params():
  module = vit.ViTEncoder(8, DEPTH, 16, 2, patch_size=2, in_channels={"s2": 2})
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), s2=jnp.zeros((1, 4, 4, 2))))["params"]
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), nn.meta.unbox(shapes))


def _updates(name, decay, params):
  opt = optimizers.make_optimizer(dict(name=name, learning_rate=0.1, warmup_steps=0, schedule="constant",
                                       weight_decay=0.05, b1=0.9, b2=0.999, momentum=0.9, layer_decay=decay),
                                  tuple(params), total_steps=10)
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  new = jax.jit(lambda g, s, p: opt.update(g, s, p, 0)[0])(grads, opt.init(params), params)
  return jax.tree.map(lambda n, p: np.asarray(n - p), new, params)


@pytest.mark.parametrize("name,scan", [("adafactor", False), ("adafactor", True), ("adamw", True), ("sgd", False)])
def test_layer_decay_scales_each_blocks_update(name, scan):
  d = 0.5
  enc = _encoder_params()
  params = {"encoder": layout.stack_blocks(enc) if scan else enc, "head": {"kernel": jnp.ones((8, 3))}}
  base, decayed = _updates(name, 1.0, params), _updates(name, d, params)
  unstack = layout.unstack_blocks
  base_enc, dec_enc = unstack(base["encoder"]), unstack(decayed["encoder"])

  def ratio(key):
    return jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a).sum() / np.abs(b).sum()), dec_enc[key],
                                        base_enc[key]))

  for i in range(DEPTH):  # block i of L: d^(L - i), so block 0 / last block = d^(L - 1)
    np.testing.assert_allclose(ratio(f"blocks_{i}"), d ** (DEPTH - i), rtol=1e-5)
  for key in ("patch_embed_s2", "modality_embed_s2", "cls"):  # entry layers: d^(L + 1)
    np.testing.assert_allclose(ratio(key), d ** (DEPTH + 1), rtol=1e-5)
  np.testing.assert_allclose(ratio("norm"), 1.0, rtol=1e-6)  # final norm and head: the full lr
  np.testing.assert_array_equal(decayed["head"]["kernel"], base["head"]["kernel"])


def test_layer_decay_needs_transformer_blocks_and_a_valid_value():
  params = {"encoder": {"conv1": {"kernel": jnp.ones((3, 3, 1, 4))}}}
  with pytest.raises(ValueError, match="needs a ViT encoder"):
    _updates("adamw", 0.5, params)
  with pytest.raises(ValueError, match=r"layer_decay=1.5 .* must be in \(0, 1\]"):
    optimizers.make_optimizer(dict(name="sgd", learning_rate=0.1, layer_decay=1.5), ("encoder",), 10)


# --- drop path ---------------------------------------------------------------------------------------------------

def _probe_encoder(scan, rate, depth=4, width=32):
  """An encoder whose CLS token reads out each branch's drop-path factor: every block's weights are zero except
  the attention output bias (e_2i) and the MLP output bias (e_2i+1), and the CLS token starts at 0; so the CLS
  token before the final norm is sum_i s_attn,i e_2i + s_mlp,i e_2i+1, with s the per-sample branch factors."""
  module = vit.ViTEncoder(width, depth, 2 * width, 2, patch_size=8, in_channels={"s2": 2}, drop_path_rate=rate,
                          scan_layers=scan)
  shapes = jax.eval_shape(lambda: vit.ViTEncoder(width, depth, 2 * width, 2, patch_size=8, in_channels={"s2": 2})
                          .init(jax.random.key(0), s2=jnp.zeros((1, 8, 8, 2))))["params"]
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), nn.meta.unbox(shapes))
  params["norm"]["scale"] = np.ones(width, np.float32)
  for i in range(depth):
    params[f"blocks_{i}"]["attn"]["out"]["bias"][2 * i] = 1.0
    params[f"blocks_{i}"]["mlp"]["fc2"]["bias"][2 * i + 1] = 1.0
  return module, {"params": layout.stack_blocks(params) if scan else params}


def _branch_factors(module, variables, batch, train, seed=0):
  x = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 8, 8, 2)), jnp.float32)
  rngs = {"dropout": jax.random.key(seed)} if train else {}
  cls = np.asarray(jax.jit(lambda v, x: module.apply(v, s2=x, train=train, rngs=rngs))(variables, x)[:, 0],
                   np.float64)
  depth = module.depth
  # After the final LayerNorm (scale 1, bias 0) the CLS token is (z - mean) / std: dims >= 2 * depth are z = 0, and
  # block 0's attention branch is never dropped (rate 0 at the first block), which fixes the unit.
  ref = cls[:, -1:]
  return (cls[:, :2 * depth] - ref) / (cls[:, :1] - ref)  # (B, 2 * depth): attn_0, mlp_0, attn_1, ...


@pytest.mark.parametrize("scan", [False, True])
def test_drop_path_drops_whole_branches_per_sample_with_linearly_rising_rate(scan):
  rate, depth, batch = 0.6, 4, 4096
  module, variables = _probe_encoder(scan, rate, depth)
  f = _branch_factors(module, variables, batch, train=True)
  for i in range(depth):
    p = rate * i / (depth - 1)  # 0, 0.2, 0.4, 0.6
    for branch in (0, 1):
      s = f[:, 2 * i + branch]
      dropped = np.isclose(s, 0.0, atol=1e-4)
      assert abs(dropped.mean() - p) < 0.04, (i, branch, dropped.mean(), p)
      np.testing.assert_allclose(s[~dropped], 1.0 / (1.0 - p), rtol=1e-4)  # the kept branch is scaled up
  last = f[:, -2:] == 0
  assert abs((last[:, 0] != last[:, 1]).mean() - 2 * rate * (1 - rate)) < 0.05  # attn and MLP drop independently
  np.testing.assert_allclose(_branch_factors(module, variables, 64, train=False), 1.0, rtol=1e-5)  # eval: identity


def test_drop_path_is_the_same_in_the_scanned_and_unrolled_layouts_and_off_at_rate_zero():
  from tests.tiny_encoder import random_params  # pylint: disable=g-import-not-at-top
  kw = dict(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=8, in_channels={"s2": 2})
  x = jnp.asarray(np.random.default_rng(2).normal(size=(16, 16, 16, 2)), jnp.float32)
  params = random_params(vit.ViTEncoder(**kw), 0, s2=x[:1])["params"]
  outs = {}
  for scan in (False, True):
    for rate in (0.0, 0.5):
      m = vit.ViTEncoder(**kw, drop_path_rate=rate, scan_layers=scan)
      p = {"params": layout.stack_blocks(params) if scan else params}
      apply = jax.jit(lambda p, x, r, m=m: (m.apply(p, s2=x, train=True, rngs={"dropout": r}),
                                            m.apply(p, s2=x, train=False)))
      outs[scan, rate, True], outs[scan, rate, False] = apply(p, x, jax.random.key(3))
  plain = jax.jit(lambda p, x: vit.ViTEncoder(**kw).apply(p, s2=x))({"params": params}, x)
  for scan in (False, True):
    np.testing.assert_array_equal(outs[scan, 0.0, True], outs[scan, 0.0, False])  # rate 0: no rng, no change
    np.testing.assert_array_equal(outs[scan, 0.5, False], outs[scan, 0.0, False])  # eval: identity
  np.testing.assert_allclose(outs[False, 0.0, False], plain, atol=1e-6)
  np.testing.assert_allclose(outs[True, 0.5, True], outs[False, 0.5, True], atol=1e-5)  # same branches dropped
  assert np.abs(np.asarray(outs[False, 0.5, True]) - np.asarray(plain)).max() > 1e-2


def test_finetune_method_passes_the_rng_and_scan_layers_to_the_encoder():
  config = eurosat.get_config("tiny,frozen=False,drop_path=0.5")
  config.model.scan_layers = True
  m = method_lib.build(config)
  assert m.encoder.drop_path_rate == 0.5 and m.encoder.scan_layers
  assert config.optimizer.layer_decay == 1.0 and tuple(config.optimizer.layer_decay_groups) == ("encoder",)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 13)), jnp.float32)
  batch = {"s2": x, m.label_key: jnp.zeros(4, jnp.int32)}
  shapes, state = jax.eval_shape(m.init, jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda v: np.asarray(1.0 + 0.1 * rng.normal(size=v.shape), np.float32),
                        nn.meta.unbox(shapes))
  state = jax.tree.map(lambda v: np.ones(v.shape, np.float32), state)
  assert params["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == m.encoder.depth  # stacked
  forward = jax.jit(m.forward, static_argnums=4)
  train = forward(params, state, batch, jax.random.key(1), True)[0]
  again = forward(params, state, batch, jax.random.key(1), True)[0]
  evals = forward(params, state, batch, None, False)[0]
  np.testing.assert_array_equal(train, again)
  assert np.abs(np.asarray(train) - np.asarray(evals)).max() > 1e-4


# --- the paper variant ---------------------------------------------------------------------------------------------

def test_paper_variant_uses_the_mae_finetune_recipe_where_the_paper_is_silent():
  for mod in (bigearthnet, sen1floods11):
    c = mod.get_config("paper")
    assert c.optimizer.name == "adafactor"  # the one thing the MixMAE paper states (with batch and steps)
    assert c.finetune.layer_decay == 0.65 and c.model.drop_path_rate == 0.1  # MAE ViT-B
    assert c.optimizer.learning_rate == pytest.approx(5e-4 * c.batch_size / 256)
    assert c.optimizer.warmup_steps == c.total_steps // 20 and c.optimizer.schedule == "cosine"
    assert c.optimizer.weight_decay == 0.05 and c.optimizer.clip_norm == 0.0
  big = bigearthnet.get_config("paper,batch_size=4096,layer_decay=0.75,drop_path=0.2")
  assert big.optimizer.learning_rate == pytest.approx(8e-3)  # MAE's linear scaling rule
  assert big.finetune.layer_decay == 0.75 and big.model.drop_path_rate == 0.2
  assert bigearthnet.get_config("paper,lr=1e-4").optimizer.learning_rate == 1e-4
  probe = eurosat.get_config("paper")  # frozen: a probe, no recipe
  assert probe.finetune.layer_decay == 1.0 and probe.model.drop_path_rate == 0.0
  tiny = bigearthnet.get_config("tiny")
  assert tiny.finetune.layer_decay == 1.0 and tiny.model.drop_path_rate == 0.0
  method_lib.prepare_config(big)
  assert big.optimizer.layer_decay == 0.75  # the optimizer reads its copy
  with pytest.raises(ValueError, match="finetune.layer_decay=0.0"):
    method_lib.prepare_config(bigearthnet.get_config("paper,layer_decay=0"))


# --- position embeddings -------------------------------------------------------------------------------------------

def _field(h, w):
  r, c = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
  return r, c


def test_pos_embed_is_resampled_bicubically_to_any_grid():
  h, w = 4, 6
  r, c = _field(h, w)
  quad = np.stack([r ** 2, c ** 2, r * c, np.sin(r + 2 * c)], -1)  # (h, w, 4)
  pos = np.concatenate([np.full((1, 1, 4), 7.0), quad.reshape(1, h * w, 4)], axis=1).astype(np.float32)
  assert convert.interpolate_pos_embed(pos, (h, w), (h, w)) is pos
  out = convert.interpolate_pos_embed(pos, (h, w), (8, 12))
  assert out.shape == (1, 1 + 96, 4) and out.dtype == np.float32
  np.testing.assert_array_equal(out[0, 0], 7.0)  # CLS kept
  grid = out[0, 1:].reshape(8, 12, 4)
  # An independent 4-tap evaluation of PyTorch's bicubic (Keys a = -0.75, align_corners=False: output i samples
  # x = (i + 0.5) * old / new - 0.5, border taps clamped), applied per axis; bilinear resampling differs on these
  # curved fields by up to ~0.1.
  y = (np.arange(8) + 0.5) * h / 8 - 0.5
  x = (np.arange(12) + 0.5) * w / 12 - 0.5

  def taps(n_old, xs, a=-0.75):
    m = np.zeros((len(xs), n_old))
    for j, s in enumerate(xs):
      b = int(np.floor(s))
      for k in range(-1, 3):
        t = abs(s - (b + k))
        wgt = ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else (((a * t - 5 * a) * t + 8 * a) * t - 4 * a
                                                                   if t < 2 else 0.0)
        m[j, min(max(b + k, 0), n_old - 1)] += wgt
    return m
  want = np.einsum("ih,jw,hwd->ijd", taps(h, y), taps(w, x), quad)
  np.testing.assert_allclose(grid, want, atol=1e-5)
  # Constants stay constant, borders included (the taps sum to one; with a = -0.75 only constants are reproduced
  # exactly, not linear ramps, unlike bilinear or a = -0.5).
  const = convert.interpolate_pos_embed(np.full((1, h * w, 2), 3.0, np.float32), (h, w), (5, 9), num_prefix=0)
  np.testing.assert_allclose(const, 3.0, rtol=1e-6)


def test_pos_embed_bicubic_matches_torch():
  torch = pytest.importorskip("torch")  # CI installs it (requirements-ci.txt)
  rng = np.random.default_rng(0)
  for (h, w), (nh, nw) in (((4, 4), (8, 12)), ((7, 5), (3, 9)), ((6, 6), (14, 14))):
    grid = rng.normal(size=(h, w, 5)).astype(np.float32)
    pos = np.concatenate([np.zeros((1, 1, 5), np.float32), grid.reshape(1, h * w, 5)], axis=1)
    got = convert.interpolate_pos_embed(pos, (h, w), (nh, nw))[0, 1:].reshape(nh, nw, 5)
    ref = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=(nh, nw),
                                          mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_recipe_fills_a_locked_config_as_launch_main_passes_it():
  """launch.main hands over a locked ConfigDict: the recipe may only set keys the configs declare."""
  from configs.finetune import bigearthnet  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import method as method_lib  # pylint: disable=g-import-not-at-top
  config = bigearthnet.get_config("paper,steps=10,batch_size=8")
  config.lock()
  method_lib.prepare_config(config)
  assert config.optimizer.layer_decay == config.finetune.layer_decay < 1.0
