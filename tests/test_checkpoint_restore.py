"""Restore robustness: a transient read error is retried and nothing is moved; a really truncated checkpoint is
moved aside and the previous one is used; a read error that persists is not taken for damage."""
import pathlib

import jax
import orbax.checkpoint as ocp
import pytest

import train_toy_method as toy
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import loop


def _train(workdir, total_steps):
  config = toy.get_config()
  config.total_steps, config.checkpoint_every_steps, config.mesh = total_steps, 2, "data=1"
  config.toy.tasks = "cross"
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
