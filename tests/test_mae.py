"""MAE (S2 baseline) and the shared masking utilities: exact mask ratio, loss only on masked patches."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mae_s2
from mmrs import methods
from mmrs.methods import masking
from mmrs.models import vit

# XLA's backend optimizations off: halves the CPU compile time of these tiny models, which run in milliseconds.
fast_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
B, SIZE, P = 4, 32, 8
L = (SIZE // P) ** 2


def smooth_images(rng, b, size, channels):
  """Low-frequency synthetic images (learnable structure, unlike white noise)."""
  k1, k2 = jax.random.split(jax.random.key(rng))
  yy, xx = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
  freq = jax.random.uniform(k1, (b, 1, 1, channels, 2), minval=0.05, maxval=0.3)
  phase = jax.random.uniform(k2, (b, 1, 1, channels), maxval=6.28)
  return jnp.sin(freq[..., 0] * yy[None, :, :, None] + freq[..., 1] * xx[None, :, :, None] + phase)


def seen_patches(seen: jax.Array) -> np.ndarray:
  """(B, L) bool: patches of a "seen" image that are not zeroed."""
  return np.asarray(jnp.any(vit.patchify(seen, P) != 0, axis=-1))


@pytest.fixture(scope="module")
def mae():
  config = mae_s2.get_config("tiny")
  assert config.model.patch_size == P and config.data.s2_only.image_size == SIZE
  method = methods.build(config)
  batch = {"s2": jax.random.normal(jax.random.key(0), (B, SIZE, SIZE, 12))}
  params, state = fast_jit(method.init)(jax.random.key(1), batch)
  params = nn.meta.unbox(params)
  loss = fast_jit(functools.partial(method.tasks[0].loss_fn, train=True))
  reconstruct = fast_jit(method.reconstruct)
  return method, params, state, batch, loss, reconstruct


def test_masking_random_split_exact_counts_and_reproducible():
  keep, rest = masking.random_split(jax.random.key(0), 16, 49, 12)
  assert keep.shape == (16, 12) and rest.shape == (16, 37)
  both = np.sort(np.concatenate([keep, rest], axis=1), axis=1)
  np.testing.assert_array_equal(both, np.broadcast_to(np.arange(49), (16, 49)))  # a partition, per sample
  assert len({tuple(r) for r in np.asarray(keep)}) > 1  # samples differ
  np.testing.assert_array_equal(keep, masking.random_split(jax.random.key(0), 16, 49, 12)[0])
  assert not np.array_equal(keep, masking.random_split(jax.random.key(1), 16, 49, 12)[0])
  first, second = masking.complementary_masks(jax.random.key(2), 16, 49, 20)
  assert (np.asarray(first).sum(1) == 20).all() and (np.asarray(first) ^ np.asarray(second)).all()
  np.testing.assert_array_equal(masking.mask_to_ids(first, 20), masking.random_split(jax.random.key(2), 16, 49, 20)[0])


def test_masking_gather_scatter_roundtrip():
  x = jax.random.normal(jax.random.key(0), (3, 10, 4))
  ids, _ = masking.random_split(jax.random.key(1), 3, 10, 4)
  picked = masking.gather_tokens(x, ids)
  full = masking.scatter_tokens(picked, ids, 10, fill=-7.0)
  mask = np.asarray(masking.ids_to_mask(ids, 10))
  np.testing.assert_array_equal(np.asarray(full)[mask], np.asarray(x)[mask])
  assert (np.asarray(full)[~mask] == -7.0).all()


def test_masking_num_kept_rejects_degenerate_ratios():
  assert masking.num_kept(64, 0.75) == 16
  with pytest.raises(ValueError, match="mask_ratio=1.0"):
    masking.num_kept(64, 1.0)


def test_mae_masks_exactly_the_ratio_per_sample(mae):
  method, params, state, batch, _, reconstruct = mae
  seen = seen_patches(reconstruct(params, state, batch, jax.random.key(5))["seen"]["s2"])
  assert (seen.sum(axis=1) == L - int(0.75 * L)).all()
  assert len({tuple(r) for r in seen}) == B  # different across samples
  again = seen_patches(reconstruct(params, state, batch, jax.random.key(5))["seen"]["s2"])
  other = seen_patches(reconstruct(params, state, batch, jax.random.key(6))["seen"]["s2"])
  np.testing.assert_array_equal(seen, again)
  assert not np.array_equal(seen, other)


def test_mae_predictions_ignore_masked_pixels(mae):
  """The encoder sees only the visible patches: changing a masked patch's pixels changes no prediction."""
  _, params, state, batch, _, reconstruct = mae
  rng = jax.random.key(7)
  out = reconstruct(params, state, batch, rng)
  seen = seen_patches(out["seen"]["s2"])
  masked = np.flatnonzero(~seen[0])
  row, col = divmod(int(masked[0]), SIZE // P)
  changed = {"s2": batch["s2"].at[0, row * P:(row + 1) * P, col * P:(col + 1) * P].add(3.0)}
  out2 = reconstruct(params, state, changed, rng)
  recon1, recon2 = (np.asarray(vit.patchify(o["reconstruction"]["s2"], P)) for o in (out, out2))
  others = np.setdiff1d(masked, masked[:1])
  np.testing.assert_allclose(recon1[0, others], recon2[0, others], rtol=1e-5, atol=1e-5)


def _blind(params):
  """Zeroes the S2 patch embedding: the encoder's input then ignores the pixels, so a pixel change can only act
  on the loss through the target."""
  params = jax.tree.map(lambda x: x, params)
  params["encoder"]["patch_embed_s2"]["kernel"] = jnp.zeros_like(params["encoder"]["patch_embed_s2"]["kernel"])
  return params


def _perturb(images, b, patch, value=20.0):
  row, col = divmod(int(patch), images.shape[2] // P)
  return images.at[b, row * P + 1, col * P + 2, 3].add(value)


def test_mae_loss_only_on_masked_patches(mae):
  _, params, state, batch, loss, reconstruct = mae
  params = _blind(params)
  rng = jax.random.key(9)
  seen = seen_patches(reconstruct(params, state, batch, rng)["seen"]["s2"])
  base = float(loss(params, state, batch, rng)[0])
  for b in range(2):
    seen_id, masked_id = np.flatnonzero(seen[b])[0], np.flatnonzero(~seen[b])[0]
    same = float(loss(params, state, {"s2": _perturb(batch["s2"], b, seen_id)}, rng)[0])
    diff = float(loss(params, state, {"s2": _perturb(batch["s2"], b, masked_id)}, rng)[0])
    assert same == pytest.approx(base, rel=1e-6)
    assert abs(diff - base) > 1e-4


def test_mae_norm_pix_loss_ignores_patch_brightness_and_contrast(mae):
  _, params, state, batch, _, reconstruct = mae
  config = mae_s2.get_config("tiny")
  config.norm_pix_loss = True
  method = methods.build(config)
  params = _blind(params)
  loss = fast_jit(functools.partial(method.tasks[0].loss_fn, train=True))
  rng = jax.random.key(3)
  seen = seen_patches(reconstruct(params, state, batch, rng)["seen"]["s2"])  # norm_pix does not change the mask
  row, col = divmod(int(np.flatnonzero(~seen[0])[0]), SIZE // P)
  where = (0, slice(row * P, (row + 1) * P), slice(col * P, (col + 1) * P))
  base = float(loss(params, state, batch, rng)[0])
  # An affine change of a scored patch leaves its per-patch normalized target, hence the loss, unchanged ...
  brighter = {"s2": batch["s2"].at[where].multiply(3.0).at[where].add(1.5)}
  assert float(loss(params, state, brighter, rng)[0]) == pytest.approx(base, rel=1e-5)
  # ... any other change of it does not.
  changed = {"s2": batch["s2"].at[where].set(jnp.abs(batch["s2"][where]))}
  assert abs(float(loss(params, state, changed, rng)[0]) - base) > 1e-4


def adam_losses(method, params, state, batch, lr, steps=8):
  """A 10-line optax loop, tasks alternating one per step: {task: (first loss, last loss)}. The rng is fixed so
  that the first and last losses of a task are measured under the same mask."""
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def step(params, opt_state, loss_fn):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, batch, jax.random.key(7), True)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  step_fns = {t.name: fast_jit(functools.partial(step, loss_fn=t.loss_fn)) for t in method.tasks}
  losses = {t.name: [] for t in method.tasks}
  for i in range(steps):
    task = method.tasks[i % len(method.tasks)]
    params, opt_state, loss = step_fns[task.name](params, opt_state)
    losses[task.name].append(float(loss))
  assert all(np.isfinite(v).all() for v in losses.values()), losses
  return {name: (v[0], v[-1]) for name, v in losses.items()}


def test_mae_tiny_config_loss_decreases(mae):
  method, params, state, *_ = mae  # built from get_config("tiny")
  config = method.config
  batch = {"s2": smooth_images(0, config.batch_size, SIZE, 12)}
  losses = adam_losses(method, params, state, batch, config.optimizer.learning_rate)
  before, after = losses["s2_mae"]
  assert np.isfinite(after) and after < before


def test_mae_task_and_params_contract(mae):
  method, params, *_ = mae
  (task,) = method.tasks
  assert (task.name, task.dataset, task.modalities, task.param_prefixes) == (
      "s2_mae", "s2_only", ("s2",), ("encoder", "decoder"))
  assert set(params) == {"encoder", "decoder"}
  assert method.flops_per_sample("s2_mae") > 0


def test_mae_mask_ratio_is_read_from_the_config(mae):
  """mask_ratio = 0.5 shows half the patches (a hard-coded 0.75 would show a quarter)."""
  _, params, state, batch, _, _ = mae
  config = mae_s2.get_config("tiny")
  config.mask_ratio = 0.5
  half = methods.build(config)
  seen = seen_patches(fast_jit(half.reconstruct)(params, state, batch, jax.random.key(5))["seen"]["s2"])
  assert (seen.sum(axis=1) == L // 2).all()
