"""--shard_groups=G on every converter (issue 19): one common flag (data_prep.convert.define_common_flags), handed by
the shared CLI driver (convert.run_cli) to each converter, which gives it to its DatasetWriter: G is recorded in the
manifest (the training pipeline's default data.<name>.shard_groups), and a --num_shards G does not divide is refused
before any input is read. (SSL4EO-S12's own test: tests/test_convert_ssl4eo.py.)"""
import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from data_prep import bigearthnet_mm, eurosat, pair_catalog, sen12ms, sen1floods11
from sample_data import SAMPLE
import test_convert_eurosat
import test_convert_sen12ms
import test_convert_sen1floods11
import test_pair_catalog as pc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair_catalog(root):
  rows = []
  for i in range(4):
    t = pc.T0 + dt.timedelta(days=30 * i)
    bounds = (pc.HERE[0] + 1000 * i, pc.HERE[1], pc.HERE[2] + 1000 * i, pc.HERE[3])
    rows += [pc.row(pc.write_tif(os.path.join(root, f"s2_{i}.tif"), pc.s2_data(i), bounds), "s2", t, bounds),
             pc.row(pc.write_tif(os.path.join(root, f"s1_{i}.tif"), pc.s1_data(i), bounds), "s1", t, bounds)]
  return pc.write_catalog(root, rows)


# name -> (source maker(tmp dir), converter(source, out, **kw)). The tiny fixtures put every record in one split
# where a split would get fewer records than shards (hence fewer files than G: refused, see the writer).
CONVERTERS = {
    "bigearthnet_mm": (lambda d: SAMPLE, lambda s, o, **kw: bigearthnet_mm.convert_dataset(s, o, **kw)),
    "sen12ms": (test_convert_sen12ms.make_tree, lambda s, o, **kw: sen12ms.convert(s, o, **kw)),
    "sen1floods11": (test_convert_sen1floods11.make_tree, lambda s, o, **kw: sen1floods11.convert(s, o, **kw)),
    "eurosat": (test_convert_eurosat.make_tree,
                lambda s, o, **kw: eurosat.convert(s, o, image_size=test_convert_eurosat.N, splits_dir="none", **kw)),
    "pair_catalog": (_pair_catalog, lambda s, o, **kw: pair_catalog.convert_catalog(s, o, **kw)),
}


@pytest.mark.parametrize("name", sorted(CONVERTERS))
def test_each_converter_records_its_shard_groups(name, tmp_path):
  make, convert = CONVERTERS[name]
  src = tmp_path / "src"
  src.mkdir()
  m = convert(make(str(src)), str(tmp_path / "out"), num_shards=2, shard_groups=2, workers=0)
  assert m["shard_groups"] == 2
  assert json.loads((tmp_path / "out" / "manifest.json").read_text())["shard_groups"] == 2
  lists = {f"{split}.{group}": names for split, groups in m["splits"].items() for group, names in groups.items()}
  small = [k for k, names in lists.items() if len(names) % 2]
  assert sorted(small) == m.get("shard_groups_unsplittable", [])
  if name != "sen1floods11":  # its fixture has 1-2 chips per split: every list is one file (next test)
    assert not small


def test_a_split_smaller_than_the_shard_count_is_written_and_refused_only_for_group_training(tmp_path):
  """Sen1Floods11's fixture: its 'bolivia' test split has 1 chip (the real one 15 for a --num_shards of 64, say):
  one file, which 2 groups cannot split. It is written (evaluation reads no groups) and listed; a training pipeline with groups on it is refused."""
  from configs.common import dataset_config  # pylint: disable=g-import-not-at-top
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.data import shard_groups  # pylint: disable=g-import-not-at-top

  src = tmp_path / "src"
  src.mkdir()
  out = str(tmp_path / "out")
  m = sen1floods11.convert(test_convert_sen1floods11.make_tree(str(src)), out, num_shards=2, shard_groups=2)
  assert "bolivia.paired" in m["shard_groups_unsplittable"] and len(m["splits"]["bolivia"]["paired"]) == 1
  with pytest.raises(shard_groups.ShardGroupError, match=r"'bolivia' group 'paired' has 1 shard file\(s\).*fewer "
                     "records than shards"):
    pipeline_lib.make_pipeline(dataset_config(out, split="bolivia", image_size=8), modalities=("s1", "s2"),
                               global_batch_size=2, seed=0)


@pytest.mark.parametrize("name,required", [
    ("bigearthnet_mm", ["--src=/nonexistent"]), ("sen12ms", ["--src=/nonexistent"]),
    ("sen1floods11", ["--src=/nonexistent"]), ("eurosat", ["--src=/nonexistent"]),
    ("pair_catalog", ["--catalog=/nonexistent.json"]), ("ssl4eo", ["--src=/nonexistent"])])
def test_every_converter_cli_refuses_a_shard_count_the_groups_cannot_split_before_reading(name, required, tmp_path):
  """The input does not exist: the refusal comes first, from the shared driver."""
  out = tmp_path / "out"
  r = subprocess.run([sys.executable, "-m", f"data_prep.{name}", *required, f"--out={out}", "--num_shards=3",
                      "--shard_groups=2", "--workers=0"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode != 0
  assert "--num_shards=3: every split and modality group has 3 shard file(s), which 2 shard groups cannot split " \
         "evenly" in r.stderr + r.stdout, (r.stdout + r.stderr)[-2000:]
  assert not out.exists()
