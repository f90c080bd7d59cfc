"""A local Cloud Storage for tests: gcp-storage-emulator behind tests/gcs_proxy.py, both on 127.0.0.1.

`gcs` (a pytest fixture; import it into a test module) yields a `GcsServer` with the bucket `bucket` emptied and no
fault rules. The servers start once per test session (free ports, a temp data folder) and are stopped by PID.
While they run, this process's environment points gcsfs (through etils.epath) and tensorstore (Orbax's array data)
at the proxy and never holds real credentials; `GcsServer.env` gives the same variables to subprocesses.
tensorstore's GCS retries are shrunk (MMRS_GCS_REQUEST_RETRIES, read by mmrs.train.checkpoint) so a persistent
fault fails in about a second instead of ~15 minutes.

Under CI=true a missing emulator is an error (.ci/run installs requirements-gcs-test.txt); elsewhere those tests skip
with a message saying what to install.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

import child_process

HERE = os.path.dirname(os.path.abspath(__file__))
BUCKET = "bucket"
TS_RETRIES = 2  # tensorstore attempts per request in tests (default 32 with up to 32 s waits)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _get(url: str, data: bytes | None = None, timeout: float = 10.0) -> bytes:
  with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
    return r.read()


class GcsServer:

  def __init__(self):
    self.root = tempfile.mkdtemp(prefix="mmrs_gcs_")
    self.emulator_port, self.proxy_port = _free_port(), _free_port()
    self.url = f"http://127.0.0.1:{self.proxy_port}"
    self.env = {
        "STORAGE_EMULATOR_HOST": self.url,  # gcsfs
        "TENSORSTORE_GCS_HTTP_URL": self.url,  # tensorstore
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else gcsfs tries gRPC/TLS first: 60 s stall per bucket
        "FSSPEC_GS_TOKEN": "anon", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # never real credentials
        "MMRS_GCS_REQUEST_RETRIES": str(TS_RETRIES),
    }
    self._procs: list[subprocess.Popen] = []

  def start(self) -> "GcsServer":
    data = os.path.join(self.root, "data")
    self._spawn([sys.executable, "-m", "gcp_storage_emulator", "-d", data, "start", "--quiet", "--host",
                 "127.0.0.1", "--port", str(self.emulator_port), "--default-bucket", BUCKET], {}, "emulator.log")
    self._spawn([sys.executable, os.path.join(HERE, "gcs_proxy.py"), str(self.proxy_port), str(self.emulator_port)],
                {}, "proxy.log")
    deadline = time.time() + 60
    while True:
      try:
        _get(f"{self.url}/storage/v1/b/{BUCKET}", timeout=2)
        return self
      except Exception as e:  # pylint: disable=broad-except
        if time.time() > deadline or any(p.poll() is not None for p in self._procs):
          logs = {n: open(os.path.join(self.root, n)).read()[-2000:] for n in ("emulator.log", "proxy.log")}
          self.stop()
          raise RuntimeError(f"the local GCS did not start ({e}): {logs}") from e
        time.sleep(0.2)

  def _spawn(self, cmd: list[str], extra_env: dict, log: str) -> None:
    env = {**os.environ, **extra_env}
    with open(os.path.join(self.root, log), "w") as out:
      self._procs.append(subprocess.Popen(cmd, cwd=self.root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))

  def stop(self) -> None:
    for p in self._procs:
      p.terminate()  # all told first, so their grace periods overlap
    for p in self._procs:
      child_process.stop(p)
    self._procs = []
    shutil.rmtree(self.root, ignore_errors=True)

  # ----------------------------------------------------------------------------------------------------------------

  def reset(self) -> None:
    """An empty bucket, no fault rules, an empty request log; fresh gcsfs listings."""
    self.clear_faults()
    _get(f"http://127.0.0.1:{self.emulator_port}/wipe?keep-buckets=1")
    _forget_listings()

  def fault(self, path_re: str, times: int = 1, method: str | None = None, after: int = 0, **action) -> None:
    """Next `times` requests matching `path_re` (-1: all) get `action`: status=503 / truncate=N / cut=N / flip=True."""
    rule = {"path_re": path_re, "times": times, "after": after, **action}
    if method:
      rule["method"] = method
    _get(f"{self.url}/__fault/rules", json.dumps({"rules": [rule]}).encode())

  def clear_faults(self) -> None:
    _get(f"{self.url}/__fault/clear", b"")

  def log(self) -> list[dict]:
    return json.loads(_get(f"{self.url}/__fault/log"))

  def objects(self, prefix: str = "") -> list[str]:
    doc = json.loads(_get(f"{self.url}/storage/v1/b/{BUCKET}/o?prefix={prefix}"))
    return sorted(i["name"] for i in doc.get("items") or [])


def _forget_listings() -> None:
  """gcsfs caches directory listings per filesystem instance: objects written by another process would be missed."""
  try:
    import fsspec  # pylint: disable=g-import-not-at-top
    for fs in list(fsspec.filesystem("gs").__class__._cache.values()):  # pylint: disable=protected-access
      fs.invalidate_cache()
  except Exception:  # pylint: disable=broad-except  (gcsfs absent: nothing cached)
    pass


def _available() -> str | None:
  """Not imported here: gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported, after `env` is set."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  missing = [m for m in ("gcp_storage_emulator", "gcsfs") if importlib.util.find_spec(m) is None]
  return f"{missing} not installed: pip install -r requirements-gcs-test.txt" if missing else None


@pytest.fixture(scope="session")
def gcs_session():
  missing = _available()
  if missing:
    if os.environ.get("CI") == "true":
      pytest.fail(f"The GCS emulator tests must run in CI: {missing}")
    pytest.skip(f"no local GCS emulator ({missing})")
  server = GcsServer()
  saved = {k: os.environ.get(k) for k in server.env}
  os.environ.update(server.env)
  server.start()
  yield server
  server.stop()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


@pytest.fixture
def gcs(gcs_session):
  gcs_session.reset()
  yield gcs_session
  gcs_session.clear_faults()
