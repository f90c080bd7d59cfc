"""Multi-host by simulation (local processes over gloo), on real data: AuxMAE `tiny` on the bundled sample, mesh
data=2,fsdp=2, Adafactor with factored kernels (tests/multihost_run.py).

One set of runs serves every assertion (CI time):
  C  1 process x 4 devices, steps 1..4, a checkpoint every step;
  A  2 processes x 2 devices, steps 1..3 then 4 (a second phase in the same processes), then
  A2 (same processes) resumes C's step-2 checkpoint on 2 x 2 to step 4 (elastic 1x4 -> 2x2);
  B  1 process x 4 devices resumes A's step-2 checkpoint to step 4 (elastic 2x2 -> 1x4).
The global sample order makes all of them one run: the same records in each global batch, losses equal within 1e-4
(reductions differ across device counts), and the idle task's parameters untouched by a task step.
Every run reads the sample in 2 shard groups (issue 19; the sample converted into 2 shards per modality group), so
each process of A/A2 reads only half the shards; A/A2 stage them from a file:// "bucket" into a directory per
process capped below the dataset's size: a bigger-than-disk run that trains.
"""
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from data_prep import bigearthnet_mm
from sample_data import SAMPLE

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = [sys.executable, "-m", "tests.multihost_run"]


def _env(cache, devices):
  # One compilation cache for all runs, the train loop's too (--compilation_cache_dir; its default, the workdir's
  # own, gave B and A2 nothing to load): B loads C's compiled steps, A2 and A's second phase A's (on process 0).
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run(args, processes, devices, cache, timeout=900):
  """Runs the processes to completion. Output goes to files, not pipes: a process blocked on a full pipe that nobody
  reads (we wait on process 0 first) would hold the others at their next collective."""
  port = _free_port()
  extra = (lambda i: [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={processes}",
                      f"--process_id={i}"]) if processes > 1 else (lambda i: [])
  logs = [cache.parent / f"run_{port}_p{i}.log" for i in range(processes)]
  procs = []
  for i, log in enumerate(logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(SCRIPT + args + extra(i) + [f"--compilation_cache_dir={cache}"], cwd=REPO,
                                    env=_env(cache, devices), stdout=f, stderr=subprocess.STDOUT, text=True))
  try:
    for p in procs:
      p.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    for q in procs:
      q.kill()
      q.wait()
    tails = [log.read_text()[-3000:] for log in logs]
    pytest.fail(f"run {args} timed out; output tails:\n" + "\n---\n".join(tails))
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log.read_text()[-5000:]


GROUPS = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """The sample in 2 shards per modality group (paired 6, s2_only 8, s1_only 3 records)."""
  out = tmp_path_factory.mktemp("data") / "ben"
  bigearthnet_mm.convert_dataset(SAMPLE, str(out), num_shards=GROUPS)
  return out


def stage_quota_gb(shards) -> float:
  """60 % of what the run reads (paired + s2_only shards): each process's half fits, the whole does not."""
  read = [p for p in shards.glob("*.array_record") if ".s1_only-" not in p.name]
  return 0.6 * sum(p.stat().st_size for p in read) / 1e9


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
  root = tmp_path_factory.mktemp("multihost")
  cache = root / "jax_cache"
  d = {k: root / k for k in ("C", "A", "A2", "B")}
  # Every run stages the "bucket" into disks of its own; only A/A2's are capped (one process reads everything).
  common = [f"--shards=file://{shards}", f"--shard_groups={GROUPS}"]
  _run(common + [f"--workdir={d['C']}", "--phases=4", f"--stage_root={root / 'disks_C'}"], 1, 4, cache)
  _run(common + [f"--workdir={d['A']}", "--phases=3,4", f"--stage_root={root / 'disks_A'}",
                 f"--stage_quota_gb={stage_quota_gb(shards)}", f"--elastic_from={d['C'] / 'checkpoints'}:2",
                 f"--elastic_workdir={d['A2']}"], 2, 2, cache)
  _run(common + [f"--workdir={d['B']}", "--phases=", f"--elastic_from={d['A'] / 'checkpoints'}:2",
                 f"--elastic_workdir={d['B']}", f"--stage_root={root / 'disks_B'}"], 1, 4, cache)  # C's compiles
  return d


@pytest.fixture(scope="module")
def chain(runs, shards, tmp_path_factory):
  """Issue 19: C's run again, interrupted twice on other process counts with the same mesh and global batch:
  4 processes x 1 device for steps 1-2 (each stages its group's half under the quota) -> 2 x 2 resumes step 2's
  checkpoint for step 3 -> 1 x 4 resumes step 3's for step 4."""
  root = tmp_path_factory.mktemp("chain")
  cache = runs["C"].parent / "jax_cache"  # C's and A's compiled programs: 2x2 and 1x4 compile nothing new
  d = {k: root / k for k in ("P4", "P2", "P1")}
  common = [f"--shards=file://{shards}", f"--shard_groups={GROUPS}"]
  _run(common + [f"--workdir={d['P4']}", "--phases=2", f"--stage_root={root / 'disks_P4'}",
                 f"--stage_quota_gb={stage_quota_gb(shards)}"], 4, 1, cache)
  _run(common + [f"--workdir={d['P2']}", "--phases=", f"--elastic_from={d['P4'] / 'checkpoints'}:2",
                 f"--elastic_workdir={d['P2']}", "--elastic_steps=3", f"--stage_root={root / 'disks_P2'}"], 2, 2, cache)
  _run(common + [f"--workdir={d['P1']}", "--phases=", f"--elastic_from={d['P2'] / 'checkpoints'}:3",
                 f"--elastic_workdir={d['P1']}", "--elastic_steps=4", f"--stage_root={root / 'disks_P1'}"], 1, 4, cache)
  return d


def losses(workdir) -> dict[int, tuple[str, float]]:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: (r["task"], r["loss"]) for r in records}


def global_keys(workdir) -> dict[tuple[str, int], list[str]]:
  """(task, global batch index) -> the record keys of its rows, assembled from every process's log."""
  out: dict[tuple[str, int], list[str]] = {}
  for path in sorted(workdir.glob("records_p*.jsonl")):
    for r in map(json.loads, path.read_text().splitlines()):
      row = out.setdefault((r["task"], r["batch"]), [None] * 8)
      for i, key in zip(r["rows"], r["keys"]):
        assert row[i] in (None, key), f"batch {r['batch']} row {i} read twice with different records"
        row[i] = key
  return out


def params(workdir, steps=4) -> dict[str, np.ndarray]:
  with np.load(workdir / f"params_{steps}.npz") as f:
    return dict(f)


# 10 % of one lr=1e-3 step; measured <= 6.1e-6, and <= 2.7e-5 with flattened 2-D matmuls (another reduction order).
QKV_BIAS_ATOL = 1e-4


def comparable(name: str, x: np.ndarray) -> np.ndarray:
  """The attention key bias (qkv/bias[1]) has an exactly zero gradient (softmax ignores a shift shared by all keys):
  what it gets is rounding noise, which Adafactor (scale-free updates) turns into +-lr steps whose sign depends on
  the reduction order, so it is left out. The query/value biases have near-zero gradients of the same kind in some
  entries: they are compared with an absolute tolerance (QKV_BIAS_ATOL) instead of a relative one."""
  return np.delete(x, 1, axis=0) if name.endswith("attn/qkv/bias") else x


def assert_params_close(a, b, rtol=1e-4, atol=1e-6, names=None):
  assert set(a) == set(b)
  bad = []
  for k in sorted(names if names is not None else a):
    x, y = comparable(k, a[k]), comparable(k, b[k])
    if not np.allclose(x, y, rtol=rtol, atol=QKV_BIAS_ATOL if k.endswith("attn/qkv/bias") else atol):
      bad.append(f"{k}: max abs diff {np.abs(x - y).max():.3g}, max abs {np.abs(y).max():.3g}")
  assert not bad, "parameters differ:\n" + "\n".join(bad)


def test_processes_read_the_rows_their_devices_hold(runs):
  got = [json.loads((runs["A"] / f"rows_p{i}.json").read_text()) for i in range(2)]
  assert all(g["placed_where_read"] for g in got)
  assert sorted(got[0]["rows"] + got[1]["rows"]) == list(range(8)) and len(got[0]["rows"]) == 4


def test_two_processes_equal_one_process_from_step_one(runs):
  """Issue 8: 2 processes x 2 devices vs 1 x 4 under data=2,fsdp=2 with Adafactor: same records, same losses."""
  a, c = losses(runs["A"]), losses(runs["C"])
  assert sorted(a) == sorted(c) == [1, 2, 3, 4]
  assert [a[s][0] for s in a] == [c[s][0] for s in a] == ["s2_mae", "s2_to_s1", "s2_mae", "s2_to_s1"]
  np.testing.assert_allclose([a[s][1] for s in sorted(a)], [c[s][1] for s in sorted(a)], rtol=1e-4)
  keys_a, keys_c = global_keys(runs["A"]), global_keys(runs["C"])
  assert keys_a == keys_c and all(all(row) for row in keys_a.values())
  assert len(keys_a) == 4  # two global batches per task
  assert_params_close(params(runs["A"]), params(runs["C"]))


def test_idle_task_parameters_are_untouched_and_equal(runs):
  """Step 4 trains s2_to_s1: the s2_mae-only group (decoder_s2) keeps its step-3 values bit for bit (2 processes,
  FSDP-sharded, factored Adafactor) and equals the 1-process run's."""
  p3, p4, c4 = params(runs["A"], 3), params(runs["A"]), params(runs["C"])
  idle = [k for k in p4 if k.startswith("decoder_s2/")]
  moved = [k for k in p4 if k.startswith("decoder_s1/")]
  assert idle and moved
  for k in idle:
    np.testing.assert_array_equal(p4[k], p3[k], err_msg=k)
  assert_params_close(p4, c4, names=idle)
  assert any(not np.array_equal(p4[k], p3[k]) for k in moved)


@pytest.mark.parametrize("resumed,reference", [("B", "A"), ("A2", "C")], ids=["2x2_to_1x4", "1x4_to_2x2"])
def test_elastic_resume_on_another_process_count(runs, resumed, reference):
  """Issue 9: a checkpoint of one process/device layout resumes on another and continues the same run."""
  got, want = losses(runs[resumed]), losses(runs[reference])
  assert sorted(got) == [3, 4]
  np.testing.assert_allclose([got[s][1] for s in (3, 4)], [want[s][1] for s in (3, 4)], rtol=1e-4)
  keys_got, keys_want = global_keys(runs[resumed]), global_keys(runs[reference])
  assert all(keys_want[k] == v for k, v in keys_got.items())
  assert {("s2_mae", 1), ("s2_to_s1", 1)} <= set(keys_got)  # steps 3 and 4 read each task's second global batch
  assert_params_close(params(runs[resumed]), params(runs[reference]))


def test_each_process_stages_and_reads_only_its_shard_groups_under_a_quota(runs, shards):
  """Issue 19 item 4: the run's shards do not fit the per-process stage quota; each of the 2 processes stages only
  the shards of its group (row block), trains, and every record in its rows comes from them."""
  quota = stage_quota_gb(shards) * 1e9
  staged = [json.loads((runs["A"] / f"stage_p{i}.json").read_text()) for i in range(2)]
  for i, names in enumerate(staged):
    assert names and all(f"-{i:05d}-of-{GROUPS:05d}" in n for n in names), names  # shard i -> group i mod 2
    assert sum((shards / n).stat().st_size for n in names) <= quota
    for path in runs["A"].glob(f"records_p{i}.jsonl"):
      for r in map(json.loads, path.read_text().splitlines()):
        assert {k.split(":")[0] for k in r["keys"]} <= set(names)
  assert not set(staged[0]) & set(staged[1])


def test_resume_four_to_two_to_one_processes_gives_the_uninterrupted_losses(runs, chain, shards):
  """Issue 19 item 1: steps 1-2 on 4 processes, 3 on 2, 4 on 1 (the same 4 devices' mesh and global batch, G = 2
  shard groups) read the same records in every row of every global batch as the uninterrupted 1-process run C, and
  log its losses. Not bitwise: 4 processes x 1 device reduce across processes (gloo) where 1 x 4 reduces in one
  process, in another order, so the losses agree to rounding (rtol 1e-4, as 2x2 vs 1x4 above; measured 9.5e-8 on
  2026-12-07: step 1's loss differs in its last bit, steps 2-4 are equal; the difference is printed)."""
  want = losses(runs["C"])
  got = {**losses(chain["P4"]), **losses(chain["P2"]), **losses(chain["P1"])}
  assert sorted(losses(chain["P4"])) == [1, 2] and sorted(losses(chain["P2"])) == [3]
  assert sorted(losses(chain["P1"])) == [4] and sorted(got) == sorted(want) == [1, 2, 3, 4]
  assert [got[s][0] for s in sorted(got)] == [want[s][0] for s in sorted(want)]
  diff = max(abs(got[s][1] - want[s][1]) / abs(want[s][1]) for s in want)
  print(f"4 -> 2 -> 1 processes vs uninterrupted: max relative loss difference {diff:.3g}")
  np.testing.assert_allclose([got[s][1] for s in sorted(got)], [want[s][1] for s in sorted(want)], rtol=1e-4)
  keys_want = global_keys(runs["C"])
  for run in chain.values():
    keys = global_keys(run)
    assert keys and all(all(row) for row in keys.values())
    assert all(keys_want[k] == v for k, v in keys.items()), "another record in some row of a global batch"
  assert set(global_keys(chain["P4"])) | set(global_keys(chain["P2"])) | set(global_keys(chain["P1"])) == set(keys_want)
  assert_params_close(params(chain["P1"]), params(runs["C"]))
  # 4 processes, 2 groups: processes 0, 1 hold rows 0-3 (group 0), 2, 3 rows 4-7 (group 1); each stages that half.
  rows = [json.loads((chain["P4"] / f"rows_p{i}.json").read_text()) for i in range(4)]
  assert [r["rows"] for r in rows] == [[0, 1], [2, 3], [4, 5], [6, 7]] and all(r["placed_where_read"] for r in rows)
  for i in range(4):
    staged = json.loads((chain["P4"] / f"stage_p{i}.json").read_text())
    assert staged and all(f"-{i // 2:05d}-of-{GROUPS:05d}" in n for n in staged), staged
