"""The contract between a pretraining method and the train loop.

The loop does not know which method it trains: a method hands it `Task`s and the loop runs them, one task per
step (alternating-task training). All arrays in a batch are normalized float32 NHWC on device:
`s2` (B, H, W, C_s2), `s1` (B, H, W, 2); BYOL batches carry `view1`, `view2` instead.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import jax
import numpy as np

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
  # Gradient accumulation (config.grad_accum_steps = k > 1, mmrs/train/step.py). None: each micro-batch runs
  # `loss_fn` with its own rng (the same distribution as one batch, not the same draws). Otherwise
  # `accumulation(k) -> (prepare, micro_loss_fn)` makes the k micro-batches compute exactly the math of one batch:
  #   prepare(batch, rng) -> dict of entries computed on the WHOLE global batch before the split, from the step's
  #     rng: arrays with the batch's leading axis (masks, scenario draws) are split with the batch; 0-d arrays (the
  #     loss's normalizers, e.g. the batch's masked-patch count per row) reach every micro-batch unchanged. Its
  #     draws must be the ones `loss_fn` makes from the same rng (so k > 1 gives the k = 1 masks).
  #   micro_loss_fn: a LossFn for one micro-batch carrying those entries (its rng: fold_in(rng, j), for dropout);
  #     the mean of its loss and metrics over the k micro-batches equals loss_fn's on the whole batch.
  accumulation: Callable[[int], tuple[Callable, LossFn]] | None = None


def micro_batch_rows(batch_size: int, k: int) -> np.ndarray:
  """(k, batch_size // k) global row ids of the k micro-batches: micro-batch j = rows j, j + k, j + 2k, ...

  The split of mmrs/train/step.py (`split_micro_batches`): a strided split keeps every micro-batch spread over all
  devices (each device's contiguous rows split the same way) with no data movement. Methods whose static shapes
  depend on which rows a micro-batch holds (JointMAE's scenario groups) size them from this table.
  """
  check_micro_batches(batch_size, k)
  return np.arange(batch_size).reshape(batch_size // k, k).T


def check_micro_batches(batch_size: int, k: int) -> None:
  if k < 1 or batch_size % k:
    raise ValueError(f"config.grad_accum_steps={k} does not divide the batch of {batch_size} rows: choose a "
                     "grad_accum_steps that divides config.batch_size.")


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
