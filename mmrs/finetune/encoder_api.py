"""The public encoder API: `mmrs.load_encoder(path)` on a converted encoder directory.

    import mmrs
    enc = mmrs.load_encoder("runs/mixmae_demo/encoder")   # from `python -m launch.convert_checkpoint`
    print(enc.bands)                                      # {"s2": ("B01", ..., "B12")} in input channel order
    x = enc.normalize(s2=s2_raw)                          # raw (B, H, W, C) uint16 / dB -> normalized float32
    tokens = enc.embed(**x)                               # (B, 1 + N, D): CLS token, then N patch tokens

    features = enc.pool(tokens)                           # (B, D): pooled the way mmrs' heads pool (enc.pooling)

`embed` takes normalized NHWC float32 arrays for one or more of the encoder's modalities (S1 and S2 tokens at a
position are summed, as the encoder does for paired input: the `sum` fusion) and is jit-compiled once per input
shape. A ResNet (RS-BYOL) encoder returns pooled features (B, 512 or 2048) instead of tokens.

The conventions every consumer of an encoder follows (load_encoder, finetuning, launch.export, launch.embed):
- Normalization: an encoder's inputs are standardized with the statistics in its encoder.json ("normalization":
  the pretraining data's stats.json, or mmrs.bands' published constants when that data had none), per band:
  (raw - mean) / std, S1 dB clipped to bands.S1_DB_CLIP first. The encoder learned its features on inputs
  standardized this way, so the same raw pixel gives the same input wherever the encoder is used; a downstream
  dataset with other statistics (another processing level, region or season) is a domain shift the finetuning
  adapts to, not one that the normalization hides. Finetuning from `init_from` follows it by default
  (finetune.normalization="encoder"; "dataset" standardizes with the downstream dataset's own stats.json instead,
  and a model finetuned that way records those statistics in its checkpoint, so converting it carries them on).
  The exports carry the same numbers (mmrs.json mean/std, preprocessor_config.json image_mean/image_std, timm
  pretrained_cfg mean/std).
- Pooling: mmrs' classification heads mean-pool the patch tokens (CLS excluded) after the encoder's final
  LayerNorm (finetune.pool="mean", the default; "cls" takes the CLS token). encoder.json's "pooling" records the
  one used (a converted finetune run keeps its finetune.pool), `Encoder.pool` applies it, and the exports carry it:
  timm model_args global_pool="avg" with fc_norm=False (timm's default for "avg" would move the final norm after the
  pooling), HF config.json "pooling" (transformers' ViTModel pooler_output is tanh(dense(CLS)) and is not what
  mmrs uses: mean-pool last_hidden_state[:, 1:] instead).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmrs.data import normalize as normalize_lib
from mmrs.finetune import convert

NORMALIZATIONS = ("encoder", "dataset")  # finetune.normalization
POOLINGS = ("mean", "cls")  # mmrs/finetune/heads.py POOLS


def pooling(meta: Mapping[str, Any]) -> str:
  """The pooling mmrs uses on this encoder's features: encoder.json "pooling", else the heads' default (mean)."""
  if meta["architecture"]["kind"] == "resnet":
    return "avg"  # the ResNet's own global average pool
  pool = meta.get("pooling", "mean")
  if pool not in POOLINGS:
    raise ValueError(f"encoder.json pooling={pool!r} is unknown; expected one of {POOLINGS}.")
  return pool


def encoder_normalizer(meta: Mapping[str, Any], bands: Mapping[str, Any] | None = None) -> normalize_lib.Normalizer:
  """The encoder's input normalization (encoder.json), for `bands` (modality -> names; default: all it has)."""
  norm = normalize_lib.Normalizer.from_json(meta["normalization"])
  if bands is None:
    return norm
  return normalize_lib.Normalizer.from_stats(norm.to_json(), {m: tuple(b) for m, b in bands.items()},
                                             source=f"encoder.json ({norm.source})")


def input_normalizer(meta: Mapping[str, Any] | None, mode: str,
                     data_normalizer: normalize_lib.Normalizer) -> normalize_lib.Normalizer:
  """What a finetuning run standardizes its inputs with (see the module docstring's conventions).

  meta: the init_from encoder.json (None: a random init, which has no statistics of its own, uses the data's);
  mode: finetune.normalization; data_normalizer: the downstream dataset's (from its stats.json).
  """
  if mode not in NORMALIZATIONS:
    raise ValueError(f"finetune.normalization={mode!r} is unknown; choose one of {NORMALIZATIONS}.")
  if meta is None or mode == "dataset":
    return data_normalizer
  return encoder_normalizer(meta, data_normalizer.bands)


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
    self.normalizer = encoder_normalizer(meta)
    self.pooling = pooling(meta)
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

  def pool(self, features) -> jax.Array:
    """`embed`'s output -> (B, D) features, pooled as mmrs' heads pool them (`self.pooling`)."""
    from mmrs.finetune import heads  # pylint: disable=g-import-not-at-top

    if self.pooling == "avg":
      return jnp.asarray(features)
    return heads.pool_tokens(jnp.asarray(features), self.pooling, bool(self.architecture.get("use_cls_token")))

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
            f"image_size={self.image_size}, patch_size={self.patch_size}, pooling={self.pooling})")


def load_encoder(path: str) -> Encoder:
  """Loads a directory written by `launch.convert_checkpoint` (encoder.safetensors + encoder.json)."""
  variables, meta = convert.load(path)
  return Encoder(variables, meta)
