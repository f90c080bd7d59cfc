"""Downstream heads on encoder features (Flax Linen; params boxed with logical axis names like the encoder's).

Classification (on (B, 1 + N, D) ViT tokens, pooled by `pool`, or on (B, F) pooled ResNet features):
  linear   Dense(num_classes): the MixMAE paper's linear probe on BigEarthNet. With `input_norm` (the default for a
           frozen ViT, finetune.probe_batchnorm) an affine-free BatchNorm comes first, as MAE's linear probe
           (He et al. 2022, A.2: "an extra BatchNorm layer without affine transformation"; BatchNorm1d(affine=False,
           eps=1e-6)): it standardizes the pooled features, so a probe's score does not depend on the scale of an
           encoder's features (pretraining methods differ in it), and the probe's learning rate means the same
           thing for every encoder. Its running statistics are the head's batch_stats.
  mlp      Dense(hidden=128) -> BatchNorm -> ReLU -> Dense(num_classes): RS-BYOL's probe (its softmax is in the loss).
Segmentation (returns per-pixel logits (B, H, W, num_classes)), on ViT tokens:
  linear   Dense(p * p * num_classes) per patch token, unpatchified: a linear per-pixel probe.
  vitlite  the MixMAE paper's ViT-Lite decoder over all tokens (CLS joins its blocks, as in pretraining) whose
           per-patch output head is the segmentation head: Dense(p * p * num_classes), unpatchified.
on a ResNet feature map (output stride 8: the backbone's last two stages dilated):
  aspp     DeepLabV3's head (Chen et al. 2017; torchvision's DeepLabHead, the RS-BYOL paper's DFC2020 model):
           ASPP = 1x1 conv, three 3x3 convs dilated 12 / 24 / 36 and image pooling, 256 channels each with
           BatchNorm + ReLU, concatenated, projected by 1x1 conv (256, BN, ReLU, dropout 0.5); then 3x3 conv 256
           + BN + ReLU, 1x1 conv to the classes, bilinear upsampling to the input size.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmrs.models import vit

CLASSIFIER_HEADS = ("linear", "mlp")
SEGMENTATION_HEADS = ("linear", "vitlite", "aspp")  # aspp: ResNet encoders
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
  input_norm: bool = False  # MAE's affine-free BatchNorm before a linear probe

  @nn.compact
  def __call__(self, features, train: bool = False):
    x = pool_tokens(features, self.pool, self.has_cls).astype(self.dtype)
    if self.input_norm:
      # PyTorch's BatchNorm1d momentum 0.1 = flax's 0.9 (the weight of the old running average).
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-6, use_scale=False, use_bias=False,
                       dtype=jnp.float32, name="probe_bn")(x.astype(jnp.float32)).astype(self.dtype)
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


def _conv_bn_relu(x, features: int, kernel: int, dilation: int, name: str, train: bool, dtype: Any):
  pad = kernel // 2 * dilation
  x = nn.Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
              use_bias=False, dtype=dtype, name=f"{name}_conv",
              kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                       (None, None, "conv_in", "conv_out")))(x)
  x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=f"{name}_bn",
                   scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
  return nn.relu(x)


class ASPPHead(nn.Module):
  """DeepLabV3's segmentation head on a (B, h, w, C) feature map -> (B, H, W, num_classes) logits."""
  num_classes: int
  rates: tuple[int, ...] = (12, 24, 36)  # torchvision's DeepLabHead at output stride 8
  width: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features, size: tuple[int, int], train: bool = False):
    x = features.astype(self.dtype)
    b, h, w, _ = x.shape
    branches = [_conv_bn_relu(x, self.width, 1, 1, "aspp_0", train, self.dtype)]
    for i, r in enumerate(self.rates):
      branches.append(_conv_bn_relu(x, self.width, 3, r, f"aspp_{i + 1}", train, self.dtype))
    pooled = _conv_bn_relu(x.mean(axis=(1, 2), keepdims=True), self.width, 1, 1, "aspp_pool", train, self.dtype)
    branches.append(jnp.broadcast_to(pooled, (b, h, w, self.width)))  # upsampling a 1x1 map: a broadcast
    x = _conv_bn_relu(jnp.concatenate(branches, -1), self.width, 1, 1, "aspp_project", train, self.dtype)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = _conv_bn_relu(x, self.width, 3, 1, "conv", train, self.dtype)
    x = nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, name="out",
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                         (None, None, "conv_in", "classes")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("classes",)))(x)
    return jax.image.resize(x.astype(jnp.float32), (b,) + tuple(size) + (self.num_classes,), "bilinear")
