"""The ViT size table shared by models, methods, finetuning and the configs (configs/common.py re-exports it)."""
from __future__ import annotations

# name: (width, depth, mlp_dim, num_heads). ViT-Lite is the ~21M-parameter decoder of the MixMAE paper.
VIT_SIZES = {
    "mu": (32, 2, 64, 2),  # test-only micro size: compiles in seconds on a CPU
    "tiny": (192, 12, 768, 3),
    "lite": (512, 8, 2048, 16),  # ViT-Lite decoder: 8 blocks x 512 wide = 25.2M params incl. norms
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
