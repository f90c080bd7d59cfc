"""The real bundled sample end to end: pretrain (MixMAE tiny) -> convert the encoder -> linear probe on its
BigEarthNet labels -> results.json with micro and macro mAP (the README's Finetune section, in small)."""
import json

import mmrs.finetune
from mmrs.finetune import convert
from mmrs.train import loop
from sample_data import shards, tiny_config  # pylint: disable=unused-import  (shards is a fixture)


def test_pretrain_convert_probe_writes_map(shards, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  pre = "mixmae"  # relative paths, as in the README's commands
  loop.train(tiny_config("mixmae", shards), pre)
  encoder = "encoder"
  meta = convert.convert_checkpoint(pre, encoder, modalities="s2", image_size=32)
  assert meta["bands"]["s2"][-1] == "B12" and "B10" not in meta["bands"]["s2"]  # L2A sample: 12 bands
  assert meta["pooling"] == "mean" and meta["source"]["data"]  # what the exports' cards carry
  from configs.finetune import bigearthnet
  config = bigearthnet.get_config(f"tiny,shards={shards},init_from={encoder},frozen=True")
  config.xla_compiler_options = {"xla_backend_optimization_level": 0}
  result = mmrs.finetune.run(config, str(tmp_path / "probe"))["eval"]
  saved = json.load(open(tmp_path / "probe" / "results.json"))
  for key in ("map_micro", "map_macro"):
    assert 0.0 <= saved["metrics"][key] <= 100.0 and saved["metrics"][key] == result["metrics"][key]
  assert saved["scenario"] == "frozen" and saved["num_examples"] == 14  # pairs + S2-only records of the sample
  logged = [json.loads(l) for l in open(tmp_path / "probe" / "metrics.jsonl")]
  assert logged[-1]["task"] == "eval" and logged[-1]["map_micro"] == saved["metrics"]["map_micro"]  # + TensorBoard
