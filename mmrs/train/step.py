"""One compiled train step per task: normalize on device, loss + grads of the task's groups, update, EMA hook.

Gradient accumulation (`grad_accum_steps` = k > 1): the global batch (batch_size rows) is split into k micro-batches
inside the one compiled step (`lax.scan`), so activation memory is that of batch_size / k rows; gradients are summed
in float32 and averaged, and the optimizer updates once. Micro-batch j takes every k-th row of each device's rows
(rows j, j + k, ...: `methods.base.micro_batch_rows`), so it stays spread over all devices with no data movement.

For the MAE family (tasks with `Task.accumulation`) k micro-batches compute exactly the math of one batch (tested to
1e-5 in tests/test_grad_accum.py, sharded or not): before the split the task's `prepare` draws the WHOLE batch's
randomness from the step rng, the same draws the loss makes with k = 1 (masks, MixMAE's mixing, JointMAE's
scenarios; jax.random values do not depend on the sharding), and each micro-batch gets its rows of them. Loss terms
whose scored patches/pixels differ between micro-batches (S1 no-data and S1-missing samples, JointMAE's scenarios)
are not means per micro-batch: each micro-batch divides its sum by the whole batch's count (prepared before the
split, per row times the micro-batch's rows), so the mean over micro-batches is the whole-batch mean. Dropout (off in
every pretraining config) is drawn per micro-batch from fold_in(rng, j): with dropout on, k > 1 is the same
distribution, not the same draws. Tasks without `accumulation` run their loss per micro-batch with
fold_in(rng, j) and report the mean over micro-batches.

RS-BYOL: method state (BatchNorm running statistics) is threaded through the micro-batches in order. BatchNorm
therefore normalizes each micro-batch with the statistics of its own batch_size / k rows (without accumulation they
are over the whole global batch: under jit the batch mean is a global reduction across devices) and updates the
running averages k times per step, as PyTorch's accumulation does. We chose this over computing full-batch
statistics first because that would need a second forward pass over every micro-batch, undoing the memory saving;
k > 1 thus behaves like training BYOL with a BatchNorm batch of batch_size / k. The paper trains on one GPU with batch
32, so its BatchNorm batch is its whole batch of 32: a run with batch_size / k = 32 keeps the paper's BatchNorm
statistics while its optimizer batch grows (tests/test_grad_accum.py checks these per-micro-batch statistics). The
EMA target moves once per step.

A step never writes a non-finite state: if the loss, the gradient norm or the updated params are NaN/inf, the state
passes through unchanged and `metrics["finite"]` is False (the loop then stops or skips, as configured). The RNG of a
step is `fold_in(fold_in(key(seed), step), task_index)`, so a step is reproducible from the step number alone.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn
import optax

from mmrs import target
from mmrs.methods import base
from mmrs.train import mesh as mesh_lib
from mmrs.train import optimizers
from mmrs.train import state as state_lib

# Task name -> number of times its step was traced; a trace is a compile (tests assert one per task).
TRACE_COUNTS: collections.Counter = collections.Counter()


def step_rng(seed: int, step, task_index: int) -> jax.Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), task_index)


def active_groups(task, groups: tuple[str, ...]) -> tuple[str, ...]:
  if task.param_prefixes is None:
    return groups
  unknown = sorted(set(task.param_prefixes) - set(groups))
  if unknown:
    raise ValueError(f"Task {task.name!r} trains param groups {unknown} that the method's params do not have; "
                     f"the groups (top-level param keys) are {list(groups)}.")
  return tuple(g for g in groups if g in task.param_prefixes)


def split_micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """(B, ...) -> (k, B / k, ...): micro-batch j = rows j, j + k, j + 2k, ... (`base.micro_batch_rows`; see the
  module docstring)."""
  def split(x):
    base.check_micro_batches(x.shape[0], k)
    x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(x, (None, "batch"))  # each micro-batch stays split over the batch axes
  return jax.tree.map(split, batch)


def loss_and_grads(task, params, active: tuple[str, ...], method_state, batch: dict[str, jax.Array], rng: jax.Array,
                   k: int = 1):
  """(loss, metrics, new method state, float grads of the `active` groups) of `task` on `batch`, in k micro-batches.

  k > 1: the gradients are summed in float32 over a `lax.scan` of micro-batches and averaged; loss and metrics are
  the mean over micro-batches. With `task.accumulation` (the MAE family) this is the k = 1 math: the task's
  `prepare` draws the whole batch's masks from `rng` and its loss normalizers before the split (see the module
  docstring); without it each micro-batch draws from fold_in(rng, j).
  """
  def one(method_state, batch, rng, loss_fn):
    def loss_of(trained):  # differentiates the task's groups only; the others enter as constants
      full = {g: trained[g] if g in trained else params[g] for g in params}
      return loss_fn(full, method_state, batch, rng, True)
    (loss, (metrics, new_ms)), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
    return loss, metrics, (new_ms if new_ms is not None else method_state), grads

  trained = {g: params[g] for g in active}
  if k == 1:
    return one(method_state, batch, rng, task.loss_fn)
  prepare, micro_loss = task.accumulation(k) if task.accumulation is not None else (None, task.loss_fn)
  shared = {}
  if prepare is not None:
    rows = next(iter(jax.tree.leaves(batch))).shape[0]
    for name, value in prepare(batch, rng).items():
      if jnp.ndim(value) == 0:
        shared[name] = value
      elif value.shape[0] == rows:
        batch = {**batch, name: value}
      else:
        raise ValueError(f"Task {task.name!r}: prepare() entry {name!r} has shape {value.shape}; give arrays with the "
                         f"batch's leading axis ({rows} rows) or 0-d arrays (see mmrs/methods/base.py Task).")

  def micro_step(carry, xs):
    acc, ms = carry
    j, micro = xs
    loss, metrics, ms, grads = one(ms, {**micro, **shared}, jax.random.fold_in(rng, j), micro_loss)
    acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
    return (acc, ms), (loss, metrics)

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trained)
  (acc, method_state), (losses, metrics) = jax.lax.scan(
      micro_step, (zeros, method_state), (jnp.arange(k), split_micro_batches(batch, k)))
  grads = jax.tree.map(lambda a, p: (a / k).astype(p.dtype), acc, trained)
  metrics = jax.tree.map(lambda m: jnp.mean(m.astype(jnp.float32), axis=0), metrics)
  return jnp.mean(losses), metrics, method_state, grads


def make_step_fn(method, task, task_index: int, optimizer: optimizers.Optimizer,
                 normalize: Callable | None, seed: int, lr_multiplier: float = 1.0, grad_accum_steps: int = 1):
  """(state, batch, step) -> (state, metrics). `batch` is the raw global batch; `step` an int32 scalar."""
  active = active_groups(task, optimizer.groups)
  k = int(grad_accum_steps)
  if k < 1:
    raise ValueError(f"config.grad_accum_steps={grad_accum_steps} must be a positive integer.")

  def step_fn(state, batch, step):
    TRACE_COUNTS[task.name] += 1
    if normalize is not None:
      batch = normalize(batch)
    rng = step_rng(seed, step, task_index)
    params = state["params"]
    trained = {g: params[g] for g in active}
    loss, metrics, method_state, grads = loss_and_grads(task, params, active, state["method_state"], batch, rng, k)
    new_trained, new_opt, lr, grad_norm = optimizer.update(
        grads, {g: state["opt_state"][g] for g in active}, trained, step, lr_multiplier)
    new_params = {g: new_trained[g] if g in new_trained else params[g] for g in params}
    method_state = method.update_state(new_params, method_state, step)
    param_norm = optax.global_norm(new_trained)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    new_state = {"params": new_params, "opt_state": {**state["opt_state"], **new_opt},
                 "method_state": method_state if method_state is not None else {}}
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
    metrics = {**metrics, "loss": loss, "grad_norm": grad_norm, "param_norm": param_norm, "lr": lr,
               "finite": finite}
    return new_state, metrics

  return step_fn


def compile_step(step_fn, state_layout: state_lib.StateLayout, batch_abstract: dict[str, jax.ShapeDtypeStruct],
                 mesh: jax.sharding.Mesh, compiler_options: dict | None = None):
  """Ahead-of-time compile (one per task: a shape change later is an error, never a silent recompile).

  `compiler_options`: XLA options for this compile (`config.xla_compiler_options`), e.g. scheduler flags on TPU.
  """
  rep = mesh_lib.replicated(mesh)
  batch_sh = {k: mesh_lib.batch_sharding(mesh) for k in batch_abstract}
  jitted = jax.jit(step_fn, in_shardings=(state_layout.shardings, batch_sh, rep),
                   out_shardings=(state_layout.shardings, rep), donate_argnums=(0,))
  batch_abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch_abstract.items()}
  # Traced for the mesh's platform, not the host's (launch.aot: a TPU/GPU target on a CPU host): mmrs/target.py.
  with nn.logical_axis_rules(mesh_lib.ACTIVATION_RULES), target.compiling_for(mesh.devices.flat[0].platform):
    lowered = jitted.lower(state_layout.abstract, batch_abstract, jax.ShapeDtypeStruct((), jnp.int32, sharding=rep))
  return lowered.compile(compiler_options=compiler_options or None)


def memory_summary(compiled) -> dict[str, float]:
  """Per-device memory of a compiled step in MiB (empty when the backend does not report it)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return {}
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", "_mib"): getattr(m, f, 0) / 2**20 for f in fields if hasattr(m, f)}
  if not any(out.values()):  # a backend that reports nothing gives zeros (XLA:CPU in jax 0.10.2 does report)
    return {}
  if out:
    out["total_mib"] = (out.get("argument_mib", 0) + out.get("output_mib", 0) - out.get("alias_mib", 0)
                        + out.get("temp_mib", 0))
  return out


def abstract_batch(local_batch: dict[str, Any], global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((global_batch_size,) + tuple(v.shape[1:]), v.dtype) for k, v in local_batch.items()}



# --- what launch.main (Trainer) and launch.aot share: the state layout and the compiled step of every task ---------

def plan_state(config, method, example: Mapping[str, jax.ShapeDtypeStruct], mesh: jax.sharding.Mesh,
               decay_steps: int) -> tuple[optimizers.Optimizer, state_lib.StateLayout]:
  """(optimizer, state layout) of `method` on `mesh`; `example` is `state_lib.example_batch` of normalized shapes."""
  groups = state_lib.param_groups(method, example)
  optimizer = optimizers.make_optimizer(config.optimizer, groups, decay_steps)
  return optimizer, state_lib.layout(method, optimizer, example, mesh, config.fsdp_min_size)


@dataclasses.dataclass
class CompiledStep:
  compiled: Any  # jax.stages.Compiled: (state, batch, step) -> (state, metrics)
  seconds: float  # lower + compile wall time
  memory: dict[str, float]  # memory_summary (MiB; empty when the backend reports none)


def compile_tasks(config, method, optimizer: optimizers.Optimizer, state_layout: state_lib.StateLayout,
                  mesh: jax.sharding.Mesh, batches: Mapping[str, Mapping[str, jax.ShapeDtypeStruct]],
                  normalizers: Mapping[str, Callable | None], on_compiled: Callable | None = None
                  ) -> dict[str, CompiledStep]:
  """Lowers and compiles every task's step. `batches`: task -> GLOBAL abstract batch (raw, before normalize).

  Reads config.{seed, task_lr_multipliers, grad_accum_steps, xla_compiler_options}. `on_compiled(name, step)` is
  called after each task (logging).
  """
  mults = _to_dict(config.get("task_lr_multipliers"))
  options = _to_dict(config.get("xla_compiler_options")) or None
  accum = int(config.get("grad_accum_steps", 1))
  out = {}
  for index, task in enumerate(method.tasks):
    fn = make_step_fn(method, task, index, optimizer, normalizers.get(task.name), config.seed,
                      float(mults.get(task.name, 1.0)), accum)
    t0 = time.perf_counter()
    compiled = compile_step(fn, state_layout, dict(batches[task.name]), mesh, options)
    out[task.name] = CompiledStep(compiled, time.perf_counter() - t0, memory_summary(compiled))
    if on_compiled is not None:
      on_compiled(task.name, out[task.name])
  return out


def _to_dict(x) -> dict:
  if x is None:
    return {}
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)
