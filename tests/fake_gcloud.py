"""A fake `gcloud` for launch/tpu_vm.sh tests: TPU VMs as local directories, each worker a home directory.

`install(bin_dir, state_dir, workers)` writes the executable. It records every call (calls.jsonl) and handles
`compute tpus tpu-vm {describe,create,delete,scp,ssh}`: create/describe/delete keep the VM's state in
state_dir/vm_<name>; scp copies to every selected worker's home (state_dir/worker<i>); ssh runs --command with bash in
each selected worker's home, all workers at once as separate processes, with MMRS_COORDINATOR_ADDRESS /
MMRS_NUM_PROCESSES / MMRS_PROCESS_ID set (what the TPU metadata server tells jax.distributed on a real slice).
"""
from __future__ import annotations

import os
import stat
import sys

_BODY = r'''
import json, os, shutil, subprocess, sys
D = os.environ["FAKE_GCLOUD_DIR"]
N = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
argv = sys.argv[1:]
with open(os.path.join(D, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\n")
if argv[:3] != ["compute", "tpus", "tpu-vm"]:
  sys.exit(f"fake gcloud: unsupported {argv}")
verb, rest = argv[3], argv[4:]
opts = dict(a[2:].split("=", 1) for a in rest if a.startswith("--") and "=" in a)
pos = [a for a in rest if not a.startswith("--")]
vm = os.path.join(D, f"vm_{pos[0].split(':')[0]}") if pos else None
homes = [os.path.join(D, f"worker{i}") for i in range(N)]
sel = homes if opts.get("worker", "0") == "all" else [homes[int(opts.get("worker", "0"))]]
if verb == "describe":
  if not os.path.exists(vm):
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND")
  print(open(vm).read().strip())
elif verb == "create":
  open(vm, "w").write("READY")
  for h in homes:
    os.makedirs(h, exist_ok=True)
elif verb == "delete":
  os.remove(vm)
elif verb == "scp":
  src, dest = pos
  for h in sel:
    shutil.copy(src, os.path.join(h, dest.split(":", 1)[1].replace("~/", "")))
elif verb == "ssh":
  if not os.path.exists(vm):
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) NOT_FOUND")
  port = os.environ.get("FAKE_GCLOUD_PORT", "29517")
  procs = [subprocess.Popen(["bash", "-c", opts["command"]], cwd=h, env=dict(
      os.environ, HOME=h, MMRS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", MMRS_NUM_PROCESSES=str(N),
      MMRS_PROCESS_ID=str(homes.index(h)))) for h in sel]
  sys.exit(max(p.wait() for p in procs))
else:
  sys.exit(f"fake gcloud: unsupported verb {verb}")
'''


def install(bin_dir, state_dir, workers: int = 2) -> dict[str, str]:
  """Writes bin_dir/gcloud; returns the env additions."""
  os.makedirs(bin_dir, exist_ok=True)
  os.makedirs(state_dir, exist_ok=True)
  path = os.path.join(bin_dir, "gcloud")
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n{_BODY}")
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_GCLOUD_DIR": str(state_dir),
          "FAKE_GCLOUD_WORKERS": str(workers)}
