"""A tiny randomly initialised ViT encoder, converted through the normal path (`convert.convert` + `convert.save`),
for tests that need an encoder directory (`mmrs.load_encoder`, exports, launch.embed, the installed package)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mmrs import bands as B
from mmrs.finetune import convert
from mmrs.models import vit

NORM = {"source": "test", "s2": {"bands": list(B.S2_L1C_BANDS), "mean": [1000.0 + 10 * i for i in range(13)],
                                 "std": [500.0 + 5 * i for i in range(13)]},
        "s1": {"bands": ["VV", "VH"], "mean": [-12.0, -19.0], "std": [5.0, 6.0]}}


def random_params(module, seed, *args, **kwargs):
  """Random, well-scaled params of `module` without compiling its init (shapes from eval_shape): kernels with
  1/sqrt(fan_in) scale, norms near one, and non-zero biases / embeddings, so no mapping error hides behind zeros."""
  abstract = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    noise = rng.normal(size=shape).astype(np.float32)
    if name == "kernel":
      keys = [k.key for k in path]
      fan_in = shape[0] if "qkv" in keys else shape[0] * shape[1] if "out" in keys else int(np.prod(shape[:-1]))
      return noise / np.sqrt(fan_in)
    if name in ("scale", "var"):
      return 1.0 + 0.1 * np.abs(noise)
    return 0.1 * noise

  return jax.tree_util.tree_map_with_path(lambda p, x: np.asarray(draw(p, x), np.float32), abstract)


def vit_params(patch=4, size=8, width=32, depth=2, seed=1):
  """Encoder params for S2 (13 L1C bands) and S1 (VV, VH), as a pretraining checkpoint would hold them."""
  module = vit.ViTEncoder(width, depth, 2 * width, 2, patch_size=patch, in_channels={"s2": 13, "s1": 2})
  return random_params(module, seed, s2=jnp.zeros((1, size, size, 13)), s1=jnp.zeros((1, size, size, 2)))["params"]


def write_encoder(out, params, *, modalities="s2", image_size=8, bands=None, source=None) -> str:
  """Converts `params` like launch.convert_checkpoint does and writes the encoder directory `out`."""
  variables, meta = convert.convert({"encoder": params}, {}, trained_bands={"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS},
                                    normalization=NORM, modalities=modalities, image_size=image_size, bands=bands,
                                    source=source or {"method": "mixmae", "step": 0})
  convert.save(str(out), variables, meta)
  return str(out)
