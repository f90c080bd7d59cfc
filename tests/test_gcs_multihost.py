"""2 processes x 2 devices (jax.distributed over gloo) on gs:// against the local GCS emulator (tests/gcs_emulator.py):
AuxMAE `tiny` on the bundled sample (tests/multihost_run.py), the workdir, the metrics, the shards and jax's
compilation cache all on gs://bucket.

Two launches serve every assertion (CI time):
  ref  trains steps 1..4 on gs://bucket/ref (checkpoints 2 and 4 on the bucket, every process writing its part);
  res  new processes on gs://bucket/res, which holds a copy of ref's checkpoint 2 (a run stopped after step 2):
       they restore it from the bucket and train steps 3..4.
Both read the sample in 2 shard groups from gs://bucket/ben, staged into a directory per process capped below the
data they read, and share the compilation cache gs://bucket/cache.
"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import test_multihost as mh
from data_prep import bigearthnet_mm
from gcs_emulator import gcs_session  # pylint: disable=unused-import  (fixture)
from mmrs.train import metrics as metrics_lib
from sample_data import SAMPLE

REPO = pathlib.Path(__file__).resolve().parents[1]
GROUPS = 2
CACHE = "gs://bucket/cache"
# tests/cpu_cache_share.py: on CPU each process's cache keys hold its own topology, so process 1 would never load
# what process 0 (the only writer) cached; keyed by device kinds, both load the resumed launch's steps.
SCRIPT = [sys.executable, "-m", "tests.cpu_cache_share", "tests.multihost_run"]


def _fs():
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs")


def _launch(gcs, name, phases, local, quota):
  """2 processes of tests/multihost_run.py on gs://bucket/<name>; side files (records, params, staged names) in
  local/<name>. Output goes to files (a full pipe would stall a process at its next collective)."""
  port = mh._free_port()  # pylint: disable=protected-access
  out = local / name
  env = dict(os.environ, **gcs.env, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs, logs = [], [local / f"{name}_p{i}.log" for i in range(2)]
  for i, log in enumerate(logs):
    # Process 1 names the proxy "localhost" (the same address): its requests carry that Host header.
    host = {k: v.replace("127.0.0.1", "localhost") for k, v in gcs.env.items() if v.startswith("http://")} if i else {}
    with open(log, "w") as f:
      procs.append(subprocess.Popen(
          SCRIPT + [f"--shards=gs://bucket/ben", f"--shard_groups={GROUPS}", f"--workdir=gs://bucket/{name}",
                       f"--outdir={out}", f"--phases={phases}", f"--stage_root={local / ('disks_' + name)}",
                       f"--stage_quota_gb={quota}", f"--compilation_cache_dir={CACHE}",
                       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
          cwd=REPO, env=dict(env, **host), stdout=f, stderr=subprocess.STDOUT, text=True))
  try:
    for p in procs:
      p.wait(timeout=900)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log.read_text()[-5000:]
  return out, [log.read_text() for log in logs]


@pytest.fixture(scope="module")
def runs(gcs_session, tmp_path_factory):
  gcs = gcs_session
  gcs.reset()
  local = tmp_path_factory.mktemp("gcs_multihost")
  shards = local / "ben"
  bigearthnet_mm.convert_dataset(SAMPLE, str(shards), num_shards=GROUPS)
  _fs().put(str(shards) + "/", "bucket/ben", recursive=True)
  quota = mh.stage_quota_gb(shards)
  ref, ref_logs = _launch(gcs, "ref", "4", local, quota)
  # ref's checkpoint 2 (every process's part) into a fresh run folder: a run stopped after step 2.
  _fs().get("bucket/ref/checkpoints/2", str(local / "ckpt2"), recursive=True)
  _fs().put(str(local / "ckpt2") + "/", "bucket/res/checkpoints/2", recursive=True)
  res, res_logs = _launch(gcs, "res", "4", local, quota)
  uploads = {0: [], 1: []}  # process -> names of the objects it uploaded
  for e in gcs.log():
    if e["name"]:
      uploads[int(e["host"].startswith("localhost"))].append(e["name"])
  return dict(gcs=gcs, shards=shards, quota=quota, ref=ref, res=res, ref_logs=ref_logs, res_logs=res_logs,
              uploads=uploads, objects=gcs.objects())


def _losses(name):
  return {r["step"]: (r["task"], r["loss"]) for r in metrics_lib.read_metrics(f"gs://bucket/{name}") if "loss" in r}


def test_checkpoints_of_two_processes_on_the_bucket(runs):
  objects = runs["objects"]
  for step in (2, 4):
    assert f"ref/checkpoints/{step}/commit_success.txt" in objects
    # Each process wrote its own part of the array data (Orbax's per-process OCDBT folders).
    assert any(o.startswith(f"ref/checkpoints/{step}/state/ocdbt.process_1/") for o in objects), step
  assert "ref/config.json" in objects


def test_two_processes_resume_from_the_bucket_exactly(runs):
  """New processes restore step 2 from gs:// and train steps 3..4 to the same losses and parameters, bit for bit,
  as the run that never stopped."""
  assert any("Resumed gs://bucket/res at step 2" in log for log in runs["res_logs"])
  ref, res = _losses("ref"), _losses("res")
  assert sorted(ref) == [1, 2, 3, 4] and sorted(res) == [3, 4]
  assert [res[s] for s in (3, 4)] == [ref[s] for s in (3, 4)]
  got, want = mh.params(runs["res"]), mh.params(runs["ref"])
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_each_process_stages_only_its_shard_groups_from_the_bucket(runs):
  """gs://bucket/ben does not fit a process's stage quota; each process stages only its group's shards from the
  bucket (per launch, into a disk of its own) and every record in its rows comes from them."""
  for name in ("ref", "res"):
    staged = [json.loads((runs[name] / f"stage_p{i}.json").read_text()) for i in range(2)]
    for i, names in enumerate(staged):
      assert names and all(f"-{i:05d}-of-{GROUPS:05d}" in n for n in names), names
      assert sum((runs["shards"] / n).stat().st_size for n in names) <= runs["quota"] * 1e9
      for r in map(json.loads, (runs[name] / f"records_p{i}.jsonl").read_text().splitlines()):
        assert {k.split(":")[0] for k in r["keys"]} <= set(names)
    assert not set(staged[0]) & set(staged[1])


def test_compilation_cache_on_the_bucket_written_by_process_0_and_loaded_by_the_next_launch(runs):
  """jax writes the persistent cache on gs:// from process 0 only (process 1 uploads its checkpoint parts, no cache
  entry); both processes of the resumed launch load their train steps from it (CPU keys made process-invariant by
  tests/cpu_cache_share.py, as GPU/TPU keys are)."""
  cached = lambda names: {n for n in names if n.startswith("cache/")}  # a resumable upload names it twice
  entries = cached(runs["objects"])
  assert entries and cached(runs["uploads"][0]) == entries
  assert not cached(runs["uploads"][1])
  assert any("/ocdbt.process_1/" in n for n in runs["uploads"][1])
  for log in runs["res_logs"]:
    compiled = [line for line in log.splitlines() if "Compiled task" in line]
    assert len(compiled) == 2 and all("(loaded from the persistent compilation cache)" in c for c in compiled), compiled
