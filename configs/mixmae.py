"""MixMAE: `--config=configs/mixmae.py:VARIANT[,key=value...]` (variants and keys as configs/mae_s2.py).

One task `mixmae` on config.data.paired: per sample k = round(k_fraction * L) positions show the S2 token and
the others the S1 token; loss = lam * L_S1 + (1 - lam) * L_S2 on the positions not shown in each modality.
`vit_b`: the paper's ViT-B/16 encoder on the full mixed sequence, two ViT-Lite decoders, Adafactor, batch 4096,
500K steps. No `mask_ratio`: the mixing is the masking.
"""
from configs import mae_s2


def get_config(arg=None):
  c, _ = mae_s2.mae_family_config(arg, "mixmae", ("paired",), vit_b_steps=500_000)
  c.k_fraction = 0.5  # the paper's k = L/2
  c.lam = 0.5  # the paper's lambda
  del c.mask_ratio
  return c
