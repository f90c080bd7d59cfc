"""RS-BYOL's DFC2020 protocol: a ResNet encoder segments with DeepLabV3 (dilated backbone at output stride 8 + the
ASPP head), frozen or finetuned."""
import functools

import jax
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs.finetune import dfc2020
from mmrs.finetune import method as method_lib
from mmrs.finetune import metrics
from mmrs.models import resnet


def _config(**finetune):
  config = dfc2020.get_config("tiny,head=aspp,modalities=s2,frozen=True")  # 32 px, 13 L1C bands
  config.model.backbone = "resnet18"
  config.finetune.update(finetune)
  return config


def test_dilated_backbone_keeps_the_weights_and_gives_a_stride_8_map():
  x = np.zeros((1, 32, 32, 3), np.float32)
  plain, dilated = resnet.ResNet("resnet18"), resnet.ResNet("resnet18", output_stride=8)
  init = lambda m: nn.meta.unbox(jax.eval_shape(lambda: m.init(jax.random.key(0), x, train=False)))  # noqa: E731
  shapes = [jax.tree.map(lambda a: a.shape, init(m)) for m in (plain, dilated)]
  assert shapes[0] == shapes[1]  # the same checkpoint loads into both
  fmap = jax.eval_shape(lambda v: dilated.apply(v, x, train=False, feature_map=True), init(dilated))
  assert fmap.shape == (1, 4, 4, 512)


@pytest.mark.parametrize("frozen", [True, False])
def test_resnet_segmentation_gives_per_pixel_logits(frozen):
  m = method_lib.build(_config(frozen=frozen))
  batch = {"s2": np.zeros((2, 32, 32, 13), np.float32), "label_dfc2020": np.zeros((2, 32, 32), np.int32)}
  params, state = jax.eval_shape(m.init, jax.random.key(0), batch)
  out = jax.eval_shape(m.predict, nn.meta.unbox(params), state, batch)
  assert out.shape == (2, 32, 32, 10) and "aspp_1_conv" in params["head"]
  assert m.tasks[0].param_prefixes == (("head",) if frozen else ("encoder", "head"))
  assert m.flops_per_sample("finetune") > 0


def test_a_vitlite_head_on_a_resnet_is_a_clear_error():
  config = _config()
  config.finetune.head = "vitlite"
  with pytest.raises(ValueError, match="segments with head=aspp"):
    method_lib.build(config)


def test_training_the_aspp_head_on_a_frozen_resnet_beats_chance():
  """Two classes in stripes of random phase; 4 images, the probe trains 20 steps: mIoU well above chance (a
  constant prediction scores 25-ish, a random one 33)."""
  config = _config(num_classes=2)
  m = method_lib.build(config)
  m.head = m.head.clone(width=32)  # DeepLabV3's 256 channels: the same head, slower to compile and run on a CPU
  rng = np.random.default_rng(0)
  cols = np.arange(32)[None, None, :]
  phase = rng.uniform(0, 2 * np.pi, (4, 1, 1))
  labels = (np.sin(2 * np.pi * cols / 16 + phase) > 0).repeat(32, axis=1).astype(np.int32)  # (4, 32, 32)
  images = (2.0 * labels[..., None] - 1.0 + 0.3 * rng.normal(size=(4, 32, 32, 13))).astype(np.float32)
  batch = {"s2": images, "label_dfc2020": labels}
  fast = {"compiler_options": {"xla_backend_optimization_level": 0}}
  params, state = jax.jit(m.init, **fast)(jax.random.key(0), batch)
  params = nn.meta.unbox(params)
  tx = optax.adam(1e-2)

  @functools.partial(jax.jit, **fast)
  def step(params, state, opt, i):
    def loss(head):
      return m.loss_fn(dict(params, head=head), state, batch, jax.random.fold_in(jax.random.key(1), i), True)
    (value, (_, new_state)), grads = jax.value_and_grad(loss, has_aux=True)(params["head"])
    updates, opt = tx.update(grads, opt, params["head"])
    return dict(params, head=optax.apply_updates(params["head"], updates)), new_state, opt, value

  opt = tx.init(params["head"])
  losses = []
  for i in range(20):
    params, state, opt, value = step(params, state, opt, i)
    losses.append(float(value))
  acc = metrics.SegmentationMetrics(2)
  acc.update(np.asarray(jax.jit(m.predict, **fast)(params, state, batch)), labels)
  assert losses[-1] < losses[0] and acc.result()["miou"] > 60.0, (losses[::5], acc.result())
