"""The two parameter layouts of a ViT block stack, and the conversion between them.

Per-block ("unrolled", `config.model.scan_layers=False`): `{..., "blocks_0": {...}, "blocks_1": {...}}`.
Stacked (`scan_layers=True`, vit.block_stack): `{..., "blocks": {...}}` where every leaf has a leading axis of size
depth (logical name "layers"). Checkpoint conversion, `mmrs.load_encoder` and the HF/timm export call
`unstack_blocks` at their entry, so they read either layout; `stack_blocks` is the inverse (e.g. to load per-block
weights into a scanned model).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

STACKED_KEY = "blocks"
_BLOCK = re.compile(r"^blocks_(\d+)$")


def _leaves(tree):
  if isinstance(tree, Mapping):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def _map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


def unstack_blocks(tree: Any) -> Any:
  """Every `"blocks": {stacked}` sub-dict (at any depth) -> `"blocks_0" ... "blocks_{n-1}"`; other keys unchanged.

  A tree already per-block passes through unchanged. Leaves keep their array type (numpy or jax).
  """
  if not isinstance(tree, Mapping):
    return tree
  out = {}
  for k, v in tree.items():
    if k == STACKED_KEY and isinstance(v, Mapping):
      depths = {int(np.shape(x)[0]) if np.ndim(x) else -1 for x in _leaves(v)}
      if len(depths) != 1 or -1 in depths:
        raise ValueError(f"Stacked block params {k!r} must all have the same leading (layers) axis; got leading "
                         f"sizes {sorted(depths)}. Is this a checkpoint of a scan_layers model?")
      (depth,) = depths
      for i in range(depth):
        name = f"blocks_{i}"
        if name in tree:
          raise ValueError(f"Params have both stacked {k!r} and per-block {name!r}: mixed layouts cannot be read.")
        out[name] = _map(lambda x, i=i: x[i], v)
    else:
      out[k] = unstack_blocks(v)
  return out


def stack_blocks(tree: Any) -> Any:
  """Inverse of `unstack_blocks`: consecutive `blocks_0 ... blocks_{n-1}` siblings -> one stacked `"blocks"`."""
  if not isinstance(tree, Mapping):
    return tree
  indices = sorted(int(m.group(1)) for k in tree if (m := _BLOCK.match(k)))
  out = {k: stack_blocks(v) for k, v in tree.items() if not _BLOCK.match(k)}
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"Per-block params must be blocks_0 ... blocks_{len(indices) - 1}, got indices {indices}.")
    if STACKED_KEY in out:
      raise ValueError(f"Params have both per-block and stacked {STACKED_KEY!r}: mixed layouts cannot be read.")
    blocks = [tree[f"blocks_{i}"] for i in indices]
    out[STACKED_KEY] = _stack(blocks)
  return out


def _stack(trees):
  first = trees[0]
  if isinstance(first, Mapping):
    if any(not isinstance(t, Mapping) or set(t) != set(first) for t in trees):
      raise ValueError("Per-block params differ in structure between blocks; they cannot be stacked.")
    return {k: _stack([t[k] for t in trees]) for k in first}
  if isinstance(first, np.ndarray) or np.isscalar(first):
    return np.stack(trees)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top  (jax arrays stay on device)
  return jnp.stack(trees)
