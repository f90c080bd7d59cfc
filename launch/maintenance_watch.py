"""Watch a TPU VM's upcoming host maintenance and SIGTERM the trainer before it starts (launch/tpu_vm.sh runs it).

    python -m launch.maintenance_watch --pid=PID [--lead_s=600] [--poll_s=60] [--state=FILE]

Cloud TPU's documented signal (Cloud TPU docs, "View maintenance notifications") is the metadata key
`instance/upcoming-maintenance`: JSON with maintenanceStatus (PENDING / ONGOING), windowStartTime, ... or
{"error": "no notifications have been received yet, ..."} when none is scheduled. Every --poll_s this reads it; when a
maintenance is ONGOING, or PENDING with its window opening within --lead_s (it may start any time in the window), it
sends SIGTERM to --pid: the trainer saves the current step and exits 75 (launch/main.py), as on preemption, and
tpu_vm.sh --watch restarts it. It acts once per maintenance window: --state records the window it acted on, so a run
restarted while the same window is still pending trains on (and loses at most the steps since that restart).

Where the VM was created with --autocheckpoint-enabled (tpu_vm.sh --autocheckpoint), Cloud TPU itself sends the
SIGTERM; this watcher is then a second, earlier notice. MMRS_METADATA_URL (environment) points it at another server
(tests: a fake one). Unreachable metadata (not a GCE VM) is logged once and the watch goes on.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import sys
import time
import urllib.request

DEFAULT_URL = "http://metadata.google.internal/computeMetadata/v1/instance/upcoming-maintenance"


def read_notice(url: str, timeout: float = 10.0) -> dict | None:
  """The upcoming maintenance, or None when none is scheduled."""
  request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      doc = json.loads(response.read() or b"{}")
  except urllib.error.HTTPError as e:
    if e.code == 404:  # no maintenance key on this VM
      return None
    raise
  return None if not isinstance(doc, dict) or "error" in doc or not doc.get("maintenanceStatus") else doc


def _time(stamp: str) -> float:
  return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def due(notice: dict | None, now: float, lead_s: float) -> bool:
  """Should the trainer stop now for this notice?"""
  if not notice:
    return False
  status = str(notice.get("maintenanceStatus", "")).upper()
  if status == "ONGOING":
    return True
  start = notice.get("windowStartTime")
  return status == "PENDING" and bool(start) and _time(start) - now <= lead_s


def watch(pid: int, url: str, lead_s: float, poll_s: float, state: str | None) -> int:
  window = lambda n: n.get("windowStartTime") or n.get("maintenanceStatus")
  acted = open(state).read().strip() if state and os.path.exists(state) else None
  warned = False
  while True:
    try:
      os.kill(pid, 0)
    except OSError:
      return 0  # the trainer is gone
    try:
      notice = read_notice(url)
    except Exception as e:  # pylint: disable=broad-except  (network, JSON): keep watching
      if not warned:
        print(f"maintenance_watch: cannot read {url} ({type(e).__name__}: {e}); still watching", flush=True)
        warned = True
      notice = None
    if due(notice, time.time(), lead_s) and window(notice) != acted:
      print(f"maintenance_watch: host maintenance {notice.get('maintenanceStatus')} (window starts "
            f"{notice.get('windowStartTime')}): SIGTERM to the trainer (pid {pid}) to save a checkpoint", flush=True)
      if state:
        with open(state, "w") as f:
          f.write(str(window(notice)))
      acted = window(notice)
      try:
        os.kill(pid, signal.SIGTERM)
      except OSError:
        return 0
    time.sleep(poll_s)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pid", type=int, required=True, help="the trainer's process id")
  parser.add_argument("--lead_s", type=float, default=600.0, help="stop this long before the window opens")
  parser.add_argument("--poll_s", type=float, default=60.0, help="seconds between metadata reads")
  parser.add_argument("--state", default=None, help="file recording the maintenance window already acted on")
  args = parser.parse_args(argv)
  if args.pid <= 0 or args.poll_s <= 0 or args.lead_s < 0:
    print("maintenance_watch: --pid and --poll_s must be positive, --lead_s not negative", file=sys.stderr)
    return 2
  return watch(args.pid, os.environ.get("MMRS_METADATA_URL", DEFAULT_URL), args.lead_s, args.poll_s, args.state)


if __name__ == "__main__":
  sys.exit(main())
