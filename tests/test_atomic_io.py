"""mmrs.atomic_io: the one writer every result, manifest, card and picture goes through."""

import json
import os

import numpy as np
import pytest

from mmrs import atomic_io


def test_json_layout_and_no_temporaries_left(tmp_path):
  path = tmp_path / "new_dir" / "result.json"
  assert atomic_io.write_json(path, {"b": 1, "a": [1.5]}) == str(path)
  assert path.read_text() == '{\n "a": [\n  1.5\n ],\n "b": 1\n}\n'
  atomic_io.write_text(str(path), "second")
  assert path.read_text() == "second"
  assert os.listdir(path.parent) == ["result.json"]


def test_a_failed_write_keeps_the_previous_file(tmp_path):
  path = tmp_path / "state.json"
  atomic_io.write_json(path, {"step": 1})
  with pytest.raises(ValueError):  # strict JSON refuses NaN before anything is renamed
    atomic_io.write_json(path, {"step": float("nan")}, allow_nan=False)

  def half_then_crash(tmp):
    with open(tmp, "w") as f:
      f.write('{"step": 2')
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    atomic_io.write_with(path, half_then_crash)
  assert json.loads(path.read_text()) == {"step": 1}
  assert os.listdir(tmp_path) == ["state.json"]


def test_write_with_keeps_the_extension_and_the_umask_mode(tmp_path):
  seen = []

  def save(tmp):
    seen.append(tmp)
    with open(tmp, "wb") as f:
      f.write(b"\x89PNG")

  old = os.umask(0o022)
  try:
    out = atomic_io.write_with(tmp_path / "picture.png", save)
  finally:
    os.umask(old)
  assert seen[0].endswith(".png") and seen[0] != out  # matplotlib/PIL pick the format from the name
  assert open(out, "rb").read() == b"\x89PNG"
  assert os.stat(out).st_mode & 0o777 == 0o644  # not mkstemp's 0600: others can read a shared run's outputs


def test_a_writer_that_creates_its_file_0600_still_gives_the_umask_mode(tmp_path):
  from safetensors.numpy import save_file  # creates its file 0600 (exported encoders were unreadable to others)
  old = os.umask(0o022)
  try:
    out = atomic_io.write_with(tmp_path / "model.safetensors", lambda tmp: save_file({"w": np.zeros(2)}, tmp))
  finally:
    os.umask(old)
  assert os.stat(out).st_mode & 0o777 == 0o644

# An object-store target (saved locally, then uploaded): tests/test_gcs_outputs.py, against the GCS emulator.
