"""ViT encoder / ViT-Lite decoder: inputs of either or both modalities, any patch grid, clear errors."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from mmrs.models import vit

# XLA's backend optimizations off: halves the CPU compile time of these tiny models, which run in milliseconds.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
P = 8
IN_CHANNELS = {"s2": 12, "s1": 2}


@pytest.fixture(scope="module")
def encoder_and_params():
  enc = vit.ViTEncoder(**common.vit_size("mu"), patch_size=P, in_channels=IN_CHANNELS)
  variables = fast_jit(enc.init)(jax.random.key(0), s2=jnp.zeros((1, 16, 16, 12)), s1=jnp.zeros((1, 16, 16, 2)))
  return enc, variables


def _numpy_init(init_fn, *args):
  """Random params of the right shapes without compiling the module's initializers (slow on CPU)."""
  r = np.random.default_rng(0)
  shapes = nn.meta.unbox(jax.eval_shape(init_fn, *args))
  return jax.tree.map(lambda s: jnp.asarray(r.normal(0.0, 0.1, s.shape), s.dtype), shapes)


def _images(rng, b, h, w):
  k2, k1 = jax.random.split(jax.random.key(rng))
  return jax.random.normal(k2, (b, h, w, 12)), jax.random.normal(k1, (b, h, w, 2))


@pytest.mark.parametrize("h,w", [(32, 32), (16, 40)])
def test_vit_encoder_finite_for_s2_s1_and_both(encoder_and_params, h, w):
  enc, variables = encoder_and_params
  params = nn.meta.unbox(variables)
  s2, s1 = _images(1, 2, h, w)
  n = (h // P) * (w // P)
  outs = fast_jit(lambda p, s2, s1: [enc.apply(p, s2=s2), enc.apply(p, s1=s1), enc.apply(p, s2=s2, s1=s1)])(
      params, s2, s1)
  for out in outs:
    assert out.shape == (2, 1 + n, 32)
    assert np.isfinite(np.asarray(out)).all()
  assert not np.allclose(outs[0], outs[1])  # each modality has its own entry layer


def test_vit_encoder_s1_s2_fusions_concat_tokens_or_sum_with_one_position_embedding(encoder_and_params):
  enc, variables = encoder_and_params
  params = nn.meta.unbox(variables)
  s2, s1 = _images(2, 2, 16, 24)

  @fast_jit
  def all_ways(params, s2, s1):
    tokens = enc.apply(params, {"s2": s2, "s1": s1}, method="embed")
    pos = vit.sincos_2d(2, 3, 32)[None]
    concat = enc.apply(params, jnp.concatenate([tokens["s1"], tokens["s2"]], axis=1), method="encode")
    summed = enc.apply(params, tokens["s2"] + tokens["s1"] - pos, method="encode")
    return (tokens, concat, summed, enc.apply(params, s2=s2, s1=s1, fusion="concat"),
            enc.apply(params, s2=s2, s1=s1, fusion="sum"))

  tokens, concat, summed, got_concat, got_sum = all_ways(params, s2, s1)
  assert tokens["s2"].shape == tokens["s1"].shape == (2, 2 * 3, 32)
  assert got_concat.shape == (2, 1 + 2 * 2 * 3, 32)  # 2L tokens: one per (position, modality), as JointMAE saw
  np.testing.assert_allclose(got_concat, concat, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_sum, summed, rtol=1e-5, atol=1e-5)  # the position embedding once, not twice
  with pytest.raises(ValueError, match="finetune.fusion"):
    enc.apply(params, s2=s2, s1=s1, fusion="max")


def test_vit_encoder_rejects_image_size_not_multiple_of_patch(encoder_and_params):
  enc, variables = encoder_and_params
  with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
    enc.apply(nn.meta.unbox(variables), s2=jnp.zeros((1, 20, 16, 12)))


def test_vit_encoder_rejects_wrong_channels_and_unknown_modality(encoder_and_params):
  enc, variables = encoder_and_params
  params = nn.meta.unbox(variables)
  with pytest.raises(ValueError, match="config.bands"):
    enc.apply(params, s2=jnp.zeros((1, 16, 16, 13)))
  with pytest.raises(ValueError, match="no entry layer for modality 'sar'"):
    enc.apply(params, {"sar": jnp.zeros((1, 16, 16, 2))}, method="embed")


def test_vit_encoder_params_have_logical_axis_names(encoder_and_params):
  _, variables = encoder_and_params
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  params = variables["params"]
  assert params["patch_embed_s2"]["kernel"].names == ("patch", "embed")
  assert params["patch_embed_s2"]["kernel"].value.shape == (P * P * 12, 32)
  assert params["modality_embed_s1"].value.shape == (32,)
  assert "cls" in params


def test_vit_sincos_position_embeddings_for_nonsquare_grids():
  for gh, gw in [(2, 5), (7, 3), (4, 4)]:
    emb = vit.sincos_2d(gh, gw, 32)
    assert emb.shape == (gh * gw, 32)
    assert np.isfinite(emb).all() and np.abs(emb).max() <= 1.0
    assert len({tuple(np.round(r, 6)) for r in emb}) == gh * gw  # every position is distinct
  # Row-major like patchify: the same row shares the row half, the same column the column half.
  emb = vit.sincos_2d(3, 4, 16)
  np.testing.assert_allclose(emb[0, :8], emb[3, :8])
  np.testing.assert_allclose(emb[1, 8:], emb[5, 8:])


def test_vit_patchify_roundtrip_and_order():
  x = jnp.arange(2 * 16 * 24 * 3, dtype=jnp.float32).reshape(2, 16, 24, 3)
  patches = vit.patchify(x, P)
  assert patches.shape == (2, 6, P * P * 3)
  # Patch 4 = row 1, column 1; its first pixel is image pixel (8, 8).
  np.testing.assert_array_equal(patches[:, 4, :3], x[:, 8, 8])
  np.testing.assert_array_equal(vit.unpatchify(patches, P, (2, 3)), x)


def test_vit_lite_decoder_fills_unseen_slots_and_has_one_head_per_group():
  b, grid, n = 2, (2, 3), 4
  tokens = jax.random.normal(jax.random.key(0), (b, 1 + n, 32))
  ids = jnp.array([[0, 2, 3, 5], [1, 2, 4, 5]])
  dec = vit.ViTLiteDecoder(**common.vit_size("mu"), out_dim=P * P * 12)
  apply = fast_jit(dec.apply, static_argnums=2)
  params = _numpy_init(lambda r, t, i: dec.init(r, t, grid, i), jax.random.key(1), tokens, ids)
  out = apply(params, tokens, grid, ids)
  assert out.shape == (b, 6, P * P * 12) and out.dtype == jnp.float32
  # Two groups (e.g. JointMAE's S2 and S1 slots): slot ids in [0, 12).
  dec2 = vit.ViTLiteDecoder(**common.vit_size("mu"), out_dim=(P * P * 12, P * P * 2))
  ids2 = jnp.array([[0, 7, 8, 11], [1, 2, 6, 9]])
  params2 = _numpy_init(lambda r, t, i: dec2.init(r, t, grid, i), jax.random.key(1), tokens, ids2)
  out_s2, out_s1 = fast_jit(dec2.apply, static_argnums=2)(params2, tokens, grid, ids2)
  assert out_s2.shape == (b, 6, P * P * 12) and out_s1.shape == (b, 6, P * P * 2)
  # Without ids the decoder needs every slot.
  full = jax.random.normal(jax.random.key(2), (b, 1 + 6, 32))
  assert apply(params, full, grid).shape == (b, 6, P * P * 12)
  with pytest.raises(ValueError, match="needs all 6 slot tokens"):
    apply(params, tokens, grid)


@pytest.mark.parametrize("implementation", ["xla", "head_major"])
def test_vit_attention_matches_a_reference_softmax_attention(implementation):
  q, k, v = np.asarray(jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8)))
  scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8.0)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  want = np.einsum("bhqk,bkhd->bqhd", weights, v)
  np.testing.assert_allclose(vit.attend(q, k, v, implementation), want, rtol=1e-5, atol=1e-6)


def test_vit_attention_auto_picks_head_major_on_cpu_and_rejects_unknown_names():
  """What a CPU can check: "auto" picks the head-major attention here (so the two agree trivially: this is NOT a
  test of cuDNN) and unknown names fail. cuDNN's numbers are checked only by the GPU test below (skipped without a
  GPU)."""
  q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 2, 8))
  if jax.default_backend() == "cpu":
    np.testing.assert_array_equal(vit.attend(q, k, v, "auto"), vit.attend(q, k, v, "head_major"))
  with pytest.raises(ValueError, match="config.model.attention"):
    vit.attend(q, k, v, "flash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN flash attention needs a GPU: not checkable on CPU")
def test_vit_cudnn_attention_matches_xla_on_gpu():
  q, k, v = (x.astype(jnp.bfloat16) for x in jax.random.normal(jax.random.key(0), (3, 2, 64, 4, 64)))
  got = vit.attend(q, k, v, "cudnn").astype(jnp.float32)
  want = vit.attend(q, k, v, "xla").astype(jnp.float32)
  np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
