"""ResNet-18/34 (basic blocks) and ResNet-50/101 (bottleneck, v1.5: stride on the 3x3 conv) with BatchNorm.

The structure and module names follow torchvision so a checkpoint exports with a rename only:
`conv1`, `bn1`, `layer{i}_{j}` / {`conv1`,`bn1`,...,`downsample_0` (conv), `downsample_1` (bn)}
<-> torchvision `layer{i}.{j}.conv1`, `layer{i}.{j}.downsample.0`, ... Convolutions have no bias, paddings are
torchvision's explicit ones (7x7/2 pad 3, max-pool 3x3/2 pad 1, 3x3 pad 1), BatchNorm eps 1e-5 and momentum 0.9
(= torch momentum 0.1). The classifier `fc` is left out: `__call__` returns globally average-pooled features
(B, 512) or (B, 2048). The number of input channels is whatever the input has (a 1-band view works).
`output_stride` 8 or 16 (DeepLabV3's backbone, torchvision's replace_stride_with_dilation) makes the later stages
dilate their 3x3 convolutions instead of striding: the same weights, a finer feature map; `__call__(...,
feature_map=True)` returns that map (B, H / output_stride, W / output_stride, C) instead of the pooled features.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# name: (block kind, blocks per stage)
RESNET_SIZES = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}

# torchvision's init: kaiming normal, fan_out, relu gain.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Any, dilation: int = 1) -> nn.Conv:
  pad = kernel // 2 * dilation
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_dilation=dilation, dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(_conv_init, (None, None, "conv_in", "conv_out")))


def _bn(train: bool, name: str, dtype: Any, zero_scale: bool = False) -> nn.BatchNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(scale_init, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


class BasicBlock(nn.Module):
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  dilation: int = 1
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    d = self.dilation
    out = nn.relu(_bn(train, "bn1", self.dtype)(_conv(self.features, 3, self.stride, "conv1", self.dtype, d)(x)))
    out = _conv(self.features, 3, 1, "conv2", self.dtype, d)(out)
    out = _bn(train, "bn2", self.dtype, self.zero_init_residual)(out)
    return nn.relu(out + _shortcut(x, self.features, self.stride, train, self.dtype))


class Bottleneck(nn.Module):
  features: int  # width of the 3x3 conv; the block outputs 4x this
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  dilation: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out = nn.relu(_bn(train, "bn1", self.dtype)(_conv(self.features, 1, 1, "conv1", self.dtype)(x)))
    out = nn.relu(_bn(train, "bn2", self.dtype)(_conv(self.features, 3, self.stride, "conv2", self.dtype,
                                                      self.dilation)(out)))
    out = _conv(self.features * 4, 1, 1, "conv3", self.dtype)(out)
    out = _bn(train, "bn3", self.dtype, self.zero_init_residual)(out)
    return nn.relu(out + _shortcut(x, self.features * 4, self.stride, train, self.dtype))


def _shortcut(x, out_features: int, stride: int, train: bool, dtype: Any):
  """Identity, or torchvision's `downsample` (1x1 conv + BN) when the shape changes.

  Called inside a block's compact `__call__`, so the submodules are named within that block.
  """
  if stride == 1 and x.shape[-1] == out_features:
    return x
  x = _conv(out_features, 1, stride, "downsample_0", dtype)(x)
  return _bn(train, "downsample_1", dtype)(x)


class ResNet(nn.Module):
  """ResNet backbone -> (B, 512) or (B, 2048) pooled features. `size` is a key of RESNET_SIZES."""
  size: str = "resnet50"
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  output_stride: int = 32  # 8 / 16: dilated later stages (DeepLabV3)

  @property
  def num_features(self) -> int:
    kind, _ = _lookup(self.size)
    return 512 * (4 if kind == "bottleneck" else 1)

  @nn.compact
  def __call__(self, x, train: bool = True, feature_map: bool = False):
    kind, stages = _lookup(self.size)
    if self.output_stride not in (8, 16, 32):
      raise ValueError(f"ResNet output_stride={self.output_stride}: use 8, 16 or 32.")
    block_cls = Bottleneck if kind == "bottleneck" else BasicBlock
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(_bn(train, "bn1", self.dtype)(_conv(64, 7, 2, "conv1", self.dtype)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    current, dilation = 4, 1
    for i, num_blocks in enumerate(stages):
      for j in range(num_blocks):
        stride = 2 if (i > 0 and j == 0) else 1
        block_dilation = dilation
        if stride == 2 and current >= self.output_stride:  # torchvision: the stage's first block keeps the old one
          stride, dilation = 1, dilation * 2
        elif stride == 2:
          current *= 2
        x = block_cls(64 * 2**i, stride, self.zero_init_residual, self.dtype, block_dilation if j == 0 else dilation,
                      name=f"layer{i + 1}_{j}")(x, train)
    if feature_map:
      return x.astype(jnp.float32)
    return jnp.mean(x, axis=(1, 2)).astype(jnp.float32)


def _lookup(size: str):
  if size not in RESNET_SIZES:
    raise ValueError(f"Unknown ResNet size {size!r} (model.backbone); choose one of {sorted(RESNET_SIZES)}.")
  return RESNET_SIZES[size]


def forward_flops(size: str, image_size: int, in_channels: int = 3, output_stride: int = 32) -> float:
  """Analytic forward FLOPs (2 per multiply-add) of the convolutions of one image; BN/ReLU/pool are ignored
  (<1%). ResNet-50 at 224 px, 3 channels: 8.18e9 (torchvision's 4.09 GMACs)."""
  kind, stages = _lookup(size)
  out = lambda h, k, s: (h + 2 * (k // 2) - k) // s + 1  # noqa: E731
  conv = lambda h, k, cin, cout: 2.0 * h * h * k * k * cin * cout  # noqa: E731
  h = out(image_size, 7, 2)
  flops = conv(h, 7, in_channels, 64)
  h = (h + 2 - 3) // 2 + 1  # max-pool
  cin, current = 64, 4
  for i, num_blocks in enumerate(stages):
    width = 64 * 2**i
    for j in range(num_blocks):
      stride = 2 if (i > 0 and j == 0) else 1
      if stride == 2 and current >= output_stride:  # dilated instead of strided: the map keeps its size
        stride = 1
      elif stride == 2:
        current *= 2
      h_out = out(h, 3, stride)
      if kind == "bottleneck":
        cout = width * 4
        flops += conv(h, 1, cin, width) + conv(h_out, 3, width, width) + conv(h_out, 1, width, cout)
      else:
        cout = width
        flops += conv(h_out, 3, cin, width) + conv(h_out, 3, width, width)
      if stride != 1 or cin != cout:
        flops += conv(h_out, 1, cin, cout)
      h, cin = h_out, cout
  return flops
