"""config.model.attention reaches every attention layer a method builds (encoders, decoders, heads, backbones)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import auxmae, jointmae, mae_s2, mixmae, rsbyol
from configs.finetune import sen1floods11
from mmrs import methods
from mmrs.finetune import method as finetune_method
from mmrs.models import vit


def _record(monkeypatch):
  seen = []
  real = vit.attend

  def attend(q, k, v, implementation="auto"):
    seen.append(implementation)
    return real(q, k, v, "xla")

  monkeypatch.setattr(vit, "attend", attend)
  return seen


def _trace(method, batch):
  params, state = jax.eval_shape(method.init, jax.random.key(0), batch)
  for task in method.tasks:
    jax.eval_shape(lambda p, s, b: task.loss_fn(p, s, b, jax.random.key(1), True), nn.meta.unbox(params), state,
                   batch)


@pytest.mark.parametrize("name", ["mae_s2", "auxmae", "mixmae", "jointmae", "jointmae_plain", "rsbyol_vit",
                                  "finetune_seg"])
def test_every_attention_layer_uses_the_configured_implementation(name, monkeypatch):
  seen = _record(monkeypatch)
  images = {"s2": jnp.zeros((2, 32, 32, 12)), "s1": jnp.zeros((2, 32, 32, 2))}
  if name == "rsbyol_vit":
    config = rsbyol.get_config("tiny")
    config.model.backbone = "vit"
    config.model.vit.update(size="mu", patch_size=8, attention="xla")
    batch = {"view1": jnp.zeros((2, 32, 32, 1)), "view2": jnp.zeros((2, 32, 32, 1))}
  elif name == "finetune_seg":
    config = sen1floods11.get_config("tiny")
    config.model.attention = "xla"
    config.bands.s2 = "B01,B02,B03,B04,B05,B06,B07,B08,B8A,B09,B11,B12"
    batch = {"s2": images["s2"], "label_sen1floods11": jnp.zeros((2, 32, 32), jnp.int32)}
  else:
    module = {"mae_s2": mae_s2, "auxmae": auxmae, "mixmae": mixmae}.get(name, jointmae)
    config = module.get_config("tiny,plain=True" if name == "jointmae_plain" else "tiny")
    config.model.attention = "xla"
    batch = images
  method = finetune_method.build(config) if name == "finetune_seg" else methods.build(config)
  _trace(method, batch)
  assert seen and set(seen) == {"xla"}, seen
