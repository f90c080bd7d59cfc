"""The train state (params, per-group optimizer state, method state) and its sharded initialization.

The state is a plain dict `{"params", "opt_state", "method_state"}`; the step count lives on the host (it is in the
checkpoint's metadata), so the device state holds arrays only. Initialization never materializes an unsharded
copy: shapes come from `jax.eval_shape`, shardings from mesh.py's rules, and `jit(out_shardings=...)` creates each
shard where it lives.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from mmrs.train import mesh as mesh_lib
from mmrs.train import optimizers

INIT_BATCH = 2  # parameter shapes do not depend on the batch size; keep the init graph small


@dataclasses.dataclass
class StateLayout:
  """What a run needs to know about its state before (or instead of) creating it."""
  abstract: Any  # tree of jax.ShapeDtypeStruct with shardings (a restore target)
  shardings: Any  # tree of NamedSharding
  specs: Any  # tree of PartitionSpec


def example_batch(batches: Mapping[str, Mapping[str, Any]]) -> dict[str, jax.ShapeDtypeStruct]:
  """Union over tasks of (normalized) batch shapes, with a small leading dim: what `method.init` sees."""
  out = {}
  for batch in batches.values():
    for k, v in batch.items():
      out.setdefault(k, jax.ShapeDtypeStruct((INIT_BATCH,) + tuple(v.shape[1:]), v.dtype))
  return out


def _zeros(shapes):
  return {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}


def param_groups(method, example: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[str, ...]:
  params, _ = jax.eval_shape(lambda r: method.init(r, _zeros(example)), jax.random.key(0))
  if not isinstance(params, Mapping) or not params:
    raise TypeError(f"Method {getattr(method, 'name', method)!r}: init must return params as a non-empty dict whose "
                    "top-level keys are optimizer groups (e.g. 'encoder', 'decoder_s2').")
  return tuple(params)


def _boxed_init(method, optimizer: optimizers.Optimizer, example):
  def init(rng):
    params, method_state = method.init(rng, _zeros(example))
    return {"params": params, "opt_state": optimizer.init(mesh_lib.unbox(params)),
            "method_state": method_state if method_state is not None else {}}
  return init


def layout(method, optimizer: optimizers.Optimizer, example, mesh: jax.sharding.Mesh, fsdp_min_size: int
           ) -> StateLayout:
  boxed = jax.eval_shape(_boxed_init(method, optimizer, example), jax.random.key(0))
  shapes = mesh_lib.unbox(boxed)
  param_specs = mesh_lib.tree_specs(boxed["params"], mesh, fsdp_min_size)
  opt_specs = {g: mesh_lib.follower_specs(shapes["opt_state"][g], param_specs[g], shapes["params"][g], mesh,
                                          fsdp_min_size) for g in shapes["opt_state"]}
  if _has_boxes(boxed["method_state"]):
    ms_specs = mesh_lib.tree_specs(boxed["method_state"], mesh, fsdp_min_size)
  else:  # e.g. an EMA copy of the params: follow the params' layout
    ms_specs = mesh_lib.follower_specs(shapes["method_state"], param_specs, shapes["params"], mesh, fsdp_min_size)
  specs = {"params": param_specs, "opt_state": opt_specs, "method_state": ms_specs}
  shardings = mesh_lib.to_shardings(specs, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  return StateLayout(abstract=abstract, shardings=shardings, specs=specs)


def _has_boxes(tree) -> bool:
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return any(is_box(x) for x in jax.tree.leaves(tree, is_leaf=is_box))


def create(method, optimizer: optimizers.Optimizer, example, state_layout: StateLayout, rng: jax.Array,
           compiler_options: dict | None = None):
  """Initializes the state directly into its shardings."""
  init = _boxed_init(method, optimizer, example)
  lowered = jax.jit(lambda r: mesh_lib.unbox(init(r)), out_shardings=state_layout.shardings).lower(rng)
  return lowered.compile(compiler_options=compiler_options or None)(rng)


def count_params(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
