"""gs:// end to end on the real code paths (gcsfs / etils.epath, tensorstore, Orbax, jax's cache) against the local
GCS emulator behind the fault proxy (tests/gcs_emulator.py), with the faults that object storage really has.

One toy run trains to step 4 on gs://bucket/run (checkpoints 2 and 4, metrics, TensorBoard and reconstruction PNGs
under gs://bucket/run/logs, jax's compilation cache under gs://bucket/run/compilation_cache); each test starts from a
copy of that bucket and resumes with a fault injected; launch.main is killed with SIGKILL and resumed exactly; a
missing bucket is one error before anything runs. Elsewhere on the emulator: 2 processes saving, restoring and
staging shards from gs:// (test_gcs_multihost.py), finetune results and exports (test_gcs_outputs.py), the TPU VM
launcher's logs and maintenance handling (test_tpu_vm_gcs.py).
"""
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import pytest

import checkpoint_chunks
import train_toy_method as toy
from gcs_emulator import gcs, gcs_session  # pylint: disable=unused-import  (fixtures)
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import loop
from mmrs.train import metrics as metrics_lib

WORKDIR, LOGDIR = "gs://bucket/run", "gs://bucket/run/logs"
STEP4 = r"run/checkpoints/4/"

# A failed Orbax restore leaves a tensorstore callback aimed at its closed asyncio loop ("Event loop is closed").
pytestmark = pytest.mark.filterwarnings("ignore:Exception ignored in:pytest.PytestUnraisableExceptionWarning")


def _train(total_steps, cache="", **kwargs):
  config = toy.get_config()
  config.total_steps, config.checkpoint_every_steps, config.mesh = total_steps, 2, "data=1"
  config.toy.tasks, config.visualize_every_steps = "cross", 2
  config.model.width = 32  # 32x32 kernels (4 KiB): above Orbax's 1 KiB inline limit, outside the CRC'd b-tree
  config.compilation_cache_dir = cache  # off unless asked: a warm cache would hide nothing here, but costs uploads
  return loop.train(config, WORKDIR, logdir=LOGDIR, method=toy.build(config), task_data=toy.fake_data,
                    devices=jax.devices()[:1], **kwargs)


def _fs():
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs")


@pytest.fixture(scope="module")
def snapshot(gcs_session, tmp_path_factory):
  """The bucket after 4 steps on gs://, downloaded."""
  gcs_session.reset()
  _train(4, cache="auto")  # the default: <workdir>/compilation_cache, on the bucket
  local = tmp_path_factory.mktemp("bucket")
  _fs().get("bucket/run", str(local), recursive=True)
  return local / "run"


@pytest.fixture
def bucket(gcs, snapshot, monkeypatch):
  monkeypatch.setattr(ckpt_lib, "RESTORE_BACKOFF_S", 0.01)
  _fs().put(str(snapshot) + "/", "bucket/run", recursive=True)
  gcs.clear_faults()
  return gcs


def _steps(gcs):
  return sorted({o.split("/")[2] for o in gcs.objects("run/checkpoints/") if o.split("/")[2].isdigit()}, key=int)


def test_first_run_wrote_everything_to_the_bucket(snapshot):
  files = {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}
  assert {"checkpoints/2/commit_success.txt", "checkpoints/4/commit_success.txt", "config.json"} <= files
  assert any(f.startswith("logs/metrics/") for f in files)
  assert any(f.startswith("logs/tensorboard/events.out.tfevents") for f in files)
  assert any(f.startswith("compilation_cache/") for f in files)  # jax wrote its persistent cache to gs://
  assert {f for f in files if f.startswith("logs/reconstructions/")} == {
      "logs/reconstructions/step_00000002_cross.png", "logs/reconstructions/step_00000004_cross.png"}


def test_two_resumes_keep_the_whole_metrics_and_tensorboard_history(bucket):
  """The old writer rewrote metrics.jsonl on gs:// at every start: only the last start's steps survived."""
  _train(6)
  _train(8)
  steps = [r["step"] for r in metrics_lib.read_metrics(LOGDIR) if r.get("task") == "cross"]
  assert steps == list(range(1, 9))
  assert len([o for o in bucket.objects("run/logs/tensorboard/") if "tfevents" in o]) == 3
  assert _steps(bucket) == ["4", "6", "8"]  # keep_checkpoints=3


@pytest.mark.parametrize("fault", [dict(status=503), dict(status=429), dict(cut=100)], ids=["503", "429", "cut"])
def test_outage_on_array_data_stops_and_moves_nothing(bucket, fault):
  """503 / 429 / a connection cut mid-body on every array-data read, beyond tensorstore's retries: the old code
  called a 503 damage (the status is only in the cause of Orbax's bare Exception) and moved step 4 aside."""
  before = bucket.objects("run/checkpoints/")
  bucket.fault(STEP4 + r"state/(.+/)?d/.*alt=media", times=-1, method="GET", **fault)
  with pytest.raises(ckpt_lib.CheckpointUnavailable, match=r"step 4 .*ABORTED.*nothing was moved"):
    _train(6)
  bucket.clear_faults()
  assert bucket.objects("run/checkpoints/") == before


def test_refused_reads_are_one_error_and_nothing_moves(bucket):
  """403 on every object read: the old code renamed every step corrupt_step_* and started again at step 0."""
  before = bucket.objects("run/checkpoints/")
  bucket.fault(r"alt=media", times=-1, method="GET", status=403)
  with pytest.raises(ckpt_lib.CheckpointAccessDenied, match=r"Access to checkpoint step 4 in gs://bucket/run/"
                     r"checkpoints was refused"):
    _train(6)
  bucket.clear_faults()
  assert bucket.objects("run/checkpoints/") == before


def test_missing_bucket_is_one_error_before_anything_is_written(gcs):
  """The old code trained to its first write and died there with a bare FileNotFoundError naming an upload URL."""
  with pytest.raises(ckpt_lib.CheckpointAccessDenied, match=r"^The bucket gs://nobucket of gs://nobucket/run/"
                     r"checkpoints does not exist"):
    loop.train(toy.get_config(), "gs://nobucket/run", method=toy.build(toy.get_config()), task_data=toy.fake_data,
               devices=jax.devices()[:1])


def test_unreadable_meta_is_an_outage_not_a_new_schedule(bucket, monkeypatch):
  """gcsfs's 503 on step 4's meta/metadata, beyond its retries: the old code moved step 4 aside as damage and, the
  meta unreadable, silently changed the learning-rate schedule's length."""
  import gcsfs.retry  # pylint: disable=g-import-not-at-top
  real_sleep = gcsfs.retry.asyncio.sleep
  monkeypatch.setattr(gcsfs.retry, "asyncio", type("Fast", (), {"sleep": staticmethod(lambda s: real_sleep(0.01))}))
  before = bucket.objects("run/checkpoints/")
  bucket.fault(STEP4 + r"meta/metadata.*alt=media", times=-1, method="GET", status=503)
  with pytest.raises(ckpt_lib.CheckpointUnavailable, match=r"step 4 .*HttpError.*503"):
    _train(6)
  bucket.clear_faults()
  assert bucket.objects("run/checkpoints/") == before


def _faults_until_moved_aside(bucket, monkeypatch):
  """The faults hit the original step 4 only, not the one trained again after it was moved aside."""
  real = ckpt_lib.Checkpointer._move_aside  # pylint: disable=protected-access

  def move_aside(self, step, prefix):
    bucket.clear_faults()
    return real(self, step, prefix)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "_move_aside", move_aside)


def test_flipped_array_bytes_are_damage_and_the_previous_step_restores(bucket, snapshot, monkeypatch, caplog):
  """One bit flipped in a parameter chunk of step 4 as stored (the proxy serves it so, with no stored hash): zstd
  decodes it to one wrong weight and tensorstore does not notice (the old code resumed from it), the value
  fingerprints do."""
  _faults_until_moved_aside(bucket, monkeypatch)
  _, name, offset, length = [c for c in checkpoint_chunks.array_chunks(snapshot / "checkpoints" / "4" / "state")
                             if c[0].startswith("params.")][0]
  bucket.fault(STEP4 + "state/" + name, times=-1, method="GET", flip=0x01, at=offset + length // 2)
  summary = _train(6)
  assert "differ from those saved (value fingerprints)" in caplog.text
  assert summary["step"] == 6
  objects = bucket.objects("run/checkpoints/")
  moved = {o.split("/")[2] for o in objects if o.split("/")[2].startswith("corrupt_step_4_")}
  assert len(moved) == 1 and _steps(bucket)[-2:] == ["4", "6"]  # 4 redone from 2, then 6


def test_truncated_manifest_moves_that_step_aside_on_the_bucket(bucket, monkeypatch):
  _faults_until_moved_aside(bucket, monkeypatch)
  bucket.fault(STEP4 + r"state/manifest.ocdbt.*alt=media", times=-1, method="GET", truncate=10)
  summary = _train(6)
  assert summary["step"] == 6
  moved = {o.split("/")[2] for o in bucket.objects("run/checkpoints/corrupt_step_4_")}
  assert len(moved) == 1
  assert "2" in _steps(bucket)


def test_kill9_after_a_checkpoint_on_the_bucket_then_resume_is_exact(gcs, tmp_path):
  """launch.main on gs://bucket/k9 is killed with SIGKILL once checkpoint 4 is committed on the bucket (the run is
  stalled at step 5); the same command resumes at step 4 and logs the same losses as an uninterrupted run."""
  repo = str(pathlib.Path(__file__).resolve().parents[1])
  overrides = ["--config.mesh=data=1,fsdp=1", "--config.checkpoint_every_steps=4", "--config.toy.tasks=cross",
               "--config.compilation_cache_dir=" + str(tmp_path / "cache")]
  cmd = [sys.executable, "-m", "tests.train_toy_method", "--config=tests/train_toy_method.py",
         "--workdir=gs://bucket/k9", "--logdir=gs://bucket/k9/logs", *overrides]
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             MMRS_TOY_BLOCK_AT="4")  # one task: the iterator stalls at its 5th batch, step 5, after checkpoint 4
  proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for line in proc.stdout:
      if "FakeIterator: blocking" in line:
        break
    else:
      pytest.fail(f"the run ended (rc={proc.wait()}) before stalling at step 5")
    deadline = time.monotonic() + 120
    while "k9/checkpoints/4/commit_success.txt" not in gcs.objects("k9/checkpoints/4/"):
      assert time.monotonic() < deadline, "checkpoint 4 was never committed on the bucket"
      time.sleep(0.2)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  env.pop("MMRS_TOY_BLOCK_AT")
  done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Resumed gs://bucket/k9 at step 4" in done.stderr
  reference = subprocess.run([*cmd[:4], "--workdir=gs://bucket/ref", "--logdir=gs://bucket/ref/logs", *overrides],
                             cwd=repo, env=env, capture_output=True, text=True, timeout=600)
  assert reference.returncode == 0, reference.stderr[-3000:]
  losses = lambda logdir: [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(logdir) if "loss" in r]
  assert losses("gs://bucket/k9/logs") == losses("gs://bucket/ref/logs") and len(losses("gs://bucket/ref/logs")) == 8
