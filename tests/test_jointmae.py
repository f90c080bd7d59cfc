"""JointMAE: the mask module's scenarios and limits, loss locality, tiny training (joint and plain variants)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import jointmae as jointmae_config
from mmrs import bands, methods
from mmrs.data import synthetic
from mmrs.methods import jointmae
from mmrs.methods import mae as mae_lib
from mmrs.models import vit

# An "rbg" key: init is mostly RNG, and XLA's RngBitGenerator compiles much faster than threefry on CPU.
KEY = jax.random.key(0, impl="rbg")


def MASKS(rng, batch_size, length, n_visible, probs):  # noqa: N802  (probs are static: they size the row groups)
  probs = tuple(float(p) for p in probs)
  return jax.jit(lambda r: jointmae.mask_module(r, batch_size, length, n_visible, probs))(rng)


def _batch(batch=8, size=32, seed=0):
  """Normalized synthetic S1/S2 scenes (shared segments, so one modality tells about the other)."""
  rng = np.random.default_rng(seed)
  recs = [synthetic.synthetic_record(rng, size, bands.S2_L2A_BANDS, labels=False, mask=False) for _ in range(batch)]
  out = {}
  for mod, stats, names in (("s1", bands.SSL4EO_S1, bands.S1_BANDS), ("s2", bands.SSL4EO_S2_L1C, bands.S2_L2A_BANDS)):
    mean, std = stats.for_bands(names)
    out[mod] = jnp.asarray((np.stack([r[mod] for r in recs]).astype(np.float32) - mean) / std)
  return out


# --- the mask module ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drawn():
  """4000 samples of the mask module, L = 16 positions, 8 visible of 32 tokens, scenario weights 5:2:3."""
  config = jointmae_config.get_config("tiny")
  config.p_independent, config.p_complementary, config.p_drop, config.drop_s1_prob = 5.0, 2.0, 3.0, 0.5
  probs = jointmae.scenario_probabilities(config)
  visible, scenario = MASKS(jax.random.key(42), 4000, 16, 8, probs)
  return np.asarray(visible), np.asarray(scenario), probs


def test_each_scenario_occurs_at_its_configured_rate(drawn):
  _, scenario, probs = drawn
  np.testing.assert_allclose(probs, [0.5, 0.2, 0.15, 0.15])
  rates = np.bincount(scenario, minlength=4) / len(scenario)
  np.testing.assert_allclose(rates, probs, atol=0.03)  # > 4 standard errors at n = 4000


def test_every_sample_shows_its_scenarios_number_of_tokens(drawn):
  visible, scenario, _ = drawn
  assert visible.shape == (4000, 32) and visible.dtype == bool
  comp = scenario == 1
  assert (visible[comp].sum(axis=1) == 16).all()  # complementary: L tokens, one per position
  assert (visible[~comp].sum(axis=1) == 8).all()  # the others: floor(visible_fraction * 2L)
  assert comp[:800].all() and not comp[800:].any()  # the static complementary group: round(B * p) first rows


def test_scenarios_show_what_they_promise(drawn):
  visible, scenario, _ = drawn
  s1, s2 = visible[:, :16], visible[:, 16:]
  ind, comp, drop_s1, drop_s2 = (scenario == i for i in range(4))
  assert not (s1[comp] & s2[comp]).any()  # complementary: never a position visible in both modalities
  assert (s1[comp] ^ s2[comp]).all()  # ... and every position visible in exactly one
  assert (s1[comp].sum(1) == 8).all() and (s2[comp].sum(1) == 8).all()
  assert not s1[drop_s1].any() and (s2[drop_s1].sum(1) == 8).all()  # one modality wholly masked, other partly
  assert not s2[drop_s2].any() and (s1[drop_s2].sum(1) == 8).all()
  assert (s1[ind].sum(1) == 4).all() and (s2[ind].sum(1) == 4).all()
  assert (s1[ind] & s2[ind]).any()  # independent draws do overlap sometimes
  # Positions are spread uniformly: every position is visible in some samples of every scenario.
  for rows in (ind, comp):
    assert (s1[rows] | s2[rows]).any(axis=0).all()


@pytest.mark.parametrize("n_visible", [4, 8, 16])
def test_complementary_covers_every_position_once_whatever_the_visible_fraction(n_visible):
  visible, scenario = MASKS(jax.random.key(3), 64, 16, n_visible, np.asarray([0.5, 0.5, 0.0, 0.0]))
  visible, comp = np.asarray(visible), np.asarray(scenario) == 1
  assert comp.sum() == 32
  np.testing.assert_array_equal(visible[comp, :16] ^ visible[comp, 16:], True)
  assert (visible[~comp].sum(1) == n_visible).all()


def test_complementary_at_half_visible_covers_every_position_once():
  visible, scenario = MASKS(jax.random.key(1), 64, 16, 16, np.asarray([0.0, 1.0, 0.0, 0.0]))
  visible = np.asarray(visible)
  assert (np.asarray(scenario) == 1).all()
  np.testing.assert_array_equal(visible[:, :16] ^ visible[:, 16:], True)


@pytest.mark.parametrize("fraction,tokens", [(0.25, 32), (0.5, 32), (0.3, 98), (0.49, 392), (0.1, 50)])
def test_visible_fraction_never_exceeds_the_limit(fraction, tokens):
  config = jointmae_config.get_config("tiny")
  config.visible_fraction = fraction
  n = jointmae.num_visible(config, tokens)
  assert 1 <= n and n / tokens <= fraction <= config.max_visible_fraction


def test_limits_are_enforced():
  config = jointmae_config.get_config("tiny")
  config.visible_fraction = 0.6
  with pytest.raises(ValueError, match="visible_fraction"):
    jointmae.num_visible(config, 32)
  config.visible_fraction, config.max_visible_fraction = 0.25, 0.7
  with pytest.raises(ValueError, match="max_visible_fraction"):
    jointmae.num_visible(config, 32)
  config.max_visible_fraction, config.p_drop = 0.5, -1.0
  with pytest.raises(ValueError, match="p_drop"):
    jointmae.scenario_probabilities(config)


# --- the method (joint and plain) ---------------------------------------------------------------------------------

def _trained(arg, steps):
  config = jointmae_config.get_config(arg)
  method = methods.build(config)
  batch = _batch()
  params, state = jax.jit(method.init)(KEY, batch)
  params = nn.meta.unbox(params)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, i):
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (metrics, _)), grads = grad_fn(params, state, batch, jax.random.fold_in(KEY, i), True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  opt_state, losses, metrics = tx.init(params), [], None
  for i in range(steps):
    params, opt_state, loss, metrics = step(params, opt_state, i % 2)  # two masks, alternating
    losses.append(float(loss))
  # One compiled evaluation for the locality and reconstruction tests: predictions, mask, PNG arrays.
  evaluate = jax.jit(lambda p, b: (method.forward(p, b, KEY, False), method.reconstruct(p, {}, b, KEY)))
  return dict(config=config, method=method, batch=batch, params=params, losses=losses, metrics=metrics,
              evaluate=evaluate)


@pytest.fixture(scope="module")
def joint():
  return _trained("tiny", 12)


@pytest.fixture(scope="module")
def plain():
  return _trained("tiny,plain=True", 12)


def test_tiny_trains_with_finite_decreasing_loss(joint, plain):
  for run in (joint, plain):
    losses = run["losses"]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_metrics_report_each_modality_and_the_scenarios(joint, plain):
  m = joint["metrics"]
  assert {"loss_s1", "loss_s2"} <= set(m) and {"loss_s1", "loss_s2"} <= set(plain["metrics"])
  counts = [float(m[f"scenario_{s}"]) for s in jointmae.SCENARIOS]
  assert sum(counts) == 8
  b_c = jointmae.num_complementary(8, joint["method"].probs)  # round(8 / 3) = 3 rows show L of 2L tokens
  assert float(m["scenario_complementary"]) == b_c
  assert float(m["visible_fraction"]) == pytest.approx((b_c * 0.5 + (8 - b_c) * 0.25) / 8)
  assert float(plain["metrics"]["visible_fraction"]) == pytest.approx(0.25)
  params = joint["params"]
  assert set(params) == {"encoder", "decoder"}
  assert {"patch_embed_s1", "patch_embed_s2"} <= set(params["encoder"])
  assert {"head_0", "head_1"} <= set(params["decoder"])  # one output head per modality
  assert "patch_embed_s1s2" in plain["params"]["encoder"]


@pytest.mark.parametrize("variant", ["joint", "plain"])
def test_a_seen_tokens_target_does_not_change_the_loss(variant, joint, plain):
  run = {"joint": joint, "plain": plain}[variant]
  method, batch, params = run["method"], run["batch"], run["params"]
  (preds, visible, _), _ = run["evaluate"](params, batch)
  base, _ = method.loss_from(preds, batch, visible)
  p = method.patch_size
  for mod in ("s1", "s2"):
    vis = np.asarray(visible[mod])
    sample = int(np.argmax(vis.any(axis=1) & (~vis).any(axis=1)))  # a sample with seen and masked tokens
    seen, masked = int(np.argmax(vis[sample])), int(np.argmax(~vis[sample]))
    for token, changes in ((seen, False), (masked, True)):
      row, col = divmod(token, 32 // p)
      target = {k: np.array(v) for k, v in batch.items()}
      target[mod][sample, row * p:(row + 1) * p, col * p:(col + 1) * p] += 5.0 * np.random.default_rng(0).normal(
          size=(p, p, target[mod].shape[-1]))
      loss, _ = method.loss_from(preds, {k: jnp.asarray(v) for k, v in target.items()}, visible)
      assert (abs(float(loss) - float(base)) > 1e-4) == changes, (mod, token, changes)


def test_reconstruct_for_the_png_helper(joint):
  batch = joint["batch"]
  (_, visible, _), out = joint["evaluate"](joint["params"], batch)
  assert set(out) == {"seen", "reconstruction", "target"}
  for mod, c in (("s1", 2), ("s2", 12)):
    assert out["seen"][mod].shape == out["reconstruction"][mod].shape == (8, 32, 32, c)
    seen_pixels = np.repeat(np.repeat(np.asarray(visible[mod]).reshape(8, 4, 4), 8, 1), 8, 2)
    np.testing.assert_array_equal(np.asarray(out["seen"][mod])[~seen_pixels], 0.0)
    np.testing.assert_allclose(np.asarray(out["reconstruction"][mod])[seen_pixels],
                               np.asarray(batch[mod])[seen_pixels])


def test_flops_count_the_visible_tokens_only():
  def flops(arg, fraction):
    config = jointmae_config.get_config(arg)
    config.visible_fraction = fraction
    return methods.build(config).flops_per_sample(config.method)
  assert flops("vit_b", 0.5) > flops("vit_b", 0.25) > 0
  assert flops("vit_b,plain=True", 0.25) < flops("vit_b", 0.25)  # half the encoder tokens, half the slots


def test_plain_baseline_is_a_plain_mae_on_the_concatenated_channels(plain):
  """Every channel of a masked patch counts equally (S1's 2 channels are 2/14 of the loss, not lam = 1/2)."""
  method, batch, params = plain["method"], plain["batch"], plain["params"]
  (preds, visible, _), _ = plain["evaluate"](params, batch)
  loss, metrics = method.loss_from(preds, batch, visible)
  images = jnp.concatenate([batch["s1"], batch["s2"]], axis=-1)
  p = method.patch_size
  want = mae_lib.patch_mse(preds["s1s2"], vit.patchify(images, p), ~visible["s1"], method.norm_pix_loss)
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  c1, c2 = 2, 12
  mixed = (c1 * metrics["loss_s1"] + c2 * metrics["loss_s2"]) / (c1 + c2)
  assert float(loss) == pytest.approx(float(mixed), rel=1e-5)
  assert abs(float(loss) - 0.5 * float(metrics["loss_s1"] + metrics["loss_s2"])) > 1e-3


def _encoder_inputs(method, params, batch, rng):
  """The token arrays `encode` receives (one per static row group), recorded by a flax method interceptor."""
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "encode":
      seen.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    preds, visible, scenario = method.forward(params, batch, rng, False)
  return seen, visible, scenario


def test_encoder_receives_exactly_the_visible_position_modality_tokens(joint):
  """Input side: with non-zero entry layers every encoder token is the embedded token of one (position,
  modality) pair, and the set of pairs is exactly the scenario's visible set."""
  method, batch, params = joint["method"], joint["batch"], joint["params"]
  for name in ("patch_embed_s1", "patch_embed_s2"):
    assert np.abs(np.asarray(params["encoder"][name]["kernel"])).max() > 0
  rng = jax.random.key(11)
  inputs, visible, scenario = _encoder_inputs(method, params, batch, rng)
  tokens = method.encoder.apply({"params": params["encoder"]}, {m: batch[m] for m in jointmae.MODALITIES},
                                method="embed")
  candidates = np.concatenate([np.asarray(tokens[m]) for m in jointmae.MODALITIES], axis=1)  # (B, 2L, D)
  want = np.concatenate([np.asarray(visible[m]) for m in jointmae.MODALITIES], axis=1)
  assert [g.shape[0] for g in inputs] == [3, 5]  # complementary rows and the others, each its own length
  assert [g.shape[1] for g in inputs] == [16, 8]  # L tokens, floor(0.25 * 2L) tokens
  b0 = 0
  for group in inputs:
    for r in range(group.shape[0]):
      b = b0 + r
      dist = np.linalg.norm(group[r][:, None, :] - candidates[b][None], axis=-1)  # (n, 2L)
      hit = dist.argmin(axis=1)
      np.testing.assert_allclose(dist.min(axis=1), 0.0, atol=1e-5)
      assert sorted(hit.tolist()) == np.flatnonzero(want[b]).tolist(), (b, int(scenario[b]))
    b0 += group.shape[0]
  assert (np.asarray(scenario)[:3] == 1).all()


# --- the ablation controls (configs/jointmae.py): matched visibility, the lam-weighted plain loss -------------------

def test_matched_complementary_rows_show_as_many_tokens_as_the_other_scenarios():
  probs = tuple(float(p) for p in jointmae.scenario_probabilities(jointmae_config.get_config("tiny")))
  visible, scenario = jax.jit(lambda r: jointmae.mask_module(r, 600, 16, 8, probs, matched=True))(jax.random.key(1))
  visible, scenario = np.asarray(visible), np.asarray(scenario)
  assert (visible.sum(axis=1) == 8).all()  # every row, complementary included: n tokens
  s1, s2 = visible[:, :16], visible[:, 16:]
  comp = scenario == 1
  assert comp.sum() == jointmae.num_complementary(600, probs)
  assert not (s1[comp] & s2[comp]).any()  # still one modality per visible position ...
  assert (s2[comp].sum(1) == 4).all() and (s1[comp].sum(1) == 4).all()
  assert ((s1[comp] | s2[comp]).sum(1) == 8).all()  # ... at n distinct positions, the rest hidden in both
  method = methods.build(jointmae_config.get_config("tiny,complementary_visible=matched"))
  n = method.num_visible(16)
  assert [g[2] for g in method.row_groups(8, 16)] == [n, n]
  default = methods.build(jointmae_config.get_config("tiny"))
  assert [g[2] for g in default.row_groups(8, 16)] == [16, n]
  assert method.flops_per_sample(method.name) < default.flops_per_sample(default.name)


def test_matched_variant_loss_sees_a_quarter_of_the_tokens_in_every_row(joint):
  config = jointmae_config.get_config("tiny,complementary_visible=matched")
  method = methods.build(config)
  loss_fn = jax.jit(lambda p, b: method.loss(p, {}, b, KEY, False),
                    compiler_options={"xla_backend_optimization_level": 0})  # compiles in half the time
  loss, (metrics, _) = loss_fn(joint["params"], joint["batch"])
  assert np.isfinite(float(loss)) and float(metrics["visible_fraction"]) == pytest.approx(0.25)


def test_plain_lam_loss_weights_the_modalities_like_jointmae(plain):
  method, batch, params = plain["method"], plain["batch"], plain["params"]
  (preds, visible, _), _ = plain["evaluate"](params, batch)
  config = jointmae_config.get_config("tiny,plain=True,plain_loss=lam")
  lam_method = methods.build(config)
  loss, terms = lam_method.loss_from(preds, batch, visible)
  assert float(loss) == pytest.approx(0.5 * float(terms["loss_s1"]) + 0.5 * float(terms["loss_s2"]), rel=1e-6)
  channels, _ = method.loss_from(preds, batch, visible)  # the default: S1 weighted by its channel share
  assert abs(float(channels) - float(loss)) > 1e-4
  config.lam = 1.0  # only the S1 term: a masked S2 patch's target no longer matters
  only_s1 = methods.build(config)
  base, _ = only_s1.loss_from(preds, batch, visible)
  vis = np.asarray(visible["s2"])
  row, col = divmod(int(np.argmax(~vis[0])), 32 // method.patch_size)
  p = method.patch_size
  changed = {k: np.array(v) for k, v in batch.items()}
  changed["s2"][0, row * p:(row + 1) * p, col * p:(col + 1) * p] += 5.0
  changed = {k: jnp.asarray(v) for k, v in changed.items()}
  assert float(only_s1.loss_from(preds, changed, visible)[0]) == pytest.approx(float(base), rel=1e-6)
  assert abs(float(method.loss_from(preds, changed, visible)[0]) - float(channels)) > 1e-4
  with pytest.raises(ValueError, match="plain_loss='lam' applies to plain=True only"):
    jointmae_config.get_config("tiny,plain_loss=lam")
