"""The ViT's Dense layers run as flattened 2-D matmuls (mmrs/models/vit.py `flat_dot_general`, a CPU backward-pass
speed-up): the losses and gradients of MAE-S2 and MixMAE equal those of plain `lax.dot_general`/`tensordot`."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import mae_s2 as mae_config
from configs import mixmae as mixmae_config
from mmrs.methods import mae as mae_lib
from mmrs.methods import mixmae as mixmae_lib
from mmrs.models import vit


def reference_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


def loss_and_grads(method, batch):
  params, state = method.init(jax.random.key(0), batch)
  params = nn.meta.unbox(params)
  task = method.tasks[0]
  fn = jax.jit(jax.value_and_grad(lambda p: task.loss_fn(p, state, batch, jax.random.key(5), True)[0]))
  return fn(params)


@pytest.mark.parametrize("name", ["mae_s2", "mixmae"])
def test_flat_matmuls_keep_the_loss_and_gradients(name, monkeypatch):
  config = (mae_config if name == "mae_s2" else mixmae_config).get_config("tiny")
  method = (mae_lib if name == "mae_s2" else mixmae_lib).build(config)
  keys = jax.random.split(jax.random.key(1), 2)
  batch = {"s2": jax.random.normal(keys[0], (4, 32, 32, 12))}
  if name == "mixmae":
    batch["s1"] = jax.random.normal(keys[1], (4, 32, 32, 2))
  loss, grads = loss_and_grads(method, batch)

  monkeypatch.setattr(vit, "flat_dot_general", reference_dot_general)
  monkeypatch.setattr(vit, "_Dense", functools.partial(nn.Dense))
  ref_loss, ref_grads = loss_and_grads(method, batch)

  assert np.isfinite(float(loss)) and float(loss) > 0
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
  flat, ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
  assert len(flat) == len(ref)
  for (path, g), r in zip(flat, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_flat_dot_general_matches_tensordot_for_multi_dim_kernels():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 4))
  k = jax.random.normal(jax.random.key(1), (3, 4, 6))
  got = vit.flat_dot_general(x, k, (((2, 3), (0, 1)), ((), ())))
  np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.tensordot(x, k, axes=2)), rtol=1e-5, atol=1e-5)
  assert got.shape == (2, 5, 6)
