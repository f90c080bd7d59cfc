"""config.model.scan_layers / remat_policy: same losses and gradients as the unrolled model; both param layouts
are read by conversion; the stacked "layers" axis is never sharded."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_s2, mixmae
from mmrs import methods
from mmrs.finetune import convert
from mmrs.models import layout
from mmrs.train import mesh as mesh_lib
from mmrs.train import optimizers
from mmrs.train import state as state_lib

fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, SIZE = 4, 32


def _build(module, **model):
  config = module.get_config("tiny")
  config.model.update(model)
  return methods.build(config)


def _batch():
  k2, k1 = jax.random.split(jax.random.key(0))
  return {"s2": jax.random.normal(k2, (B, SIZE, SIZE, 12)), "s1": jax.random.normal(k1, (B, SIZE, SIZE, 2))}


def _loss_and_grads(method, params, batch):
  def loss(p):
    return method.tasks[0].loss_fn(p, {}, batch, jax.random.key(3), True)[0]
  return fast_jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("module,policies", [(mae_s2, ("none",)), (mixmae, ("save_qkv_proj",))],
                         ids=["mae", "mixmae"])
def test_scanned_model_matches_unrolled(module, policies):
  batch = _batch()
  unrolled = _build(module)
  params, _ = fast_jit(unrolled.init)(jax.random.key(1), batch)
  params = nn.meta.unbox(params)
  loss, grads = _loss_and_grads(unrolled, params, batch)
  stacked = layout.stack_blocks(params)
  assert "blocks" in stacked["encoder"] and "blocks_0" not in stacked["encoder"]
  for policy in policies:
    scanned = _build(module, scan_layers=True, remat_policy=policy)
    # The scanned model initializes the stacked layout itself (same tree as stack_blocks of the unrolled one).
    own, _ = jax.eval_shape(scanned.init, jax.random.key(1), batch)
    assert jax.tree.structure(nn.meta.unbox(own)) == jax.tree.structure(stacked)
    s_loss, s_grads = _loss_and_grads(scanned, stacked, batch)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(layout.unstack_blocks(s_grads)), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_remat_without_scan_matches_and_bad_policy_is_named():
  batch = _batch()
  plain = _build(mixmae)
  params = nn.meta.unbox(fast_jit(plain.init)(jax.random.key(1), batch)[0])
  loss, grads = _loss_and_grads(plain, params, batch)
  remat_loss, remat_grads = _loss_and_grads(_build(mixmae, remat_policy="full"), params, batch)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(remat_grads["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"],
                             grads["encoder"]["blocks_0"]["mlp"]["fc1"]["kernel"], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError, match="config.model.remat_policy"):
    jax.eval_shape(_build(mixmae, remat_policy="everything").init, jax.random.key(1), batch)


def test_layout_round_trip_and_conversion_reads_both(tmp_path):
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  enc = {"patch_embed_s2": {"kernel": normal(4, 3)},
         **{f"blocks_{i}": {"attn": {"w": normal(3, 2)}, "norm1": {"scale": normal(3)}} for i in range(3)}}
  params = {"encoder": enc, "decoder": {"blocks_0": {"w": normal(2)}, "head": {"w": np.ones(2, np.float32)}}}
  stacked = layout.stack_blocks(params)
  assert stacked["encoder"]["blocks"]["attn"]["w"].shape == (3, 3, 2)
  back = layout.unstack_blocks(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(layout.unstack_blocks(params)) == jax.tree.structure(params)  # per-block: unchanged
  # Conversion's entry (extract_encoder) and convert.load (load_encoder, export) read the stacked layout.
  kind, got, _ = convert.extract_encoder(stacked, None)
  assert kind == "vit" and sorted(got) == sorted(enc)
  np.testing.assert_array_equal(got["blocks_2"]["attn"]["w"], enc["blocks_2"]["attn"]["w"])
  convert.save(str(tmp_path), {"params": stacked["encoder"]}, {"format": convert.FORMAT})
  loaded, _ = convert.load(str(tmp_path))
  np.testing.assert_array_equal(loaded["params"]["blocks_1"]["norm1"]["scale"], enc["blocks_1"]["norm1"]["scale"])
  with pytest.raises(ValueError, match="leading"):
    layout.unstack_blocks({"blocks": {"a": np.ones((2, 3)), "b": np.ones((3,))}})


def test_stacked_layers_axis_is_never_sharded():
  method = _build(mixmae, scan_layers=True)
  method.config.model.encoder = "mu"
  example = {k: jax.ShapeDtypeStruct((2,) + v.shape[1:], v.dtype) for k, v in _batch().items()}
  opt = optimizers.make_optimizer(method.config.optimizer, ("encoder", "decoder_s2", "decoder_s1"), 10)
  mesh = mesh_lib.make_mesh("data=1,fsdp=8")
  lay = state_lib.layout(method, opt, example, mesh, fsdp_min_size=1)
  specs = lay.specs["params"]["encoder"]["blocks"]
  sharded = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
             if "fsdp" in tuple(s)]
  assert sharded, "fsdp should split the stacked kernels along embed/mlp"
  assert all(len(s) == 0 or s[0] is None for s in sharded)  # axis 0 = layers stays whole
