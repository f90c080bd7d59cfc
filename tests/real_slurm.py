"""A real SLURM cluster on this machine for the launcher tests: munge + slurmctld + two slurmd nodes (n1, n2) with
fake GPU GRES and two partitions over them, the default one and URGENT, whose jobs preempt the default one's (a
requeue after a grace time), in a temporary directory (what the job does on it: README "Run on a GPU cluster / a
TPU pod").

`start(root)` (root: a directory whose parents are all o+x, as munged requires) returns a `Cluster` (its `env`
points the SLURM clients at it); `Cluster.stop()` kills its jobs, shuts everything down by PID and removes the
/etc/hosts line that makes n1/n2 resolve. `unavailable_reason()` says why this machine
cannot run one (not root, packages missing), None when it can; tests/conftest.py's `real_slurm` fixture skips with
that reason, except under CI=true, where .ci/run installs the packages and the tests must run.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

import child_process

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
HOSTS_FILE = "/etc/hosts"
NODES = ("n1", "n2")
GPUS_PER_NODE = 4  # 2 per job: two jobs at once fit on the nodes (the port-collision test)
CPUS_PER_NODE = 8  # slots, not cores (config_overrides): jobs of 2 "CPUs" per node, two at once
# Preemption as clusters configure it for requeueable jobs (PreemptType=preempt/partition_prio, PreemptMode=REQUEUE):
# a job in partition URGENT preempts the jobs of the default partition on its nodes. SLURM then sends SIGCONT +
# SIGTERM to their steps at once and requeues them GRACE_S seconds later if they still run.
URGENT = "urgent"
GRACE_S = 120


def _which(name: str) -> str | None:
  return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def unavailable_reason() -> str | None:
  if os.geteuid() != 0:
    return "a local SLURM cluster needs root (slurmd runs jobs as their user)"
  missing = [d for d in DAEMONS if _which(d) is None]
  if missing:
    return (f"SLURM/munge not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd "
            "slurm-client munge (.ci/run does)")
  return None


def _free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  try:
    for s in socks:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def _config(root: str, ctld_port: int, node_ports: list[int]) -> str:
  nodes = "\n".join(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
                    f"RealMemory=1000 Gres=gpu:{GPUS_PER_NODE} State=UNKNOWN" for n, p in zip(NODES, node_ports))
  return f"""ClusterName=mmrstest
SlurmctldHost={socket.gethostname().split('.')[0]}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket.2,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
{nodes}
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={GRACE_S}
PartitionName={URGENT} Nodes={','.join(NODES)} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


class Cluster:
  """A running cluster: `env` (SLURM_CONF, for the clients and the jobs they submit), `root`, `stop()`."""

  def __init__(self, root: str):
    self.root = root
    self.env = dict(os.environ, SLURM_CONF=f"{root}/slurm.conf")
    self.procs: list[subprocess.Popen] = []
    self.hosts_line: str | None = None

  def run(self, *argv: str, check: bool = True) -> str:
    out = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=60)
    if check and out.returncode:
      raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}")
    return out.stdout

  def job(self, job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once the job is forgotten."""
    out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

  def logs(self) -> str:
    return "\n".join(f"== {n}\n" + open(f"{self.root}/log/{n}", errors="replace").read()[-3000:]
                     for n in sorted(os.listdir(f"{self.root}/log")))

  def stop(self) -> None:
    if any(p.poll() is None for p in self.procs[1:]):
      # Jobs first (`scontrol shutdown` leaves running steps behind): SIGKILL to every process of every job.
      jobs = self.run("squeue", "-h", "-o", "%A", check=False).split()
      if jobs:
        self.run("scancel", "--signal=KILL", "--full", *jobs, check=False)
        self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", "-t", "R,CG", "-o", "%A", check=False).split() and time.monotonic() < deadline:
          time.sleep(0.3)
      subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
      deadline = time.monotonic() + 20
      while any(p.poll() is None for p in self.procs[1:]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in reversed(self.procs):  # what did not shut down, and munged
      child_process.stop(p)
    self.procs = []
    if self.hosts_line is not None:
      with open(HOSTS_FILE) as f:
        lines = f.readlines()
      with open(HOSTS_FILE, "w") as f:  # in place: /etc/hosts may be a bind mount
        f.writelines(l for l in lines if l != self.hosts_line)
      self.hosts_line = None


def start(root: str, timeout_s: float = 60) -> Cluster:
  """Starts the cluster in `root` (an empty directory); raises RuntimeError (with the daemons' logs) on failure."""
  c = Cluster(root)
  try:
    for d in ("munge", "state", "spool", "log", "run", "dev"):
      os.makedirs(f"{root}/{d}", exist_ok=True)
    os.chmod(f"{root}/munge", 0o711)  # munged refuses a socket directory without o+x
    os.chmod(root, 0o755)
    for i in range(GPUS_PER_NODE):  # gres.conf needs File= (placeholders: slurmd logs "not a valid device")
      open(f"{root}/dev/nvidia{i}", "w").close()
    c.run(_which("mungekey"), "-c", "-k", f"{root}/munge/munge.key")
    c.procs.append(subprocess.Popen(
        [_which("munged"), "-F", f"--key-file={root}/munge/munge.key", f"--socket={root}/munge/munge.socket.2",
         f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
         f"--seed-file={root}/munge/munged.seed"], stdout=subprocess.DEVNULL,
        stderr=open(f"{root}/log/munged.err", "w")))
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    with open(f"{root}/slurm.conf", "w") as f:
      f.write(_config(root, ctld_port, node_ports))
    with open(f"{root}/gres.conf", "w") as f:
      f.write(f"NodeName={','.join(NODES)} Name=gpu File={root}/dev/nvidia[0-{GPUS_PER_NODE - 1}]\n")
    c.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # mmrs tests/real_slurm.py {os.getpid()}\n"
    with open(HOSTS_FILE, "a") as f:  # the launcher uses node names as the coordinator host
      f.write(c.hosts_line)
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(f"{root}/munge/munge.socket.2"):
      if time.monotonic() > deadline or c.procs[0].poll() is not None:
        raise RuntimeError("munged did not start")
      time.sleep(0.1)
    log = open(f"{root}/log/daemons.out", "w")
    c.procs.append(subprocess.Popen([_which("slurmctld"), "-D", "-i"], env=c.env, stdout=log, stderr=log))
    for n in NODES:  # -N: several slurmd on one host (without it the second replaces the first)
      c.procs.append(subprocess.Popen([_which("slurmd"), "-D", "-N", n], env=c.env, stdout=log, stderr=log))
    while c.run("sinfo", "-h", "-p", "debug", "-t", "idle", "-o", "%D", check=False).strip() != str(len(NODES)):
      if time.monotonic() > deadline or any(p.poll() is not None for p in c.procs):
        raise RuntimeError(f"the nodes did not become idle within {timeout_s:g}s")
      time.sleep(0.2)
  except BaseException as e:
    logs = c.logs() if os.path.isdir(f"{root}/log") else ""
    c.stop()
    if isinstance(e, RuntimeError):
      raise RuntimeError(f"{e}\n{logs}") from None
    raise
  return c


@pytest.fixture(scope="session")
def real_slurm():
  """One cluster per test session (tests/conftest.py imports this). Skips where it cannot start, fails under CI."""
  reason = unavailable_reason()
  if reason:
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI=true but no local SLURM cluster: {reason}")
    pytest.skip(reason)
  # Not under pytest's tmp dir: munged refuses a socket whose parent directories are not o+x (pytest's are 0700).
  root = tempfile.mkdtemp(prefix="mmrs-slurm-")
  try:
    cluster = start(root)
    yield cluster
    cluster.stop()
  finally:
    shutil.rmtree(root, ignore_errors=True)
