"""Multi-host by simulation: local processes x 2 CPU devices (gloo), preemption across processes, Ctrl-C, start-up
errors, the launchers' input checks and the TPU VM launcher (fake gcloud). launch/gpu_slurm.sh's job against a real
SLURM: tests/test_slurm_real.py. Exit codes are launch/main.py's (75 = preempted)."""
import functools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import sample_data
from sample_data import shards  # pylint: disable=unused-import  (fixture)
from timeouts import wait_for


REPO = pathlib.Path(__file__).resolve().parents[1]
PREEMPTED = 75


def _env(tmp_path, devices=2, **extra):
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              # -O0: halves CPU compile time (every run compared in a test uses it).
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **extra)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


_wait_for = functools.partial(wait_for, timeout_s=600)


def _metrics(workdir):
  path = workdir / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _jsonl(path):
  return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def _toy(tmp_path, workdir, n, port, *args, env_extra=None, devices=2):
  return [subprocess.Popen([sys.executable, "-m", "tests.launch_entry", "--config=tests/train_toy_method.py",
                            f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}",
                            f"--num_processes={n}", f"--process_id={i}", *args],
                           cwd=REPO, env=_env(tmp_path, devices, **(env_extra or {})), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for i in range(n)]


def _communicate(procs, timeout=600):
  """Reads every process's output at once: waiting on one while another fills its pipe would deadlock them at
  their next collective."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  try:
    with concurrent.futures.ThreadPoolExecutor(len(procs)) as pool:
      outs = list(pool.map(lambda p: p.communicate(timeout=timeout)[0], procs))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
  workdir = tmp_path / "w"
  # >= 10 s of steps (50 ms each): the notice (polled once a second by JAX) must land before the run ends.
  procs = _toy(tmp_path, workdir, 2, _free_port(), "--config.total_steps=200", "--config.checkpoint_every_steps=0",
               "--config.toy.tasks=cross", env_extra={"MMRS_TEST_SIGTERM_AT": "1:3", "MMRS_TEST_STEP_SLEEP_S": "0.05"})
  outs = _communicate(procs)
  assert [p.returncode for p in procs] == [PREEMPTED, PREEMPTED], outs[1][-3000:]
  done = [next(l for l in o.splitlines() if l.startswith("done step=")) for o in outs]
  assert done[0] == done[1] and "preempted=True" in done[0]
  step = int(done[0].split()[1].split("=")[1])
  assert 3 <= step < 200
  ckpts = workdir / "checkpoints"
  assert sorted(p.name for p in ckpts.iterdir()) == [str(step)]
  states = {p.name: json.loads(p.read_text())["states"] for p in (ckpts / str(step) / "data").glob("process_*")}
  assert states == {f"process_{i}-of-2.json": {"cross": {"index": step}} for i in range(2)}

  # A restart where only process 1 cannot read the checkpoint (a storage outage there): the run stops (process 1
  # with exit code 5; process 0, whose Orbax barriers lost their partner, is aborted by JAX once process 1 missed
  # its heartbeats: --heartbeat_timeout=10 instead of JAX's 100 s) and the checkpoint is not moved aside on one
  # host's error.
  procs = _toy(tmp_path, workdir, 2, _free_port(), "--config.total_steps=200", "--config.checkpoint_every_steps=0",
               "--config.toy.tasks=cross", "--heartbeat_timeout=10", env_extra={"MMRS_TEST_RESTORE_ERROR": "1"})
  outs = _communicate(procs)
  assert procs[1].returncode == 5 and procs[0].returncode != 0, outs[1][-3000:]
  assert f"ERROR: Checkpoint step {step} " in outs[1] and "not proven damaged, so nothing was moved" in outs[1]
  assert sorted(p.name for p in ckpts.iterdir()) == [str(step)]


def test_ctrl_c_in_one_process_saves_the_current_step_like_sigterm(tmp_path):
  """Ctrl-C (SIGINT) is a preemption: the step is saved and the run exits 75, no KeyboardInterrupt traceback."""
  workdir = tmp_path / "w"
  proc = subprocess.Popen([sys.executable, "-m", "tests.launch_entry", "--config=tests/train_toy_method.py",
                           f"--workdir={workdir}", "--config.total_steps=200", "--config.checkpoint_every_steps=0",
                           "--config.toy.tasks=cross"], cwd=REPO, env=_env(tmp_path, MMRS_TEST_STEP_SLEEP_S="0.05"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(lambda: proc.poll() is not None or any(r["step"] >= 3 for r in _metrics(workdir)), "step 3")
    proc.send_signal(signal.SIGINT)
    out = proc.communicate(timeout=300)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == PREEMPTED, out[-3000:]
  done = [l for l in out.splitlines() if l.startswith("done step=")]
  assert len(done) == 1 and "preempted=True" in done[0] and "Traceback" not in out and "KeyboardInterrupt" not in out
  step = int(done[0].split()[1].split("=")[1])
  assert 3 <= step < 200 and [p.name for p in (workdir / "checkpoints").iterdir()] == [str(step)]


def test_hosts_with_different_dataset_copies_stop_before_step_1(tmp_path, shards):
  """Process 1 reads another copy of the dataset (the same records in 2 shards instead of 1): both processes stop
  with one line naming process 1's host and the dataset, before training (no checkpoint, no metrics)."""
  from data_prep import bigearthnet_mm  # pylint: disable=g-import-not-at-top
  other = tmp_path / "other_copy"
  bigearthnet_mm.convert_dataset(sample_data.SAMPLE, str(other), num_shards=2)
  workdir, port = tmp_path / "w", _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "launch.main", f"--config=configs/mae_s2.py:tiny,shards={copy}",
                             f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                             f"--process_id={i}", "--config.data.s2_only.workers=0"],
                            cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, copy in enumerate((shards, other))]
  outs = _communicate(procs, timeout=300)
  for proc, out in zip(procs, outs):
    errors = [l for l in out.splitlines() if l.startswith("ERROR:")]
    assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
    assert f"process 1 on host {socket.gethostname()} differs from process 0" in errors[0]
    assert "in data.s2_only (" in errors[0] and "Traceback" not in out
  assert not (workdir / "metrics.jsonl").exists() and not (workdir / "checkpoints").exists()


def test_unreachable_coordinator_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "w"
  out = subprocess.run([sys.executable, "-m", "launch.main", "--config=tests/train_toy_method.py",
                        f"--workdir={workdir}", f"--coordinator_address=127.0.0.1:{_free_port()}",
                        "--num_processes=2", "--process_id=1", "--init_timeout=2"],
                       cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
  assert out.returncode == 4, out.stderr[-2000:]
  errors = [l for l in out.stderr.splitlines() if l.startswith("ERROR:")]
  assert len(errors) == 1 and "no coordinator answered at 127.0.0.1:" in errors[0] and "Traceback" not in out.stderr
  assert not workdir.exists()


def test_batch_that_does_not_split_over_the_processes_is_a_one_line_error(tmp_path):
  workdir = tmp_path / "w"
  outs = _communicate(_toy(tmp_path, workdir, 2, _free_port(), "--config.batch_size=7", devices=1), timeout=300)
  for out in outs:
    errors = [l for l in out.splitlines() if l.startswith("ERROR:")]
    assert len(errors) == 1 and "config.batch_size=7" in errors[0], out[-2000:]
  assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())


def test_gpu_slurm_rejects_bad_input(tmp_path):
  def run(*argv):
    return subprocess.run(["bash", "launch/gpu_slurm.sh", *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
  base = ["--config=c.py", f"--workdir={tmp_path}/w"]
  out = run("--nodes=2", *base)
  assert out.returncode == 2 and out.stderr.strip() == "gpu_slurm.sh: --gpus_per_node is required (see --help)"
  out = run("--nodes=0", "--gpus_per_node=8", *base)
  assert out.returncode == 2 and "NODES must be a positive integer" in out.stderr
  out = run("--nodes=1", "--gpus_per_node=8", "--time=soon", *base)
  assert out.returncode == 2 and "--time" in out.stderr
  out = run("--nodes=1", "--gpus_per_node=8", f"--venv={tmp_path}/none", *base)
  assert out.returncode == 2 and "--install" in out.stderr and len(out.stderr.splitlines()) == 1
  assert not (tmp_path / "w").exists()


def test_tpu_vm_launcher_runs_detached_on_every_worker_and_stops_on_request(tmp_path):
  """launch/tpu_vm.sh against a fake gcloud whose 2 workers are local home directories: the VM is created, the code
  shipped, training starts detached on both workers (the ssh calls return) and reaches steps; --status, --stop
  (checkpoint + exit 75 on both) and --logs work."""
  import fake_gcloud  # pylint: disable=g-import-not-at-top
  state = tmp_path / "gcloud"
  env = dict(os.environ, JAX_PLATFORMS="cpu", **fake_gcloud.install(tmp_path / "bin", state, workers=2),
             FAKE_GCLOUD_PORT=str(_free_port()),
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  env.pop("PYTHONPATH", None)  # the workers must run the shipped copy
  for i in range(2):  # the environment --skip_setup expects (the setup step itself needs the network)
    (state / f"worker{i}").mkdir(parents=True)
    (state / f"worker{i}" / "mmrs_venv").symlink_to(sys.prefix)
  workdir = tmp_path / "run"
  where = ["--name=mmrs-t", "--zone=us-central2-b", f"--workdir={workdir}", "--shared_workdir"]

  def tpu(*argv):
    out = subprocess.run(["bash", "launch/tpu_vm.sh", *where, *argv], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout

  tpu("--accelerator=v4-16", "--config=tests/train_toy_method.py", "--module=tests.train_toy_method",
      "--skip_setup", "--", "--config.total_steps=100000", "--config.toy.tasks=cross",
      "--config.checkpoint_every_steps=0")
  # gcloud's verbs; a v4 VM is created through `gcloud alpha` (Autocheckpoint): the track does not matter here.
  gcloud_calls = lambda: [c[1:] if c[:1] == ["alpha"] else c for c in _jsonl(state / "calls.jsonl")]
  calls = gcloud_calls()
  assert calls[0][3:5] == ["describe", "mmrs-t"] and calls[1][3] == "create" and "--accelerator-type=v4-16" in calls[1]
  assert (state / "worker1" / "mmrs" / "launch" / "main.py").exists() and not (state / "worker1" / "mmrs" / ".git").exists()
  _wait_for(lambda: any(r["step"] >= 3 for r in _metrics(workdir)), "training steps on the workers")
  assert tpu("--status").count(": running (pid") == 2
  tpu("--stop")
  codes = [state / f"worker{i}" / "mmrs_logs" / "run" / "exit_code" for i in range(2)]
  _wait_for(lambda: all(c.exists() for c in codes), "both workers to exit")
  assert [c.read_text().strip() for c in codes] == [str(PREEMPTED)] * 2
  assert tpu("--status").count(f": exited {PREEMPTED}") == 2
  assert "Preemption: saving step" in tpu("--logs")
  steps = [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert len(steps) == 1 and int(steps[0]) >= 3

  # The spot VM is preempted; --watch recreates it, restarts training (which resumes) and ends when it finishes.
  (state / "vm_mmrs-t").write_text("PREEMPTED")
  out = tpu("--accelerator=v4-16", "--config=tests/train_toy_method.py", "--module=tests.train_toy_method",
            "--skip_setup", "--watch", "--watch_interval=1", "--", f"--config.total_steps={int(steps[0]) + 2}",
            "--config.toy.tasks=cross", "--config.checkpoint_every_steps=0")
  assert "the run finished" in out
  verbs = [c[3] for c in gcloud_calls()[len(calls):]]
  assert "delete" in verbs and verbs.index("create") > verbs.index("delete")
  assert [c.read_text().strip() for c in codes] == ["0", "0"]
  assert f"Resumed {workdir} at step {steps[0]}" in tpu("--logs")


def test_tpu_vm_rejects_bad_input(tmp_path):
  def run(*argv):
    return subprocess.run(["bash", "launch/tpu_vm.sh", "--dry_run", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  base = ["--name=x", "--zone=z", "--config=c.py", "--workdir=gs://b/r"]
  out = run(*base)
  assert out.returncode == 2 and out.stderr.strip() == "tpu_vm.sh: --accelerator is required (see --help)"
  out = run(*base, "--accelerator=v3-8")
  assert out.returncode == 2 and "not a single-slice v4/v5e/v5p/v6e type" in out.stderr
  out = run("--name=x", "--zone=z", "--status")
  assert out.returncode == 2 and "--workdir is required" in out.stderr
  for accel, image in [("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")]:
    out = run(*base, f"--accelerator={accel}")
    assert out.returncode == 0 and f"--version={image}" in out.stdout
