"""Optimizers with one state per parameter group, learning-rate schedules, and weight-decay masks.

The top-level keys of `params` are groups (e.g. "encoder", "decoder_s2"). Each group has its own optimizer state, and
a step updates only the groups its task trains: with alternating tasks, a decoder that is idle this step is not moved
by momentum or weight decay, and its statistics (Adam/Adafactor step counts) advance only with its own updates.

The learning rate is a function of the *global* step (so every group follows the one schedule in wall-clock steps),
times the task's `config.task_lr_multipliers[task]`. Each group's transform yields an lr-free direction and the step
applies `-lr * direction`, so weight decay is lr-scaled for every optimizer (decoupled, as AdamW).

Adafactor (`optimizer.name="adafactor"`), defaults and why:
  - factored second moment (rows/columns of matrices with both dims >= 128), decay 1 - t^-0.8 (Shazeer & Stern);
  - update clipping at block RMS 1.0 (the paper's d=1);
  - `multiply_by_parameter_scale=False`: `learning_rate` is an absolute step size, as in big_vision's MAE/ViT
    configs, so the same lr works for adafactor and adamw sweeps;
  - no first moment (`optimizer.adafactor_momentum`, default 0 = off): Adafactor is chosen for its memory;
  - weight decay is lr-scaled here, unlike `optax.adafactor(weight_decay_rate=...)`, which adds decay after the lr
    (a decay of 1e-4 there would be 1e-4 per step at any lr, DESIGN §7).
AdamW: b1, b2, eps=1e-8, decoupled lr-scaled weight decay. SGD: heavy-ball momentum on (grad + wd * param)
(PyTorch's SGD, as RS-BYOL).

Schedules (`optimizer.schedule`): "cosine" (linear warmup to lr, cosine to `end_lr_fraction * lr`), "linear",
"constant"; `restart_period_steps > 0` selects cosine warm restarts (SGDR) after warmup: periods P, P*m, P*m^2, ...
(m = `restart_mult`), lr from `learning_rate` down to `min_learning_rate` in each period.

Layer-wise lr decay (`optimizer.layer_decay` = d < 1, for the groups in `optimizer.layer_decay_groups`, default
("encoder",); finetuning fills it from `finetune.layer_decay`): BEiT/MAE's `param_groups_lrd` on a ViT encoder of
depth L: block i gets lr * d^(L - i), the entry layers (patch/modality embeddings, CLS, position embeddings) get
lr * d^(L + 1), everything else in the group (the final norm) and every other group (the head) lr. It is a per-leaf
factor on the lr-free direction, which equals a per-group learning rate for every optimizer here, Adafactor included:
each applies the lr after its transform (AdamW/SGD as PyTorch's per-group lr, Adafactor's update clipping runs before
the lr, and the lr-scaled weight decay is scaled with the group's lr, as PyTorch's AdamW does). With `scan_layers`
the blocks are one stacked leaf per param: the factor is then a per-layer vector along its leading (layers) axis.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("adafactor", "adamw", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "cosine_restarts")
# Leaves never decayed: biases, norm scales, embeddings / tokens (matched on any path element, case-insensitive).
NO_DECAY_PATTERN = re.compile(
    r"(^|[_/.])(bias|scale|norm|ln|bn|layernorm|batchnorm|embedding|pos_?emb\w*|posemb\w*|cls\w*|mask_token|"
    r"modality_emb\w*|\w*_token)($|[_/.\d])", re.IGNORECASE)


def decay_mask(params: Any, prefix: tuple[str, ...] = ()) -> Any:
  """True for leaves that get weight decay: matrices/kernels (ndim >= 2) not named like a bias/norm/embedding."""
  def decays(path, leaf):
    names = prefix + tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    if jnp.ndim(leaf) < 2:
      return False
    return not any(NO_DECAY_PATTERN.search(n) for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def lr_schedule(opt: Mapping[str, Any], total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """step -> learning rate (float32), a pure jnp function (safe inside jit).

  `total_steps` is the schedule's length: the train loop passes config.optimizer.decay_steps, or the first run's
  config.total_steps (saved in the checkpoint), so a resume with another total_steps does not move the lr.
  """
  base = float(opt["learning_rate"])
  warmup = int(opt.get("warmup_steps", 0))
  kind = opt.get("schedule", "cosine")
  end = base * float(opt.get("end_lr_fraction", 0.0))
  period = int(opt.get("restart_period_steps", 0))
  mult = float(opt.get("restart_mult", 2))
  lr_min = float(opt.get("min_learning_rate", 0.0))
  if kind not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={kind!r}: choose one of {SCHEDULES}.")
  if kind == "cosine_restarts" and period <= 0:
    raise ValueError("config.optimizer.schedule='cosine_restarts' needs config.optimizer.restart_period_steps > 0.")
  if period > 0 and kind not in ("cosine", "cosine_restarts"):
    raise ValueError(f"config.optimizer.restart_period_steps={period} (cosine warm restarts) cannot be combined with "
                     f"config.optimizer.schedule={kind!r}; use 'cosine' or set restart_period_steps=0.")
  if period > 0 and mult < 1:
    raise ValueError(f"config.optimizer.restart_mult={mult} must be >= 1.")
  decay_steps = max(total_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = base * jnp.minimum(1.0, (step + 1) / warmup) if warmup > 0 else jnp.float32(base)
    t = jnp.maximum(step - warmup, 0.0)
    if period > 0:
      after = _sgdr(t, period, mult, base, lr_min)
    elif kind == "cosine":
      frac = jnp.minimum(t / decay_steps, 1.0)
      after = end + (base - end) * 0.5 * (1 + jnp.cos(jnp.pi * frac))
    elif kind == "linear":
      after = base + (end - base) * jnp.minimum(t / decay_steps, 1.0)
    else:
      after = jnp.float32(base)
    return jnp.where(step < warmup, warm, after).astype(jnp.float32)

  return schedule


def _sgdr(t, period, mult, lr_max, lr_min):
  """Cosine annealing with warm restarts (Loshchilov & Hutter): position within the current period."""
  if mult == 1.0:
    start = jnp.floor(t / period) * period
    length = jnp.float32(period)
  else:
    i = jnp.floor(jnp.log1p(t / period * (mult - 1)) / jnp.log(mult))
    start_of = lambda k: period * (mult ** k - 1) / (mult - 1)
    # Guard float rounding at period boundaries.
    i = jnp.where(t < start_of(i), i - 1, i)
    i = jnp.where(t >= start_of(i + 1), i + 1, i)
    start, length = start_of(i), period * mult ** i
  frac = (t - start) / length
  return lr_min + (lr_max - lr_min) * 0.5 * (1 + jnp.cos(jnp.pi * frac))


def direction(opt: Mapping[str, Any], group: str) -> optax.GradientTransformation:
  """The lr-free transform of one group: preconditioning/momentum plus weight decay (see module docstring)."""
  name = opt.get("name", "adafactor")
  wd = float(opt.get("weight_decay", 0.0))
  mask = lambda p: decay_mask(p, (group,))
  decay = [optax.add_decayed_weights(wd, mask)] if wd > 0 else []
  if name == "adafactor":
    parts = [optax.scale_by_factored_rms(decay_rate=float(opt.get("adafactor_decay_rate", 0.8)),
                                         min_dim_size_to_factor=int(opt.get("adafactor_min_dim_to_factor", 128))),
             optax.clip_by_block_rms(float(opt.get("adafactor_clipping", 1.0)))]
    momentum = float(opt.get("adafactor_momentum", 0.0))
    if momentum > 0:
      parts.append(optax.ema(momentum, debias=False))
    return optax.chain(*parts, *decay)
  if name == "adamw":
    return optax.chain(optax.scale_by_adam(b1=float(opt["b1"]), b2=float(opt["b2"]), eps=float(opt.get("eps", 1e-8))),
                       *decay)
  if name == "sgd":
    momentum = float(opt.get("momentum", 0.9))
    return optax.chain(*decay, optax.trace(decay=momentum, nesterov=bool(opt.get("nesterov", False))))
  raise ValueError(f"config.optimizer.name={name!r}: choose one of {OPTIMIZERS}.")


# Entry layers of a ViT encoder: MAE's layer 0 ("cls_token", "pos_embed", "patch_embed").
_ENTRY = re.compile(r"^(patch_embed\w*|modality_embed\w*|cls\w*|pos_?emb\w*)$")
_BLOCK = re.compile(r"^blocks_(\d+)$")
_STACKED = "blocks"  # mmrs/models/layout.py STACKED_KEY (not imported: optimizers stay model-agnostic)


def layer_lr_scales(params: Mapping[str, Any], decay: float, where: str = "encoder") -> Any:
  """Per-leaf lr factors of a ViT encoder's params (same tree; floats, or (L, 1, ...) arrays for stacked blocks).

  Block i of L -> decay^(L - i); entry layers -> decay^(L + 1); other keys (the final norm) -> 1 (see the module
  docstring). Blocks are `blocks_<i>` (unrolled) or `blocks` with a leading layers axis (scan_layers).
  """
  unrolled = sorted(int(m.group(1)) for k in params if (m := _BLOCK.match(k)))
  if _STACKED in params and isinstance(params[_STACKED], Mapping):
    if unrolled:
      raise ValueError(f"{where}: params have both stacked 'blocks' and per-block blocks_<i>; cannot tell the depth.")
    depth = {int(np.shape(x)[0]) for x in jax.tree.leaves(params[_STACKED])}
    if len(depth) != 1:
      raise ValueError(f"{where}: stacked 'blocks' leaves disagree on the layers axis {sorted(depth)}.")
    (depth,) = depth
  else:
    depth = len(unrolled)
  if depth == 0:
    raise ValueError(f"config.optimizer.layer_decay={decay} (finetune.layer_decay) needs a ViT encoder with "
                     f"transformer blocks, but {where} has none (keys {sorted(params)}); set it to 1.0.")
  per_layer = np.asarray([decay ** (depth - i) for i in range(depth)], np.float32)

  def scale(key, sub):
    if key == _STACKED and isinstance(sub, Mapping):
      return jax.tree.map(lambda x: per_layer.reshape((depth,) + (1,) * (np.ndim(x) - 1)), sub)
    m = _BLOCK.match(key)
    value = decay ** (depth - int(m.group(1))) if m else decay ** (depth + 1) if _ENTRY.match(key) else 1.0
    return jax.tree.map(lambda _: value, sub)

  return {k: scale(k, v) for k, v in params.items()}


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Per-group optimizer: `init(params)` -> {group: state}; `update` moves only the active groups."""
  groups: tuple[str, ...]
  transforms: Mapping[str, optax.GradientTransformation]
  schedule: Callable[[jax.Array], jax.Array]
  clip_norm: float
  layer_decay: float = 1.0  # < 1: layer-wise lr decay of `layer_decay_groups` (module docstring)
  layer_decay_groups: tuple[str, ...] = ()

  def init(self, params: Mapping[str, Any]) -> dict[str, Any]:
    return {g: self.transforms[g].init(params[g]) for g in self.groups}

  def update(self, grads: Mapping[str, Any], opt_state: Mapping[str, Any], params: Mapping[str, Any],
             step: jax.Array, lr_multiplier: float = 1.0):
    """grads/opt_state/params hold only the active groups. Returns (new_params, new_opt_state, lr, grad_norm)."""
    grad_norm = optax.global_norm(grads)
    if self.clip_norm > 0:  # one global norm over everything this task trains
      scale = jnp.minimum(1.0, self.clip_norm / (grad_norm + 1e-12))
      grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
    lr = self.schedule(step) * lr_multiplier
    new_params, new_state = {}, {}
    for g in grads:
      d, new_state[g] = self.transforms[g].update(grads[g], opt_state[g], params[g])
      if self.layer_decay != 1.0 and g in self.layer_decay_groups:
        d = jax.tree.map(lambda u, s: u * jnp.asarray(s, u.dtype), d,
                         layer_lr_scales(params[g], self.layer_decay, g))
      new_params[g] = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), params[g], d)
    return new_params, new_state, lr, grad_norm


def make_optimizer(opt: Mapping[str, Any], groups: Sequence[str], total_steps: int) -> Optimizer:
  groups = tuple(groups)
  decay = float(opt.get("layer_decay", 1.0))
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"config.optimizer.layer_decay={decay} (finetune.layer_decay) must be in (0, 1]; 1.0 = off "
                     "(MAE finetunes ViT-B with 0.65).")
  decay_groups = tuple(opt.get("layer_decay_groups", ("encoder",)))
  return Optimizer(groups=groups, transforms={g: direction(opt, g) for g in groups},
                   schedule=lr_schedule(opt, total_steps), clip_norm=float(opt.get("clip_norm", 0.0)),
                   layer_decay=decay, layer_decay_groups=decay_groups)
