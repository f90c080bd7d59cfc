"""The public encoder API: `mmrs.load_encoder(path)` on a converted encoder directory.

    import mmrs
    enc = mmrs.load_encoder("runs/mixmae_demo/encoder")   # from `python -m launch.convert_checkpoint`
    print(enc.bands)                                      # {"s2": ("B01", ..., "B12")} in input channel order
    x = enc.normalize(s2=s2_raw)                          # raw (B, H, W, C) uint16 / dB -> normalized float32
    tokens = enc.embed(**x)                               # (B, 1 + N, D): CLS token, then N patch tokens

`embed` takes normalized NHWC float32 arrays for one or more of the encoder's modalities (S1 and S2 tokens at a
position are summed, as the encoder does for paired input) and is jit-compiled once per input shape. A ResNet
(RS-BYOL) encoder returns pooled features (B, 512 or 2048) instead of tokens.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmrs.data import normalize as normalize_lib
from mmrs.finetune import convert


def build_module(meta: Mapping[str, Any], dtype: Any = jnp.float32, dropout_rate: float = 0.0):
  """The flax module of a converted encoder's `encoder.json`."""
  arch = meta["architecture"]
  if arch["kind"] == "vit":
    from mmrs.models import vit  # pylint: disable=g-import-not-at-top

    return vit.ViTEncoder(
        width=arch["width"], depth=arch["depth"], mlp_dim=arch["mlp_dim"], num_heads=arch["num_heads"],
        patch_size=arch["patch_size"], in_channels={m: len(b) for m, b in meta["bands"].items()},
        use_cls_token=arch["use_cls_token"], dtype=dtype, dropout_rate=dropout_rate)
  if arch["kind"] == "resnet":
    from mmrs.models import resnet  # pylint: disable=g-import-not-at-top

    return resnet.ResNet(arch["size"], dtype=dtype)
  raise ValueError(f"encoder.json architecture kind {arch['kind']!r} is unknown (vit | resnet).")


class Encoder:
  """A converted encoder: `.bands`, `.normalize(...)`, `.embed(...)`; `.module` / `.variables` for flax use."""

  def __init__(self, variables: Mapping[str, Any], meta: Mapping[str, Any]):
    self.meta = dict(meta)
    self.architecture = dict(meta["architecture"])
    self.modalities = tuple(meta["modalities"])
    self.bands = {m: tuple(meta["bands"][m]) for m in self.modalities}
    self.image_size = int(meta["image_size"])
    self.patch_size = meta.get("patch_size")
    self.normalizer = normalize_lib.Normalizer.from_json(meta["normalization"])
    self.module = build_module(meta)
    self.variables = jax.tree.map(jnp.asarray, dict(variables))
    kind = self.architecture["kind"]

    def apply(variables, images):
      if kind == "vit":
        return self.module.apply(variables, **images, train=False)
      (x,) = images.values()
      return self.module.apply(variables, x, train=False)

    self._apply = jax.jit(apply)

  def normalize(self, s2=None, s1=None) -> dict[str, np.ndarray]:
    """Raw arrays (S2 reflectance x 1e4, S1 dB; channels = `self.bands[m]`) -> {modality: normalized float32}."""
    raw = self._inputs(s2, s1)
    return {m: np.asarray(v, np.float32) for m, v in normalize_lib.normalize_batch(raw, self.normalizer).items()}

  def embed(self, s2=None, s1=None) -> jax.Array:
    """Normalized NHWC float32 -> (B, 1 + N, D) tokens (ViT) or (B, F) pooled features (ResNet)."""
    images = self._inputs(s2, s1)
    if self.architecture["kind"] == "resnet" and len(images) != 1:
      raise ValueError("A ResNet encoder takes one modality at a time.")
    return self._apply(self.variables, {m: jnp.asarray(x, jnp.float32) for m, x in images.items()})

  def _inputs(self, s2, s1) -> dict:
    images = {m: x for m, x in (("s2", s2), ("s1", s1)) if x is not None}
    if not images:
      raise ValueError(f"Give at least one of {self.modalities} (e.g. encoder.embed(s2=...)).")
    for m, x in images.items():
      if m not in self.bands:
        raise ValueError(f"This encoder was converted for {list(self.modalities)}; it has no {m} entry layer. "
                         "Convert the checkpoint again with --modalities including it.")
      if np.ndim(x) != 4 or np.shape(x)[-1] != len(self.bands[m]):
        raise ValueError(f"{m} must be (B, H, W, {len(self.bands[m])}) with bands {list(self.bands[m])} in that "
                         f"order, got shape {np.shape(x)}.")
    return images

  def __repr__(self):
    return (f"Encoder({self.architecture['kind']}, modalities={list(self.modalities)}, "
            f"image_size={self.image_size}, patch_size={self.patch_size})")


def load_encoder(path: str) -> Encoder:
  """Loads a directory written by `launch.convert_checkpoint` (encoder.safetensors + encoder.json)."""
  variables, meta = convert.load(path)
  return Encoder(variables, meta)
