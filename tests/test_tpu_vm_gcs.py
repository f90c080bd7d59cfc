"""launch/tpu_vm.sh on gs:// for real: the fake gcloud (tests/fake_gcloud.py: 2 workers as local homes, its
`gcloud storage rsync` writing to the local GCS emulator), a fake metadata server announcing host maintenance, and
the toy trainer (2 processes x 2 devices) with its checkpoints, metrics and logs on gs://bucket/tpu.

A maintenance is announced -> each worker's maintenance watcher SIGTERMs its trainer -> the step is saved on the
bucket and both exit 75 -> the VM is gone after the maintenance -> --watch recreates it (fresh disks) and the run
resumes to the end. Every start of every worker keeps its own log prefix on the bucket; the metrics history is whole.

What the fakes cannot show: that Cloud TPU really announces maintenance through instance/upcoming-maintenance in
time, that --autocheckpoint-enabled (a Preview flag of `gcloud alpha`) is accepted for this accelerator and sends
the SIGTERM itself, and real hostnames, IAM or gcloud's own rsync.
"""
import datetime as dt
import functools
import http.server
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading

import fake_gcloud
from gcs_emulator import _forget_listings, gcs, gcs_session  # pylint: disable=unused-import  (fixtures)
from mmrs.train import metrics as metrics_lib
from timeouts import wait_for

REPO = pathlib.Path(__file__).resolve().parents[1]
PREEMPTED = 75


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FakeMetadata:
  """instance/upcoming-maintenance as Cloud TPU documents it: no notice, or one maintenance notice."""

  NONE = {"error": "no notifications have been received yet, try again later"}

  def __init__(self):
    self.notice = self.NONE
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # pylint: disable=invalid-name
        body = json.dumps(outer.notice if self.headers.get("Metadata-Flavor") == "Google" else {}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/computeMetadata/v1/instance/upcoming-maintenance"
    threading.Thread(target=self.server.serve_forever, daemon=True).start()

  def announce(self, minutes: float) -> None:
    start = dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=minutes)
    self.notice = {"maintenanceType": "SCHEDULED", "maintenanceStatus": "PENDING", "canReschedule": True,
                   "windowStartTime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                   "windowEndTime": (start + dt.timedelta(hours=4)).strftime("%Y-%m-%dT%H:%M:%SZ")}


_wait_for = functools.partial(wait_for, timeout_s=600)


def _read(name):
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs").cat(f"bucket/{name}").decode()


def _synced_starts(worker):
  """The starts of `worker` whose last copy to the bucket is done (their exit_code is there)."""
  prefix = f"tpu/logs/workers/fake-tpu-w-{worker}/"
  _forget_listings()
  import fsspec  # pylint: disable=g-import-not-at-top
  names = fsspec.filesystem("gs").find(f"bucket/{prefix}")
  return sorted({n.split("/")[-2] for n in names if n.endswith("/exit_code")})


def _steps(logdir):
  _forget_listings()
  return [r["step"] for r in metrics_lib.read_metrics(logdir) if "loss" in r]


def test_maintenance_saves_and_a_recreated_vm_keeps_every_workers_history(gcs, tmp_path):
  state = tmp_path / "gcloud"
  metadata = FakeMetadata()
  env = dict(os.environ, **gcs.env, **fake_gcloud.install(tmp_path / "bin", state, workers=2, venv=sys.prefix),
             JAX_PLATFORMS="cpu", FAKE_GCLOUD_PORT=str(_free_port()), MMRS_METADATA_URL=metadata.url,
             XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
  env.pop("PYTHONPATH", None)  # the workers run the shipped copy
  workdir, logdir = "gs://bucket/tpu", "gs://bucket/tpu/logs"
  launch = ["--name=mmrs-t", "--zone=us-central2-b", f"--workdir={workdir}", "--accelerator=v4-16",
            "--config=tests/train_toy_method.py", "--module=tests.train_toy_method", "--skip_setup",
            "--maintenance_poll=1"]
  toy = ["--", "--config.toy.tasks=cross", "--config.checkpoint_every_steps=0"]

  def tpu(*argv):
    out = subprocess.run(["bash", "launch/tpu_vm.sh", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stdout

  try:
    tpu(*launch, *toy, "--config.total_steps=100000")
    create = [c for c in map(json.loads, (state / "calls.jsonl").read_text().splitlines()) if "create" in c]
    # v4: created through gcloud alpha with Cloud TPU's Autocheckpoint (a maintenance sends SIGTERM first).
    assert create[0][:4] == ["alpha", "compute", "tpus", "tpu-vm"] and "--autocheckpoint-enabled" in create[0]
    _wait_for(lambda: max(_steps(logdir), default=0) >= 3, "training steps on the bucket")

    metadata.announce(minutes=5)  # within the watcher's 10 min lead: stop now, save the step
    codes = [state / f"worker{i}" / "mmrs_logs" / "tpu" / "exit_code" for i in range(2)]
    _wait_for(lambda: all(c.exists() for c in codes), "both workers to exit after the maintenance notice")
    assert [c.read_text().strip() for c in codes] == [str(PREEMPTED)] * 2
    saved = sorted({int(o.split("/")[2]) for o in gcs.objects("tpu/checkpoints/") if o.endswith("commit_success.txt")})
    assert len(saved) == 1 and saved[0] >= 3

    # The wrapper copies the logs to the bucket after writing exit_code; the VM goes once that copy is done.
    _wait_for(lambda: all(len(_synced_starts(i)) == 1 for i in range(2)), "the first start's logs on the bucket")
    # The maintenance took the VM; --watch recreates it (new disks, so no local log survives) and resumes to the end.
    metadata.notice = FakeMetadata.NONE
    (state / "vm_mmrs-t").write_text("TERMINATED")
    out = tpu(*launch, "--watch", "--watch_interval=1", *toy, f"--config.total_steps={saved[0] + 2}")
    assert "the run finished" in out
  except BaseException:
    for pid_file in state.glob("worker*/mmrs_logs/tpu/pid"):  # a failed test leaves no trainer behind: the
      subprocess.run(["pkill", "-TERM", "-s", pid_file.read_text().strip()], check=False)  # wrapper's session
    raise
  finally:
    metadata.server.shutdown()

  assert _steps(logdir) == list(range(1, saved[0] + 3))  # one history across both VMs
  _wait_for(lambda: all(len(_synced_starts(i)) == 2 for i in range(2)), "the second start's logs on the bucket",
            timeout_s=300)
  for i in range(2):
    prefix = f"tpu/logs/workers/fake-tpu-w-{i}/"
    starts = _synced_starts(i)  # one prefix per start: the recreated VM did not overwrite the first
    first, second = (_read(f"{prefix}{s}/train.log") for s in starts)
    assert "host maintenance PENDING" in first and f"Preemption: saving step {saved[0]}" in first
    assert f"Resumed {workdir} at step {saved[0]}" in second and "Preemption" not in second
    assert [_read(f"{prefix}{s}/exit_code").strip() for s in starts] == [str(PREEMPTED), "0"]


def test_maintenance_notice_rules_and_bad_input():
  from launch import maintenance_watch as mw  # pylint: disable=g-import-not-at-top
  now = dt.datetime(2026, 12, 7, 8, 0, tzinfo=dt.timezone.utc).timestamp()
  pending = lambda at: {"maintenanceStatus": "PENDING", "windowStartTime": at}
  assert not mw.due(None, now, 600)
  assert mw.due({"maintenanceStatus": "ONGOING"}, now, 600)
  assert mw.due(pending("2026-12-07T08:09:00Z"), now, 600) and not mw.due(pending("2026-12-07T08:11:00Z"), now, 600)
  out = subprocess.run([sys.executable, "-m", "launch.maintenance_watch", "--pid=0"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 2 and out.stderr.strip() == \
      "maintenance_watch: --pid and --poll_s must be positive, --lead_s not negative"
  out = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry_run", "--name=x", "--zone=z", "--accelerator=v6e-8",
                        "--config=c.py", "--workdir=gs://b/r", "--maintenance_poll=soon"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 2 and out.stderr.strip() == \
      "tpu_vm.sh: --maintenance_poll must be a positive number of seconds, got 'soon'"
  out = subprocess.run(["bash", "launch/tpu_vm.sh", "--dry_run", "--name=x", "--zone=z", "--accelerator=v6e-8",
                        "--config=c.py", "--workdir=gs://b/r"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert "gcloud compute tpus tpu-vm create x" in out.stdout and "--autocheckpoint-enabled" not in out.stdout
