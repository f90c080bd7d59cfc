"""config.grad_accum_steps: k micro-batches inside one compiled step, float32 gradient mean, one optimizer update.

For the MAE family k = 2 must compute the k = 1 math (same masks, whole-batch loss normalizers), sharded or not;
RS-BYOL's BatchNorm normalizes each micro-batch with its own statistics (mmrs/train/step.py docstring)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import auxmae, jointmae, mae_s2, mixmae, rsbyol
from mmrs import methods
from mmrs.train import config_check
from mmrs.train import mesh as mesh_lib
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib

OPTS = {"xla_backend_optimization_level": 0}
B, SIZE = 8, 32
RNG = step_lib.step_rng(0, 3, 0)


def _paired_batch():
  """S2 + S1 with S1 no-data that differs between rows: row 0 has no valid S1 (an S1-missing sample, filled),
  rows 1 and 6 lose a corner or a stripe, so the two micro-batches score different numbers of S1 pixels."""
  k2, k1 = jax.random.split(jax.random.key(0))
  valid = np.ones((B, SIZE, SIZE), np.float32)
  valid[0] = 0
  valid[1, :12, :20] = 0
  valid[6, :, 5:9] = 0
  return {"s2": jax.random.normal(k2, (B, SIZE, SIZE, 12)), "s1": jax.random.normal(k1, (B, SIZE, SIZE, 2)),
          "s1_valid": jnp.asarray(valid)}


def _grads(task, k):
  return lambda params, batch: step_lib.loss_and_grads(task, params, task.param_prefixes, {}, batch, RNG, k)


def _assert_same(got, want):
  """(loss, metrics, _, grads) of two runs agree to 1e-5 (relative; gradients relative to each leaf's largest)."""
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
  assert set(got[1]) == set(want[1])
  for name in want[1]:
    np.testing.assert_allclose(np.asarray(got[1][name]), np.asarray(want[1][name]), rtol=1e-5, atol=1e-7, err_msg=name)
  def leaf(a, b):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
  jax.tree.map(leaf, got[3], want[3])


CASES = [(mae_s2, 0), (auxmae, 0), (auxmae, 1), (mixmae, 0), (jointmae, 0)]


def _compiled(fn, *args):
  compiled = jax.jit(fn, compiler_options=OPTS).lower(*args).compile()
  return compiled, compiled(*args)


@pytest.fixture(scope="module")
def mixmae_unsharded():
  """MixMAE's tiny method, params, batch and the compiled k = 1 and k = 2 loss_and_grads (unsharded), shared."""
  method = methods.build(mixmae.get_config("tiny"))
  batch = _paired_batch()
  params = nn.meta.unbox(method.init(jax.random.key(1), batch)[0])
  out = {k: _compiled(_grads(method.tasks[0], k), params, batch) for k in (1, 2)}
  return method, params, batch, out


@pytest.mark.parametrize("module,task_index", CASES, ids=["mae_s2", "auxmae/s2_mae", "auxmae/s2_to_s1", "mixmae",
                                                          "jointmae"])
def test_two_micro_batches_compute_the_one_batch_math_sharded_or_not(module, task_index, mixmae_unsharded):
  """k = 2 with the rows sharded over a data=2 mesh (each device: 4 rows, 2 per micro-batch) = k = 1 unsharded
  (loss, metrics, gradients). MixMAE: k = 2 unsharded = k = 1, with less temporary memory; its sharded k = 2 is the
  compiled step of the next test. One compile per mesh (CI time)."""
  if module is mixmae:
    _, _, _, out = mixmae_unsharded
    _assert_same(out[2][1], out[1][1])
    # Activations of half the batch at a time: the compiled accumulation needs less temporary memory.
    assert out[2][0].memory_analysis().temp_size_in_bytes < out[1][0].memory_analysis().temp_size_in_bytes
    return
  method = methods.build(module.get_config("tiny"))
  task = method.tasks[task_index]
  batch = _paired_batch()
  params = nn.meta.unbox(method.init(jax.random.key(1), batch)[0])
  want = jax.jit(_grads(task, 1), compiler_options=OPTS)(params, batch)
  mesh = mesh_lib.make_mesh("data=2,fsdp=1", jax.devices()[:2])
  with jax.set_mesh(mesh), nn.logical_axis_rules(mesh_lib.ACTIVATION_RULES):
    sharded = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    _assert_same(jax.jit(_grads(task, 2), compiler_options=OPTS)(params, sharded), want)


def test_jointmae_micro_batches_hold_different_numbers_of_complementary_rows():
  """What the JointMAE case above exercises: 3 complementary rows of 8 split 2 + 1, so the groups are padded."""
  method = methods.build(jointmae.get_config("tiny"))
  assert method.micro_group_sizes(4, 2) == (2, 3)  # capacities: 2 complementary + 3 other slots for 4 rows
  assert method.micro_group_sizes(8, 1) == (3, 5)  # no accumulation: exact


def test_accumulated_step_updates_once_with_the_one_batch_gradients(mixmae_unsharded):
  """The compiled MixMAE k = 2 step (rows sharded over a data=2 mesh) = one optimizer update with the unsharded k = 1
  gradients: same loss, metrics, gradient norm and updated params (plain SGD: linear in the gradients)."""
  method, params0, batch, out = mixmae_unsharded
  _, (loss, metrics, _, grads) = out[1]
  mesh = mesh_lib.make_mesh("data=2,fsdp=1", jax.devices()[:2])
  config = method.config.copy_and_resolve_references()  # plain SGD: the update is linear in the gradients
  config.optimizer.update(dict(name="sgd", momentum=0.0, learning_rate=0.1, schedule="constant", warmup_steps=0,
                               weight_decay=0.0, clip_norm=0.0))
  with jax.set_mesh(mesh):
    example = state_lib.example_batch({"t": batch})
    optimizer, layout = step_lib.plan_state(config, method, example, mesh, decay_steps=10)
    state = state_lib.create(method, optimizer, example, layout, jax.random.key(1), OPTS)
    opt_state0 = jax.device_get(state["opt_state"])
    abstract = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in batch.items()}
    step = step_lib.compile_step(step_lib.make_step_fn(method, method.tasks[0], 0, optimizer, None, seed=0,
                                                       grad_accum_steps=2), layout, abstract, mesh, OPTS)
    new_state, got = step(state, jax.device_put(batch, mesh_lib.batch_sharding(mesh)), np.int32(3))
  for key in ("loss_s1", "loss_s2"):
    np.testing.assert_allclose(float(got[key]), float(metrics[key]), rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(float(got["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(got["grad_norm"]), float(optax.global_norm(grads)), rtol=1e-5)
  want, _, _, _ = jax.jit(optimizer.update, static_argnums=(4,))(grads, opt_state0, params0, np.int32(3), 1.0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(new_state["params"]), want)


def test_rsbyol_batchnorm_normalizes_each_micro_batch_with_its_own_statistics():
  """k = 2 is: micro-batch 0 (rows 0, 2), then micro-batch 1 (rows 1, 3) with the running averages micro-batch 0
  left, each normalized by its own BatchNorm statistics; not one BatchNorm over the 4 rows. (A "mu" ViT backbone
  keeps the compile short: its BatchNorms are the projector's and predictor's, handled as the ResNet's.)"""
  config = rsbyol.get_config("tiny")
  config.model.backbone = "vit"
  config.model.vit.update(size="mu", patch_size=8)
  method = methods.build(config)
  task = method.tasks[0]
  views = {"view1": jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 1)),
           "view2": jax.random.normal(jax.random.key(2), (4, SIZE, SIZE, 1))}
  params, ms0 = method.init(jax.random.key(0), views)
  params = nn.meta.unbox(params)

  def run(params, ms0, views):
    accumulated = step_lib.loss_and_grads(task, params, ("online",), ms0, views, RNG, 2)
    ms, losses = ms0, []
    for j in range(2):  # by hand: each micro-batch alone through the loss, state threaded
      loss, (_, ms) = task.loss_fn(params, ms, {n: v[j::2] for n, v in views.items()}, RNG, True)
      losses.append(loss)
    one_batch = task.loss_fn(params, ms0, views, RNG, True)[0]
    return accumulated, (jnp.mean(jnp.stack(losses)), ms), one_batch

  accumulated, by_hand, one_batch = jax.jit(run, compiler_options=OPTS)(params, ms0, views)
  np.testing.assert_allclose(float(accumulated[0]), float(by_hand[0]), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), accumulated[2], by_hand[1])
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), ms0["batch_stats"],
                       accumulated[2]["batch_stats"])
  assert max(jax.tree.leaves(moved)) > 0  # the running statistics were updated
  assert abs(float(one_batch) - float(accumulated[0])) > 1e-4  # statistics over 2 rows, not over the 4


def test_grad_accum_must_divide_the_rows_per_shard():
  config = mixmae.get_config("tiny")  # batch 8
  config.grad_accum_steps = 3
  with pytest.raises(config_check.ConfigError, match="config.grad_accum_steps=3"):
    config_check.validate(config, None, device_count=8, process_count=1)
  config.grad_accum_steps = 2  # 8 rows over 8 shards: 1 row each
  with pytest.raises(config_check.ConfigError, match="grad_accum_steps"):
    config_check.validate(config, None, device_count=8, process_count=1)
  config_check.validate(config, None, device_count=4, process_count=1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_the_step_splits_rows_as_micro_batch_rows_says(k):
  """JointMAE sizes its scenario groups from methods.base.micro_batch_rows; the step's split must hold those rows."""
  from mmrs.methods import base  # pylint: disable=import-outside-toplevel
  x = jnp.arange(B * 3).reshape(B, 3)
  split = step_lib.split_micro_batches({"x": x}, k)["x"]
  rows = base.micro_batch_rows(B, k)
  assert split.shape == (k, B // k, 3)
  for j in range(k):
    np.testing.assert_array_equal(split[j], x[rows[j]])
  with pytest.raises(ValueError, match="grad_accum_steps=3 does not divide the batch of 8 rows"):
    step_lib.split_micro_batches({"x": x}, 3)
