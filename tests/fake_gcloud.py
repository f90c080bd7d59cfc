"""A fake `gcloud` for launch/tpu_vm.sh tests: TPU VMs as local directories, each worker a home directory.

`install(bin_dir, state_dir, workers)` writes the executable. It records every call (calls.jsonl) and handles
`compute tpus tpu-vm {describe,create,delete,scp,ssh}`: create/describe/delete keep the VM's state in
state_dir/vm_<name>; scp copies to every selected worker's home (state_dir/worker<i>); ssh runs --command with bash in
each selected worker's home, all workers at once as separate processes, with MMRS_COORDINATOR_ADDRESS /
MMRS_NUM_PROCESSES / MMRS_PROCESS_ID set (what the TPU metadata server tells jax.distributed on a real slice), and a
`hostname` of its own (fake-tpu-w-<i>: real workers' hostnames differ). `alpha compute tpus tpu-vm ...` is handled
like the GA command. `storage rsync [--recursive] DIR gs://...` really copies DIR's files to the bucket through
gcsfs (the tests point it at the local GCS emulator). With `venv` given, a deleted VM loses its workers' disks and a
created one starts from fresh homes holding only mmrs_venv (a link to `venv`, what --skip_setup expects): a
recreated VM as on Cloud TPU.
"""
from __future__ import annotations

import os
import stat
import sys

_BODY = r'''
import json, os, shutil, subprocess, sys
D = os.environ["FAKE_GCLOUD_DIR"]
N = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
VENV = os.environ.get("FAKE_GCLOUD_VENV")
argv = sys.argv[1:]
with open(os.path.join(D, "calls.jsonl"), "a") as f:
  f.write(json.dumps(argv) + "\n")
if argv[:1] == ["alpha"]:
  argv = argv[1:]
if argv[:2] == ["storage", "rsync"]:
  import fsspec
  src, dst = [a for a in argv[2:] if not a.startswith("--")]
  fs = fsspec.filesystem("gs")
  for root, _, names in os.walk(src):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), src)
      fs.put(os.path.join(root, name), dst[len("gs://"):].rstrip("/") + "/" + rel)
  sys.exit(0)
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
    if VENV and not os.path.exists(os.path.join(h, "mmrs_venv")):
      os.symlink(VENV, os.path.join(h, "mmrs_venv"))
elif verb == "delete":
  os.remove(vm)
  if VENV:  # the VM's disks go with it
    for h in homes:
      shutil.rmtree(h, ignore_errors=True)
elif verb == "scp":
  src, dest = pos
  for h in sel:
    shutil.copy(src, os.path.join(h, dest.split(":", 1)[1].replace("~/", "")))
elif verb == "ssh":
  if not os.path.exists(vm):
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.ssh) NOT_FOUND")
  port = os.environ.get("FAKE_GCLOUD_PORT", "29517")
  procs = []
  for h in sel:
    i = homes.index(h)
    shim = os.path.join(D, f"host{i}")  # this worker's `hostname`
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "hostname"), "w") as f:
      f.write(f"#!/bin/sh\necho fake-tpu-w-{i}\n")
    os.chmod(os.path.join(shim, "hostname"), 0o755)
    procs.append(subprocess.Popen(["bash", "-c", opts["command"]], cwd=h, env=dict(
        os.environ, HOME=h, PATH=shim + os.pathsep + os.environ["PATH"], MMRS_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        MMRS_NUM_PROCESSES=str(N), MMRS_PROCESS_ID=str(i))))
  sys.exit(max(p.wait() for p in procs))
else:
  sys.exit(f"fake gcloud: unsupported verb {verb}")
'''


def install(bin_dir, state_dir, workers: int = 2, venv: str | None = None) -> dict[str, str]:
  """Writes bin_dir/gcloud; returns the env additions."""
  os.makedirs(bin_dir, exist_ok=True)
  os.makedirs(state_dir, exist_ok=True)
  path = os.path.join(bin_dir, "gcloud")
  with open(path, "w") as f:
    f.write(f"#!{sys.executable}\n{_BODY}")
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_GCLOUD_DIR": str(state_dir),
          "FAKE_GCLOUD_WORKERS": str(workers), **({"FAKE_GCLOUD_VENV": str(venv)} if venv else {})}
