"""Restore robustness on a local folder: a transient read error is retried and nothing is moved; a really truncated
checkpoint is moved aside and the previous one is used; a read error that persists is not taken for damage; the
exception chain decides (not the outer message); a refused access, an unknown error and a second damaged step move
nothing; flipped array bytes are caught by the value fingerprints. tests/test_gcs.py has the same faults on gs://."""
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import checkpoint_chunks
import train_toy_method as toy
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import loop

# A failed Orbax restore leaves a tensorstore callback aimed at its closed asyncio loop; Python reports it at garbage
# collection ("Event loop is closed"). Not what these tests check.
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


def _train(workdir, total_steps):
  config = toy.get_config()
  config.total_steps, config.checkpoint_every_steps, config.mesh = total_steps, 2, "data=1"
  config.toy.tasks = "cross"
  config.model.width = 32  # 32x32 kernels (4 KiB): above Orbax's 1 KiB inline limit, outside the CRC'd b-tree
  return loop.train(config, str(workdir), method=toy.build(config), task_data=toy.fake_data,
                    devices=jax.devices()[:1])


def _entries(workdir):
  return sorted(p.name for p in (pathlib.Path(workdir) / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A run with checkpoints 2 and 4."""
  workdir = tmp_path_factory.mktemp("trained") / "w"
  _train(workdir, 4)
  assert [e for e in _entries(workdir) if e.isdigit()] == ["2", "4"]
  return workdir


@pytest.fixture
def copy(trained, tmp_path, monkeypatch):
  import shutil  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ckpt_lib, "RESTORE_BACKOFF_S", 0.01)
  workdir = tmp_path / "w"
  shutil.copytree(trained, workdir)
  return workdir


def _fail_state_restores(monkeypatch, error, times):
  """Makes CheckpointManager.restore of the train state raise `error` the first `times` calls."""
  real = ocp.CheckpointManager.restore
  calls = {"n": 0}

  def restore(self, step, *args, **kwargs):
    composite = kwargs.get("args")
    if composite is not None and "state" in composite and calls["n"] < times:
      calls["n"] += 1
      raise error
    return real(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  return calls


def test_transient_error_is_retried_and_nothing_moves(copy, monkeypatch):
  before = _entries(copy)
  calls = _fail_state_restores(monkeypatch, ValueError("UNAVAILABLE: GCS read: Connection reset by peer"), times=1)
  summary = _train(copy, 6)
  assert calls["n"] == 1 and summary["step"] == 6
  assert not any(e.startswith("corrupt_step_") for e in _entries(copy))
  assert set(before) <= set(_entries(copy))  # 2 and 4 still there (plus 6)


def test_persistent_outage_stops_without_moving_anything(copy, monkeypatch):
  before = _entries(copy)
  _fail_state_restores(monkeypatch, TimeoutError("read timed out"), times=100)
  with pytest.raises(ckpt_lib.CheckpointUnavailable, match=r"step 4 .* not proven damaged, so nothing was moved"):
    _train(copy, 6)
  assert _entries(copy) == before


def test_truncated_checkpoint_is_quarantined_and_the_previous_one_used(copy):
  files = [p for p in (copy / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and p.stat().st_size > 64
           and "metadata" not in p.name]
  assert files
  for p in files:  # a save cut short by a dying disk / a partial copy: every data file loses its second half
    p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
  summary = _train(copy, 6)
  assert summary["step"] == 6
  entries = _entries(copy)
  assert any(e.startswith("corrupt_step_4_") for e in entries) and "2" in entries
  assert "4" in entries  # step 4 was trained again from 2 and saved anew


# ---------------------------------------------------------------------------------------------------------------
# Restore semantics that never lose progress (the exception chain decides; only proven damage moves one step).


def _chained(outer_text, cause):
  """What Orbax raises on a read failure: a bare Exception whose status is only in __cause__."""
  try:
    raise Exception(outer_text) from cause  # pylint: disable=broad-exception-raised
  except Exception as e:  # pylint: disable=broad-except
    return e


def _not_moved(workdir, before):
  entries = _entries(workdir)
  assert not any(e.startswith(("corrupt_step_", "unrestorable_step_")) for e in entries), entries
  assert entries == before


def test_outage_inside_orbax_s_bare_exception_is_not_damage(copy, monkeypatch):
  """A 503 beyond tensorstore's retries: the status is only in __cause__ (the old code read the outer text, judged
  it damage, moved steps 4 and 2 aside and started over)."""
  before = _entries(copy)
  error = _chained("Encountered error while reading array index (0,) ...", ValueError(
      "ABORTED: Error reading \"params/x\": All 2 retry attempts failed [http_response_code='503']"))
  _fail_state_restores(monkeypatch, error, times=100)
  with pytest.raises(ckpt_lib.CheckpointUnavailable, match=r"step 4 .* nothing was moved"):
    _train(copy, 6)
  _not_moved(copy, before)


def test_permission_denied_is_one_error_and_nothing_moves(copy, monkeypatch):
  before = _entries(copy)
  calls = _fail_state_restores(monkeypatch, PermissionError(13, "Permission denied", "state/manifest.ocdbt"),
                               times=100)
  with pytest.raises(ckpt_lib.CheckpointAccessDenied, match=r"Access to checkpoint step 4 in .*checkpoints was "
                     r"refused .*nothing was moved\. Check that the bucket exists"):
    _train(copy, 6)
  assert calls["n"] == 1  # a refusal is not retried
  _not_moved(copy, before)


def test_unknown_error_refuses_to_start_over_unless_asked(copy, monkeypatch):
  """A host's MemoryError says nothing about the files: nothing moves and the run does not silently restart at 0."""
  before = _entries(copy)
  _fail_state_restores(monkeypatch, MemoryError(), times=100)
  with pytest.raises(ckpt_lib.NoRestorableCheckpoint, match=r"none restores: step 4: not restorable and not proven "
                     r"damaged \(MemoryError\).*--allow_fresh_start"):
    _train(copy, 6)
  _not_moved(copy, before)


def test_allow_fresh_start_sets_unrestorable_steps_aside_and_starts_at_0(copy, monkeypatch):
  _fail_state_restores(monkeypatch, MemoryError(), times=3 * ckpt_lib.RESTORE_TRIES)
  config = toy.get_config()
  config.total_steps, config.checkpoint_every_steps, config.mesh, config.toy.tasks = 2, 2, "data=1", "cross"
  config.model.width = 32
  summary = loop.train(config, str(copy), method=toy.build(config), task_data=toy.fake_data,
                       devices=jax.devices()[:1], allow_fresh_start=True)
  assert summary["step"] == 2
  entries = _entries(copy)
  assert sorted(e.split("_")[2] for e in entries if e.startswith("unrestorable_step_")) == ["2", "4"]
  assert "2" in entries  # the new run's own checkpoint


def _flip_array_bytes(step_dir):
  """Flips one bit in the middle of the step's largest parameter chunk (what a bad disk, cable or copy does): zstd
  still decodes it, to one changed weight."""
  key, name, offset, length = [c for c in checkpoint_chunks.array_chunks(step_dir / "state")
                               if c[0].startswith("params.")][0]
  path = step_dir / "state" / name
  data = bytearray(path.read_bytes())
  data[offset + length // 2] ^= 0x01
  path.write_bytes(bytes(data))
  return key


def test_flipped_array_bytes_are_caught_by_the_value_fingerprints(copy, caplog):
  """tensorstore does not checksum array chunks: the old code resumed from step 4's wrong values silently."""
  _flip_array_bytes(copy / "checkpoints" / "4")
  summary = _train(copy, 6)
  assert "differ from those saved (value fingerprints)" in caplog.text
  assert summary["step"] == 6
  entries = _entries(copy)
  assert any(e.startswith("corrupt_step_4_") for e in entries) and "2" in entries


def test_two_damaged_steps_move_one_aside_and_refuse(copy):
  for step in ("4", "2"):
    _flip_array_bytes(copy / "checkpoints" / step)
  with pytest.raises(ckpt_lib.NoRestorableCheckpoint, match=r"step 4: damaged, moved aside to corrupt_step_4_\d+ "
                     r".*; step 2: damaged, left in place"):
    _train(copy, 6)
  entries = _entries(copy)
  assert "2" in entries and sum(e.startswith("corrupt_step_") for e in entries) == 1


def test_unreadable_meta_never_changes_the_lr_schedule(copy, trained):
  """Step 4's meta is cut short (damage): it is moved aside, step 2 restores, and the schedule keeps the first
  run's length (4) although config.total_steps is now 6 (the old code fell back to 6: another lr at step 4)."""
  meta = copy / "checkpoints" / "4" / "meta" / "metadata"
  meta.write_text(meta.read_text()[:20])
  _train(copy, 6)
  lr = lambda w: {r["step"]: r["lr"] for r in map(json.loads, (w / "metrics.jsonl").read_text().splitlines())
                  if "lr" in r}
  assert any(e.startswith("corrupt_step_4_") for e in _entries(copy))
  assert lr(copy)[4] == pytest.approx(lr(trained)[4], rel=1e-6)  # step 3 is the first after warmup: same on both


_OBSERVED = [  # (what each storage fault raised on the local GCS emulator, kind); the status is in the cause
    (ValueError("ABORTED: Error reading \"a/0\": All 2 retry attempts failed [http_response_code='503']"), "transient"),
    (ValueError("ABORTED: All 32 retry attempts failed: The object exceeded the rate limit"), "transient"),
    (ValueError("ABORTED: ... CURL error Transferred a partial file [curl_code='18']"), "transient"),
    (ValueError("PERMISSION_DENIED: Error reading ... caller does not have storage.objects.get access"), "access"),
    (ValueError("NOT_FOUND: Error opening \"cast\" driver ..."), "access"),
    (ValueError("DATA_LOSS: Error decoding manifest: CRC-32C checksum verification failed"), "damage"),
    (ValueError("OUT_OF_RANGE: Requested byte range [0, 284) was not satisfied"), "damage"),
    (ValueError("FAILED_PRECONDITION: Truncated Zstd-compressed stream; at byte 0"), "damage"),
    (json.JSONDecodeError("Unterminated string", "{\"a", 1), "damage"),
    (OSError("Forbidden: http://127.0.0.1/download/storage/v1/b/bucket/o/x?alt=media\ncaller does not have"),
     "access"),
    (PermissionError(13, "Permission denied"), "access"),
    (ConnectionResetError(), "transient"),
    (MemoryError(), "unknown"),
    (TypeError("unexpected keyword argument 'sharding'"), "unknown"),
    (ckpt_lib.errors.CheckpointDamage("values differ"), "damage"),
]


@pytest.mark.parametrize("cause,kind", _OBSERVED, ids=[f"{type(c).__name__}-{k}" for c, k in _OBSERVED])
def test_classification_walks_the_chain(cause, kind):
  assert ckpt_lib.errors.classify(cause) == kind
  wrapped = _chained("Encountered error while reading array index (0,): see above", cause)
  assert ckpt_lib.errors.classify(wrapped) == kind
  assert ckpt_lib.errors.describe(wrapped).startswith("Exception: Encountered error")


def test_gcsfs_http_errors_by_code():
  gcsfs_retry = pytest.importorskip("gcsfs.retry")
  kinds = {code: ckpt_lib.errors.classify(_chained("read failed", gcsfs_retry.HttpError({"code": code,
                                                                                          "message": "x"})))
           for code in (401, 403, 429, 503, 400)}
  assert kinds == {401: "access", 403: "access", 429: "transient", 503: "transient", 400: "unknown"}
