"""Stopping a service a test fixture started (the GCS emulator and its proxy, the SLURM daemons): TERM, then KILL
if it has not exited after a grace period."""
from __future__ import annotations

import subprocess


def stop(p: subprocess.Popen, grace_s: float = 10) -> None:
  if p.poll() is None:
    p.terminate()
  try:
    p.wait(timeout=grace_s)
  except subprocess.TimeoutExpired:
    p.kill()
    p.wait()
