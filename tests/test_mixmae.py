"""MixMAE: exactly k S2 and L - k S1 tokens at complementary positions; each modality scored where it was unseen."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mixmae
from mmrs import methods
from test_mae import adam_losses, fast_jit, seen_patches, smooth_images  # pylint: disable=g-bad-import-order

B, SIZE, P = 4, 32, 8
L = (SIZE // P) ** 2


def _method(**overrides):
  config = mixmae.get_config("tiny")
  config.update(overrides)
  return methods.build(config)


@pytest.fixture(scope="module")
def mix():
  method = _method()
  k2, k1 = jax.random.split(jax.random.key(0))
  batch = {"s2": jax.random.normal(k2, (B, SIZE, SIZE, 12)), "s1": jax.random.normal(k1, (B, SIZE, SIZE, 2))}
  params, state = fast_jit(method.init)(jax.random.key(1), batch)
  params = nn.meta.unbox(params)
  # Blind entry layers: pixels then reach the loss only as targets (for the locality tests).
  blind = jax.tree.map(lambda x: x, params)
  for m in ("s2", "s1"):
    blind["encoder"][f"patch_embed_{m}"]["kernel"] = jnp.zeros_like(params["encoder"][f"patch_embed_{m}"]["kernel"])
  return method, params, blind, state, batch, fast_jit(method.reconstruct)


def _shown(reconstruct, params, state, batch, rng):
  out = reconstruct(params, state, batch, rng)
  return seen_patches(out["seen"]["s2"]), seen_patches(out["seen"]["s1"])


def _perturb(images, b, patch, value=20.0):
  row, col = divmod(int(patch), SIZE // P)
  return images.at[b, row * P + 3, col * P + 1, 0].add(value)


def _loss(method):
  return fast_jit(functools.partial(method.tasks[0].loss_fn, train=True))


def test_mixmae_takes_exactly_k_s2_and_rest_s1_at_complementary_positions(mix):
  method, params, _, state, batch, reconstruct = mix
  s2, s1 = _shown(reconstruct, params, state, batch, jax.random.key(5))
  assert (s2.sum(1) == L // 2).all() and (s1.sum(1) == L - L // 2).all()
  assert (s2 ^ s1).all()  # every position shows exactly one modality
  assert len({tuple(r) for r in s2}) == B  # different across samples
  s2_again, _ = _shown(reconstruct, params, state, batch, jax.random.key(5))
  s2_next_step, _ = _shown(reconstruct, params, state, batch, jax.random.fold_in(jax.random.key(5), 1))
  np.testing.assert_array_equal(s2, s2_again)
  assert not np.array_equal(s2, s2_next_step)
  assert _method(k_fraction=0.25).num_s2(L) == L // 4


def test_mixmae_loss_only_where_modality_was_not_shown(mix):
  method, _, blind, state, batch, reconstruct = mix
  rng = jax.random.key(7)
  loss = _loss(method)
  s2_shown, s1_shown = _shown(reconstruct, blind, state, batch, rng)
  base = float(loss(blind, state, batch, rng)[0])
  for m, shown in (("s2", s2_shown), ("s1", s1_shown)):
    for b in range(2):
      seen_id, unseen_id = np.flatnonzero(shown[b])[0], np.flatnonzero(~shown[b])[0]
      same = dict(batch, **{m: _perturb(batch[m], b, seen_id)})
      diff = dict(batch, **{m: _perturb(batch[m], b, unseen_id)})
      assert float(loss(blind, state, same, rng)[0]) == pytest.approx(base, rel=1e-6), (m, b)
      assert abs(float(loss(blind, state, diff, rng)[0]) - base) > 1e-4, (m, b)


@pytest.mark.parametrize("lam,kept,dropped", [(1.0, "s1", "s2"), (0.0, "s2", "s1")])
def test_mixmae_lambda_keeps_only_one_term(mix, lam, kept, dropped):
  _, _, blind, state, batch, reconstruct = mix
  method = _method(lam=lam)
  loss = _loss(method)
  rng = jax.random.key(8)
  value, (metrics, _) = loss(blind, state, batch, rng)
  assert float(value) == pytest.approx(float(metrics[f"loss_{kept}"]), rel=1e-6)
  # A change the dropped term would see leaves the loss unchanged.
  shown = dict(zip(("s2", "s1"), _shown(reconstruct, blind, state, batch, rng)))
  unseen_id = np.flatnonzero(~shown[dropped][0])[0]
  changed = dict(batch, **{dropped: _perturb(batch[dropped], 0, unseen_id)})
  assert float(loss(blind, state, changed, rng)[0]) == pytest.approx(float(value), rel=1e-6)


def test_mixmae_task_and_params_contract(mix):
  method, params, *_ = mix
  (task,) = method.tasks
  assert (task.name, task.dataset, task.modalities) == ("mixmae", "paired", ("s1", "s2"))
  assert set(params) == {"encoder", "decoder_s2", "decoder_s1"}
  assert {"patch_embed_s2", "patch_embed_s1", "modality_embed_s2", "modality_embed_s1"} <= set(params["encoder"])
  assert method.flops_per_sample("mixmae") > 0


def test_mixmae_tiny_config_loss_decreases(mix):
  method, params, _, state, *_ = mix  # built from get_config("tiny")
  config = method.config
  batch = {"s2": smooth_images(0, config.batch_size, SIZE, 12), "s1": smooth_images(1, config.batch_size, SIZE, 2)}
  before, after = adam_losses(method, params, state, batch, config.optimizer.learning_rate)["mixmae"]
  assert np.isfinite(after) and after < before


def test_mixmae_encoder_receives_the_s2_token_at_the_k_chosen_positions_and_the_s1_token_elsewhere(mix):
  """Input side, with non-zero entry layers: a swapped mix (S1 where S2 was chosen) or a masked token fails."""
  method, params, _, _, batch, _ = mix
  received = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "encode":
      received.append(np.asarray(args[0]))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, take_s2 = method.forward(params, batch, jax.random.key(7), False)
  (tokens_in,) = received
  take_s2 = np.asarray(take_s2)
  assert (take_s2.sum(1) == L // 2).all()
  embedded = method.encoder.apply({"params": params["encoder"]}, batch, method="embed")
  s2, s1 = np.asarray(embedded["s2"]), np.asarray(embedded["s1"])
  assert np.abs(s2 - s1).max() > 1e-3  # the two modalities' tokens differ
  want = np.where(take_s2[..., None], s2, s1)
  np.testing.assert_allclose(tokens_in, want, atol=1e-6)
  assert np.abs(tokens_in - np.where(take_s2[..., None], s1, s2)).max() > 1e-3


def test_mixmae_k_fraction_chooses_which_positions_show_s2(mix):
  """k_fraction = 0.25: a quarter of the positions show S2 (its token reaches the encoder there), the other three
  quarters S1. At 0.5 a swapped mask (S1's positions as S2's) has the same count; here it does not."""
  _, params, _, _, batch, _ = mix
  method = _method(k_fraction=0.25)
  received = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "encode":
      received.append(args[0])
    return next_fun(*args, **kwargs)

  def forward(params, batch, rng):
    with nn.intercept_methods(record):
      take_s2 = method.forward(params, batch, rng, False)[1]
    embedded = method.encoder.apply({"params": params["encoder"]}, batch, method="embed")
    return take_s2, received.pop(), embedded

  take_s2, tokens_in, embedded = fast_jit(forward)(params, batch, jax.random.key(3))
  take_s2 = np.asarray(take_s2)
  assert (take_s2.sum(1) == L // 4).all()
  np.testing.assert_allclose(tokens_in, np.where(take_s2[..., None], embedded["s2"], embedded["s1"]), atol=1e-6)
