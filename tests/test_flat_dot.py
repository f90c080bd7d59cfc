"""The ViT's CPU fast paths (mmrs/models/vit.py: Dense layers as flattened 2-D matmuls `flat_dot_general`, the
head-major attention `head_major_attention` that attention="auto" picks on CPU, erf GELU `gelu`) keep the math: the
losses and gradients of MAE-S2 and MixMAE equal those of plain `lax.dot_general`, `jax.nn.dot_product_attention`'s
XLA path and `jax.nn.gelu(approximate=False)`."""
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
def test_cpu_fast_paths_keep_the_loss_and_gradients(name, monkeypatch):
  config = (mae_config if name == "mae_s2" else mixmae_config).get_config("tiny")
  assert config.model.attention == "auto" and jax.default_backend() == "cpu"  # -> head_major (test_vit.py)
  method = (mae_lib if name == "mae_s2" else mixmae_lib).build(config)
  keys = jax.random.split(jax.random.key(1), 2)
  batch = {"s2": jax.random.normal(keys[0], (4, 32, 32, 12))}
  if name == "mixmae":
    batch["s1"] = jax.random.normal(keys[1], (4, 32, 32, 2))
  loss, grads = loss_and_grads(method, batch)

  monkeypatch.setattr(vit, "flat_dot_general", reference_dot_general)
  monkeypatch.setattr(vit, "_Dense", functools.partial(nn.Dense))
  monkeypatch.setattr(vit, "head_major_attention",
                      lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
  monkeypatch.setattr(vit, "gelu", lambda x: jax.nn.gelu(x, approximate=False))
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


def test_erf_gelu_is_jax_exact_gelu():
  x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 4001), jax.random.normal(jax.random.key(0), (1000,)) * 3])
  np.testing.assert_allclose(np.asarray(vit.gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)),
                             rtol=1e-5, atol=2e-6)
  grad = jax.vmap(jax.grad(vit.gelu))(x)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, False)))(x)),
                             rtol=1e-5, atol=2e-6)
