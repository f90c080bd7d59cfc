"""mesh.device_grid: jax's TPU mesh builder where it works, a logged fallback where it refuses valid device sets
(per-TensorCore v4 devices of libtpu's compile-only topology; an fsdp size that splits a torus axis). Fake device
objects stand in for TPU devices, so no libtpu is needed (except the libtpu test at the end)."""
import dataclasses
import itertools
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from jax.experimental import mesh_utils

from mmrs.train import aot
from mmrs.train import mesh as mesh_lib


@dataclasses.dataclass(frozen=True, eq=False)
class FakeTpu:
  id: int
  coords: tuple
  core_on_chip: int
  device_kind: str
  platform: str = "tpu"
  process_index: int = 0
  slice_index: int = 0


def _torus(dims, cores, kind):
  """Devices in libtpu's order (x fastest, cores of a chip adjacent), ids in that order."""
  out = []
  for z, y, x in itertools.product(*(range(d) for d in reversed(dims))):
    for c in range(cores):
      out.append(FakeTpu(len(out), (x, y, z), c, kind))
  return out


def _messages(caplog):
  return " ".join(r.getMessage() for r in caplog.records)


def test_megacore_devices_keep_jax_builder(caplog):
  devices = _torus((2, 2, 2), 1, "TPU v4")  # a real v4-16 slice: one device per chip
  with caplog.at_level(logging.INFO):
    grid = mesh_lib.device_grid((4, 2), devices)
  expected = mesh_utils.create_device_mesh((4, 2), devices)
  assert [d.id for d in grid.flat] == [d.id for d in expected.flat]
  assert "builder" in _messages(caplog) and not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_per_core_v4_devices_fall_back_to_physical_order(caplog):
  devices = _torus((2, 2, 2), 2, "TPU v4")  # libtpu's compile-only v4:2x2x2: one device per TensorCore
  with pytest.raises(AssertionError, match="megacore"):
    mesh_utils.create_device_mesh((8, 2), devices)  # what jax.make_mesh used to hit
  shuffled = devices[::-1]
  with caplog.at_level(logging.INFO):
    grid = mesh_lib.device_grid((8, 2), shuffled)
  assert grid.shape == (8, 2) and sorted(d.id for d in grid.flat) == list(range(16))
  for row in grid:  # the fsdp axis holds the two cores of one chip
    assert row[0].coords == row[1].coords and {d.core_on_chip for d in row} == {0, 1}
  assert [tuple(r[0].coords) for r in grid[:2]] == [(0, 0, 0), (1, 0, 0)]  # then neighbours along x
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and "physical order" in warnings[0] and "megacore" in warnings[0]


def test_axis_that_splits_the_torus_uses_allow_split_physical_axes(caplog):
  devices = _torus((4, 4, 4), 1, "TPU v5")  # v5p-128; fsdp=8 is no product of whole torus axes
  with pytest.raises(NotImplementedError):
    mesh_utils.create_device_mesh((8, 8), devices)
  with caplog.at_level(logging.INFO):
    grid = mesh_lib.device_grid((8, 8), devices)
  expected = mesh_utils.create_device_mesh((8, 8), devices, allow_split_physical_axes=True)
  assert [d.id for d in grid.flat] == [d.id for d in expected.flat]
  assert "allow_split_physical_axes=True" in _messages(caplog)


def test_non_tpu_errors_are_not_swallowed():
  devices = [FakeTpu(i, (0, 0, 0), 0, "cpu", platform="cpu") for i in range(4)]
  with pytest.raises(ValueError):
    mesh_lib.device_grid((3, 1), devices)


def test_libtpu_v4_devices_and_memory():
  """libtpu's compile-only v4 devices, in a subprocess with <venv>/aot-targets/tpu on its path as launch.aot has it
  (.ci/run installs it; skips without it, fails under CI=true)."""
  where = pathlib.Path(sys.prefix) / "aot-targets" / "tpu"
  if not where.is_dir():
    msg = f"{where} is missing: pip install --no-deps --target {where} -r requirements-tpu-aot.txt (.ci/run does)"
    if os.environ.get("CI") == "true":
      pytest.fail(msg)
    pytest.skip(msg)
  code = f"""
import os, sys
os.environ.update(JAX_PLATFORMS="cpu", TPU_ACCELERATOR_TYPE="v5p-8", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
sys.path.append({str(where)!r})
from mmrs.train import aot, mesh as mesh_lib
cloud = aot.topology_devices("v4-32")  # megacore, as a real v4-32 slice: 16 chips of 32 GiB
assert len(cloud) == 16 and {{d.core_on_chip for d in cloud}} == {{0}}, cloud
assert aot.device_memory(cloud, None)[0] == 32 * 2**30
raw = aot.topology_devices("v4:2x2x1")  # libtpu's default: one device per TensorCore, half the HBM each
assert len(raw) == 8 and aot.device_memory(raw, None)[0] == 16 * 2**30
assert dict(mesh_lib.make_mesh("data=-1,fsdp=2", raw).shape) == {{"data": 4, "fsdp": 2}}
print("ok")
"""
  out = subprocess.run([sys.executable, "-c", code], cwd=pathlib.Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
