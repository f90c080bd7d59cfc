"""Downstream heads on encoder features (Flax Linen; params boxed with logical axis names like the encoder's).

Classification (on (B, 1 + N, D) ViT tokens, pooled by `pool`, or on (B, F) pooled ResNet features):
  linear   Dense(num_classes): the MixMAE paper's linear probe on BigEarthNet.
  mlp      Dense(hidden=128) -> BatchNorm -> ReLU -> Dense(num_classes): RS-BYOL's probe (its softmax is in the loss).
Segmentation (on ViT tokens; returns per-pixel logits (B, H, W, num_classes)):
  linear   Dense(p * p * num_classes) per patch token, unpatchified: a linear per-pixel probe.
  vitlite  the MixMAE paper's ViT-Lite decoder over all tokens (CLS joins its blocks, as in pretraining) whose
           per-patch output head is the segmentation head: Dense(p * p * num_classes), unpatchified.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmrs.models import vit

CLASSIFIER_HEADS = ("linear", "mlp")
SEGMENTATION_HEADS = ("linear", "vitlite")
POOLS = ("mean", "cls")


def _dense(n: int, axes: tuple, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(n, dtype=dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


def pool_tokens(features, pool: str, has_cls: bool):
  """(B, [1 +] N, D) tokens -> (B, D); (B, F) features pass through."""
  if features.ndim == 2:
    return features
  if pool == "cls":
    if not has_cls:
      raise ValueError("finetune.pool='cls' but the encoder has no CLS token (model.use_cls_token); use 'mean'.")
    return features[:, 0]
  if pool == "mean":
    return features[:, int(has_cls):].mean(axis=1)
  raise ValueError(f"finetune.pool={pool!r} is unknown; choose one of {POOLS}.")


class ClassifierHead(nn.Module):
  num_classes: int
  kind: str = "linear"
  pool: str = "mean"
  has_cls: bool = True
  hidden_dim: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = pool_tokens(features, self.pool, self.has_cls).astype(self.dtype)
    if self.kind == "mlp":
      x = _dense(self.hidden_dim, ("embed", "mlp"), "dense1", self.dtype)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn",
                       scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
      x = nn.relu(x)
    elif self.kind != "linear":
      raise ValueError(f"finetune.head={self.kind!r} is not a classification head; choose one of {CLASSIFIER_HEADS}.")
    return _dense(self.num_classes, ("embed", "classes"), "out", self.dtype)(x).astype(jnp.float32)


class SegmentationHead(nn.Module):
  num_classes: int
  patch_size: int
  kind: str = "vitlite"
  has_cls: bool = True
  decoder_size: Any = None  # dict(width, depth, mlp_dim, num_heads) for "vitlite"
  dtype: Any = jnp.float32
  attention: str = "auto"  # config.model.attention (mmrs/models/vit.py attend())

  @nn.compact
  def __call__(self, tokens, grid: tuple[int, int], train: bool = False):
    p, k = self.patch_size, self.num_classes
    if self.kind == "linear":
      x = tokens[:, int(self.has_cls):].astype(self.dtype)
      logits = _dense(p * p * k, ("embed", "patch"), "out", self.dtype)(x)
    elif self.kind == "vitlite":
      decoder = vit.ViTLiteDecoder(**dict(self.decoder_size), out_dim=p * p * k, dtype=self.dtype,
                                   attention=self.attention, name="decoder")
      logits = decoder(tokens, grid, None, self.has_cls, train)
    else:
      raise ValueError(f"finetune.head={self.kind!r} is not a segmentation head; choose one of "
                       f"{SEGMENTATION_HEADS}.")
    return vit.unpatchify(logits.astype(jnp.float32), p, grid)
