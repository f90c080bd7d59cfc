"""What a finetune run and the encoder tools write, on gs:// (the local GCS emulator, tests/gcs_emulator.py):
results.json / results.md / validation.json / the best state of a finetune run whose workdir is gs://bucket/ft; a
converted encoder saved to and loaded from the bucket (init_from=gs://...); launch.export's hf and timm exports
written to the bucket, the same as what the same export writes to a local folder. Nothing may land in a local folder
named "gs:" (what os.makedirs makes of a gs:// URL).
"""
import json
import os

import numpy as np
import pytest

import mmrs.finetune
import test_finetune_validation as ftv
import tiny_encoder
from gcs_emulator import gcs, gcs_session  # pylint: disable=unused-import  (fixtures)
from mmrs import atomic_io
from mmrs import bands as B
from mmrs.finetune import convert, export, method, report, validation


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
  """Runs the test in tmp_path, so a gs:// URL taken for a local path shows up as tmp_path/gs:."""
  monkeypatch.chdir(tmp_path)
  yield tmp_path
  assert not (tmp_path / "gs:").exists(), "a gs:// path was written as a local folder"


def _fs():
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs")


def test_finetune_results_and_best_state_on_the_bucket(gcs, in_tmp):
  """EuroSAT tiny on synthetic data, 2 steps with a validation at step 2, workdir on gs://."""
  shards = ftv._shards(in_tmp / "data", n_val=4)  # pylint: disable=protected-access
  config = ftv._config(shards, 2)  # pylint: disable=protected-access
  result = mmrs.finetune.run(config, "gs://bucket/ft")["eval"]
  objects = gcs.objects("ft/")
  assert {"ft/results.json", "ft/results.md", f"ft/{validation.STATE_FILE}", "ft/config.json"} <= set(objects)
  assert any(o.startswith(f"ft/{validation.BEST_DIR}/2/") for o in objects)
  saved = report.read("gs://bucket/ft")
  assert saved["selected_step"] == 2 and saved["metrics"] == result["metrics"]
  assert "Selected step 2" in _fs().cat("bucket/ft/results.md").decode()


def _encoder(path):
  variables, meta = convert.convert({"encoder": tiny_encoder.vit_params()}, {},
                                    trained_bands={"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS},
                                    normalization=tiny_encoder.NORM, modalities="s1,s2", image_size=8)
  convert.save(path, variables, meta)
  return variables, meta


def test_converted_encoder_on_the_bucket_loads_and_is_found_by_init_from(gcs, in_tmp):
  variables, meta = _encoder("gs://bucket/enc")
  assert gcs.objects("enc/") == sorted(f"enc/{n}" for n in (convert.WEIGHTS_FILE, convert.META_FILE))
  got, got_meta = convert.load("gs://bucket/enc")
  assert got_meta == json.loads(json.dumps(meta))
  flat, want = convert.flatten(got), convert.flatten(variables)
  assert set(flat) == set(want) and all(np.array_equal(flat[k], want[k]) for k in want)
  assert method.encoder_meta({"init_from": "gs://bucket/enc"}) == got_meta
  with pytest.raises(FileNotFoundError, match=r"init_from='gs://bucket/none' has no encoder.json"):
    method.encoder_meta({"init_from": "gs://bucket/none"})
  with pytest.raises(FileNotFoundError, match=r"gs://bucket/none is not a converted encoder"):
    convert.load("gs://bucket/none")


def _same(a: bytes, b: bytes) -> bool:
  """Equal files; for safetensors, equal header JSON and data (safetensors writes its metadata map in a random
  order: two saves of the same weights differ in bytes)."""
  if a[:1] != b"{" and len(a) > 8 and len(b) > 8:
    split = lambda x: (json.loads(x[8:8 + int.from_bytes(x[:8], "little")]), x[8 + int.from_bytes(x[:8], "little"):])
    try:
      return split(a) == split(b)
    except ValueError:
      pass
  return a == b


@pytest.mark.parametrize("fmt,out", [("hf", "hf"), ("timm", "timm"), ("timm", "timm.safetensors")])
def test_exports_to_the_bucket_equal_local_exports(gcs, in_tmp, fmt, out):
  _encoder(str(in_tmp / "enc"))
  local = export.export(str(in_tmp / "enc"), fmt, str(in_tmp / out))
  remote = export.export(str(in_tmp / "enc"), fmt, f"gs://bucket/{out}")
  assert [os.path.basename(p) for p in remote] == [os.path.basename(p) for p in local]
  for mine, theirs in zip(local, remote):
    assert _same(_fs().cat(theirs[len("gs://"):]), open(mine, "rb").read()), theirs
  assert not [o for o in gcs.objects() if ".tmp" in o]  # the temporaries were renamed into place


def test_library_writers_save_locally_and_upload(gcs, in_tmp):
  """atomic_io.write_with on gs://: the library saves to a local file with the target's extension, which is uploaded
  beside the target and renamed; a save that fails uploads nothing."""
  seen = []

  def save(tmp):
    seen.append(tmp)
    with open(tmp, "wb") as f:
      f.write(b"png bytes")
  assert atomic_io.write_with("gs://bucket/run/picture.png", save) == "gs://bucket/run/picture.png"
  assert "://" not in seen[0] and seen[0].endswith("picture.png") and not os.path.exists(seen[0])
  assert gcs.objects("run/") == ["run/picture.png"] and _fs().cat("bucket/run/picture.png") == b"png bytes"

  def fail(tmp):
    raise OSError("disk full")
  with pytest.raises(OSError, match="disk full"):
    atomic_io.write_with("gs://bucket/run/other.png", fail)
  assert gcs.objects("run/") == ["run/picture.png"]
