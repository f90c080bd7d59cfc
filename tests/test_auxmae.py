"""AuxMAE: the S2 MAE task plus S2 -> S1 on the whole unmasked S2 image, scored on every S1 patch."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import auxmae
from mmrs import methods
from mmrs.models import vit
from test_mae import adam_losses, fast_jit, smooth_images  # pylint: disable=g-bad-import-order

B, SIZE, P = 4, 32, 8


@pytest.fixture(scope="module")
def aux():
  config = auxmae.get_config("tiny")
  method = methods.build(config)
  k2, k1 = jax.random.split(jax.random.key(0))
  batch = {"s2": jax.random.normal(k2, (B, SIZE, SIZE, 12)), "s1": jax.random.normal(k1, (B, SIZE, SIZE, 2))}
  params, state = fast_jit(method.init)(jax.random.key(1), batch)
  return method, nn.meta.unbox(params), state, batch


def _grads(task, params, state, batch, rng):
  """Gradients of the task's loss w.r.t. params and w.r.t. the batch's pixels."""
  fn = lambda p, b: task.loss_fn(p, state, b, rng, True)[0]
  return fast_jit(jax.grad(fn, argnums=(0, 1)))(params, batch)


def test_auxmae_tasks_and_params_contract(aux):
  method, params, _, _ = aux
  assert set(params) == {"encoder", "decoder_s2", "decoder_s1"}
  got = [(t.name, t.dataset, t.modalities, t.param_prefixes) for t in method.tasks]
  assert got == [("s2_mae", "s2_only", ("s2",), ("encoder", "decoder_s2")),
                 ("s2_to_s1", "paired", ("s1", "s2"), ("encoder", "decoder_s1"))]
  assert "patch_embed_s1" not in params["encoder"]  # S1 is only ever a target
  assert method.flops_per_sample("s2_to_s1") > 0 and method.flops_per_sample("s2_mae") > 0


def test_auxmae_s2_to_s1_sees_whole_s2_and_scores_every_s1_patch(aux):
  method, params, state, batch = aux
  task = {t.name: t for t in method.tasks}["s2_to_s1"]
  param_grads, batch_grads = _grads(task, params, state, batch, jax.random.key(2))
  # Every S2 patch of every sample reaches the loss (S2 is input only in this task: no S2 target) ...
  per_patch_s2 = np.abs(np.asarray(vit.patchify(batch_grads["s2"], P))).sum(-1)
  assert (per_patch_s2 > 0).all()
  # ... and every S1 patch is scored (S1 is target only).
  per_patch_s1 = np.abs(np.asarray(vit.patchify(batch_grads["s1"], P))).sum(-1)
  assert (per_patch_s1 > 0).all()
  # The S2 reconstruction decoder takes no part.
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(param_grads["decoder_s2"]))


def test_auxmae_reconstruct_predicts_s1_from_s2(aux):
  method, params, state, batch = aux
  out = fast_jit(method.reconstruct)(params, state, batch, jax.random.key(4))
  assert out["reconstruction"]["s1"].shape == batch["s1"].shape
  assert float(jnp.abs(out["seen"]["s1"]).max()) == 0.0  # S1 is never an input
  assert np.isfinite(np.asarray(out["reconstruction"]["s1"])).all()


def test_auxmae_tiny_config_alternating_steps_decrease_both_losses(aux):
  method, params, state, _ = aux  # built from get_config("tiny")
  config = method.config
  batch = {"s2": smooth_images(0, config.batch_size, SIZE, 12), "s1": smooth_images(1, config.batch_size, SIZE, 2)}
  losses = adam_losses(method, params, state, batch, config.optimizer.learning_rate)
  for name, (before, after) in losses.items():
    assert np.isfinite(after) and after < before, (name, before, after)


def test_auxmae_mask_ratio_is_read_from_the_config(aux):
  """The s2_mae task masks config.mask_ratio of the S2 patches (0.5: half stay visible)."""
  from test_mae import seen_patches  # pylint: disable=g-import-not-at-top
  _, params, state, batch = aux
  config = auxmae.get_config("tiny")
  config.mask_ratio = 0.5
  method = methods.build(config)
  seen = seen_patches(fast_jit(method.reconstruct)(params, state, batch, jax.random.key(4))["seen"]["s2"])
  assert (seen.sum(axis=1) == (SIZE // P) ** 2 // 2).all()
