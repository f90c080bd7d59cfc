"""The ViT size table shared by models, methods, finetuning and the configs (configs/common.py re-exports it).

ViT-Lite: the MixMAE paper gives only "the same ViT-Lite architecture with approximately 21M parameters" for its
S2 decoder and S1 aux-decoder. Whole-decoder parameter counts at width 512 / MLP 2048 / 16 heads (input projection
from a ViT-B encoder, mask token, blocks, final norm and the per-patch head at patch 16; counted with
jax.eval_shape, tests/test_sizes.py):

  depth   S2 decoder (13 bands, head 512 x 3328)   S1 decoder (2 bands, head 512 x 512)
    6            21.0M                                   19.6M
    7            24.2M                                   22.7M
    8            27.3M                                   25.9M

Depth 6 is the closest to ~21M for both decoders (mean 20.3M; depth 7: 23.4M), so "lite" = (512, 6, 2048, 16).
Earlier versions of mmrs used depth 8 (27.3M): set model.decoder_depth=8 to reproduce those checkpoints.
"""
from __future__ import annotations

# name: (width, depth, mlp_dim, num_heads). ViT-Lite is the ~21M-parameter decoder of the MixMAE paper.
VIT_SIZES = {
    "mu": (32, 2, 64, 2),  # test-only micro size: compiles in seconds on a CPU
    "tiny": (192, 12, 768, 3),
    "lite": (512, 6, 2048, 16),  # ViT-Lite decoder: ~21.0M params as the S2 decoder (table above)
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def vit_size(name: str) -> dict:
  """{'width', 'depth', 'mlp_dim', 'num_heads'} of a named size; a clear error for an unknown name."""
  if name not in VIT_SIZES:
    raise ValueError(f"Unknown ViT size {name!r}; choose one of {sorted(VIT_SIZES)} (mmrs/models/sizes.py).")
  width, depth, mlp_dim, heads = VIT_SIZES[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)
