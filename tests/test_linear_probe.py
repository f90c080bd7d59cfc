"""The linear-probe protocol (MAE, He et al. 2022 A.2): a frozen ViT's linear head standardizes its input with an
affine-free BatchNorm, so the probe's score does not depend on the scale of the encoder's features."""
import jax
import numpy as np
import pytest
from flax import linen as nn

from configs.finetune import bigearthnet
from mmrs.finetune import method as method_lib
from mmrs.models import vit
from test_finetune_method import _batch, _random_init  # pylint: disable=g-bad-import-order


def _logits_fn(m):
  """jit (params, state, batch, feature_scale) -> training-mode (head outputs, new state), the encoder's features
  multiplied by `feature_scale` (the head uses batch statistics)."""

  def fn(params, state, batch, feature_scale):
    def scale(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      is_encoder = isinstance(context.module, vit.ViTEncoder) and context.method_name == "__call__"
      return out * feature_scale if is_encoder else out

    with nn.intercept_methods(scale):
      return m.forward(params, state, batch, jax.random.key(1), True)

  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


@pytest.fixture(scope="module")
def probes():
  out = {}
  for mode in ("auto", "off"):
    config = bigearthnet.get_config("tiny,frozen=True")  # a random-init ViT and the linear head
    config.finetune.probe_batchnorm = mode
    m = method_lib.build(config)
    batch = _batch(m, config, b=8)
    out[mode] = (m, *_random_init(m, batch), batch)
  return out


def test_frozen_vit_probe_is_invariant_to_the_feature_scale(probes):
  m, params, state, batch = probes["auto"]
  assert m.probe_batchnorm
  fn = _logits_fn(m)
  (base, new_state), (scaled, _) = (fn(params, state, batch, s) for s in (1.0, 10.0))
  np.testing.assert_allclose(np.asarray(scaled), np.asarray(base), rtol=1e-3, atol=1e-4)
  # Affine-free: the BatchNorm has running statistics only (no scale / bias params), and training updates them.
  assert "probe_bn" not in params["head"]
  stats = new_state["batch_stats"]["head"]["probe_bn"]
  assert set(stats) == {"mean", "var"} and float(np.abs(np.asarray(stats["mean"])).max()) > 0
  # Without it (probe_batchnorm=off, the old probe) the same scaling changes the logits.
  m, params, state, batch = probes["off"]
  assert not m.probe_batchnorm
  fn = _logits_fn(m)
  (base, _), (scaled, _) = (fn(params, state, batch, s) for s in (1.0, 10.0))
  assert np.abs(np.asarray(scaled) - np.asarray(base)).max() > 1e-2


def test_probe_batchnorm_defaults_and_errors():
  assert not method_lib.build(bigearthnet.get_config("tiny")).probe_batchnorm  # finetuned: MAE's finetune recipe
  assert not method_lib.build(bigearthnet.get_config("tiny,frozen=True,head=mlp")).probe_batchnorm  # RS-BYOL's
  config = bigearthnet.get_config("tiny,frozen=True,head=mlp")
  config.finetune.probe_batchnorm = "on"
  with pytest.raises(ValueError, match="probe_batchnorm='on' is for the linear"):
    method_lib.build(config)
  config.finetune.probe_batchnorm = "yes"
  with pytest.raises(ValueError, match="probe_batchnorm='yes' is unknown"):
    method_lib.build(config)
