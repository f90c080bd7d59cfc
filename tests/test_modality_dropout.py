"""finetune.modality_dropout: in training, dropped samples go through the encoder's missing-modality path (the
encoder given one modality), exactly what launch.robustness's missing_s1 / missing_s2 stresses evaluate."""
import jax
import numpy as np
import pytest

from configs.finetune import sen12ms
from mmrs.finetune import method as method_lib
from mmrs.finetune import robustness
from test_finetune_method import _batch, _random_init  # pylint: disable=g-bad-import-order


def test_dropped_samples_take_the_missing_modality_path():
  config = sen12ms.get_config("tiny,modality_dropout=1.0")  # S1+S2 (concat), 10 classes, random-init ViT
  m = method_lib.build(config)
  batch = _batch(m, config, b=8)
  params, state = _random_init(m, batch)
  subs = {lost: robustness._without(m, lost) for lost in ("s1", "s2")}  # pylint: disable=protected-access

  def outputs(p, b):  # one compiled program: training forward, full prediction, each one-modality prediction
    alone = {lost: sub.predict(p, state, {k: v for k, v in b.items() if k != lost}) for lost, sub in subs.items()}
    return m.forward(p, state, b, jax.random.key(3), True)[0], m.predict(p, state, b), alone

  train_out, full, alone = jax.tree.map(np.asarray, jax.jit(
      outputs, compiler_options={"xla_backend_optimization_level": 0})(params, batch))
  took = [[lost for lost in ("s1", "s2") if np.allclose(train_out[i], alone[lost][i], rtol=1e-4, atol=1e-5)]
          for i in range(8)]
  assert all(len(t) == 1 for t in took), took  # p = 1: every sample lost exactly one modality ...
  assert {t[0] for t in took} == {"s1", "s2"}  # ... S1 for some, S2 for others
  assert not np.allclose(train_out, full, atol=1e-3)


def test_modality_dropout_is_recorded_and_checked():
  from mmrs.finetune import evaluate  # pylint: disable=g-import-not-at-top
  m = method_lib.build(sen12ms.get_config("tiny,modality_dropout=0.5"))
  assert evaluate.describe_run(m.config, m, 0)["modality_dropout"] == 0.5
  with pytest.raises(ValueError, match="needs S1\\+S2 input"):
    method_lib.build(sen12ms.get_config("tiny,modality_dropout=0.5,modalities=s2"))
  with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
    method_lib.build(sen12ms.get_config("tiny,modality_dropout=1.5"))
  report = robustness.markdown({"metric": "accuracy", "stresses": {}, "runs": {
      "a": {"modalities": ["s2", "s1"], "clean": 1.0, "modality_dropout": 0.5},
      "b": {"modalities": ["s2", "s1"], "clean": 1.0, "modality_dropout": 0.0}}})
  assert "| a | s2+s1 | 1.00 | yes (p=0.5) |" in report and "| b | s2+s1 | 1.00 | no: missing_s1" in report
