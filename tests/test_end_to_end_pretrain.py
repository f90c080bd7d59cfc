"""The real bundled sample end to end: every pretraining method's `tiny` config trains through the train loop."""
import json
import math
import os

import pytest

from mmrs.train import loop
from sample_data import shards, tiny_config  # pylint: disable=unused-import  (shards is a fixture)


@pytest.mark.parametrize("module,extra", [("mae_s2", ""), ("auxmae", ""), ("mixmae", ""), ("jointmae", ""),
                                          ("jointmae", ",plain=True"), ("rsbyol", "")])
def test_every_method_tiny_trains_on_the_real_sample(shards, tmp_path, monkeypatch, module, extra):
  monkeypatch.chdir(tmp_path)
  workdir = "run"  # relative, as in the README's commands
  summary = loop.train(tiny_config(module, shards, extra), workdir)
  assert summary["step"] == 3 and summary["skipped_steps"] == 0
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert {r["step"] for r in records} == {1, 2, 3}
  assert all(math.isfinite(r["loss"]) for r in records)
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
  if module != "rsbyol":  # reconstruction methods leave a PNG
    assert os.listdir(os.path.join(workdir, "reconstructions"))


def test_mixmae_fsdp_matches_data_parallel(shards, tmp_path):
  """A real ViT method with every param split over fsdp (and the activation constraints active) follows the same
  loss trajectory as pure data parallelism."""
  losses = {}
  for mesh in ("data=8,fsdp=1", "data=4,fsdp=2"):
    config = tiny_config("mixmae", shards)
    config.mesh, config.fsdp_min_size, config.visualize_every_steps = mesh, 0, 0
    workdir = tmp_path / mesh
    loop.train(config, str(workdir))
    losses[mesh] = [json.loads(line)["loss"] for line in open(workdir / "metrics.jsonl")]
  assert len(losses["data=8,fsdp=1"]) == 3
  assert losses["data=8,fsdp=1"] == pytest.approx(losses["data=4,fsdp=2"], rel=1e-5)
