"""Token masking utilities shared by the MAE family (MAE, AuxMAE, MixMAE, JointMAE).

Everything runs on device inside the jit step with static shapes (per-sample random permutation by argsort of
uniform noise, then slicing, as scenic's MAE): each sample gets exactly the requested number of kept tokens.
Ids are int32 token indices into a sequence of `length` tokens (the `patchify` order of mmrs/models/vit.py);
returned id lists are sorted ascending. Masks are bool (B, length).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def num_kept(length: int, drop_ratio: float, what: str = "mask_ratio") -> int:
  """Tokens kept when a fraction `drop_ratio` of `length` is dropped (rounded); 0 < kept < length enforced.

  `what` names the config key in the error (e.g. "mask_ratio", "k_fraction").
  """
  kept = int(round(length * (1.0 - drop_ratio)))
  if not 0 < kept < length:
    raise ValueError(f"{what}={drop_ratio} keeps {kept} of {length} tokens; choose it so that at least one token "
                     "is kept and at least one is dropped.")
  return kept


def random_split(rng: jax.Array, batch_size: int, length: int, num_first: int) -> tuple[jax.Array, jax.Array]:
  """Per sample, a uniformly random split of range(length) into `num_first` ids and the other length - num_first.

  Returns (first_ids (B, num_first), rest_ids (B, length - num_first)), each sorted ascending, int32.
  The same rng gives the same split; samples get independent splits.
  """
  if not 0 <= num_first <= length:
    raise ValueError(f"random_split: num_first={num_first} must be in [0, {length}].")
  noise = jax.random.uniform(rng, (batch_size, length))
  order = jnp.argsort(noise, axis=1).astype(jnp.int32)
  return jnp.sort(order[:, :num_first], axis=1), jnp.sort(order[:, num_first:], axis=1)


def random_mask(rng: jax.Array, batch_size: int, length: int, num_keep: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MAE masking: (keep_ids (B, num_keep), masked_ids (B, length - num_keep), mask (B, length) True = masked)."""
  keep_ids, masked_ids = random_split(rng, batch_size, length, num_keep)
  return keep_ids, masked_ids, ~ids_to_mask(keep_ids, length)


def complementary_masks(rng: jax.Array, batch_size: int, length: int, num_first: int) -> tuple[jax.Array, jax.Array]:
  """Two complementary bool masks (B, length): `first` has exactly num_first True per sample, `second` = ~first."""
  first_ids, _ = random_split(rng, batch_size, length, num_first)
  first = ids_to_mask(first_ids, length)
  return first, ~first


def ids_to_mask(ids: jax.Array, length: int) -> jax.Array:
  """(B, n) ids -> (B, length) bool, True at the listed ids."""
  return jnp.zeros((ids.shape[0], length), bool).at[jnp.arange(ids.shape[0])[:, None], ids].set(True)


def mask_to_ids(mask: jax.Array, count: int) -> jax.Array:
  """(B, length) bool with exactly `count` True per sample -> (B, count) sorted ids of the True entries.

  `count` must be static (a Python int); rows with another number of True entries give wrong ids.
  """
  # Stable argsort of (not mask) puts the True positions first, in ascending order.
  return jnp.argsort(~mask, axis=1, stable=True)[:, :count].astype(jnp.int32)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
  """(B, L, ...) tokens, (B, n) ids -> (B, n, ...) the tokens at those ids, in the order of `ids`."""
  idx = ids.reshape(ids.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def scatter_tokens(x: jax.Array, ids: jax.Array, length: int, fill: jax.Array | float = 0.0) -> jax.Array:
  """Inverse of `gather_tokens`: (B, n, ...) tokens placed at `ids` of a (B, length, ...) array filled with
  `fill` (a scalar or an array broadcastable to one token, e.g. a learned mask token (D,))."""
  full = jnp.broadcast_to(jnp.asarray(fill, x.dtype), (x.shape[0], length) + x.shape[2:])
  return jax.vmap(lambda f, i, v: f.at[i].set(v))(full, ids, x)


def mix_tokens(first: jax.Array, second: jax.Array, take_first: jax.Array) -> jax.Array:
  """(B, L, D) x2 and (B, L) bool -> per position the token of `first` where take_first, else of `second`."""
  return jnp.where(take_first[..., None], first, second)


def masked_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """Weighted mean of (B, L) `values` with (B, L) 0/1 (or bool) `weights`; 0 when no weight is set."""
  weights = weights.astype(values.dtype)
  return (values * weights).sum() / jnp.maximum(weights.sum(), 1.0)
