"""Shard groups (issue 19): a process stages, opens and reads only the shards of its groups; the global batches do
not depend on the process count, so a run resumes 4 -> 2 -> 1 processes on the same sequence; shard counts and
batch sizes the groups cannot split, another G on resume and a share larger than the stage quota are refused.
(Training across process counts with groups and a capped stage directory: tests/test_multihost.py.)"""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs.common import dataset_config
from mmrs.data import pipeline as pipeline_lib
from mmrs.data import shard_groups
from mmrs.data import staging
from mmrs.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
BATCH, GROUPS, SHARDS = 8, 4, 8


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """8 shards dealt into 4 groups (recorded in the manifest), 96 px records (~0.3 MB): big enough that the bytes a
  process reads stand out from its imports."""
  d = tmp_path_factory.mktemp("bucket") / "ds"
  synthetic.write_synthetic_dataset(str(d), n_pairs=32, size=96, num_shards=SHARDS, seed=0, shard_groups=GROUPS)
  return d


def _dataset_bytes(d) -> int:
  return sum(p.stat().st_size for p in d.glob("*.array_record"))


def _make(shards, index=0, count=1, batch=BATCH, **cfg):
  return pipeline_lib.make_pipeline(dataset_config(str(shards), image_size=16, **cfg), modalities=("s1", "s2"),
                                    global_batch_size=batch, seed=5, process_index=index, process_count=count)


def _global_batches(shards, count, n, state=None):
  """n global batches assembled from `count` pipelines (one per simulated process), and the state after them."""
  pipes = [_make(shards, i, count) for i in range(count)]
  for p in pipes:
    if state is not None:
      p.iterator.set_state(json.loads(json.dumps(state)))
  out = []
  for _ in range(n):
    parts = [next(p.iterator) for p in pipes]
    out.append({k: np.concatenate([b[k] for b in parts]) for k in parts[0]})
  state = pipes[0].iterator.get_state()
  assert all(p.iterator.get_state()["global_batches"] == state["global_batches"] for p in pipes)
  for p in pipes:
    p.close()
  return out, state


def test_four_processes_stage_open_and_read_only_their_share(bucket, tmp_path):
  procs, outs = [], []
  for i in range(4):
    outs.append(tmp_path / f"p{i}.json")
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "tests.shard_share_run", f"file://{bucket}", str(tmp_path / f"stage{i}"), str(i),
         "4", "1", str(outs[-1])], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  for p in procs:
    log = p.communicate(timeout=300)[0]
    assert p.returncode == 0, log[-3000:]
  reports = [json.loads(o.read_text()) for o in outs]
  manifest = json.loads((bucket / "manifest.json").read_text())
  total = _dataset_bytes(bucket)
  for i, r in enumerate(reports):
    mine = sorted(manifest["splits"]["train"]["paired"][i::GROUPS])  # shard j goes to group j mod G
    assert r["served_groups"] == [i]
    assert r["staged"] == mine, "a process stages only its group's shards"
    assert r["open_shards"] and set(r["open_shards"]) <= set(mine), "a process opens only its group's shards"
    assert {k.split(":")[0] for ks in r["keys"] for k in ks} <= set(mine)
    # Its share: copying 1/4 of the dataset, hashing the copy, opening 2 shards, reading 2 records (measured
    # 0.75x the dataset's bytes). Staging every shard (one group) reads the whole dataset twice (copy + sha256).
    assert r["bytes_read"] < total, (r["bytes_read"], total)
  # The rows of the 4 processes make up the global batch a single process reads.
  want, _ = _global_batches(bucket, 1, 1)
  for k in range(1):
    got = [key for r in reports for key in r["keys"][k]]
    assert got == [str(x) for x in want[k]["record_key"]]


def test_resume_four_to_two_to_one_processes_continues_the_same_global_batches(bucket):
  """Bitwise-equal global batches (record ids and every array): the step sees the same input on any process
  count. 32 records in 4 groups of 8 = 4 batches per epoch of each group: 9 batches cross two epochs."""
  uninterrupted, _ = _global_batches(bucket, 1, 9)
  four, state = _global_batches(bucket, 4, 3)
  two, state = _global_batches(bucket, 2, 3, state)
  one, _ = _global_batches(bucket, 1, 3, state)
  assert state["mmrs_pipeline"]["shard_groups"] == GROUPS
  for k, (a, b) in enumerate(zip(uninterrupted, four + two + one)):
    assert set(a) == set(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"global batch {k} {key}")
  # Each block of B/G rows holds one group's records, each group in its own order: every record once per epoch.
  keys = np.stack([b["record_key"] for b in uninterrupted[:4]])  # (batch, row)
  for j in range(GROUPS):
    block = keys[:, 2 * j:2 * j + 2].ravel()
    assert len(set(block)) == 8 and {k.split(":")[0] for k in block} == {
        f"train.paired-{s:05d}-of-{SHARDS:05d}.array_record" for s in (j, j + GROUPS)}


def test_shard_counts_that_do_not_suit_the_groups_are_refused(bucket, tmp_path):
  with pytest.raises(shard_groups.ShardGroupError, match=r"6 shard file\(s\), which 4 shard groups cannot split"):
    synthetic.write_synthetic_dataset(str(tmp_path / "six"), n_pairs=12, size=8, num_shards=6, shard_groups=4)
  assert not (tmp_path / "six").exists()
  with pytest.raises(shard_groups.ShardGroupError, match=r"'paired' has 8 shard file\(s\), which 3 shard groups"):
    _make(bucket, batch=12, shard_groups=3)
  with pytest.raises(shard_groups.ShardGroupError, match="batch_size=8 is not a multiple of the 16 shard groups"):
    _make(bucket, shard_groups=16)


def test_resume_with_another_group_count_is_refused(bucket):
  pipe = _make(bucket)
  next(pipe.iterator)
  state = pipe.iterator.get_state()
  pipe.close()
  other = _make(bucket, shard_groups=2)
  with pytest.raises(ValueError, match="shard_groups: saved 4, now 2"):
    other.iterator.set_state(state)


def test_a_share_larger_than_the_stage_quota_fails_before_copying(bucket, tmp_path):
  total = _dataset_bytes(bucket)
  # Two hosts: each share (half the dataset) fits a quota of 0.6x the dataset, the whole dataset does not.
  quota_gb = 0.6 * total / 1e9
  for i in range(2):
    pipe = _make(f"file://{bucket}", i, 2, stage_dir=str(tmp_path / f"host{i}"), stage_quota_gb=quota_gb)
    next(pipe.iterator)
    pipe.close()
    staged = sum(p.stat().st_size for p in (tmp_path / f"host{i}").glob("*.array_record"))
    assert 0 < staged <= 0.6 * total
  with pytest.raises(staging.StagingError, match=r"would exceed data.<name>.stage_quota_gb .* more shard groups"):
    _make(f"file://{bucket}", 0, 1, stage_dir=str(tmp_path / "one_host"), stage_quota_gb=quota_gb)
  assert not list((tmp_path / "one_host").glob("*.array_record*")), "nothing is copied before the check"
