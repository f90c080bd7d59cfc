"""config.grad_accum_steps: k micro-batches inside one compiled step, float32 gradient mean, one optimizer update."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mixmae, rsbyol
from mmrs import methods
from mmrs.train import config_check
from mmrs.train import mesh as mesh_lib
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib

OPTS = {"xla_backend_optimization_level": 0}
B, SIZE = 8, 32


def _setup(method, batch, mesh):
  example = state_lib.example_batch({"t": batch})
  optimizer, layout = step_lib.plan_state(method.config, method, example, mesh, decay_steps=10)
  state = state_lib.create(method, optimizer, example, layout, jax.random.key(0), OPTS)
  return optimizer, layout, state


def _compile(method, optimizer, layout, mesh, batch, k):
  fn = step_lib.make_step_fn(method, method.tasks[0], 0, optimizer, None, seed=0, grad_accum_steps=k)
  abstract = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in batch.items()}
  return step_lib.compile_step(fn, layout, abstract, mesh, OPTS)


def test_accumulated_step_is_the_mean_of_micro_batch_gradients_and_uses_less_memory():
  method = methods.build(mixmae.get_config("tiny"))
  k2, k1 = jax.random.split(jax.random.key(0))
  batch = {"s2": jax.random.normal(k2, (B, SIZE, SIZE, 12)), "s1": jax.random.normal(k1, (B, SIZE, SIZE, 2))}
  mesh = mesh_lib.make_mesh("data=2,fsdp=1", jax.devices()[:2])
  with jax.set_mesh(mesh):
    optimizer, layout, state = _setup(method, batch, mesh)
    params0 = jax.device_get(state["params"])
    one = _compile(method, optimizer, layout, mesh, batch, 1)
    two = _compile(method, optimizer, layout, mesh, batch, 2)
    sharded = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    new_state, metrics = two(jax.tree.map(jnp.copy, state), sharded, np.int32(3))
  # Reference, unsharded: micro-batch j = rows j, j+2, ...; rng fold_in(step rng, j); float32 mean; one update.
  rng = step_lib.step_rng(0, 3, 0)
  value_and_grad = jax.jit(jax.value_and_grad(
      lambda p, b, r: method.tasks[0].loss_fn(p, {}, b, r, True)[0]), compiler_options=OPTS)
  outs = [value_and_grad(params0, jax.tree.map(lambda x, j=j: x[j::2], batch), jax.random.fold_in(rng, j))
          for j in range(2)]
  loss = np.mean([float(l) for l, _ in outs])
  grads = jax.tree.map(lambda a, b: (a + b) / 2, outs[0][1], outs[1][1])
  opt_state0 = jax.device_get(state["opt_state"])
  want, _, _, _ = jax.jit(optimizer.update, static_argnums=(4,))(grads, opt_state0, params0, np.int32(3), 1.0)
  np.testing.assert_allclose(float(metrics["loss"]), loss, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
  # Adam's first step is lr * sign(g) where |g| ~ 0: allow float noise of a few percent of one lr=1e-3 step there.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5),
               jax.device_get(new_state["params"]), want)
  # Activations of half the batch at a time: the compiled step needs less temporary memory.
  assert two.memory_analysis().temp_size_in_bytes < one.memory_analysis().temp_size_in_bytes


def test_rsbyol_batchnorm_runs_per_micro_batch():
  config = rsbyol.get_config("tiny")
  method = methods.build(config)
  views = {"view1": jax.random.normal(jax.random.key(1), (4, 32, 32, 1)),
           "view2": jax.random.normal(jax.random.key(2), (4, 32, 32, 1))}
  mesh = mesh_lib.make_mesh("data=1,fsdp=1", jax.devices()[:1])
  with jax.set_mesh(mesh):
    optimizer, layout, state = _setup(method, views, mesh)
    before = jax.device_get(state["method_state"])
    step = _compile(method, optimizer, layout, mesh, views, 2)
    new_state, metrics = step(state, views, np.int32(0))
  assert np.isfinite(float(metrics["loss"])) and bool(metrics["finite"])
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), before,
                       jax.device_get(new_state["method_state"]))
  assert max(jax.tree.leaves(moved)) > 0  # running statistics and the EMA target were updated


def test_grad_accum_must_divide_the_rows_per_shard():
  config = mixmae.get_config("tiny")  # batch 8
  config.grad_accum_steps = 3
  with pytest.raises(config_check.ConfigError, match="config.grad_accum_steps=3"):
    config_check.validate(config, None, device_count=8, process_count=1)
  config.grad_accum_steps = 2  # 8 rows over 8 shards: 1 row each
  with pytest.raises(config_check.ConfigError, match="grad_accum_steps"):
    config_check.validate(config, None, device_count=8, process_count=1)
  config_check.validate(config, None, device_count=4, process_count=1)
