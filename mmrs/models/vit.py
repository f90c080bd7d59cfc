"""ViT encoder with per-modality entry layers, and the ViT-Lite decoder of the MAE family (Flax Linen).

Conventions (shared with mmrs/methods and the checkpoint export):
- Images are NHWC float32, already normalized. A patch is flattened in (row, column, channel) order by
  `patchify`, so patch index i = row * grid_w + col and pixel index = (py * p + px) * C + c.
- Entry layer `patch_embed_<modality>` is a Dense over flattened patches: kernel (p*p*C, D), bias (D,).
  Exported as a strided Conv (timm `patch_embed.proj`): conv_kernel_HWIO = kernel.reshape(p, p, C, D), stride p.
- `modality_embed_<modality>` (D,) is added to every token of that modality; `cls` (1, 1, D) is the CLS token.
- Position embeddings are fixed 2D sin-cos (not params), computed for whatever grid the images give, so any
  image size that is a multiple of the patch size works. The CLS token gets no position embedding (as in MAE).
- Attention QKV is one fused kernel (D, 3, heads, head_dim) -> reshape (D, 3D) is timm's `qkv.weight.T`.
- Params are float32 and boxed with logical axis names (`nn.with_logical_partitioning`); compute runs in `dtype`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict
from jax.ad_checkpoint import checkpoint_name

from mmrs import target

Dtype = Any
_ACT = ("batch", "length", "embed")  # logical axes of the main (B, N, D) activations


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`lax.dot_general` of activations (..., K1..Kk) with a kernel (K1..Kk, F...), as ONE 2-D matmul over the
  flattened leading and contracted dims. The same math (the same products and sums).

  Why: the kernel gradient of a (B, N, K) x (K, F) dot contracts two dims (B and N), and XLA:CPU lowers that by
  materialising transposed copies of the activations and of their gradient (two full-size copies per layer in the
  backward pass, ~1/4 of the MAE step's copy traffic); as (B*N, K) x (K, F) the gradient is a plain 2-D dot.
  Other dimension numbers go to `lax.dot_general` unchanged.
  """
  (lc, rc), (lb, rb) = dimension_numbers
  k = len(lc)
  lead = lhs.ndim - k
  if lb or rb or tuple(lc) != tuple(range(lead, lhs.ndim)) or tuple(rc) != tuple(range(k)) or lead < 2:
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  y = jax.lax.dot_general(lhs.reshape(-1, math.prod(lhs.shape[lead:])), rhs.reshape(math.prod(rhs.shape[:k]), -1),
                          (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(lhs.shape[:lead] + rhs.shape[k:])


# Every Dense of the ViT runs its matmul through `flat_dot_general` (params and names as nn.Dense).
_Dense = functools.partial(nn.Dense, dot_general=flat_dot_general)


def _init(init, names):
  return nn.with_logical_partitioning(init, names)


def _xavier(in_axis=-2, out_axis=-1):
  return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axis, out_axis=out_axis)


def patch_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
  """(H/p, W/p); a clear error when the image size is not a multiple of the patch size."""
  if height % patch_size or width % patch_size:
    raise ValueError(
        f"Image size {height}x{width} is not a multiple of the patch size {patch_size}: set the dataset's "
        f"`image_size` (config.data.<dataset>.image_size) to a multiple of config.model.patch_size.")
  return height // patch_size, width // patch_size


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, N, p*p*C), patches in row-major order, pixels in (py, px, c) order."""
  b, h, w, c = images.shape
  gh, gw = patch_grid(h, w, patch_size)
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int]) -> jax.Array:
  """Inverse of `patchify`: (B, N, p*p*C) with N = grid_h * grid_w -> (B, grid_h*p, grid_w*p, C)."""
  b, n, d = patches.shape
  gh, gw = grid
  if n != gh * gw or d % (patch_size * patch_size):
    raise ValueError(f"unpatchify: {n} patches of {d} values do not fit grid {grid} with patch size {patch_size}.")
  c = d // (patch_size * patch_size)
  x = patches.reshape(b, gh, gw, patch_size, patch_size, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * patch_size, gw * patch_size, c)


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0) -> np.ndarray:
  """Fixed 2D sin-cos position embeddings, (grid_h * grid_w, dim) float32, row-major like `patchify`.

  The first dim/2 features encode the row, the last dim/2 the column, each as [sin, cos] of dim/4 frequencies.
  """
  if dim % 4:
    raise ValueError(f"2D sin-cos position embeddings need a width divisible by 4, got {dim}.")
  omega = 1.0 / temperature ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

  def one_axis(pos):
    out = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  emb = np.concatenate([one_axis(rows.reshape(-1)), one_axis(cols.reshape(-1))], axis=1)
  return emb.astype(np.float32)


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2: timm's/MAE's and PyTorch's formula (export-compatible).

  The same function as `jax.nn.gelu(x, approximate=False)`, which evaluates it as x * erfc(-x / sqrt 2) / 2;
  XLA:CPU computes erfc with two branches and a select (an exp and two polynomials per element), erf with one
  polynomial: the MLP's GELU forward + backward runs ~1.7x faster. The two differ by float rounding only (absolute
  ~1e-7 |x| where erfc's tail is more precise than 1 + erf).
  """
  return x * (1.0 + jax.lax.erf(x * np.asarray(math.sqrt(0.5), x.dtype))) * np.asarray(0.5, x.dtype)


class MlpBlock(nn.Module):
  width: int
  mlp_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_init(_xavier(), ("embed", "mlp")),
                 bias_init=_init(nn.initializers.zeros, ("mlp",)), name="fc1")(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = gelu(x)
    return _Dense(self.width, dtype=self.dtype, kernel_init=_init(_xavier(), ("mlp", "embed")),
                    bias_init=_init(nn.initializers.zeros, ("embed",)), name="fc2")(x)


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "head_major", "cudnn")


def head_major_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v on (B, N, heads, head_dim), computed head-major: the same math as
  `jax.nn.dot_product_attention`'s XLA path (logits in float32 times the scale, softmax in float32, probabilities
  cast back to v's dtype), written as two batched matmuls whose batch dims (B, heads) lead and whose operands are
  already in the (batch, rows, contracted) x (batch, contracted, columns) form XLA:CPU's batched dot takes.

  Why: jax's version runs as a vmap over head groups with einsums "BTNH,BSNH->BNTS" / "BNTS,BSNH->BTNH"; XLA:CPU
  then materialises K^T twice and re-lays-out q, v and the output in both passes. Here each of q, k^T, v is laid
  out once (fused with the qkv bias add) and the output once.
  """
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  qh = q.transpose(0, 2, 1, 3)  # (B, H, N, d)
  kt = k.transpose(0, 2, 3, 1)  # (B, H, d, N)
  vh = v.transpose(0, 2, 1, 3)  # (B, H, N, d)
  batch = ((0, 1), (0, 1))
  logits = jax.lax.dot_general(qh, kt, (((3,), (2,)), batch), preferred_element_type=logits_dtype)
  logits = logits * jnp.asarray(scale, logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  out = jax.lax.dot_general(probs, vh, (((3,), (2,)), batch))  # (B, H, N, d)
  return out.transpose(0, 2, 1, 3)


def _cudnn_trainable(q, k, v) -> bool:
  """Whether jax takes cuDNN flash attention for these shapes forward AND backward. Its backward rule checks more
  than the forward (an odd sequence length is refused for training: ViT-B/16 at 128 px with a CLS token has 65
  tokens), and it refuses while the step's gradient is traced, past any fallback around the forward call; so both
  are traced here, abstractly (nothing is added to the program)."""
  def forward_backward(*args):
    out, vjp = jax.vjp(functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), *args)
    return vjp(out)
  try:
    jax.eval_shape(forward_backward, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)))
  except (NotImplementedError, RuntimeError, ValueError):
    return False
  return True


def attend(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
  """Softmax attention on (B, N, heads, head_dim) (config.model.attention).

  implementation: "xla" (`jax.nn.dot_product_attention`'s XLA path), "head_major" (`head_major_attention`: the same
  math with fewer layout copies; the faster one on CPU), "cudnn" (fused flash attention; GPU, bf16/fp16,
  head_dim % 8 == 0), or "auto": what `mmrs.target.choices` picks for the platform being compiled for (the
  target's under launch.aot, not this host's). An "auto" cuDNN choice falls back to XLA where jax refuses cuDNN
  for these shapes, forward or backward (`_cudnn_trainable`). The ops run under the named scope `attention_<implementation>`, so
  the compiled HLO's op names say which implementation a program got (tests/test_aot_target.py reads them).
  """
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"Attention implementation {implementation!r}: use one of {', '.join(ATTENTION_IMPLEMENTATIONS)} "
                     "(config.model.attention).")
  if implementation == "auto":
    implementation = target.choices(target.platform(), q.dtype).attention
    if implementation == "cudnn" and not _cudnn_trainable(q, k, v):
      implementation = "xla"
  with jax.named_scope(f"attention_{implementation}"):
    if implementation == "head_major":
      return head_major_attention(q, k, v)
    return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


class Projection(nn.Module):
  """Dense from the last `in_ndim` axes of x to `features` axes, with the kernel created at its full N-d shape.

  (flax's DenseGeneral initializes a flattened 2-D kernel and reshapes it, which breaks logical-axis sharding
  constraints on multi-dimensional kernels when flax logical-axis rules are active.)
  """
  features: tuple[int, ...]
  in_ndim: int
  kernel_axes: tuple[str | None, ...]
  bias_axes: tuple[str | None, ...]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_out = len(self.features)
    init = _xavier(in_axis=tuple(range(self.in_ndim)), out_axis=tuple(range(self.in_ndim, self.in_ndim + n_out)))
    kernel = self.param("kernel", _init(init, self.kernel_axes), tuple(x.shape[-self.in_ndim:]) + self.features)
    bias = self.param("bias", _init(nn.initializers.zeros, self.bias_axes), self.features)
    contract = (tuple(range(x.ndim - self.in_ndim, x.ndim)), tuple(range(self.in_ndim)))
    y = flat_dot_general(x.astype(self.dtype), kernel.astype(self.dtype), (contract, ((), ())))
    return y + bias.astype(self.dtype)


class SelfAttention(nn.Module):
  """Multi-head self-attention: fused QKV projection, `attend`, output projection.

  Params: qkv/kernel (D, 3, heads, head_dim), qkv/bias (3, heads, head_dim), out/kernel (heads, head_dim, D),
  out/bias (D,).
  """
  width: int
  num_heads: int
  dtype: Dtype = jnp.float32
  attention: str = "auto"  # see `attend()`

  @nn.compact
  def __call__(self, x):
    if self.width % self.num_heads:
      raise ValueError(f"Width {self.width} is not divisible by num_heads {self.num_heads} (configs/common.py).")
    head_dim = self.width // self.num_heads
    qkv = Projection((3, self.num_heads, head_dim), 1, ("embed", None, "heads", "head_dim"),
                     (None, "heads", "head_dim"), self.dtype, name="qkv")(x)
    qkv = checkpoint_name(qkv, "qkv_proj")  # what remat_policy="save_qkv_proj" keeps for the backward pass
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, heads, head_dim)
    y = attend(q, k, v, self.attention)
    y = nn.with_logical_constraint(y, ("batch", "length", "heads", "head_dim"))
    return Projection((self.width,), 2, ("heads", "head_dim", "embed"), ("embed",), self.dtype, name="out")(y)


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, scale_init=_init(nn.initializers.ones, ("embed",)),
                      bias_init=_init(nn.initializers.zeros, ("embed",)), name=name)


def drop_path_scales(rng: jax.Array, rate: float, depth: int, batch: int) -> jax.Array:
  """Stochastic depth (Huang et al. 2016) as timm/MAE apply it: (depth, 2, batch) float32 factors of block i's
  attention [0] and MLP [1] residual branch per sample: 0 (branch dropped) with probability p_i, else 1 / (1 - p_i),
  p_i = rate * i / (depth - 1) (linear from 0 at the first block to `rate` at the last, timm's
  `torch.linspace(0, rate, depth)`); each branch and sample draws independently."""
  p = jnp.linspace(0.0, rate, depth, dtype=jnp.float32)[:, None, None]
  keep = 1.0 - p
  kept = jax.random.bernoulli(rng, jnp.broadcast_to(keep, (depth, 2, batch)))
  return jnp.where(kept & (keep > 0), 1.0 / jnp.maximum(keep, 1e-12), 0.0).astype(jnp.float32)


def _branch(y: jax.Array, scale: jax.Array | None) -> jax.Array:
  """A residual branch times its per-sample drop-path factor (B,); None = no drop path (exactly y)."""
  return y if scale is None else y * scale.astype(y.dtype)[:, None, None]


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

  `drop_scale`: None, or (2, B) drop-path factors of the attention and MLP branches (`drop_path_scales`)."""
  width: int
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False, drop_scale: jax.Array | None = None):
    drop = nn.Dropout(self.dropout_rate, deterministic=not train or self.dropout_rate == 0.0)
    attn = SelfAttention(self.width, self.num_heads, self.dtype, self.attention, name="attn")
    y = attn(_layer_norm(self.dtype, "norm1")(x))
    x = nn.with_logical_constraint(x + _branch(drop(y), None if drop_scale is None else drop_scale[0]), _ACT)
    y = MlpBlock(self.width, self.mlp_dim, self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))
    return nn.with_logical_constraint(x + _branch(drop(y), None if drop_scale is None else drop_scale[1]), _ACT)


# --- a stack of blocks: unrolled or scanned, with or without rematerialization ---------------------------------------
# config.model.remat_policy -> what the backward pass keeps of each block's forward (the rest is recomputed).
# "none": no remat (keep everything); "full": keep only the block inputs; "dots_saveable": keep every matmul output;
# "dots_with_no_batch_dims_saveable": keep the weight matmuls (not attention's batched QK^T / AV);
# "save_qkv_proj": keep only the fused QKV projection (checkpoint_name "qkv_proj" in SelfAttention).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv_proj": jax.checkpoint_policies.save_only_these_names("qkv_proj"),
}


def stack_options(model_config: Mapping[str, Any]) -> dict:
  """ViTEncoder / ViTLiteDecoder kwargs from config.model.{scan_layers, remat_policy} (absent keys: defaults)."""
  get = model_config.get
  return dict(scan_layers=bool(get("scan_layers", False)), remat_policy=str(get("remat_policy", "none")))


class _ScanBlock(EncoderBlock):
  """EncoderBlock as an `nn.scan` body: (x, train, drop_scale) -> (x, None); drop_scale is scanned (layer i's
  slice of the (depth, 2, B) factors), so the per-layer drop-path rate is data, not a constant of the one body."""

  def __call__(self, x, train: bool = False, drop_scale=None):  # pylint: disable=useless-parent-delegation
    return EncoderBlock.__call__(self, x, train, drop_scale), None


def block_stack(depth: int, block_kwargs: Mapping[str, Any], scan: bool, remat_policy: str,
                name: str | None = None):
  """The modules of `depth` EncoderBlocks (call `run_blocks` on the result).

  Unrolled (scan=False): a list of blocks whose params are `blocks_0 ... blocks_{depth-1}` (names given by the
  parent's setup attribute, or `{name}_{i}` in a compact method). Scanned: one `nn.scan` module whose params are
  `blocks/...` with a leading axis of size depth, logical name "layers" (mesh.py never shards it): XLA compiles one
  block instead of depth copies. mmrs/models/layout.py converts between the two layouts. Every block gets the same
  `block_kwargs`; the per-layer drop-path factors are a call argument (`run_blocks`), scanned along the layers.
  `remat_policy` (REMAT_POLICIES) wraps each block in `nn.remat`.
  """
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.model.remat_policy={remat_policy!r}: choose one of {sorted(REMAT_POLICIES)}.")
  remat = remat_policy != "none"
  if not scan:
    cls = nn.remat(EncoderBlock, static_argnums=(2,), policy=REMAT_POLICIES[remat_policy]) if remat else EncoderBlock
    return [cls(**block_kwargs, **({"name": f"{name}_{i}"} if name else {})) for i in range(depth)]
  cls = _ScanBlock
  if remat:  # prevent_cse=False: scan already keeps XLA from merging the recomputation with the forward pass
    cls = nn.remat(cls, static_argnums=(2,), policy=REMAT_POLICIES[remat_policy], prevent_cse=False)
  scanned = nn.scan(cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast, 0), length=depth, metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(**block_kwargs, **({"name": name} if name else {}))


def run_blocks(blocks, x: jax.Array, train: bool, drop_scales: jax.Array | None = None) -> jax.Array:
  """Runs what `block_stack` made. `drop_scales`: None or (depth, 2, B) drop-path factors (`drop_path_scales`)."""
  if isinstance(blocks, (list, tuple)):
    for i, block in enumerate(blocks):
      x = block(x, train, None if drop_scales is None else drop_scales[i])
    return x
  return blocks(x, train, drop_scales)[0]


class ViTEncoder(nn.Module):
  """ViT encoder with one entry layer (patch embedding + modality embedding) per modality.

  Sizes: `configs.common.vit_size(name)` gives width/depth/mlp_dim/num_heads. `in_channels` maps each modality
  the encoder accepts to its channel count (e.g. {"s2": 12} for an S2-only MAE, {"s2": 13, "s1": 2} for MixMAE).

  Methods (use `module.apply(variables, ..., method="embed")` etc.):
  - `embed(images: {modality: (B, H, W, C)}) -> {modality: (B, N, D)}`: entry layer + position + modality
    embedding; no CLS. N = (H/p) * (W/p) in `patchify` order.
  - `encode(tokens (B, n, D), train=False) -> (B, 1 + n, D)`: prepends CLS (when `use_cls_token`), runs the
    blocks, final LayerNorm. Tokens may be any subset/mix of embedded tokens (they carry their position).
  - `__call__(s2=None, s1=None, train=False, fusion="sum") -> (B, 1 + N, D)`: S2 only, S1 only, or both; with
    both, `fusion` = "concat" (2L tokens, N = 2L) or "sum" (one token per position): the downstream S1+S2 input.
  Dropout (`dropout_rate` > 0 and train=True) needs a "dropout" rng; so does drop path (`drop_path_rate` > 0 and
  train=True: stochastic depth, per sample, on every block's attention and MLP branch, rate rising linearly from 0
  at the first block to drop_path_rate at the last, as timm/MAE finetune; `drop_path_scales`). The factors of all
  blocks are drawn once in `encode` from one "dropout" key, so the unrolled and scanned layouts drop the same
  branches. Drop path is the finetuning recipe's (model.drop_path_rate, mmrs/finetune/method.py); the pretraining
  methods leave it at 0, as MAE pretrains without it.
  To initialize every entry layer, call `init(rng, **{m: example for m in in_channels})`.
  """
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  in_channels: Mapping[str, int] = FrozenDict({"s2": 13, "s1": 2})
  use_cls_token: bool = True
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  drop_path_rate: float = 0.0  # stochastic depth of the last block (0 at the first; see above)
  attention: str = "auto"  # xla | head_major | cudnn | auto (cuDNN on GPU for bf16/fp16, head_major on CPU)
  scan_layers: bool = False  # see `block_stack`
  remat_policy: str = "none"  # see REMAT_POLICIES

  def setup(self):
    # Dict attributes get names "<attr>_<key>": patch_embed_s2, patch_embed_s1, ...
    self.patch_embed = {
        m: _Dense(self.width, dtype=self.dtype, kernel_init=_init(_xavier(), ("patch", "embed")),
                    bias_init=_init(nn.initializers.zeros, ("embed",)))
        for m in self.in_channels}
    self.modality_embeds = {
        m: self.param(f"modality_embed_{m}", _init(nn.initializers.normal(0.02), ("embed",)), (self.width,))
        for m in self.in_channels}
    if self.use_cls_token:
      self.cls = self.param("cls", _init(nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, self.width))
    self.blocks = block_stack(self.depth, dict(width=self.width, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                               dtype=self.dtype, dropout_rate=self.dropout_rate,
                                               attention=self.attention), self.scan_layers, self.remat_policy)
    self.norm = _layer_norm(self.dtype, None)

  def embed(self, images: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    out = {}
    for m, x in images.items():
      if m not in self.in_channels:
        raise ValueError(f"ViTEncoder has no entry layer for modality {m!r}; it accepts {sorted(self.in_channels)} "
                         "(set by the method from config.bands).")
      if x.ndim != 4 or x.shape[-1] != self.in_channels[m]:
        raise ValueError(f"ViTEncoder: {m!r} images must be (B, H, W, {self.in_channels[m]}), got {x.shape}; "
                         "check config.bands against the bands of the data.")
      gh, gw = patch_grid(x.shape[1], x.shape[2], self.patch_size)
      tokens = self.patch_embed[m](patchify(x.astype(self.dtype), self.patch_size))
      pos = jnp.asarray(sincos_2d(gh, gw, self.width), self.dtype)
      tokens = tokens + pos[None] + self.modality_embeds[m].astype(self.dtype)
      out[m] = nn.with_logical_constraint(tokens, _ACT)
    return out

  def encode(self, tokens: jax.Array, train: bool = False) -> jax.Array:
    x = tokens.astype(self.dtype)
    if self.use_cls_token:
      cls = jnp.broadcast_to(self.cls.astype(self.dtype), (x.shape[0], 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = nn.with_logical_constraint(x, _ACT)
    scales = None
    if train and self.drop_path_rate > 0:
      scales = drop_path_scales(self.make_rng("dropout"), self.drop_path_rate, self.depth, x.shape[0])
    x = run_blocks(self.blocks, x, train, scales)
    return nn.with_logical_constraint(self.norm(x), _ACT)

  def __call__(self, s2: jax.Array | None = None, s1: jax.Array | None = None, train: bool = False,
               fusion: str = "sum") -> jax.Array:
    """S2 only, S1 only, or both. With both, `fusion` says how the two modalities meet (finetune.fusion):
    "concat": 2L tokens (S1's then S2's), each with its own modality embedding and one position embedding: what
      JointMAE's encoder saw (and MixMAE's per-position S1-or-S2 tokens generalise to) -> (B, [1 +] 2L, D);
    "sum": one token per position, the sum of the two patch + modality embeddings plus ONE position embedding
      (not two) -> (B, [1 +] L, D)."""
    images = {m: x for m, x in (("s2", s2), ("s1", s1)) if x is not None}
    if not images:
      raise ValueError("ViTEncoder needs at least one of s2=..., s1=... images.")
    shapes = {m: x.shape[:3] for m, x in images.items()}
    if len(set(shapes.values())) > 1:
      raise ValueError(f"ViTEncoder: S1 and S2 images must have the same batch and spatial size, got {shapes}.")
    embedded = self.embed(images)
    if len(embedded) == 1:
      tokens = next(iter(embedded.values()))
    elif fusion == "concat":
      tokens = jnp.concatenate([embedded["s1"], embedded["s2"]], axis=1)
    elif fusion == "sum":  # each embedded token carries the position embedding: keep it once
      x = next(iter(images.values()))
      pos = jnp.asarray(sincos_2d(*patch_grid(x.shape[1], x.shape[2], self.patch_size), self.width), self.dtype)
      tokens = embedded["s1"] + embedded["s2"] - pos[None]
    else:
      raise ValueError(f"S1+S2 fusion {fusion!r} is unknown; use concat or sum (finetune.fusion).")
    return self.encode(tokens, train)


class ViTLiteDecoder(nn.Module):
  """The MAE-style decoder. The methods build it at the "lite" size of mmrs/models/sizes.py (width 512, depth 6,
  16 heads: ~21M parameters, the papers' ViT-Lite); the field defaults below are only constructor defaults.

  Output "slots": S = G * L where L = grid_h * grid_w positions and G = number of output groups (1 when `out_dim`
  is an int; len(out_dim) when it is a tuple, e.g. one group per modality for JointMAE). Slot s is position
  s % L of group s // L.

  `__call__(tokens, grid, ids=None, has_cls=True, train=False)`:
  - tokens: (B, [1 +] n, D_enc) encoder output; when `has_cls` the first token is the CLS token, which joins the
    decoder blocks (as in MAE) but is not predicted.
  - grid: (grid_h, grid_w) of the images (static Python ints).
  - ids: (B, n) int slot indices in [0, S) of the n non-CLS tokens (e.g. MAE's visible ids, or JointMAE's
    position + L * modality). Slots not listed get the learned `mask_token`. None = the tokens already fill all
    S slots in order (AuxMAE's full S2 -> S1, MixMAE's full mixed sequence).
  Each slot gets the fixed 2D sin-cos embedding of its position, plus a learned `group_embed[g]` when G > 1.
  Returns (B, L, out_dim) float32 when `out_dim` is an int, else a tuple of G arrays (B, L, out_dim[g]),
  one head per group (`head` / `head_<g>`). Per-patch pixel order is `patchify`'s.
  """
  width: int = 512
  depth: int = 8
  mlp_dim: int = 2048
  num_heads: int = 16
  out_dim: int | Sequence[int] = 16 * 16 * 13
  dtype: Dtype = jnp.float32
  dropout_rate: float = 0.0
  attention: str = "auto"
  scan_layers: bool = False  # see `block_stack`
  remat_policy: str = "none"  # see REMAT_POLICIES

  @nn.compact
  def __call__(self, tokens: jax.Array, grid: tuple[int, int], ids: jax.Array | None = None,
               has_cls: bool = True, train: bool = False):
    out_dims = (self.out_dim,) if isinstance(self.out_dim, int) else tuple(self.out_dim)
    groups = len(out_dims)
    length = grid[0] * grid[1]
    slots = groups * length
    x = _Dense(self.width, dtype=self.dtype, kernel_init=_init(_xavier(), (None, "embed")),
                 bias_init=_init(nn.initializers.zeros, ("embed",)), name="input_proj")(tokens.astype(self.dtype))
    cls, x = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
    mask_token = self.param("mask_token", _init(nn.initializers.normal(0.02), ("embed",)), (self.width,))
    if ids is None:
      if x.shape[1] != slots:
        raise ValueError(f"ViTLiteDecoder: without ids the decoder needs all {slots} slot tokens, got {x.shape[1]}.")
    else:
      full = jnp.broadcast_to(mask_token.astype(self.dtype), (x.shape[0], slots, self.width))
      x = jax.vmap(lambda f, i, v: f.at[i].set(v))(full, ids, x)
    pos = jnp.asarray(np.tile(sincos_2d(grid[0], grid[1], self.width), (groups, 1)), self.dtype)
    x = x + pos[None]
    if groups > 1:
      group_embed = self.param("group_embed", _init(nn.initializers.normal(0.02), (None, "embed")),
                               (groups, self.width))
      x = x + jnp.repeat(group_embed.astype(self.dtype), length, axis=0)[None]
    if has_cls:
      x = jnp.concatenate([cls, x], axis=1)
    x = nn.with_logical_constraint(x, _ACT)
    blocks = block_stack(self.depth, dict(width=self.width, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                                          dtype=self.dtype, dropout_rate=self.dropout_rate, attention=self.attention),
                         self.scan_layers, self.remat_policy, name="blocks")
    x = run_blocks(blocks, x, train)
    x = _layer_norm(self.dtype, "norm")(x)
    if has_cls:
      x = x[:, 1:]
    outs = []
    for g, dim in enumerate(out_dims):
      head = _Dense(dim, dtype=self.dtype, kernel_init=_init(_xavier(), ("embed", "patch")),
                      bias_init=_init(nn.initializers.zeros, ("patch",)),
                      name="head" if isinstance(self.out_dim, int) else f"head_{g}")
      outs.append(head(x[:, g * length:(g + 1) * length]).astype(jnp.float32))
    return outs[0] if isinstance(self.out_dim, int) else tuple(outs)
