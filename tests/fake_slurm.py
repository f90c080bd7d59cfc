"""Fake `sbatch`, `srun`, `scancel` and `scontrol` for the launcher tests: they run a job on this machine.

`install(bin_dir, state_dir)` writes the four executables. What they do (state in $FAKE_SLURM_DIR):
  sbatch FILE    runs FILE with bash in the foreground, with the SLURM_* variables of a batch step (job id
                 $FAKE_SLURM_JOB_ID, nodes $FAKE_SLURM_NODELIST, #SBATCH --nodes/--cpus-per-task/--output read from
                 FILE); prints "Submitted batch job ID" first; batch.pid / batch.rc record the batch shell.
  srun ...       starts nodes x ntasks-per-node tasks with per-task SLURM_PROCID/LOCALID/NODEID/... (one "node" per
                 host of the node list), records its arguments (srun.jsonl) and the task pids (tasks.pids);
                 --kill-on-bad-exit=1 kills the others when one fails; returns the highest task exit code.
  scancel --signal=SIG JOBID   sends SIG to every process of the tasks (job steps), not to the batch shell, as
                 SLURM does.
  scontrol show hostnames LIST / requeue JOBID   expands a node list / records the requeue (requeue.log).
"""
from __future__ import annotations

import os
import stat
import sys

_COMMON = r'''
import json, os, re, signal, subprocess, sys, time
D = os.environ["FAKE_SLURM_DIR"]

def expand(nodelist):
  out = []
  for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
    m = re.match(r"(.*)\[(.*)\](.*)", part)
    if not m:
      out.append(part)
      continue
    for r in m.group(2).split(","):
      a, _, b = r.partition("-")
      for i in range(int(a), int(b or a) + 1):
        out.append(f"{m.group(1)}{str(i).zfill(len(a))}{m.group(3)}")
  return out

def record(name, obj):
  with open(os.path.join(D, name), "a") as f:
    f.write(json.dumps(obj) + "\n")
'''

_SBATCH = r'''
path = sys.argv[-1]
text = open(path).read()
opt = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", text, re.M))
job = os.environ.get("FAKE_SLURM_JOB_ID", "4242")
nodes = expand(os.environ["FAKE_SLURM_NODELIST"])
assert len(nodes) == int(opt.get("nodes", 1)), (nodes, opt)
env = dict(os.environ, SLURM_JOB_ID=job, SLURM_JOBID=job, SLURM_JOB_NODELIST=os.environ["FAKE_SLURM_NODELIST"],
           SLURM_NODELIST=os.environ["FAKE_SLURM_NODELIST"], SLURM_JOB_NUM_NODES=str(len(nodes)),
           SLURM_NNODES=str(len(nodes)), SLURM_SUBMIT_DIR=os.getcwd(), SLURM_CPUS_PER_TASK=opt.get("cpus-per-task", "1"),
           SLURM_NTASKS=str(len(nodes) * int(opt.get("ntasks-per-node", 1))), SLURM_PROCID="0", SLURM_LOCALID="0",
           SLURM_NODEID="0", SLURMD_NODENAME=nodes[0], SLURM_RESTART_COUNT=os.environ.get("FAKE_SLURM_RESTARTS", "0"))
record("sbatch.jsonl", {"file": path, "options": opt})
out = open(opt.get("output", os.path.join(D, "slurm-%j.out")).replace("%j", job), "a")
print(f"Submitted batch job {job}", flush=True)
proc = subprocess.Popen(["bash", path], env=env, stdout=out, stderr=subprocess.STDOUT)
open(os.path.join(D, "batch.pid"), "w").write(str(proc.pid))
rc = proc.wait()
open(os.path.join(D, "batch.rc.tmp"), "w").write(str(rc))
os.replace(os.path.join(D, "batch.rc.tmp"), os.path.join(D, "batch.rc"))
'''

_SRUN = r'''
args = sys.argv[1:]
opts, i = {}, 0
while i < len(args) and args[i].startswith("-"):
  k, _, v = args[i].lstrip("-").partition("=")
  opts[k] = v or "1"
  i += 1
cmd = args[i:]
record("srun.jsonl", {"options": opts, "command": cmd})
nodes = expand(os.environ["SLURM_JOB_NODELIST"])[:int(opts.get("nodes", os.environ.get("SLURM_NNODES", 1)))]
per_node = int(opts.get("ntasks-per-node", 1))
n = len(nodes) * per_node
procs = []
for rank in range(n):
  node = rank // per_node
  env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank % per_node), SLURM_NODEID=str(node),
             SLURM_NTASKS=str(n), SLURM_STEP_NUM_TASKS=str(n), SLURM_STEP_NODELIST=",".join(nodes),
             SLURM_STEP_NUM_NODES=str(len(nodes)), SLURM_STEP_ID="0", SLURMD_NODENAME=nodes[node],
             SLURM_CPUS_PER_TASK=opts.get("cpus-per-task", os.environ.get("SRUN_CPUS_PER_TASK", "1")))
  procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))  # a task's processes: one group
with open(os.path.join(D, "tasks.pids"), "w") as f:
  f.write(" ".join(str(p.pid) for p in procs))
def stop(signum, frame):  # real srun turns SIGTERM/SIGINT into SIGKILL of the step
  for p in procs:
    p.kill()
signal.signal(signal.SIGTERM, stop)
rcs = [None] * n
while None in rcs:
  for k, p in enumerate(procs):
    if rcs[k] is None and p.poll() is not None:
      rcs[k] = p.returncode if p.returncode >= 0 else 128 - p.returncode
      if rcs[k] != 0 and opts.get("kill-on-bad-exit") == "1":
        time.sleep(2)  # let the others finish a clean exit of their own first
        for q in procs:
          if q.poll() is None:
            q.kill()
  time.sleep(0.1)
sys.exit(max(rcs))
'''

_SCANCEL = r'''
sig = signal.SIGTERM
for a in sys.argv[1:]:
  if a.startswith("--signal="):
    sig = getattr(signal, "SIG" + a.split("=", 1)[1].upper().removeprefix("SIG"))
record("scancel.jsonl", {"args": sys.argv[1:]})
for pid in open(os.path.join(D, "tasks.pids")).read().split():
  try:
    os.killpg(int(pid), sig)  # every process of the task (grain workers too), as slurmstepd does
  except ProcessLookupError:
    pass
'''

_SCONTROL = r'''
a = sys.argv[1:]
if a[:2] == ["show", "hostnames"]:
  print("\n".join(expand(a[2] if len(a) > 2 else os.environ["SLURM_JOB_NODELIST"])))
elif a[:1] == ["requeue"]:
  record("requeue.jsonl", {"job": a[1]})
else:
  sys.exit(f"fake scontrol: unsupported {a}")
'''


def install(bin_dir, state_dir) -> dict[str, str]:
  """Writes the fakes into bin_dir; returns the env additions (PATH first, FAKE_SLURM_DIR)."""
  os.makedirs(bin_dir, exist_ok=True)
  os.makedirs(state_dir, exist_ok=True)
  for name, body in (("sbatch", _SBATCH), ("srun", _SRUN), ("scancel", _SCANCEL), ("scontrol", _SCONTROL)):
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
      f.write(f"#!{sys.executable}\n{_COMMON}\n{body}")
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(state_dir)}


def expand_nodelist(nodelist: str) -> list[str]:
  scope: dict = {}
  exec(_COMMON.replace('D = os.environ["FAKE_SLURM_DIR"]', ""), scope)  # pylint: disable=exec-used
  return scope["expand"](nodelist)

