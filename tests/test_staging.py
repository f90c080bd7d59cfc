"""Data on the pod: a remote dataset directory is staged to local disk (verified, resumable, atomic) and read from
there. A local directory reached as a `file://` URL stands in for the bucket: the same copy code runs."""
import concurrent.futures
import json
import os
import shutil

import numpy as np
import pytest

from configs.common import dataset_config
from mmrs.data import pipeline as pipeline_lib
from mmrs.data import staging
from mmrs.data import synthetic


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
  d = tmp_path_factory.mktemp("bucket") / "ds"
  synthetic.write_synthetic_dataset(str(d), n_pairs=12, size=20, num_shards=2, seed=0)
  return d


def _shards(remote_dir):
  manifest = json.loads((remote_dir / "manifest.json").read_text())
  return [n for g in ("paired",) for n in manifest["splits"]["train"][g]], manifest


def _first_batches(shards, stage_dir=None, n=2):
  cfg = dataset_config(shards, image_size=16)
  if stage_dir is not None:
    cfg.stage_dir = str(stage_dir)
  pipe = pipeline_lib.make_pipeline(cfg, modalities=("s1", "s2"), global_batch_size=4, seed=0)
  out = [next(pipe.iterator) for _ in range(n)]
  pipe.close()
  return out


def test_manifest_records_sizes_and_checksums(remote):
  names, manifest = _shards(remote)
  for name in names:
    entry = manifest["files"][name]
    assert entry["bytes"] == (remote / name).stat().st_size and len(entry["sha256"]) == 64


def test_remote_dataset_is_staged_and_read_locally(remote, tmp_path):
  stage = tmp_path / "stage"
  got = _first_batches(f"file://{remote}", stage)
  want = _first_batches(str(remote))
  for a, b in zip(got, want):
    for k in ("s1", "s2"):
      np.testing.assert_array_equal(a[k], b[k])
    assert list(a["record_key"]) == list(b["record_key"])
  names, _ = _shards(remote)
  assert sorted(os.listdir(stage)) == sorted(names + ["manifest.json", "stats.json", ".mmrs_stage.lock"])
  for name in names:
    assert (stage / name).read_bytes() == (remote / name).read_bytes()
  before = {n: (stage / n).stat().st_mtime_ns for n in names}
  assert staging.stage_dataset(f"file://{remote}", "train", ("paired",), str(stage)) == str(stage)
  assert before == {n: (stage / n).stat().st_mtime_ns for n in names}  # already staged: nothing copied


def test_an_interrupted_copy_resumes_where_it_stopped(remote, tmp_path):
  names, manifest = _shards(remote)
  src = remote / names[0]
  data = src.read_bytes()
  dst = tmp_path / names[0]
  (tmp_path / (names[0] + ".partial")).write_bytes(data[: len(data) // 3])
  copied = staging._copy_resumable(staging._remote_path(f"file://{src}"), str(dst), len(data))
  assert copied == len(data) - len(data) // 3
  # Through the public path: a partial copy is completed, verified and renamed into place.
  stage = tmp_path / "stage"
  stage.mkdir()
  (stage / (names[1] + ".partial")).write_bytes((remote / names[1]).read_bytes()[:100])
  staging.stage_dataset(f"file://{remote}", "train", ("paired",), str(stage))
  assert (stage / names[1]).read_bytes() == (remote / names[1]).read_bytes()
  assert not list(stage.glob("*.partial"))
  assert manifest["files"][names[1]]["bytes"] == (stage / names[1]).stat().st_size


def test_a_corrupted_copy_is_caught_by_the_checksum(remote, tmp_path, caplog):
  names, _ = _shards(remote)
  stage = tmp_path / "stage"
  stage.mkdir()
  good = (remote / names[0]).read_bytes()
  (stage / (names[0] + ".partial")).write_bytes(b"\0" * (len(good) // 2))  # a damaged prefix: right size later
  staging.stage_dataset(f"file://{remote}", "train", ("paired",), str(stage))
  assert (stage / names[0]).read_bytes() == good  # detected, deleted, copied again
  assert "sha256 differs" in caplog.text

  bad_remote = tmp_path / "bad_bucket"
  shutil.copytree(remote, bad_remote)
  shard = bad_remote / names[1]
  damaged = bytearray(shard.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF  # same size, other content: only the checksum can tell
  shard.write_bytes(bytes(damaged))
  with pytest.raises(staging.StagingError, match=rf"{names[1]}.*failed twice.*sha256"):
    staging.stage_dataset(f"file://{bad_remote}", "train", ("paired",), str(tmp_path / "stage2"))
  assert not (tmp_path / "stage2" / names[1]).exists() and not (tmp_path / "stage2" / "manifest.json").exists()


def test_an_old_manifest_without_checksums_is_checked_by_size(remote, tmp_path, caplog):
  old = tmp_path / "old"
  shutil.copytree(remote, old)
  manifest = json.loads((old / "manifest.json").read_text())
  del manifest["files"]
  (old / "manifest.json").write_text(json.dumps(manifest))
  stage = tmp_path / "stage"
  staging.stage_dataset(f"file://{old}", "train", ("paired",), str(stage))
  assert "no checksums" in caplog.text
  names, _ = _shards(remote)
  assert all((stage / n).read_bytes() == (old / n).read_bytes() for n in names)


def test_processes_of_one_host_share_one_copy(remote, tmp_path):
  stage = tmp_path / "stage"
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    outs = list(pool.map(lambda _: staging.stage_dataset(f"file://{remote}", "train", ("paired",), str(stage)),
                         range(3)))
  assert outs == [str(stage)] * 3
  names, _ = _shards(remote)
  assert all((stage / n).read_bytes() == (remote / n).read_bytes() for n in names)


def test_unreachable_remote_is_one_clear_line(tmp_path, monkeypatch):
  # A GCS emulator another test file started in this worker (tests/gcs_emulator.py: session-wide environment) must not
  # answer here: without it gs:// is really unreachable (no credentials, no network), with it the bucket is missing.
  for var in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "FSSPEC_GS_TOKEN", "GOOGLE_AUTH_TOKEN_FOR_TESTING"):
    monkeypatch.delenv(var, raising=False)
  try:
    import gcsfs  # pylint: disable=g-import-not-at-top
    gcsfs.GCSFileSystem.clear_instance_cache()  # fsspec reuses a file system built for the emulator otherwise
  except ImportError:
    pass
  with pytest.raises(staging.StagingError, match=r"Cannot read gs://no-such-bucket-mmrs/ds/manifest.json .*gcloud"
                     ) as e:
    staging.stage_dataset("gs://no-such-bucket-mmrs/ds", "train", ("paired",), str(tmp_path / "s"))
  assert "\n" not in str(e.value)
  with pytest.raises(staging.StagingError, match="manifest.json does not exist"):
    staging.stage_dataset(f"file://{tmp_path / 'nowhere'}", "train", ("paired",), str(tmp_path / "s"))
  assert staging.default_stage_dir("gs://b/some/ds").endswith(os.path.join("staged", "b_some_ds"))
