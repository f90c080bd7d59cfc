"""Every entry point answers a user's everyday mistake with one line `ERROR: ...` and exit code 2, no traceback
(launch/cli.py). The console scripts run these same modules as `__main__` (tests/test_package.py runs one).

The commands of a test start together (Popen) so the heavy imports overlap on a 2-core machine."""
import os
import shutil
import subprocess
import sys

import pytest

from sample_data import shards  # noqa: F401  pylint: disable=unused-import  (fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 1800  # not a speed budget: only stops a hung child


def _run_together(commands: dict[str, list[str]], cwd) -> dict[str, subprocess.CompletedProcess]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  procs = {name: subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for name, args in commands.items()}
  out = {}
  for name, p in procs.items():
    try:
      stdout, stderr = p.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
      p.kill()
      pytest.fail(f"{name}: still running after {HANG_GUARD_S} s (hung?)")
    out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
  return out


def _assert_one_error_line(name: str, res: subprocess.CompletedProcess, *needles: str) -> str:
  err = res.stderr
  assert res.returncode == 2 and "Traceback" not in err, f"{name}: exit {res.returncode}\n{err[-3000:]}"
  last = [line for line in err.splitlines() if line.strip()][-1]
  assert last.startswith("ERROR: "), f"{name}: {err[-2000:]}"
  for needle in needles:
    assert needle in last, f"{name}: {needle!r} not in {last!r}"
  return last


def test_launch_main_and_aot_config_override_typo(tmp_path):
  res = _run_together({
      "main": ["launch.main", "--config=configs/mixmae.py:tiny", "--config.batchsize=8", f"--workdir={tmp_path}/w"],
      "aot": ["launch.aot", "--config=configs/mixmae.py:tiny", "--config.model.encoderr=S", "--topology=cpu:1"],
      "main_flag": ["launch.main", "--config=configs/mixmae.py:tiny"],  # --workdir missing (absl alone: exit 1)
  }, REPO)
  _assert_one_error_line("main", res["main"], "--config.batchsize", "no key 'batchsize'",
                         'Did you mean "batch_size"')
  _assert_one_error_line("aot", res["aot"], "--config.model.encoderr", 'Did you mean "encoder"')
  _assert_one_error_line("main_flag", res["main_flag"], "--workdir")
  assert not (tmp_path / "w").exists()


def test_launch_main_missing_or_damaged_inputs(shards, tmp_path):  # noqa: F811
  damaged = tmp_path / "damaged"
  shutil.copytree(shards, damaged)
  shard = sorted(damaged.glob("train.paired-*"))[0]
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # an interrupted copy
  ft = "configs/finetune/bigearthnet.py:tiny"
  res = _run_together({
      "shards": ["launch.main", f"--config={ft},shards={tmp_path}/nowhere", f"--workdir={tmp_path}/ft1"],
      "init_from": ["launch.main", f"--config={ft},shards={shards},init_from={tmp_path}/no_encoder",
                    f"--workdir={tmp_path}/ft2"],
      "damaged": ["launch.main", f"--config=configs/mixmae.py:tiny,shards={damaged}", f"--workdir={tmp_path}/pt"],
  }, REPO)
  _assert_one_error_line("shards", res["shards"], "data.shards=", "does not exist")
  _assert_one_error_line("init_from", res["init_from"], "init_from=", "encoder.json")
  _assert_one_error_line("damaged", res["damaged"], shard.name, "truncated or corrupted")
  for workdir in ("ft1", "ft2", "pt"):  # a run that failed on its input leaves no empty run directory
    assert not (tmp_path / workdir).exists(), workdir


def test_launch_tools_missing_inputs(tmp_path):
  nowhere = str(tmp_path / "nowhere")
  res = _run_together({
      "convert": ["launch.convert_checkpoint", f"--checkpoint={nowhere}", f"--out={tmp_path}/o1", "--image_size=32"],
      "export": ["launch.export", f"--checkpoint={nowhere}", f"--out={tmp_path}/o2"],
      "embed": ["launch.embed", f"--encoder={nowhere}", f"--s2={nowhere}.tif", f"--out={tmp_path}/o3"],
      "robustness": ["launch.robustness", f"--runs={nowhere}", f"--out={tmp_path}/o4"],
  }, tmp_path)
  for name, r in res.items():
    _assert_one_error_line(name, r, nowhere)


def test_data_prep_entry_points_missing_inputs(tmp_path):
  nowhere, out = str(tmp_path / "nowhere"), f"--out={tmp_path}/out"
  commands = {name: [f"data_prep.{name}", f"--src={nowhere}", out]
              for name in ("bigearthnet_mm", "ssl4eo", "sen1floods11", "sen12ms", "eurosat")}
  commands["pair_catalog"] = ["data_prep.pair_catalog", f"--catalog={nowhere}", out]
  commands["inspect"] = ["data_prep.inspect", nowhere]
  commands["tfds"] = ["data_prep.tfds.prepare", "--dataset=no_such_builder", f"--manual_dir={nowhere}",
                      f"--data_dir={tmp_path}/tfds"]
  res = _run_together(commands, tmp_path)
  for name, r in res.items():
    _assert_one_error_line(name, r, "no_such_builder" if name == "tfds" else nowhere)


def test_library_noise_is_dropped_by_default_and_mmrs_lines_kept():
  import logging  # pylint: disable=import-outside-toplevel
  import types  # pylint: disable=import-outside-toplevel
  from launch import cli  # pylint: disable=import-outside-toplevel

  def record(path, level, msg):
    return logging.LogRecord("absl", level, path, 1, msg, None, None)

  noise = cli.LibraryNoise()
  site = "/venv/lib/python3.11/site-packages"
  assert not noise.filter(record(f"{site}/orbax/checkpoint/checkpointer.py", logging.INFO, "Restoring checkpoint"))
  assert not noise.filter(record(f"{site}/jax/_src/xla_bridge.py", logging.INFO, "Unable to initialize backend"))
  assert not noise.filter(record(f"{site}/orbax/checkpoint/_src/metadata/checkpoint.py", logging.WARNING,
                                 "Metadata file does not exist: /w/checkpoints/4/state/_CHECKPOINT_METADATA"))
  assert noise.filter(record(f"{site}/orbax/checkpoint/checkpointer.py", logging.WARNING, "something new"))
  assert noise.filter(record(f"{site}/orbax/checkpoint/checkpointer.py", logging.ERROR, "failed"))
  assert noise.filter(record(f"{REPO}/mmrs/train/loop.py", logging.INFO, "step 10/300 | loss 0.5"))

  seen = []
  hook = cli._drop_closed_loop_reports(seen.append)  # pylint: disable=protected-access
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  hook(closed)
  hook(other)
  assert seen == [other]
