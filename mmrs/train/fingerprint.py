"""Per-leaf value fingerprints of a train state, so a restore can prove it got back the values that were saved.

tensorstore checks its manifest's CRC but not the array data chunks: bytes flipped inside a chunk restore silently as
wrong weights. At save, `compute` gives every leaf two 32-bit words over the bit patterns w of its values (as
uint32): sum(w) and sum(w * w), both modulo 2^32 (the issue's "sum and sum of squares", on the bits). Integer sums
that wrap are exact and independent of the reduction order, so the same values give the same words on any mesh,
sharding or process count, with no tolerance (float sums would differ in the last bits); a change of any one value
always changes the first word. They are computed on device by one small jitted program per leaf shape (with the
NaN/inf check; elementwise ops and full reductions only, so nothing is resharded; a ViT has a few dozen distinct
shapes, while one program over all ~650 leaves took ~10x longer to compile), and only 8 bytes per leaf reach the
host; the checkpoint's meta item stores them as {leaf path: [sum, sum of squares]}.
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


@jax.jit
def _leaf(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  w = _words(x)
  finite = jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
  return jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * w, dtype=jnp.uint32), finite


def _fetch(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
    return np.asarray(x.addressable_shards[0].data if not getattr(x, "is_fully_addressable", True) else x)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compute(state: Any) -> tuple[dict[str, list[int]], bool]:
  """({leaf path: [sum, sum of squares]}, whether every float value is finite) of the arrays in `state`."""
  flat = jax.tree_util.tree_flatten_with_path(state)[0]
  arrays = [(p, x) for p, x in flat if isinstance(x, jax.Array)]
  local = all(getattr(x, "is_fully_addressable", True) for _, x in arrays)
  parts = []
  for _, x in arrays:
    parts.append(_leaf(x))  # unsharded leaves: dispatched together, fetched once
    if len(x.sharding.device_set) > 1:
      # A leaf over several devices gets a program with collectives, and XLA:CPU deadlocks with many of those in
      # flight at once: several processes blocked in Execute (tests/test_multihost.py), and in one process over 8
      # devices its all-reduce rendezvous aborted after 40 s ("only 1 of 2 threads arrived"). One at a time.
      jax.block_until_ready(parts[-1])
  if local:
    values = jax.device_get(parts)
  else:  # several processes: the scalars are replicated, each process reads its own copy
    values = [tuple(_fetch(v) for v in part) for part in parts]
  return ({_path(p): [int(s), int(t)] for (p, _), (s, t, _) in zip(arrays, values)},
          all(bool(f) for _, _, f in values))


def differences(saved: dict[str, list[int]], now: dict[str, list[int]]) -> list[str]:
  """The leaf paths whose fingerprint differs (or that only one side has)."""
  return sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
