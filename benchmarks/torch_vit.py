"""An independent PyTorch implementation of mmrs's MAE-S2 and MixMAE models and train step (benchmarks only).

This is the peer a user would write instead of mmrs, in the idiom of the MAE reference code and timm: NCHW images,
a strided Conv2d patch embedding, `nn.Linear` fused qkv, `F.scaled_dot_product_attention` (SDPA: flash/efficient
kernels on GPU, the fused CPU kernel on CPU), exact GELU, pre-LN blocks (LayerNorm eps 1e-6), fixed 2D sin-cos
positions (none on the CLS token), MAE's random masking by argsort of noise and its gather-based "unshuffle" of the
decoder sequence, and the loss on masked patches only. The architecture and the math are the same as
mmrs/models/vit.py and mmrs/methods/{mae,mixmae}.py (tests/test_peer.py checks the forward on copied weights); none
of the code is shared, so the benchmark compares two implementations, not one.

PyTorch is an optional benchmark dependency (requirements-bench.txt); nothing in mmrs imports this module.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d(grid_h: int, grid_w: int, dim: int, temperature: float = 10000.0, device=None) -> torch.Tensor:
  """(grid_h * grid_w, dim) row-major; first half of the features encodes the row, second half the column."""
  quarter = dim // 4
  f64 = dict(dtype=torch.float64, device=device)
  omega = 1.0 / temperature ** (torch.arange(quarter, **f64) / quarter)
  rows, cols = torch.meshgrid(torch.arange(grid_h, **f64), torch.arange(grid_w, **f64), indexing="ij")
  parts = []
  for pos in (rows.reshape(-1), cols.reshape(-1)):
    angle = pos[:, None] * omega[None, :]
    parts += [angle.sin(), angle.cos()]
  return torch.cat(parts, dim=1).float()


class Positions(nn.Module):
  """Fixed sin-cos positions of a (grid_h, grid_w) patch grid, made once at construction as a (non-persistent)
  buffer when the grid is known, else computed in forward for the grid at hand.

  Why not a cache filled on first use: torch.compile guards on the module's state, so a dict that the first call
  fills makes the second call recompile (the whole model, minutes for ViT-B on a GPU). A buffer set in __init__ is
  never mutated in forward.
  """

  def __init__(self, dim: int, grid: tuple[int, int] | None):
    super().__init__()
    self.dim, self.grid = dim, tuple(grid) if grid else None
    self.register_buffer("table", sincos_2d(*grid, dim) if grid else None, persistent=False)

  def forward(self, grid_h: int, grid_w: int, like: torch.Tensor) -> torch.Tensor:
    table = self.table if self.grid == (grid_h, grid_w) else sincos_2d(grid_h, grid_w, self.dim, device=like.device)
    return table.to(like.dtype)


class Attention(nn.Module):
  def __init__(self, dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    y = F.scaled_dot_product_attention(q, k, v)
    return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
  def __init__(self, dim: int, mlp_dim: int, heads: int):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.fc1 = nn.Linear(dim, mlp_dim)
    self.fc2 = nn.Linear(mlp_dim, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # exact (erf) GELU


class Encoder(nn.Module):
  """ViT encoder with a Conv2d entry layer and a modality embedding per modality, CLS token, final LayerNorm."""

  def __init__(self, in_channels: Mapping[str, int], width: int, depth: int, mlp_dim: int, heads: int,
               patch_size: int, grid: tuple[int, int] | None = None):
    super().__init__()
    self.patch_size, self.width = patch_size, width
    self.patch_embed = nn.ModuleDict({m: nn.Conv2d(c, width, patch_size, stride=patch_size)
                                      for m, c in in_channels.items()})
    self.modality_embed = nn.ParameterDict({m: nn.Parameter(torch.randn(width) * 0.02) for m in in_channels})
    self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.blocks = nn.ModuleList([Block(width, mlp_dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.pos_embed = Positions(width, grid)

  def embed(self, modality: str, images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, D) tokens with position and modality embedding, row-major."""
    x = self.patch_embed[modality](images)
    gh, gw = x.shape[2:]
    x = x.flatten(2).transpose(1, 2)
    return x + self.pos_embed(gh, gw, x)[None] + self.modality_embed[modality]

  def encode(self, tokens: torch.Tensor) -> torch.Tensor:
    x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class Decoder(nn.Module):
  """MAE-style decoder: input projection, mask tokens at the dropped slots, sin-cos positions, blocks, pixel head.

  The CLS token joins the blocks and is not predicted.
  """

  def __init__(self, in_width: int, width: int, depth: int, mlp_dim: int, heads: int, out_dim: int,
               grid: tuple[int, int] | None = None):
    super().__init__()
    self.width = width
    self.input_proj = nn.Linear(in_width, width)
    self.mask_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
    self.blocks = nn.ModuleList([Block(width, mlp_dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(width, eps=1e-6)
    self.head = nn.Linear(width, out_dim)
    self.pos_embed = Positions(width, grid)

  def forward(self, latent: torch.Tensor, grid: tuple[int, int], ids_restore: torch.Tensor | None = None):
    """latent (B, 1 + n, D_enc); ids_restore (B, L): MAE's unshuffle indices, None when n == L (no mask)."""
    x = self.input_proj(latent)
    cls, x = x[:, :1], x[:, 1:]
    length = grid[0] * grid[1]
    if ids_restore is not None:
      masks = self.mask_token.to(x.dtype).expand(x.shape[0], length - x.shape[1], -1)
      x = torch.cat([x, masks], dim=1)
      x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
    x = torch.cat([cls, x + self.pos_embed(grid[0], grid[1], x)[None]], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 1:]).float()


def patchify(images: torch.Tensor, p: int) -> torch.Tensor:
  """(B, C, H, W) -> (B, L, p*p*C), pixels in (py, px, c) order (as MAE's reference and mmrs)."""
  b, c, h, w = images.shape
  x = images.reshape(b, c, h // p, p, w // p, p)
  return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def masked_patch_mse(pred: torch.Tensor, target: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
  per_patch = (pred - target.float()).square().mean(dim=-1)
  scored = scored.float()
  return (per_patch * scored).sum() / scored.sum().clamp(min=1.0)


def random_split(batch: int, length: int, first: int, device) -> tuple[torch.Tensor, torch.Tensor]:
  """MAE's masking: (ids_shuffle (B, L), ids_restore (B, L)); the first `first` of ids_shuffle are kept."""
  noise = torch.rand(batch, length, device=device)
  ids_shuffle = torch.argsort(noise, dim=1)
  return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


def shuffle_from_kept(keep_ids: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
  """(ids_shuffle, ids_restore) that keep exactly `keep_ids` (B, n), in their order (to reproduce a given mask)."""
  b = keep_ids.shape[0]
  dropped = torch.ones(b, length, dtype=torch.bool, device=keep_ids.device)
  dropped[torch.arange(b, device=keep_ids.device)[:, None], keep_ids] = False
  rest = torch.nonzero(dropped)[:, 1].reshape(b, length - keep_ids.shape[1])
  ids_shuffle = torch.cat([keep_ids, rest], dim=1)
  return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


class MAES2(nn.Module):
  """MAE on S2: loss = mean over masked patches of the per-patch pixel MSE (plain targets, no norm_pix)."""

  def __init__(self, channels: int, enc: dict, dec: dict, patch_size: int = 16, mask_ratio: float = 0.75,
               grid: tuple[int, int] | None = None):
    super().__init__()
    self.p, self.mask_ratio = patch_size, mask_ratio
    self.encoder = Encoder({"s2": channels}, patch_size=patch_size, grid=grid, **enc)
    self.decoder = Decoder(enc["width"], out_dim=patch_size * patch_size * channels, grid=grid, **dec)

  def forward(self, s2: torch.Tensor, keep_ids: torch.Tensor | None = None):
    """s2 (B, C, H, W). Returns (loss, pred (B, L, p*p*C), mask (B, L) True = masked)."""
    b, _, h, w = s2.shape
    grid = (h // self.p, w // self.p)
    length = grid[0] * grid[1]
    keep = int(round(length * (1 - self.mask_ratio)))
    if keep_ids is None:
      ids_shuffle, ids_restore = random_split(b, length, keep, s2.device)
    else:
      ids_shuffle, ids_restore = shuffle_from_kept(keep_ids, length)
    tokens = self.encoder.embed("s2", s2)
    visible = torch.gather(tokens, 1, ids_shuffle[:, :keep, None].expand(-1, -1, tokens.shape[2]))
    latent = self.encoder.encode(visible)
    pred = self.decoder(latent, grid, ids_restore)
    mask = torch.ones(b, length, device=s2.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore).bool()
    return masked_patch_mse(pred, patchify(s2, self.p), mask), pred, mask


class MixMAE(nn.Module):
  """MixMAE: per position the S2 or the S1 token (k = k_fraction * L show S2); two decoders, each scored where its
  modality was hidden; loss = lam * L_S1 + (1 - lam) * L_S2."""

  def __init__(self, s2_channels: int, s1_channels: int, enc: dict, dec: dict, patch_size: int = 16,
               k_fraction: float = 0.5, lam: float = 0.5, grid: tuple[int, int] | None = None):
    super().__init__()
    self.p, self.k_fraction, self.lam = patch_size, k_fraction, lam
    self.encoder = Encoder({"s2": s2_channels, "s1": s1_channels}, patch_size=patch_size, grid=grid, **enc)
    self.decoders = nn.ModuleDict({
        "s2": Decoder(enc["width"], out_dim=patch_size * patch_size * s2_channels, grid=grid, **dec),
        "s1": Decoder(enc["width"], out_dim=patch_size * patch_size * s1_channels, grid=grid, **dec)})

  def forward(self, s2: torch.Tensor, s1: torch.Tensor, take_s2: torch.Tensor | None = None):
    """Returns (loss, {modality: pred}, take_s2 (B, L) bool)."""
    b, _, h, w = s2.shape
    grid = (h // self.p, w // self.p)
    length = grid[0] * grid[1]
    if take_s2 is None:
      k = int(round(length * self.k_fraction))
      ids_shuffle, _ = random_split(b, length, k, s2.device)
      take_s2 = torch.zeros(b, length, dtype=torch.bool, device=s2.device)
      take_s2.scatter_(1, ids_shuffle[:, :k], True)
    mixed = torch.where(take_s2[..., None], self.encoder.embed("s2", s2), self.encoder.embed("s1", s1))
    latent = self.encoder.encode(mixed)
    preds = {m: self.decoders[m](latent, grid) for m in ("s2", "s1")}
    loss_s2 = masked_patch_mse(preds["s2"], patchify(s2, self.p), ~take_s2)
    loss_s1 = masked_patch_mse(preds["s1"], patchify(s1, self.p), take_s2)
    return self.lam * loss_s1 + (1 - self.lam) * loss_s2, preds, take_s2


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Weights from mmrs (for the equivalence test): mmrs params (nested dicts of arrays, unboxed) -> this model.


def _t(x) -> torch.Tensor:
  return torch.from_numpy(np.array(x, dtype=np.float32))


def _block_params(tree: Mapping, depth: int):
  """Per-block param dicts: `blocks_<i>` (unrolled blocks) or a stacked `blocks` tree with a leading depth axis."""
  if "blocks_0" in tree:
    return [tree[f"blocks_{i}"] for i in range(depth)]
  stacked = tree["blocks"]

  def index(t, i):
    return {k: index(v, i) for k, v in t.items()} if isinstance(t, Mapping) else np.asarray(t)[i]
  return [index(stacked, i) for i in range(depth)]


def _copy_block(block: Block, p: Mapping) -> None:
  d = block.norm1.normalized_shape[0]
  block.norm1.weight.copy_(_t(p["norm1"]["scale"]))
  block.norm1.bias.copy_(_t(p["norm1"]["bias"]))
  block.norm2.weight.copy_(_t(p["norm2"]["scale"]))
  block.norm2.bias.copy_(_t(p["norm2"]["bias"]))
  block.attn.qkv.weight.copy_(_t(p["attn"]["qkv"]["kernel"]).reshape(d, 3 * d).T)
  block.attn.qkv.bias.copy_(_t(p["attn"]["qkv"]["bias"]).reshape(3 * d))
  block.attn.proj.weight.copy_(_t(p["attn"]["out"]["kernel"]).reshape(d, d).T)
  block.attn.proj.bias.copy_(_t(p["attn"]["out"]["bias"]))
  block.fc1.weight.copy_(_t(p["mlp"]["fc1"]["kernel"]).T)
  block.fc1.bias.copy_(_t(p["mlp"]["fc1"]["bias"]))
  block.fc2.weight.copy_(_t(p["mlp"]["fc2"]["kernel"]).T)
  block.fc2.bias.copy_(_t(p["mlp"]["fc2"]["bias"]))


@torch.no_grad()
def load_encoder(enc: Encoder, p: Mapping) -> None:
  for m, conv in enc.patch_embed.items():
    c = conv.in_channels
    kernel = _t(p[f"patch_embed_{m}"]["kernel"]).reshape(enc.patch_size, enc.patch_size, c, enc.width)
    conv.weight.copy_(kernel.permute(3, 2, 0, 1))  # (p, p, C, D) -> (D, C, p, p)
    conv.bias.copy_(_t(p[f"patch_embed_{m}"]["bias"]))
    enc.modality_embed[m].copy_(_t(p[f"modality_embed_{m}"]))
  enc.cls_token.copy_(_t(p["cls"]))
  for block, bp in zip(enc.blocks, _block_params(p, len(enc.blocks))):
    _copy_block(block, bp)
  enc.norm.weight.copy_(_t(p["norm"]["scale"]))
  enc.norm.bias.copy_(_t(p["norm"]["bias"]))


@torch.no_grad()
def load_decoder(dec: Decoder, p: Mapping) -> None:
  dec.input_proj.weight.copy_(_t(p["input_proj"]["kernel"]).T)
  dec.input_proj.bias.copy_(_t(p["input_proj"]["bias"]))
  dec.mask_token.copy_(_t(p["mask_token"]).reshape(1, 1, -1))
  for block, bp in zip(dec.blocks, _block_params(p, len(dec.blocks))):
    _copy_block(block, bp)
  dec.norm.weight.copy_(_t(p["norm"]["scale"]))
  dec.norm.bias.copy_(_t(p["norm"]["bias"]))
  dec.head.weight.copy_(_t(p["head"]["kernel"]).T)
  dec.head.bias.copy_(_t(p["head"]["bias"]))


def load_mmrs_params(model: nn.Module, params: Mapping) -> None:
  """Copy an mmrs method's params ({"encoder", "decoder"} or {"encoder", "decoder_s2", "decoder_s1"})."""
  load_encoder(model.encoder, params["encoder"])
  if isinstance(model, MAES2):
    load_decoder(model.decoder, params["decoder"])
  else:
    for m, dec in model.decoders.items():
      load_decoder(dec, params[f"decoder_{m}"])


# ---------------------------------------------------------------------------------------------------------------
# The train step.


def make_optimizer(model: nn.Module, lr: float = 1e-3):
  """Adafactor (torch.optim.Adafactor: factored second moment, decay t^-0.8, update clipping d=1), as mmrs's."""
  if not hasattr(torch.optim, "Adafactor"):
    raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Adafactor (added in 2.5): "
                       "pip install -r requirements-bench.txt.")
  return torch.optim.Adafactor(model.parameters(), lr=lr)


def make_step(model: nn.Module, optimizer, dtype: torch.dtype, clip_norm: float = 1.0, compile_model: bool = False,
              compile_backend: str = "inductor"):
  """step(batch: tuple of tensors) -> loss tensor: forward (autocast in bf16), backward, global-norm clip, update.

  Params stay float32 (as mmrs's); `dtype` bfloat16 runs the matmuls under autocast, as users do. `compile_backend`:
  torch.compile's backend (inductor, the default, is what a user gets; "aot_eager" traces the same graphs, forward
  and backward, without generating kernels: a dry run's choice, minutes cheaper on a CPU).
  """
  device_type = next(model.parameters()).device.type
  forward = torch.compile(model, backend=compile_backend) if compile_model else model
  params = [p for p in model.parameters() if p.requires_grad]

  def step(batch):
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
      loss = forward(*batch)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    return loss

  return step


def build(method: str, *, enc: dict, dec: dict, patch_size: int, s2_channels: int, s1_channels: int = 2,
          mask_ratio: float = 0.75, k_fraction: float = 0.5, lam: float = 0.5,
          image_size: int | None = None) -> nn.Module:
  """enc/dec: {"width", "depth", "mlp_dim", "heads"}. `image_size` (square images): the position tables are made
  here for that size (other sizes still work, computing theirs per call)."""
  grid = (image_size // patch_size,) * 2 if image_size else None
  if method == "mae_s2":
    return MAES2(s2_channels, enc, dec, patch_size, mask_ratio, grid=grid)
  if method == "mixmae":
    return MixMAE(s2_channels, s1_channels, enc, dec, patch_size, k_fraction, lam, grid=grid)
  raise ValueError(f"Unknown method {method!r}: use mae_s2 or mixmae.")


def synthetic_batch(method: str, batch: int, image_size: int, s2_channels: int, s1_channels: int, device):
  g = torch.Generator().manual_seed(0)
  s2 = torch.randn(batch, s2_channels, image_size, image_size, generator=g).to(device)
  if method == "mae_s2":
    return (s2,)
  return (s2, torch.randn(batch, s1_channels, image_size, image_size, generator=g).to(device))

