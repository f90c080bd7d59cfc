"""Per-leaf value fingerprints of a train state, so a restore can prove it got back the values that were saved.

tensorstore checks its manifest's CRC but not the array data chunks: bytes flipped inside a chunk restore silently as
wrong weights. At save, `compute` gives every leaf two 32-bit words over the bit patterns of its values w (as uint32,
index i in the leaf's row-major order): sum(w) and sum(w * (2i + 1)), both modulo 2^32. Integer sums that wrap are
exact and independent of the reduction order, so the same values give the same words on any mesh, sharding or
process count (a float sum would not); any change of one value changes both (an odd multiplier is invertible mod
2^32), and moving a value to another index changes the second. They are computed on device in one jitted program
over the whole tree (with the NaN/inf check), so only 8 bytes per leaf reach the host; the checkpoint's meta item
stores them as {leaf path: [sum, weighted sum]}.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _path(path) -> str:
  def key(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  return "/".join(key(k) for k in path)


def _words(x: jax.Array) -> jax.Array:
  """x's bit patterns as uint32 (8-byte values give two words each)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  size = jnp.dtype(x.dtype).itemsize
  if size >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * size}")).astype(jnp.uint32)


def _leaf(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  w = _words(x)
  index = jnp.zeros(w.shape, jnp.uint32)  # row-major index from iotas: no reshape, so no resharding
  stride = 1
  for axis in reversed(range(w.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= w.shape[axis]
  finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * (2 * index + 1), dtype=jnp.uint32), finite


@jax.jit
def _all(leaves):
  parts = [_leaf(x) for x in leaves]
  words = jnp.stack([jnp.stack([s, t]) for s, t, _ in parts]) if parts else jnp.zeros((0, 2), jnp.uint32)
  finite = jnp.stack([f for _, _, f in parts]).all() if parts else jnp.bool_(True)
  return words, finite


def _fetch(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data if not getattr(x, "is_fully_addressable", True) else x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute(state: Any) -> tuple[dict[str, list[int]], bool]:
  """({leaf path: [sum, weighted sum]}, whether every float value is finite) of the arrays in `state`."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  arrays = [(p, x) for p, x in flat if isinstance(x, jax.Array)]
  words, finite = _all([x for _, x in arrays])
  words = _fetch(words)
  return {_path(p): [int(a), int(b)] for (p, _), (a, b) in zip(arrays, words)}, bool(_fetch(finite))


def differences(saved: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
  """The leaf paths whose fingerprint differs (or that only one side has)."""
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
