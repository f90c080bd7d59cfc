"""Analytic FLOP counts for the ViT encoder/decoder (for MFU), and XLA's own count (to check them in tests).

Only matrix multiplications are counted (2 FLOPs per multiply-add): patch embedding, attention (QKV, scores,
attention x values, output projection), MLP, decoder input projection and heads. Norms, softmax, GELU, masking
are left out (a few % for real sizes). Training = forward + backward: a matmul costs 1x forward and 2x backward
(gradients w.r.t. inputs and weights), except the entry layer, whose input (the pixels) needs no gradient: 1x.
Use `train_flops(forward, entry=...)` to combine.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax


def patch_embed_flops(num_patches: int, patch_size: int, channels: int, width: int) -> float:
  """Forward FLOPs of a Dense entry layer over `num_patches` flattened p*p*C patches."""
  return 2.0 * num_patches * patch_size * patch_size * channels * width


def blocks_flops(num_tokens: int, width: int, depth: int, mlp_dim: int) -> float:
  """Forward FLOPs of `depth` transformer blocks on `num_tokens` tokens (CLS included if present)."""
  n, d = num_tokens, width
  qkv = 2.0 * n * d * 3 * d
  scores = 2.0 * n * n * d  # Q K^T over all heads
  attend = 2.0 * n * n * d  # softmax(QK^T) V
  out = 2.0 * n * d * d
  mlp = 2.0 * n * d * mlp_dim * 2
  return depth * (qkv + scores + attend + out + mlp)


def encoder_flops(num_tokens: int, size: dict) -> float:
  """Forward FLOPs of a ViTEncoder's blocks; `size` = configs.common.vit_size(...) (width/depth/mlp_dim)."""
  return blocks_flops(num_tokens, size["width"], size["depth"], size["mlp_dim"])


def decoder_flops(num_inputs: int, input_width: int, length: int, size: dict, out_dims: int | Sequence[int],
                  has_cls: bool = True) -> float:
  """Forward FLOPs of a ViTLiteDecoder.

  num_inputs: encoder tokens fed in (CLS excluded); length: positions L of the grid; out_dims as the decoder's
  `out_dim` (an int, or one per group: then the sequence holds len(out_dims) * L slots).
  """
  dims = (out_dims,) if isinstance(out_dims, int) else tuple(out_dims)
  slots = len(dims) * length
  cls = 1 if has_cls else 0
  w = size["width"]
  proj = 2.0 * (num_inputs + cls) * input_width * w
  heads = sum(2.0 * length * w * d for d in dims)
  return proj + blocks_flops(slots + cls, w, size["depth"], size["mlp_dim"]) + heads


def train_flops(forward: float, entry: float = 0.0) -> float:
  """Forward + backward FLOPs: 3x the `forward` FLOPs of all matmuls but the entry layers, whose forward FLOPs
  (`entry`, not included in `forward`) count 2x (no gradient w.r.t. the pixels)."""
  return 3.0 * forward + 2.0 * entry


def xla_flops(fn: Callable, *args: Any, compiler_options: dict[str, Any] | None = None, **kwargs: Any) -> float:
  """FLOPs that XLA's `cost_analysis()` reports for `jax.jit(fn)(*args, **kwargs)` on the default backend.

  `compiler_options` go to the compile, e.g. {"xla_backend_optimization_level": 0}: the count is of the HLO after
  XLA's HLO passes, which the backend's code-generation level does not change, at a fraction of the compile time."""
  cost = jax.jit(fn).lower(*args, **kwargs).compile(compiler_options).cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per computation
    cost = cost[0]
  if not cost or "flops" not in cost:
    raise RuntimeError(f"XLA's cost_analysis() has no 'flops' entry on backend {jax.default_backend()!r}: {cost}")
  return float(cost["flops"])
