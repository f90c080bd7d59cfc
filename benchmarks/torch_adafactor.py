"""mmrs's Adafactor in PyTorch, for the peer (benchmarks/peer.py): the same update as mmrs/train/optimizers.py's
`direction` for optimizer.name="adafactor" followed by `params - lr * update`.

torch.optim.Adafactor differs from it in two ways that change every step: it scales the step by the parameter's
RMS (relative step size, multiply_by_parameter_scale) and it factors the second moment of every 2-D tensor, where
mmrs uses optax.scale_by_factored_rms (absolute lr; factored only where the two largest dims are >= 128,
`adafactor_min_dim_to_factor`) and optax.clip_by_block_rms(1.0). This optimizer follows optax exactly:
  rho_t = 1 - t^-0.8 (t = 1, 2, ...), s = g^2 + 1e-30;
  factored (two largest dims d1 <= d0 both >= min_dim): r = rho r + (1 - rho) mean_d0 s, c = rho c + (1 - rho)
    mean_d1 s, u = g / sqrt((r / mean(r)) c)  (broadcast back over d0 / d1);
  else v = rho v + (1 - rho) s, u = g / sqrt(v);
  u /= max(1, rms(u) / clipping); p -= lr * u.
The factoring depends on dimension sizes, not positions, so a torch Linear weight (out, in) gets the update of the
flax kernel (in, out) transposed. A weight of more than 2 dims (the peer's Conv2d patch embedding (D, C, p, p))
is treated as the (D, C * p * p) matrix that mmrs's patch-embedding Dense kernel (p * p * C, D) is: factored like
it (the element order within a row does not matter to the row/column means). The attention weights are held
by mmrs with head axes (qkv kernel (D, 3, H, D/H), output kernel (H, D/H, D)), which decides what is factored (at
ViT-B neither is: the two largest dims are D and 64 < 128), so the update of those is computed on the torch
weight viewed in mmrs's layout (`mmrs_shapes`, filled by `make_optimizer` from the peer's attention modules). The step has no host syncs (no .item(); the step count is a Python int).
Global-norm gradient clipping stays in the training step (torch.nn.utils.clip_grad_norm_, as benchmarks/torch_vit.py).
"""
from __future__ import annotations

import torch


def factored_dims(shape, min_dim_size_to_factor: int):
  """optax's _factored_dims: (d1, d0) = (second largest, largest) axis, or None (ties: the earlier axis first)."""
  if len(shape) < 2:
    return None
  order = sorted(range(len(shape)), key=lambda i: (shape[i], i))  # a stable argsort, as np.argsort on ties
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return order[-2], order[-1]


class MmrsAdafactor(torch.optim.Optimizer):
  """mmrs's Adafactor (module docstring); no momentum, no weight decay (the peer's vit_b config has neither)."""

  def __init__(self, params, lr: float = 1e-3, decay_rate: float = 0.8, min_dim_size_to_factor: int = 128,
               clipping_threshold: float = 1.0, eps: float = 1e-30, mmrs_shapes=None):
    """mmrs_shapes: {parameter: shape} for 2-D torch weights (out, in) that mmrs holds as a kernel of another
    shape whose (in, out) transpose reshapes to it (the attention weights)."""
    super().__init__(params, dict(lr=lr, decay_rate=decay_rate, min_dim_size_to_factor=min_dim_size_to_factor,
                                  clipping_threshold=clipping_threshold, eps=eps))
    self.mmrs_shapes = {id(p): tuple(shape) for p, shape in (mmrs_shapes or {}).items()}

  @torch.no_grad()
  def step(self, closure=None):
    loss = None
    if closure is not None:
      with torch.enable_grad():
        loss = closure()
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        g = p.grad.float()
        view = self.mmrs_shapes.get(id(p))
        if view is not None:  # mmrs's layout: the (in, out) transpose reshaped to its kernel shape
          g = g.T.reshape(view)
        elif g.ndim > 2:  # a conv weight (out, in, kh, kw): mmrs holds it as a Dense kernel (kh * kw * in, out)
          g = g.reshape(g.shape[0], -1)
        state = self.state[p]
        if not state:
          state["step"] = 0
          state["dims"] = factored_dims(tuple(g.shape), group["min_dim_size_to_factor"])
          if state["dims"] is None:
            state["v"] = torch.zeros_like(g)
          else:
            d1, d0 = state["dims"]
            state["v_row"] = torch.zeros_like(g.mean(d0))
            state["v_col"] = torch.zeros_like(g.mean(d1))
        state["step"] += 1
        rho = 1.0 - state["step"] ** (-group["decay_rate"])
        sq = g * g + group["eps"]
        if state["dims"] is None:
          v = state["v"].mul_(rho).add_(sq, alpha=1.0 - rho)
          u = g * v.rsqrt()
        else:
          d1, d0 = state["dims"]
          row = state["v_row"].mul_(rho).add_(sq.mean(d0), alpha=1.0 - rho)
          col = state["v_col"].mul_(rho).add_(sq.mean(d1), alpha=1.0 - rho)
          reduced_d1 = d1 - 1 if d1 > d0 else d1
          row_factor = (row / row.mean(reduced_d1, keepdim=True)).rsqrt()
          u = g * row_factor.unsqueeze(d0) * col.rsqrt().unsqueeze(d1)
        rms = u.square().mean().sqrt()
        u = u / torch.clamp(rms / group["clipping_threshold"], min=1.0)
        u = u.reshape(p.shape[1], p.shape[0]).T if view is not None else u.reshape(p.shape)
        p.add_(u.to(p.dtype), alpha=-group["lr"])
    return loss


def mmrs_shapes(model: torch.nn.Module) -> dict:
  """{weight: mmrs kernel shape} of the peer's attention modules (anything with .heads, .qkv and .proj Linears)."""
  out = {}
  for module in model.modules():
    if hasattr(module, "heads") and isinstance(getattr(module, "qkv", None), torch.nn.Linear):
      d, h = module.proj.in_features, module.heads
      out[module.qkv.weight] = (d, 3, h, d // h)
      out[module.proj.weight] = (h, d // h, d)
  return out


def make_optimizer(model: torch.nn.Module, lr: float = 1e-3, min_dim_size_to_factor: int = 128) -> MmrsAdafactor:
  return MmrsAdafactor(model.parameters(), lr=lr, min_dim_size_to_factor=min_dim_size_to_factor,
                       mmrs_shapes=mmrs_shapes(model))
