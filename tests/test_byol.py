"""RS-BYOL: stop-gradient on the target, the EMA update, the symmetric loss, collapse metric, tiny training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import rsbyol
from mmrs import bands, methods
from mmrs.data import synthetic
from mmrs.methods import byol

# An "rbg" key: XLA's RngBitGenerator compiles in a fraction of threefry's time on CPU (init is mostly RNG).
KEY = jax.random.key(0, impl="rbg")


def _views(c1=1, c2=1, batch=8, size=32, seed=1):
  rng = np.random.default_rng(seed)
  return {"view1": jnp.asarray(rng.normal(size=(batch, size, size, c1)), jnp.float32),
          "view2": jnp.asarray(rng.normal(size=(batch, size, size, c2)), jnp.float32)}


def _sampled_views(method, batch=8, seed=1):
  """Views drawn by the method's host-side sampler from synthetic 40 px S1/S2 scenes."""
  rng = np.random.default_rng(seed)
  sampler = method.record_transform(method.tasks[0], {"s2": bands.SSL4EO_S2_L1C, "s1": bands.SSL4EO_S1})
  views = [sampler(synthetic.synthetic_record(rng, 40, bands.S2_L2A_BANDS), rng) for _ in range(batch)]
  return {k: jnp.asarray(np.stack([v[k] for v in views])) for k in ("view1", "view2")}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def tiny():
  config = rsbyol.get_config("tiny")
  method = methods.build(config)
  batch = _sampled_views(method)
  params, state = jax.jit(method.init)(KEY, batch)
  params = nn.meta.unbox(params)
  tx = optax.sgd(0.05, momentum=0.9)

  @jax.jit
  def step(params, opt_state, state, batch, i):
    grad_fn = jax.value_and_grad(method.loss_fn, argnums=(0, 1), has_aux=True)
    (loss, (metrics, new_state)), (g_params, g_state) = grad_fn(params, state, batch, KEY, True)
    updates, opt_state = tx.update(g_params, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    return new_params, opt_state, new_state, method.update_state(new_params, new_state, i), loss, metrics, g_state

  first = step(params, tx.init(params), state, batch, 0)
  return dict(config=config, method=method, batch=batch, params=params, state=state, step=step, tx=tx,
              first=first)


def test_layout_of_params_and_state(tiny):
  params, state = tiny["params"], tiny["state"]
  assert set(params) == {"online"} and set(params["online"]) == {"backbone", "projector", "predictor"}
  assert set(state["target"]["params"]) == {"backbone", "projector"}
  assert "batch_stats" in state and set(state["target"]["batch_stats"]) == {"backbone", "projector"}
  # BYOL starts the target as a copy of the online network.
  _assert_trees_equal(params["online"]["backbone"], state["target"]["params"]["backbone"])
  (task,) = tiny["method"].tasks
  assert (task.name, task.dataset, task.batch_kind, task.param_prefixes) == ("byol", "paired", "byol_views",
                                                                              ("online",))


def test_no_gradient_reaches_the_target(tiny):
  _, _, new_state, _, loss, _, g_state = tiny["first"]
  assert np.isfinite(float(loss))
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_state["target"]["params"]))
  # The loss/optimizer step leaves the target params alone (only BN running stats move).
  _assert_trees_equal(new_state["target"]["params"], tiny["state"]["target"]["params"])
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(new_state["batch_stats"]),
                                                 jax.tree.leaves(tiny["state"]["batch_stats"]))]
  assert any(moved)


def test_ema_update_is_tau_xi_plus_one_minus_tau_theta(tiny):
  new_params, _, new_state, ema_state, _, _, _ = tiny["first"]
  tau = tiny["config"].byol.tau
  assert tau == 0.9
  for part in ("backbone", "projector"):
    for xi, theta, got in zip(jax.tree.leaves(new_state["target"]["params"][part]),
                              jax.tree.leaves(new_params["online"][part]),
                              jax.tree.leaves(ema_state["target"]["params"][part])):
      np.testing.assert_allclose(got, tau * xi + (1 - tau) * theta, rtol=1e-6, atol=1e-7)
  # The target's BN statistics are its own (from its forward passes), not averaged.
  _assert_trees_equal(ema_state["target"]["batch_stats"], new_state["target"]["batch_stats"])


def test_cosine_tau_schedule():
  cfg = rsbyol.get_config("tiny").byol
  cfg.tau_schedule = "cosine"
  assert float(byol.ema_tau(cfg, 0, 100)) == pytest.approx(0.9)
  assert float(byol.ema_tau(cfg, 50, 100)) == pytest.approx(0.95)
  assert float(byol.ema_tau(cfg, 100, 100)) == pytest.approx(1.0)


def test_loss_is_zero_for_identical_directions_and_symmetric_in_the_views(tiny):
  p = jnp.asarray(np.random.default_rng(0).normal(size=(5, 16)), jnp.float32)
  np.testing.assert_allclose(byol.regression_loss(p, 3.0 * p), 0.0, atol=1e-6)
  np.testing.assert_allclose(byol.regression_loss(p, -p), 4.0, atol=1e-5)
  batch = tiny["batch"]
  swapped = {"view1": batch["view2"], "view2": batch["view1"]}
  opt_state = tiny["tx"].init(tiny["params"])
  loss = tiny["first"][4]
  loss_swapped = tiny["step"](tiny["params"], opt_state, tiny["state"], swapped, 0)[4]
  np.testing.assert_allclose(float(loss_swapped), float(loss), rtol=1e-5)


def test_embedding_std_detects_collapse():
  healthy = jnp.asarray(np.random.default_rng(0).normal(size=(256, 64)), jnp.float32)
  assert float(byol.embedding_std(healthy)) == pytest.approx(1 / np.sqrt(64), rel=0.1)
  collapsed = jnp.tile(healthy[:1], (256, 1))
  assert float(byol.embedding_std(collapsed)) < 1e-6


def test_tiny_trains_with_finite_decreasing_loss(tiny):
  params, opt_state, _, state, loss0, metrics, _ = tiny["first"]
  losses = [float(loss0)]
  for i in range(1, 5):
    params, opt_state, _, state, loss, metrics, _ = tiny["step"](params, opt_state, state, tiny["batch"], i)
    losses.append(float(loss))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]
  assert set(metrics) >= {"cos_sim", "embed_std"}
  assert 0.0 < float(metrics["embed_std"]) <= 1.0


@pytest.mark.parametrize("arg,backbone", [("tiny,view1=one_band,view2=vv_vh_copy", None), ("tiny", "vit")])
def test_mixed_channels_and_vit_backbone_trace(arg, backbone):
  config = rsbyol.get_config(arg)
  if backbone:
    config.model.backbone = backbone
    config.model.vit.update(size="mu", patch_size=8)
  method = methods.build(config)
  c1, c2 = (1, 3) if "vv_vh_copy" in arg else (1, 1)
  batch = _views(c1, c2)
  params, state = jax.eval_shape(method.init, KEY, batch)
  loss_fn = lambda p, s, b: method.loss_fn(p, s, b, KEY, True)  # noqa: E731
  loss, (metrics, _) = jax.eval_shape(loss_fn, nn.meta.unbox(params), state, batch)
  assert loss.shape == () and metrics["embed_std"].shape == ()
  assert method.flops_per_sample("byol") > 0


def test_record_transform_builds_the_view_sampler(tiny):
  batch = tiny["batch"]  # drawn by method.record_transform(task) from synthetic records
  assert batch["view1"].shape == (8, 32, 32, 1) and batch["view2"].shape == (8, 32, 32, 1)
  assert float(jnp.abs(batch["view1"] - batch["view2"]).mean()) > 0.1  # two different sensors


def test_flops_count_both_views_and_both_networks():
  method = methods.build(rsbyol.get_config("resnet50"))
  per_sample = method.flops_per_sample("byol")
  # ResNet-50 on a 1-channel 224 px view is ~8.0 GFLOPs forward; online fwd+bwd (~3x) + target fwd (1x), x2 views.
  assert 8 * 7.5e9 < per_sample < 8 * 8.5e9


def test_loss_pairs_online_of_one_view_with_target_of_the_other(tiny):
  """loss = mean[ l(q(online(view1)), target(view2)) + l(q(online(view2)), target(view1)) ]; pairing a view with
  itself (l(q1, t1) + l(q2, t2)) gives another number. Train mode, as training runs: both views go through each
  network in one batch (BatchNorm statistics over both), so the outputs are computed that way here too."""
  method, params, state, batch = tiny["method"], tiny["params"], tiny["state"], tiny["batch"]
  # A target that differs from the online network, so that which network sees which view matters.
  target = jax.tree.map(lambda x: x * 1.1 + 0.01, state["target"])
  state = {**state, "target": target}
  loss, _ = method.loss_fn(params, state, batch, KEY, True)
  x = jnp.concatenate([batch["view1"], batch["view2"]], axis=0)
  (_, q), _ = method.net.apply({"params": params["online"], "batch_stats": state["batch_stats"]}, x, train=True,
                               mutable=["batch_stats"])
  t, _ = method.net.apply({"params": target["params"], "batch_stats": target["batch_stats"]}, x, train=True,
                          method=byol.BYOLNet.project, mutable=["batch_stats"])
  b = batch["view1"].shape[0]
  q1, q2, t1, t2 = q[:b], q[b:], t[:b], t[b:]
  cross = jnp.mean(byol.regression_loss(q1, t2) + byol.regression_loss(q2, t1))
  itself = jnp.mean(byol.regression_loss(q1, t1) + byol.regression_loss(q2, t2))
  assert float(loss) == pytest.approx(float(cross), rel=1e-4, abs=1e-5)
  assert abs(float(cross) - float(itself)) > 1e-2, (float(cross), float(itself))
