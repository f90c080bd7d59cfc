"""The device mesh and the sharding rules: batch over ("data", "fsdp"), large params split over "fsdp".

`config.mesh` is a string such as "data=-1,fsdp=1" (-1 takes the remaining devices). The batch is split over both
axes (pure data parallelism when fsdp=1; ZeRO-3 style FSDP when fsdp>1). A parameter is split over "fsdp" along one
of its logical "embed"/"mlp" dimensions when it has at least `fsdp_min_size` elements and the dimension divides by
the fsdp axis size; everything else is replicated. The leading "layers" axis of scanned block params
(config.model.scan_layers) is never a candidate: each scan iteration needs its whole layer. Unannotated leaves
(plain arrays, optimizer statistics that do not mirror a param) fall back to "the largest divisible dimension" with the same size threshold.

Activations: the train step is traced under `ACTIVATION_RULES`, so the models' `nn.with_logical_constraint` calls
keep the "batch" dimension split over ("data", "fsdp"); every other logical activation axis is replicated and XLA's
propagation does the rest. (Models must not use flax's `DenseGeneral` with multi-dimensional logically-boxed kernels:
under rules it constrains the kernel before reshaping it, which fails; vit.py uses its own projection for that.)
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")
# flax logical-axis rules active while the train step is traced (activation sharding constraints).
ACTIVATION_RULES = (("batch", BATCH_AXES),)
# Logical parameter axes that may be split over "fsdp" (the big matmul dims of a ViT / MLP).
FSDP_LOGICAL_AXES = ("embed", "mlp")
# Device kinds for which jax.make_mesh itself passes allow_split_physical_axes=True (jax/_src/sharding_impls.py).
_SPLIT_BY_DEFAULT = ("TPU v5 lite", "TPU v5e")


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
  """'data=-1,fsdp=2' -> {'data': n/2, 'fsdp': 2}; errors name `config.mesh`."""
  sizes: dict[str, int] = {}
  for part in spec.replace(" ", "").split(","):
    if not part:
      continue
    name, _, value = part.partition("=")
    if name not in MESH_AXES:
      raise ValueError(f"config.mesh={spec!r}: unknown axis {name!r}; the mesh axes are {MESH_AXES} "
                       "(e.g. 'data=-1,fsdp=1').")
    if name in sizes:
      raise ValueError(f"config.mesh={spec!r}: axis {name!r} is given twice.")
    try:
      sizes[name] = int(value)
    except ValueError:
      raise ValueError(f"config.mesh={spec!r}: {part!r} must be axis=integer.") from None
  for name in MESH_AXES:
    sizes.setdefault(name, 1)
  fills = [n for n, s in sizes.items() if s == -1]
  if len(fills) > 1:
    raise ValueError(f"config.mesh={spec!r}: only one axis may be -1.")
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh={spec!r}: axis sizes must be positive (or -1 for the rest).")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fills:
    if num_devices % fixed:
      raise ValueError(f"config.mesh={spec!r}: {num_devices} devices do not divide by the fixed axes' product "
                       f"{fixed}.")
    sizes[fills[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh={spec!r} needs {math.prod(sizes.values())} devices but {num_devices} are "
                     "available; use -1 for one axis to fill the rest.")
  return {n: sizes[n] for n in MESH_AXES}


def make_mesh(spec: str, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  devices = list(devices) if devices is not None else jax.devices()
  sizes = parse_mesh_spec(spec, len(devices))
  grid = device_grid(tuple(sizes.values()), devices)
  return jax.sharding.Mesh(grid, tuple(sizes), axis_types=(jax.sharding.AxisType.Auto,) * len(sizes))


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """The devices arranged as `shape` (axes in MESH_AXES order, the last the most communication-heavy).

  First jax's own builder, exactly as `jax.make_mesh` calls it (unchanged wherever it works: CPU, GPU, megacore v4,
  v5p, v5e). jax's TPU builder refuses two kinds of device sets that are still valid meshes:
  - an axis size that is no product of whole torus axes (e.g. fsdp=8 on v5p-128's 4x4x4 chips): retried with
    `allow_split_physical_axes=True`, which splits a torus axis between two mesh axes;
  - one device per TensorCore on a v4/v5p chip (libtpu's compile-only `v4:AxBxC` topology, or a v4 job run without
    megacore): `_get_physical_tpu_mesh` asserts one device per chip. Then the devices are ordered by physical position
    (slice, z, y, x, core) and reshaped, so the last mesh axis ("fsdp") groups the cores of a chip and then
    neighbouring chips along x.
  The path taken is logged (info for the builder, warning for a fallback, with jax's reason).
  """
  shape = tuple(int(s) for s in shape)
  devices = list(devices)
  split = devices[0].device_kind in _SPLIT_BY_DEFAULT
  try:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
    logging.info("Mesh %s over %d x %s: jax's device-mesh builder.", shape, len(devices), devices[0].device_kind)
    return grid
  except (AssertionError, ValueError, NotImplementedError) as e:
    if devices[0].platform != "tpu":
      raise
    first = e
  if not split:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      logging.warning("Mesh %s over %d x %s: jax's builder refused whole torus axes (%s); using it with "
                      "allow_split_physical_axes=True.", shape, len(devices), devices[0].device_kind,
                      _first_line(first))
      return grid
    except (AssertionError, ValueError, NotImplementedError) as e:
      first = e
  grid = np.asarray(sorted(devices, key=physical_order), dtype=object).reshape(shape)
  logging.warning("Mesh %s over %d x %s: jax's TPU builder refused these devices (%s); using the devices in "
                  "physical order (slice, z, y, x, core) reshaped.", shape, len(devices), devices[0].device_kind,
                  _first_line(first))
  return grid


def physical_order(device: Any) -> tuple[int, ...]:
  """Sort key: slice, then torus coordinates z, y, x, then the core on the chip (devices without coords: id)."""
  coords = tuple(getattr(device, "coords", ()) or ())
  return (int(getattr(device, "slice_index", 0) or 0), *reversed(coords), int(getattr(device, "core_on_chip", 0)),
          int(device.id))


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every data-parallel axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def logical_axes(tree: Any) -> Any:
  """Tree of logical axis-name tuples (None where a leaf is not a flax `Partitioned` box)."""
  def names(x):
    return tuple(x.names) if isinstance(x, nn.Partitioned) else None
  return jax.tree.map(names, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def unbox(tree: Any) -> Any:
  """Removes flax partitioning boxes without adding sharding constraints (placement comes from out_shardings)."""
  def value(x):
    return x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x
  return jax.tree.map(value, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_spec(shape: Sequence[int], names: Sequence[str | None] | None, fsdp_size: int, min_size: int) -> P:
  """The PartitionSpec of one parameter (see the module docstring for the rule)."""
  if fsdp_size <= 1 or not shape or math.prod(shape) < min_size:
    return P()
  if names is not None and len(names) == len(shape):
    candidates = [i for i, n in enumerate(names) if n in FSDP_LOGICAL_AXES]
  else:
    candidates = list(range(len(shape)))
  candidates = [i for i in candidates if shape[i] % fsdp_size == 0]
  if not candidates:
    return P()
  dim = max(candidates, key=lambda i: (shape[i], -i))  # the largest; the first on ties
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return _spec(spec)


def tree_specs(abstract: Any, mesh: jax.sharding.Mesh, min_size: int) -> Any:
  """PartitionSpecs for a (possibly boxed) abstract tree; boxes give logical names."""
  fsdp = mesh.shape["fsdp"]
  names = logical_axes(abstract)
  shapes = unbox(abstract)
  return jax.tree.map(lambda s, n: param_spec(s.shape, n, fsdp, min_size), shapes, names)


def _key_names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
  return tuple(out)


def follower_specs(tree: Any, leader_specs: Any, leader_shapes: Any, mesh: jax.sharding.Mesh, min_size: int) -> Any:
  """Specs for trees whose leaves mirror a leader tree (optimizer moments, EMA targets).

  A leaf whose key path ends with a leader leaf's path gets that leaf's spec when the shapes match, or the spec with
  one dimension dropped when it is a reduced copy (Adafactor's factored row/column statistics); other leaves use the
  shape fallback.
  """
  leaders = {}
  for path, spec in jax.tree_util.tree_flatten_with_path(leader_specs, is_leaf=lambda x: isinstance(x, P))[0]:
    leaders[_key_names(path)] = spec
  shapes = {_key_names(p): tuple(s.shape) for p, s in jax.tree_util.tree_flatten_with_path(leader_shapes)[0]}
  fsdp = mesh.shape["fsdp"]

  def spec_for(path, leaf):
    shape = tuple(np.shape(leaf))
    keys = _key_names(path)
    for start in range(len(keys)):
      suffix = keys[start:]
      if suffix in leaders:
        lshape, lspec = shapes[suffix], tuple(leaders[suffix]) + (None,) * (len(shapes[suffix]) - len(leaders[suffix]))
        if shape == lshape:
          return _spec(lspec)
        for d in range(len(lshape)):  # a reduced copy: drop one dimension
          if shape == lshape[:d] + lshape[d + 1:]:
            return _spec(lspec[:d] + lspec[d + 1:])
        break
    return param_spec(shape, None, fsdp, min_size)

  return jax.tree_util.tree_map_with_path(spec_for, tree)


def _spec(axes: Sequence[str | None]) -> P:
  """PartitionSpec without trailing Nones (P(None) and P() mean the same; keep one spelling)."""
  axes = list(axes)
  while axes and axes[-1] is None:
    axes.pop()
  return P(*axes)


def to_shardings(specs: Any, mesh: jax.sharding.Mesh) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
