"""Multi-host finetune evaluation (mmrs/finetune/evaluate.py): a finetune run with periodic validation and the final
test, on 2 local processes x 2 CPU devices (gloo), writes the same results.json numbers and selects the same step as
1 process x 4 devices."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from mmrs.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def write_data(path) -> str:
  """Synthetic 6-class S1/S2 shards: 8 training records, a val split of 4."""
  synthetic.write_synthetic_dataset(str(path), n_pairs=8, n_val=4, size=32, seed=1, mask=False)
  return str(path)


def finetune_args(shards, workdir, cache) -> list[str]:
  """launch.main's arguments: EuroSAT's tiny finetune variant on `write_data`'s shards, 4 steps, validation every 2
  (test split: 'train', a stand-in). Also submitted as a SLURM job by tests/test_slurm_real.py."""
  return [f"--config=configs/finetune/eurosat.py:tiny,shards={shards},steps=4", f"--workdir={workdir}",
          "--config.finetune.label_set=synthetic_class", "--config.finetune.num_classes=6",
          "--config.data.eval.split=train", "--config.finetune.eval_every_steps=2",
          f"--config.compilation_cache_dir={cache}"]


def run_local(tmp_path, workdir, shards, processes, devices):
  """The finetune run as `processes` local processes x `devices` CPU devices; returns its results.json."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
  for k in [k for k in env if k.startswith(("SLURM_", "MMRS_"))]:
    del env[k]
  args = [sys.executable, "-m", "launch.main", *finetune_args(shards, workdir, tmp_path / "cache")]
  port = _free_port()
  multi = [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}", f"--process_id={i}"]
           for i in range(processes)] if processes > 1 else [[]]
  logs = [open(tmp_path / f"{workdir.name}_{i}.log", "w+") for i in range(processes)]
  procs = [subprocess.Popen(args + m, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
           for m, log in zip(multi, logs)]
  try:
    codes = [p.wait(timeout=600) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outs = [(log.seek(0), log.read())[1] for log in logs]
  assert codes == [0] * processes, outs[-1][-4000:]
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


def test_finetune_validation_and_test_on_two_processes_equal_one_process(tmp_path):
  shards = write_data(tmp_path / "data")
  one = run_local(tmp_path, tmp_path / "one", shards, processes=1, devices=4)
  two = run_local(tmp_path, tmp_path / "two", shards, processes=2, devices=2)
  assert_same_numbers(two, one)


def assert_same_numbers(got, want):
  """The same selected step, and every validation and test number within float tolerance."""
  a, b = numbers(want), numbers(got)
  assert sorted(a) == sorted(b)
  assert a["/step"] == b["/step"] and any("selected_step" in k for k in a)  # the same state was tested
  assert any(k.startswith("/test/metrics") for k in a) and any(k.startswith("/val/curve") for k in a)
  keys = sorted(a)
  np.testing.assert_allclose([b[k] for k in keys], [a[k] for k in keys], rtol=1e-4, atol=1e-6, err_msg=str(keys))
