"""One compiled train step per task: normalize on device, loss + grads of the task's groups, update, EMA hook.

A step never writes a non-finite state: if the loss, the gradient norm or the updated params are NaN/inf, the state
passes through unchanged and `metrics["finite"]` is False (the loop then stops or skips, as configured). The RNG of a
step is `fold_in(fold_in(key(seed), step), task_index)`, so a step is reproducible from the step number alone.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import linen as nn
import optax

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


def make_step_fn(method, task, task_index: int, optimizer: optimizers.Optimizer,
                 normalize: Callable | None, seed: int, lr_multiplier: float = 1.0):
  """(state, batch, step) -> (state, metrics). `batch` is the raw global batch; `step` an int32 scalar."""
  active = active_groups(task, optimizer.groups)

  def step_fn(state, batch, step):
    TRACE_COUNTS[task.name] += 1
    if normalize is not None:
      batch = normalize(batch)
    rng = step_rng(seed, step, task_index)
    params = state["params"]
    trained = {g: params[g] for g in active}

    def loss_of(trained):  # differentiates the task's groups only; the others enter as constants
      full = {g: trained[g] if g in trained else params[g] for g in params}
      return task.loss_fn(full, state["method_state"], batch, rng, True)

    (loss, (metrics, method_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(trained)
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
  with nn.logical_axis_rules(mesh_lib.ACTIVATION_RULES):  # activation constraints: batch over (data, fsdp)
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
  if not any(out.values()):  # the CPU backend reports zeros
    return {}
  if out:
    out["total_mib"] = (out.get("argument_mib", 0) + out.get("output_mib", 0) - out.get("alias_mib", 0)
                        + out.get("temp_mib", 0))
  return out


def abstract_batch(local_batch: dict[str, Any], global_batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((global_batch_size,) + tuple(v.shape[1:]), v.dtype) for k, v in local_batch.items()}

