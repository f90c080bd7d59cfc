"""data_prep.inspect: summary + one line per record, label names via the manifest, and corrupted shards."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep import inspect
from mmrs.data.writer import DatasetWriter
from mmrs import bands
from mmrs.data import records
from timeouts import HANG_GUARD_S

ROOT = os.path.join(os.path.dirname(__file__), "..")
NAMES = ["water", "forest", "field"]


def record(i):
  rng = np.random.default_rng(i)
  rec = {"id": f"place{i}", "s2": rng.integers(1, 3000, (32, 32, 12)).astype(np.uint16),
         "s2_bands": bands.S2_L2A_BANDS, "labels": {"cover": [0, 2] if i % 2 else [1]},
         "meta": {"lon": 10.5 + i, "s2_time": "2022-06-01T10:30:00Z"}}
  if i % 2 == 0:
    rec["s1"], _ = records.clean_s1(rng.normal(-12, 3, (32, 32, 2)))
    rec["s1_bands"] = bands.S1_BANDS
  return rec


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("insp") / "ds")
  with DatasetWriter(out, num_shards=2, source="unit test", licence="CC0",
                     label_sets={"cover": {"kind": "multi_label", "names": NAMES}},
                     extra={"pairing": {"max_days": 7}}) as w:
    for i in range(8):
      w.add(record(i))
    w.close()
  return out


@pytest.fixture
def damaged(dataset, tmp_path):
  out = str(tmp_path / "ds")
  shutil.copytree(dataset, out)
  return out


def test_text_summary_and_one_line_per_record(dataset):
  buf = io.StringIO()
  assert inspect.inspect(dataset, buf, limit=0) == 8
  text = buf.getvalue().splitlines()
  header = "\n".join(text[:-8])
  assert "source: unit test  licence: CC0" in header
  assert "counts: pairs=4 records=8 s1_only=0 s2_only=4 skipped=0" in header
  assert "split train: paired 4 records in 2 shards, s2_only 4 records in 2 shards" in header
  assert 'pairing: {"max_days": 7}' in header and "labels cover: multi_label, 3 classes" in header
  lines = text[-8:]
  assert lines[0].startswith("[train.paired-00000-of-00002 #0] place0 s1+s2 s2=(32, 32, 12):uint16 "
                             "s1=(32, 32, 2):float32 labels: cover=[forest]")
  assert 'lon=10.5' in lines[0] and 's2_time="2022-06-01T10:30:00Z"' in lines[0]
  assert any("place1 s2 " in ln and "cover=[water; field]" in ln for ln in lines)


def test_json_lines_and_limit(dataset):
  buf = io.StringIO()
  assert inspect.inspect(dataset, buf, fmt="json", limit=3) == 3
  objs = [json.loads(ln) for ln in buf.getvalue().splitlines()]
  assert [o["type"] for o in objs] == ["summary", "record", "record", "record"]
  assert objs[0]["counts"]["records"] == 8 and objs[0]["label_sets"]["cover"]["classes"] == 3
  r = objs[1]
  assert (r["shard"], r["index"], r["id"]) == ("train.paired-00000-of-00002.array_record", 0, "place0")
  assert r["arrays"]["s1"] == {"shape": [32, 32, 2], "dtype": "float32"}
  assert r["labels"] == {"cover": ["forest"]} and r["modalities"] == ["s1", "s2"]


def flip(path, offset, n=16):
  with open(path, "r+b") as f:
    f.seek(offset)
    b = f.read(n)
    f.seek(offset)
    f.write(bytes(x ^ 0xFF for x in b))


def test_truncated_shard_is_named(damaged):
  shard = os.path.join(damaged, "train.s2_only-00001-of-00002.array_record")
  with open(shard, "r+b") as f:
    f.truncate(os.path.getsize(shard) // 2)
  with pytest.raises(inspect.ShardError, match="train.s2_only-00001-of-00002.array_record: holds 0 readable"):
    inspect.inspect(damaged, io.StringIO(), limit=1)


def test_flipped_bytes_are_named_with_the_record_index(damaged):
  shard = os.path.join(damaged, "train.paired-00001-of-00002.array_record")
  flip(shard, 50_000)  # inside the second record (each ~30 KB compressed; the first starts at byte 64)
  inspect.inspect(damaged, io.StringIO(), limit=1)  # the printed record is fine: no full read without --verify
  with pytest.raises(inspect.ShardError, match=r"train.paired-00001-of-00002.array_record: record 1 is unreadable"):
    inspect.inspect(damaged, io.StringIO(), limit=1, verify=True)


def test_record_that_does_not_decode_is_named(damaged, tmp_path):
  from array_record.python import array_record_module
  shard = os.path.join(damaged, "train.s2_only-00000-of-00002.array_record")
  w = array_record_module.ArrayRecordWriter(shard, "group_size:1")
  w.write(records.encode(record(1)))
  w.write(b"MMRS garbage")
  w.close()
  with pytest.raises(inspect.ShardError, match=r"s2_only-00000-of-00002.array_record: record 1 is unreadable"):
    inspect.inspect(damaged, io.StringIO(), limit=0)


def test_cli_exit_codes(dataset, damaged):
  def cli(*args):
    return subprocess.run([sys.executable, "-m", "data_prep.inspect", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=HANG_GUARD_S)
  ok = cli(dataset, "--limit=2", "--format=json")
  assert ok.returncode == 0, ok.stderr
  assert len(ok.stdout.splitlines()) == 3
  with open(os.path.join(damaged, "train.paired-00000-of-00002.array_record"), "r+b") as f:
    f.truncate(100)
  bad = cli(damaged)
  assert bad.returncode == 2 and "train.paired-00000-of-00002.array_record" in bad.stderr
  missing = cli(os.path.dirname(dataset))
  assert missing.returncode == 2 and "manifest.json not found" in missing.stderr
