"""The contract between a pretraining method and the train loop.

The loop does not know which method it trains: a method hands it `Task`s and the loop runs them, one task per
step (alternating-task training). All arrays in a batch are normalized float32 NHWC on device:
`s2` (B, H, W, C_s2), `s1` (B, H, W, 2); BYOL batches carry `view1`, `view2` instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax

PyTree = Any
# loss_fn(params, state, batch, rng, train) -> (loss, (metrics, new_state))
#   params: the trainable parameters (the whole tree; a task may use only part of it)
#   state:  non-trainable state (BatchNorm statistics, BYOL's EMA target); {} when a method has none
#   metrics: dict of scalar jax arrays (logged as given; 'loss' is added by the loop)
LossFn = Callable[[PyTree, PyTree, Mapping[str, jax.Array], jax.Array, bool], tuple[jax.Array, tuple[dict, PyTree]]]


@dataclasses.dataclass(frozen=True)
class Task:
  name: str  # e.g. "s2_mae", "s2_to_s1", "mixmae", "byol"
  dataset: str  # key into config.data (e.g. "paired", "s2_only")
  modalities: tuple[str, ...]  # record modalities the task needs, e.g. ("s2",) or ("s1", "s2")
  loss_fn: LossFn
  batch_kind: str = "images"  # "images" (s1/s2 arrays) or "byol_views" (view1/view2)
  # Top-level param collections the task trains (others get zero gradients and must not move: see the loop).
  param_prefixes: tuple[str, ...] | None = None  # None = all


# Parameter conventions (the loop relies on them):
# - `init` may return params wrapped in flax `nn.LogicallyPartitioned` boxes (from `nn.with_logical_partitioning`);
#   the loop reads logical axis names with `nn.get_partition_spec` and unboxes (`nn.meta.unbox`) before training,
#   so loss functions always receive plain dicts of arrays.
# - Logical axis names used on params/activations: "batch", "length", "embed" (model width), "mlp", "heads",
#   "head_dim", "patch" (flattened patch pixels), "channels", "classes", "conv_in", "conv_out", "norm".
# - The top-level keys of `params` are optimizer groups (e.g. "encoder", "decoder_s2", "decoder_s1"): a task's
#   `param_prefixes` names the groups it trains; the others must not be moved by momentum or weight decay.


class Method(Protocol):
  name: str
  tasks: Sequence[Task]

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[PyTree, PyTree]:
    """Returns (params, state) from an example batch (shapes only matter)."""

  def update_state(self, params: PyTree, state: PyTree, step: jax.Array) -> PyTree:
    """Called inside the jit step after the optimizer update (BYOL's EMA); identity for most methods."""

  def flops_per_sample(self, task_name: str) -> float:
    """Analytic training FLOPs (forward + backward) of one sample of `task_name`, used for MFU."""

  # Optional (reconstruction methods): normalized NHWC arrays for a PNG grid, keys "seen", "reconstruction",
  # "target", each a dict modality -> (B, H, W, C); see mmrs/methods/visualize.py.
  # def reconstruct(self, params, state, batch, rng) -> dict[str, dict[str, jax.Array]]
