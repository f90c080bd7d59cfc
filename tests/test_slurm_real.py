"""launch/gpu_slurm.sh's job submitted to a real SLURM (tests/real_slurm.py: slurmctld + 2 slurmd on this machine),
2 nodes x 1 task x 2 CPU devices: MAE `tiny` on the bundled sample, and a tiny finetune run with validation. What
SLURM itself does is not simulated: time-limit and TERM signals, scancel (plain and --full), requeue, srun's kill of
the other tasks, a preemption by a job of a higher-priority partition, the job's recorded state and exit code. Exit
codes are launch/main.py's (75 = preempted, 4 = could not connect). One cluster and one compilation cache serve every
test (CI time); tests.launch_entry lets every process load the compiled step from it (tests/cpu_cache_share.py)."""
import functools
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import real_slurm
import test_multihost_eval as ft_eval
from sample_data import shards  # pylint: disable=unused-import  (fixture)
from timeouts import wait_for

REPO = pathlib.Path(__file__).resolve().parents[1]
PREEMPTED = 75
UNINTERRUPTED_STEPS = 36  # past the interrupted job's third resume (its saves land 5-9 steps apart: 5, 13, 22)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def test_ci_runs_the_real_slurm_tests():
  """Under CI=true (.ci/run installs SLURM and munge) these tests must run, not skip."""
  if os.environ.get("CI") != "true":
    pytest.skip("only checked under CI=true")
  assert real_slurm.unavailable_reason() is None


_wait_for = functools.partial(wait_for, timeout_s=600)


def _losses(workdir):
  path = workdir / "metrics.jsonl"
  return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


class _Jobs:
  """Submits launch/gpu_slurm.sh jobs to the cluster (tiny MAE, 2 nodes x 2 CPU devices) and reads them back."""

  def __init__(self, cluster, tmp_path, shards):
    self.cluster, self.shards = cluster, shards
    self.env = dict(cluster.env, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
                    XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0")
    self.cache = tmp_path / "compilation_cache"  # shared by every run of the test

  def args(self, workdir, total_steps, *extra):
    """launch.main's arguments (gpu_slurm.sh takes --config and --workdir, the rest after `--`)."""
    return [f"--config=configs/mae_s2.py:tiny,shards={self.shards}", f"--workdir={workdir}",
            # one schedule for every run, whatever its total_steps
            f"--config.total_steps={total_steps}", f"--config.optimizer.decay_steps={UNINTERRUPTED_STEPS}",
            "--config.checkpoint_every_steps=0", "--config.data.s2_only.workers=1",
            f"--config.compilation_cache_dir={self.cache}", *extra]

  def submit(self, workdir, total_steps, *launcher_flags, env=None, extra=()):
    return self.submit_args(self.args(workdir, total_steps, *extra), *launcher_flags, env=env)

  def submit_args(self, main_args, *launcher_flags, env=None, module="tests.launch_entry"):
    """`main_args`: --config, --workdir, then the rest (passed after `--`)."""
    out = subprocess.run(["bash", "launch/gpu_slurm.sh", "--nodes=2", "--gpus_per_node=2", "--cpus_per_node=2",
                          f"--venv={sys.prefix}", f"--module={module}", *launcher_flags, *main_args[:2], "--",
                          *main_args[2:]],
                         cwd=REPO, env=dict(self.env, **(env or {})), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("Submitted batch job "), out.stderr
    return out.stdout.split()[-1]

  def state(self, job):
    return self.cluster.job(job)

  def wait_end(self, job, restarts=0):
    """The job's final record (state, exit code) once it ended after `restarts` requeues."""
    return _wait_for(lambda: (s := self.state(job)).get("JobState") in FINAL and int(s.get("Restarts", 0)) >= restarts
                     and s, f"job {job} to end")

  def wait_running(self, job, workdir, restarts, step):
    """Waits until the job's run number `restarts` logged `step` (metrics.jsonl of the current run)."""
    def ready():
      s = self.state(job)
      if s.get("JobState") in FINAL:
        pytest.fail(f"job {job} ended ({s.get('JobState')} {s.get('ExitCode')}) before step {step}:\n"
                    f"{log(workdir, job)[-4000:]}")
      return int(s.get("Restarts", 0)) == restarts and max(_losses(workdir), default=0) >= step
    _wait_for(ready, f"job {job} (run {restarts}) to reach step {step}")


def log(workdir, job):
  path = workdir / f"slurm-{job}.out"
  return path.read_text(errors="replace") if path.exists() else ""


def _single_process(tmp_path, workdir, jobs, total_steps):
  """The same training as 1 process x 4 devices, outside SLURM."""
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
  for k in [k for k in env if k.startswith(("SLURM_", "MMRS_"))]:
    del env[k]
  return subprocess.Popen([sys.executable, "-m", "tests.launch_entry", *jobs.args(workdir, total_steps)], cwd=REPO,
                          env=env, stdout=open(tmp_path / "single.log", "w"), stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def jobs(real_slurm, tmp_path_factory, shards):  # pylint: disable=redefined-outer-name
  return _Jobs(real_slurm, tmp_path_factory.mktemp("jobs"), shards)


@pytest.fixture(scope="module")
def uninterrupted(jobs, tmp_path_factory):
  """Two jobs submitted at once onto the same two nodes (--shared_nodes): the tiny MAE pretraining and a finetune
  run with validation and test (tests/test_multihost_eval.py's); and both as 1 process x 4 devices alongside."""
  tmp = tmp_path_factory.mktemp("uninterrupted")
  single = _single_process(tmp, tmp / "single", jobs, UNINTERRUPTED_STEPS)
  ft_shards = ft_eval.write_data(tmp / "ft_data")
  pretrain = jobs.submit(tmp / "pretrain", UNINTERRUPTED_STEPS, "--shared_nodes")
  finetune = jobs.submit_args(ft_eval.finetune_args(ft_shards, tmp / "finetune", jobs.cache), "--shared_nodes",
                              module="launch.main")
  ft_single = ft_eval.run_local(tmp, tmp / "ft_single", ft_shards, processes=1, devices=4)
  runs = {pretrain: tmp / "pretrain", finetune: tmp / "finetune"}
  ends = {job: jobs.wait_end(job) for job in runs}
  assert single.wait(timeout=600) == 0, (tmp / "single.log").read_text()[-3000:]
  return {"jobs": runs, "ends": ends, "pretrain": _losses(tmp / "pretrain"), "single": _losses(tmp / "single"),
          "finetune": tmp / "finetune" / "results.json", "ft_single": ft_single}


def test_two_jobs_at_once_complete_on_their_own_ports_and_equal_one_process(uninterrupted):
  """Both jobs complete; the pretraining losses and the finetune results.json (validation curve, selected step,
  test metrics) are those of one process with 4 devices."""
  runs, ends = uninterrupted["jobs"], uninterrupted["ends"]
  for job, workdir in runs.items():
    assert (ends[job]["JobState"], ends[job]["ExitCode"]) == ("COMPLETED", "0:0"), log(workdir, job)[-4000:]
  # The coordinator port derives from the job id: the two jobs on the same node did not collide (a fixed port
  # made the second job's process 0 fail to listen and its process 1 join the first job's coordinator).
  ports = {job: {l.split("jax.distributed.initialize(", 1)[1].split(",")[0] for l in log(w, job).splitlines()
                 if "jax.distributed.initialize(" in l} for job, w in runs.items()}
  assert all(len(p) == 1 for p in ports.values()) and len(set.union(*ports.values())) == 2, ports
  got, single = uninterrupted["pretrain"], uninterrupted["single"]
  assert sorted(got) == list(range(1, UNINTERRUPTED_STEPS + 1))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [single[s] for s in sorted(got)], rtol=1e-4)
  ft_eval.assert_same_numbers(json.loads(uninterrupted["finetune"].read_text()), uninterrupted["ft_single"])


def test_time_limit_term_and_preemption_save_and_requeue_and_plain_scancel_saves_and_cancels(jobs, uninterrupted,
                                                                                            tmp_path):
  """One job, four runs: (1) the time-limit signal (USR1 to the batch shell, what --signal=B:USR1@N delivers) ->
  both tasks save the same step, 75, requeued; (2) `scancel --signal=TERM --full` (TERM to the batch shell's process
  group, srun included) -> the trap forwards it to the tasks: saved, requeued; (3) a real preemption: a job in the
  urgent partition takes both nodes (tests/real_slurm.py: PreemptMode=REQUEUE with a GraceTime), SLURM sends its
  TERM to the tasks -> saved, requeued, and the urgent job runs; (4) plain `scancel` -> saved, CANCELLED, not
  requeued, without the batch shell forwarding a TERM SLURM already sent. Every resume is exact: the losses are the
  uninterrupted job's, bit for bit."""
  workdir = tmp_path / "run"
  job = jobs.submit(workdir, 200, env={"MMRS_TEST_STEP_SLEEP_S": "0.1"})  # 200 steps: signals land first
  urgent = []

  def preempt():
    urgent.append(jobs.cluster.run("sbatch", f"--partition={real_slurm.URGENT}", "--nodes=2", "--exclusive",
                                   f"--output={tmp_path}/urgent-%j.out", "--wrap=true").split()[-1])

  phases = (lambda: jobs.cluster.run("scancel", "--batch", "--signal=USR1", job),
            lambda: jobs.cluster.run("scancel", "--signal=TERM", "--full", job),
            preempt,
            lambda: jobs.cluster.run("scancel", job))
  saved = []
  for restarts, act in enumerate(phases):
    jobs.wait_running(job, workdir, restarts, (saved[-1] if saved else 0) + 2)
    act()
    if restarts < len(phases) - 1:  # saved and requeued: the job runs again
      _wait_for(lambda: int(jobs.state(job).get("Restarts", 0)) == restarts + 1, f"requeue #{restarts + 1}")
    else:
      end = jobs.wait_end(job, restarts)
    text = log(workdir, job)
    done = [l for l in text.splitlines() if l.startswith("done step=")][2 * restarts:]
    assert len(done) == 2 and len(set(done)) == 1 and "preempted=True" in done[0], text[-5000:]  # the same step
    saved.append(int(done[0].split()[1].split("=")[1]))
    assert (workdir / "checkpoints" / str(saved[-1])).is_dir()
  assert (end["JobState"], end["Restarts"], end["ExitCode"]) == ("CANCELLED", "3", "75:0"), end  # 75: saved
  assert jobs.wait_end(urgent[0])["JobState"] == "COMPLETED"  # the preempting job got the nodes
  text = log(workdir, job)
  assert all(text.count(f"at step {s}.") == 2 for s in saved[:3])  # both tasks resumed each saved step
  assert text.count("mmrs: preempted, checkpoint saved: requeueing") == 3
  # The batch shell forwarded one TERM, scancel --full's: the preemption's went to the tasks only, and plain
  # scancel's to every process (the shell only notes it).
  terms = [l for l in text.splitlines() if l.startswith("mmrs: SIGTERM (job ")]
  assert [l.split(")")[0] for l in terms] == ["mmrs: SIGTERM (job RUNNING", "mmrs: SIGTERM (job COMPLETING"], terms
  assert "cancelled, checkpoint saved: resubmit to resume" in text
  reference = uninterrupted["pretrain"]  # the same job, uninterrupted
  got = _losses(workdir)
  common = sorted(set(got) & set(reference))
  assert all(s + 1 in common for s in saved[:3]), (saved, common)  # steps right after each resume
  assert [got[s] for s in common] == [reference[s] for s in common]


def _job_processes(job):
  """pid -> cmdline of the live processes that belong to the job (SLURM_JOB_ID in their environment)."""
  out = {}
  for p in pathlib.Path("/proc").iterdir():
    try:
      if not p.name.isdigit() or (p / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        continue
      if f"SLURM_JOB_ID={job}".encode() in (p / "environ").read_bytes().split(b"\0"):
        out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
      continue
  return out


def test_killed_task_ends_the_job_at_once_and_leaves_no_process(jobs, tmp_path):
  """kill -9 of one task's training process: its grain worker and resource tracker exit with it (they held the
  task's stdout: srun waited 60 s, "Abandoning IO", and they outlived the job), srun stops the other task, the job
  fails without a requeue, and no process of the job is left on the node."""
  workdir = tmp_path / "run"
  job = jobs.submit(workdir, 200, env={"MMRS_TEST_STEP_SLEEP_S": "0.1"})
  jobs.wait_running(job, workdir, 0, 2)
  procs = _job_processes(job)
  assert any("multiprocessing.spawn" in c for c in procs.values())  # grain workers are running
  main = [pid for pid, c in procs.items() if "tests.launch_entry" in c and "bash" not in c
          and "SLURM_PROCID=0" in (pathlib.Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))]
  assert len(main) == 1, procs
  os.kill(main[0], signal.SIGKILL)
  end = jobs.wait_end(job)
  assert end["JobState"] == "FAILED" and end["Restarts"] == "0" and end["ExitCode"] not in ("0:0", "75:0"), end
  assert "Abandoning IO" not in log(workdir, job)
  deadline = time.monotonic() + 60  # the orphans of a killed task used to live on (they ignore SIGTERM)
  while _job_processes(job) and time.monotonic() < deadline:
    time.sleep(0.5)
  assert not _job_processes(job)


def test_the_jobs_exit_code_is_the_projects(jobs, tmp_path):
  """A task that cannot start the coordinator exits 4; srun then stops the other task (143) and returns the highest
  code, but the job records 4, the code launch/main.py documents."""
  with socket.socket() as busy:
    busy.bind(("", 0))
    busy.listen()
    workdir = tmp_path / "run"
    job = jobs.submit(workdir, 4, f"--port={busy.getsockname()[1]}")
    end = jobs.wait_end(job)
  assert (end["JobState"], end["ExitCode"]) == ("FAILED", "4:0"), log(workdir, job)[-4000:]
  assert "process 0 cannot listen on port" in log(workdir, job)
