"""Model selection during finetuning (mmrs/finetune/validation.py): validate every eval_every_steps, keep the best
state by the dataset's main metric, test THAT state; resume keeps the best-so-far; no val split -> the last step."""
import json
import math

import jax
import numpy as np
import pytest

import mmrs.finetune
from configs.finetune import eurosat
from mmrs.data import synthetic
from mmrs.finetune import evaluate, report, validation

import test_tensorboard


def _shards(path, n_val):
  synthetic.write_synthetic_dataset(str(path), n_pairs=8, n_val=n_val, size=32, seed=1, mask=False)
  return str(path)


def _config(shards, steps):
  """EuroSAT's tiny variant on synthetic 6-class data: train split 'train', test = 'train' (a stand-in), val 'val'."""
  config = eurosat.get_config(f"tiny,shards={shards},steps={steps}")
  config.finetune.label_set, config.finetune.num_classes = "synthetic_class", 6
  config.data.eval.split = "train"
  config.finetune.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.optimizer.decay_steps = 100  # a schedule longer than both runs: steps 5-6 of the resume still move params
  config.xla_compiler_options = {"xla_backend_optimization_level": 0}  # halves CPU compile time
  return config


def _fingerprint(params):
  return float(sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(jax.device_get(params))))


class _Scripted:
  """Wraps Evaluator.__call__: the real evaluation, but the val accuracy comes from `script` (one value per call),
  and the params each call saw are fingerprinted, so a test can tell which state was tested."""

  def __init__(self, monkeypatch):
    self.script, self.calls, self.instances = [], [], []
    real = evaluate.Evaluator.__call__

    def call(evaluator, params, state, split):
      out = real(evaluator, params, state, split)
      if evaluator not in self.instances:
        self.instances.append(evaluator)
      if split == "val":
        out["metrics"]["accuracy"] = self.script.pop(0)
      self.calls.append((split, _fingerprint(params)))
      return out
    monkeypatch.setattr(evaluate.Evaluator, "__call__", call)


def test_best_val_state_is_tested_and_resume_keeps_the_best_so_far(tmp_path, monkeypatch):
  shards = _shards(tmp_path / "data", n_val=4)
  workdir = str(tmp_path / "run")
  fake = _Scripted(monkeypatch)
  fake.script = [50.0, 80.0]  # val at steps 2, 4
  first = mmrs.finetune.run(_config(shards, 4), workdir)["eval"]
  assert first["selected_step"] == 4 and first["val"]["metrics"]["accuracy"] == 80.0
  (_, at2), (_, at4), (test_split, tested) = fake.calls
  assert test_split == "train" and tested == at4 != at2

  # Resume the same run to 6 steps (as after a preemption): the new process must know that step 4 scored 80, must
  # not evaluate steps 2 and 4 again, and must test step 4's state, restored from disk, when step 6 scores less.
  fake.calls, fake.script = [], [60.0]
  out = mmrs.finetune.run(_config(shards, 6), workdir)
  result = out["eval"]
  assert out["train"]["step"] == 6
  (val_split, at6), (_, tested) = fake.calls  # one validation (step 6), then the test
  assert val_split == "val" and at6 != at4
  assert result["selected_step"] == 4 and tested == pytest.approx(at4, rel=1e-12)
  assert [(e["step"], e["metrics"]["accuracy"]) for e in result["val"]["curve"]] == [(2, 50.0), (4, 80.0), (6, 60.0)]
  assert result["val"]["metrics"]["accuracy"] == 80.0 and result["step"] == 4
  assert result["test"]["split"] == "train" and result["metrics"] == result["test"]["metrics"]
  assert result["selection"]["metric"] == "accuracy" and result["selection"]["mode"] == "max"
  assert json.load(open(tmp_path / "run" / "results.json"))["selected_step"] == 4
  assert sorted(p.name for p in (tmp_path / "run" / validation.BEST_DIR).iterdir() if p.name.isdigit()) == ["4"]
  md = open(tmp_path / "run" / "results.md").read()
  assert "Selected step 4" in md and "| **4** |" in md and "| val (val, n=4) |" in md
  # one compiled predict function for every validation and the test of the restored state
  assert fake.instances[-1].traces == 1
  # the validation curve reaches metrics.jsonl (and TensorBoard, through the same writer)
  logged = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert [(l["step"], l["accuracy"]) for l in logged if l["task"] == "val"] == [(2, 50.0), (4, 80.0), (6, 60.0)]
  curve = {step: v.simple_value for step, tag, v in test_tensorboard.events(tmp_path / "run") if tag == "val/accuracy"}
  assert curve == {2: 50.0, 4: 80.0, 6: 60.0}  # TensorBoard's scalars tab shows the validation curve


def test_without_a_val_split_the_last_step_is_tested_and_results_say_so(tmp_path):
  shards = _shards(tmp_path / "data", n_val=0)
  manifest_path = tmp_path / "data" / "manifest.json"  # chip counts as data_prep.sen1floods11 writes them
  manifest = json.loads(manifest_path.read_text())
  manifest["coverage"] = {"train": {"chips": 8, "chips_with_s1": 7, "s1_dropped_chips": ["x"], "published_chips": 9}}
  manifest_path.write_text(json.dumps(manifest))
  config = _config(shards, 2)
  result = mmrs.finetune.run(config, str(tmp_path / "run"))["eval"]
  assert result["val"] is None and result["selected_step"] == 2
  assert result["selection"]["note"].startswith("no validation split: evaluated the last step")
  assert "'val'" in result["selection"]["note"]  # the reason names the missing split
  assert result["coverage"]["evaluated_chips"] == 8 and result["coverage"]["published_chips"] == 9
  saved = report.read(str(tmp_path / "run"))
  assert saved["selection"]["note"] == result["selection"]["note"]
  assert "no validation split" in open(tmp_path / "run" / "results.md").read()
  assert not (tmp_path / "run" / validation.BEST_DIR).exists()


def test_chip_coverage_counts_what_an_s1_s2_evaluation_reads():
  manifest = {"coverage": {"test": {"chips": 90, "chips_with_s1": 87, "s1_dropped_chips": ["a", "b", "c"],
                                    "published_chips": 90}}}
  cfg = {}
  both = evaluate.chip_coverage(manifest, "test", cfg, ("s1", "s2"))
  assert both["evaluated_chips"] == 87 and both["published_chips"] == 90
  assert both["note"].startswith("87 of the 90 published test chips evaluated")
  assert "3 chip(s) without S1" in both["note"]
  s2 = evaluate.chip_coverage(manifest, "test", cfg, ("s2",))
  assert s2["evaluated_chips"] == 90 and s2["note"] == "all 90 published test chips evaluated"
  assert evaluate.chip_coverage({}, "test", cfg, ("s2",)) is None


def test_main_metric_per_dataset_and_nan_never_wins():
  assert validation.main_metric(eurosat.get_config("tiny")) == ("accuracy", "max")
  from configs.finetune import bigearthnet, dfc2020, sen12ms, sen1floods11  # pylint: disable=import-outside-toplevel
  assert validation.main_metric(bigearthnet.get_config("tiny"))[0] == "map_micro"
  assert validation.main_metric(sen1floods11.get_config("tiny"))[0] == "iou_water"
  assert validation.main_metric(sen12ms.get_config("tiny"))[0] == "f1_weighted"
  assert validation.main_metric(dfc2020.get_config("tiny"))[0] == "miou"
  assert dfc2020.get_config("tiny").finetune.val_split == ""  # its "val" set is the training data
  assert validation.is_better(1.0, None, "max") and validation.is_better(1.0, math.nan, "max")
  assert not validation.is_better(math.nan, 0.0, "max") and validation.is_better(0.5, 1.0, "min")
