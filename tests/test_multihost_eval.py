"""Multi-host evaluation on 2 local processes x 2 CPU devices (gloo) gives the numbers of 1 process x 4 devices:
- finetuning (mmrs/finetune/evaluate.py) with periodic validation and the final test: the same results.json numbers
  and the same selected step;
- launch.robustness (mmrs/finetune/robustness.py) on that run: the same robustness.json numbers, under stresses that
  read per-sample seeds and a wider read of the split (shift) and the seeded missing-modality draw (missing_s2), with
  the example grids gathered from both processes; its clean value is results.json's (the selected step's state)."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from mmrs.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_data(path) -> str:
  """Synthetic S1/S2 shards (6 classes): 8 training records, a val split of 4; 36 px around the 32 px crops (the shift
  stress reads 2 real pixels on each side)."""
  synthetic.write_synthetic_dataset(str(path), n_pairs=8, n_val=4, size=36, seed=1, mask=False)
  return str(path)


def finetune_args(shards, workdir, cache) -> list[str]:
  """launch.main's arguments: the tiny finetune variant (multi-label, S1+S2) on `write_data`'s shards, 4 steps,
  validation every 2 (test split: 'train', a stand-in). Multi-label: its mAP moves with every score, so rows out of
  place or a stress that changed nothing would show. Also submitted as a SLURM job by tests/test_slurm_real.py."""
  return [f"--config=configs/finetune/bigearthnet.py:tiny,shards={shards},steps=4,modalities=s1+s2",
          f"--workdir={workdir}", "--config.finetune.label_set=synthetic_ml", "--config.finetune.num_classes=6",
          "--config.data.eval.split=train", "--config.finetune.eval_every_steps=2",
          f"--config.compilation_cache_dir={cache}"]


def _start(tmp_path, name, argv, processes, devices):
  """`python ARGV` as `processes` local processes x `devices` CPU devices -> (processes, logs)."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  for k in [k for k in env if k.startswith(("SLURM_", "MMRS_"))]:
    del env[k]
  port = _free_port()
  multi = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
           for i in range(processes)] if processes > 1 else [[]]
  logs = [open(tmp_path / f"{name}_{i}.log", "w+") for i in range(processes)]
  procs = [subprocess.Popen([sys.executable, *argv, *m], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
           for m, log in zip(multi, logs)]
  return procs, logs


def _wait(started):
  procs, logs = started
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = [(log.seek(0), log.read())[1] for log in logs]
  assert codes == [0] * len(procs), "\n".join(o[-3000:] for o in outs)


def run_local(tmp_path, workdir, shards, processes, devices):
  """The finetune run as `processes` local processes x `devices` CPU devices; returns its results.json."""
  _wait(_start(tmp_path, workdir.name, ["-m", "launch.main", *finetune_args(shards, workdir, tmp_path / "cache")],
               processes, devices))
  return json.loads((workdir / "results.json").read_text())


def numbers(result):
  """The results.json numbers: {path: value} of every metric (test and validation), and the selected step."""
  out = {}

  def walk(prefix, x):
    if isinstance(x, dict):
      for k, v in x.items():
        if k not in ("seconds", "shards", "init_from", "encoder_source"):
          walk(f"{prefix}/{k}", v)
    elif isinstance(x, list):
      for i, v in enumerate(x):
        walk(f"{prefix}/{i}", v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
      out[prefix] = x
  walk("", result)
  return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """The finetune run as 1 process x 4 devices: (tmp dir, shards, workdir, results.json)."""
  tmp = tmp_path_factory.mktemp("finetuned")
  shards = write_data(tmp / "data")
  return tmp, shards, tmp / "one", run_local(tmp, tmp / "one", shards, processes=1, devices=4)


def test_finetune_validation_and_test_on_two_processes_equal_one_process(finetuned):
  tmp, shards, _, one = finetuned
  two = run_local(tmp, tmp / "two", shards, processes=2, devices=2)
  assert_same_numbers(two, one)


# shift: per-sample seeds (the direction) and the wider read; missing_s2: the seeded draw of the samples that lose
# S2 and the missing-modality path; time_gap: skipped alike (the synthetic records carry no dates).
ROBUSTNESS = ["--stress=missing_s2,shift,time_gap", "--severities=missing_s2=50", "--severities=shift=3",
              "--examples=2"]


def test_robustness_on_two_processes_equals_one_process(finetuned):
  """launch.robustness on the run: 2 processes x 2 devices write robustness.json with the numbers of 1 process x 4
  devices (before, launch.robustness had no multi-process start and refused process_count > 1); the clean value is
  results.json's."""
  tmp, _, run, results = finetuned
  started = {n: _start(tmp, f"robustness_{n}", ["-m", "launch.robustness", f"--runs={run}", f"--out={tmp / n}",
                                                *ROBUSTNESS], processes=p, devices=d)
             for n, p, d in (("one", 1, 4), ("two", 2, 2))}
  for s in started.values():
    _wait(s)
  one, two = (json.loads((tmp / n / "robustness.json").read_text()) for n in ("one", "two"))
  for r in (one, two):
    stresses = r["runs"]["one"]["stresses"]
    assert set(stresses) == {"missing_s2", "shift"} and "time_gap" in r["runs"]["one"]["skipped"]
    assert r["runs"]["one"]["shift_margin"] == 2 and r["runs"]["one"]["n"] == 8
    assert [row["n"] for row in stresses["missing_s2"]] == [8, 8]  # every sample scored, half without S2
    assert all(rows[1]["value"] != rows[0]["value"] for rows in stresses.values())  # each stress changed scores
  a, b = numbers(one), numbers(two)
  assert sorted(a) == sorted(b)
  keys = sorted(a)
  np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-4, atol=1e-6, err_msg=str(keys))
  metric = one["metric"]
  # The state results.json tested: the selected step (model selection's best_checkpoint/), its test value.
  assert one["runs"]["one"]["step"] == two["runs"]["one"]["step"] == results["selected_step"]
  np.testing.assert_allclose(two["runs"]["one"]["clean"], results["test"]["metrics"][metric], rtol=1e-4)
  assert {p.name for p in (tmp / "two").iterdir()} >= {"robustness.json", "robustness.md", "examples_shift.png",
                                                       "examples_missing_s2.png"}


def assert_same_numbers(got, want):
  """The same selected step, and every validation and test number within float tolerance."""
  a, b = numbers(want), numbers(got)
  assert sorted(a) == sorted(b)
  assert a["/step"] == b["/step"] and any("selected_step" in k for k in a)  # the same state was tested
  assert any(k.startswith("/test/metrics") for k in a) and any(k.startswith("/val/curve") for k in a)
  keys = sorted(a)
  np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-4, atol=1e-6, err_msg=str(keys))
