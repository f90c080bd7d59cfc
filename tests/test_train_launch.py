"""launch/main.py and the launchers: a typo in --config fails fast, a 2-process run trains and resumes, dry runs."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_toy_method as toy
from mmrs.train import data as data_lib
from mmrs.train import loop
from timeouts import HANG_GUARD_S

REPO = pathlib.Path(__file__).resolve().parents[1]
TOY = [sys.executable, "-m", "tests.train_toy_method", "--config=tests/train_toy_method.py"]


def env(tmp_path, devices):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def test_config_typo_fails_fast_naming_the_key(tmp_path):
  out = subprocess.run([sys.executable, "-m", "launch.main", "--config=tests/train_toy_method.py",
                        f"--workdir={tmp_path / 'w'}", "--config.optimizer.lerning_rate=1"], cwd=REPO,
                       env=env(tmp_path, 1), capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]  # launch/cli.py: one line
  assert out.stderr.strip().splitlines()[-1].startswith("ERROR: --config.optimizer.lerning_rate")
  assert not (tmp_path / "w").exists()  # nothing started


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(tmp_path, workdir, total_steps):
  port = _free_port()
  procs = [subprocess.Popen(TOY + [f"--workdir={workdir}", f"--config.total_steps={total_steps}",
                                   "--config.checkpoint_every_steps=2", "--config.toy.tasks=cross",
                                   f"--coordinator_address=127.0.0.1:{port}",
                                   "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=env(tmp_path, 1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=HANG_GUARD_S)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("2-process run timed out")
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


class _Concat:
  """Process 0's and process 1's toy batches side by side: what the 2-process run's global batch must be."""

  def __init__(self, parts):
    self.parts = parts

  def next(self):
    batches = [p.next() for p in self.parts]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return [p.get_state() for p in self.parts]

  def set_state(self, state):
    for p, s in zip(self.parts, state):
      p.set_state(s)


def _as_one_process(config, method, process_index, process_count):
  del process_index, process_count
  two = [toy.fake_data(config, method, i, 2) for i in range(2)]
  return {name: data_lib.TaskData(_Concat([two[0][name].iterator, two[1][name].iterator]), toy.normalize)
          for name in two[0]}


def test_two_process_run_trains_saves_and_resumes(tmp_path):
  workdir = tmp_path / "w"
  _two_processes(tmp_path, workdir, total_steps=2)
  data_dir = workdir / "checkpoints" / "2" / "data"
  states = {f.name: json.loads(f.read_text())["states"] for f in data_dir.glob("process_*.json")}
  assert set(states) == {"process_0-of-2.json", "process_1-of-2.json"}
  assert all(s == {"cross": {"index": 2}} for s in states.values())

  outs = _two_processes(tmp_path, workdir, total_steps=4)
  assert all("Resumed" in o and "at step 2" in o and "done step=4" in o for o in outs)
  got = [(r["step"], r["task"], r["loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())]
  assert [s for s, _, _ in got] == [1, 2, 3, 4]

  # The same 4 steps in one process whose batches are [process 0's part; process 1's part] on 2 devices: each
  # process read its own part, and the global batch was assembled from them in process order.
  config = toy.get_config()
  config.total_steps = 4
  config.toy.tasks = "cross"
  ref = loop.train(config, str(tmp_path / "ref"), method=toy.build(config), task_data=_as_one_process,
                   devices=jax.devices()[:2])
  want = [(r["step"], r["task"], r["loss"]) for r in map(json.loads, (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines())]
  np.testing.assert_allclose([l for *_, l in got], [l for *_, l in want], rtol=1e-5)
  del ref


def test_step_throughput_benchmark():
  from benchmarks import step_throughput  # pylint: disable=g-import-not-at-top
  config = toy.get_config()
  config.peak_flops_per_device = 1e9  # a CPU has no spec peak: MFU would be n/a (NaN)
  out = step_throughput.benchmark(config, method=toy.build(config), steps=4, warmup=1, s2_channels=3,
                                  devices=jax.devices()[:2])
  assert out["tasks"] == ["recon", "cross"] and out["mesh"] == {"data": 2, "fsdp": 1}
  assert out["steps_per_s"] > 0 and out["images_per_s"] == pytest.approx(out["steps_per_s"] * 8)
  assert 0 < out["mfu"] and set(out["memory_mib"]) == {"recon", "cross"}
  assert json.loads(json.dumps(out)) == out  # the JSON line
  config.peak_flops_per_device = 0.0  # a CPU: MFU n/a is None in the JSON line (was NaN, printed "MFU nan%")
  out = step_throughput.benchmark(config, method=toy.build(config), steps=1, warmup=1, s2_channels=3,
                                  devices=jax.devices()[:2])
  assert out["mfu"] is None


def test_tpu_vm_dry_run_prints_the_commands():
  out = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry_run", "--name=mmrs-test", "--zone=us-central2-b",
                        "--accelerator=v4-32", "--config=configs/mixmae.py:vit_b", "--workdir=gs://bucket/runs/m1",
                        "--", "--config.total_steps=10"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  assert "gcloud compute tpus tpu-vm create mmrs-test" in text.replace("gcloud alpha ", "gcloud ")
  assert "--accelerator-type=v4-32" in text and "--autocheckpoint-enabled" in text  # v4: Autocheckpoint (alpha)
  assert "--version=tpu-ubuntu2204-base" in text and "--worker=all" in text
  assert "--exclude=./runs --exclude=./data" in text  # local runs and data stay home
  assert "uv python install 3.11" in text and "requirements-tpu.txt" in text
  assert "setsid nohup" in text  # detached from the ssh session
  train = text.replace("\\", "")
  assert "python -m launch.main --config=configs/mixmae.py:vit_b --workdir=gs://bucket/runs/m1 --multihost " \
         "--config.total_steps=10" in train
  # Metrics / TensorBoard to the bucket (one file per start); each worker's logs under its own prefix per start, so a
  # recreated VM never overwrites the history.
  assert "--logdir=gs://bucket/runs/m1/logs" in train and "stamp=$(date -u +%Y%m%dT%H%M%SZ)" in train
  assert "rsync --recursive $HOME/mmrs_logs/m1 gs://bucket/runs/m1/logs/workers/$(hostname)/$stamp" in train
  assert "python -m launch.maintenance_watch --pid=$child --poll_s=60" in train  # host maintenance -> SIGTERM


def test_tpu_vm_needs_a_gs_workdir():
  out = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry_run", "--name=x", "--zone=z", "--accelerator=v4-8",
                        "--config=c.py", "--workdir=/tmp/local"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert out.returncode != 0 and "gs://" in out.stderr


def test_gpu_slurm_dry_run_prints_the_job(tmp_path):
  out = subprocess.run(["bash", "launch/gpu_slurm.sh", "--dry_run", "--nodes=2", "--gpus_per_node=8",
                        "--partition=a100", "--config=configs/mixmae.py:vit_b", f"--workdir={tmp_path}/run",
                        "--", "--config.batch_size=256"], cwd=REPO, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert out.returncode == 0, out.stderr
  text = out.stdout
  # One process per node driving its 8 GPUs, passed explicitly as local device ids (see the script's header).
  assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=1" in text and "#SBATCH --gpus-per-node=8" in text
  assert "MMRS_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in text and "MMRS_PROCESS_ID=$SLURM_PROCID" in text
  assert "--cpus-per-task=64" in text.split("srun ", 1)[1]  # on srun itself, not only on sbatch
  assert "#SBATCH --signal=B:USR1@300" in text and "scontrol requeue" in text
  assert "-m launch.main --config=configs/mixmae.py:vit_b" in text and "--config.batch_size=256" in text
  assert f"sbatch {tmp_path}/run/mmrs_slurm.sbatch" in text
  assert not (tmp_path / "run").exists()  # a dry run writes nothing
