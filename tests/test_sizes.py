"""The ViT-Lite decoder size matches the MixMAE paper's "approximately 21M parameters"."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mixmae
from mmrs import methods


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.meta.unbox(tree))))


def test_vit_lite_decoders_of_the_paper_setup_have_about_21m_parameters():
  config = mixmae.get_config("vit_b")  # ViT-B/16 encoder, two ViT-Lite decoders, 13 L1C bands + VV, VH
  method = methods.build(config)
  batch = {"s2": jnp.zeros((1, 224, 224, 13)), "s1": jnp.zeros((1, 224, 224, 2))}
  params, _ = jax.eval_shape(method.init, jax.random.key(0), batch)
  s2, s1 = _count(params["decoder_s2"]), _count(params["decoder_s1"])
  assert s2 == pytest.approx(21.0e6, abs=0.3e6)
  assert s1 == pytest.approx(19.6e6, abs=0.3e6)
  assert 80e6 < _count(params["encoder"]) < 90e6  # ViT-B
