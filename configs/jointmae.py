"""JointMAE: `--config=configs/jointmae.py:VARIANT[,plain=True][,key=value...]` (variants as configs/mae_s2.py:
`vit_b` (default; ViT-B/16 encoder, one ViT-Lite decoder with an S1 and an S2 head, Adafactor, batch 4096),
`demo` (the bundled BigEarthNet-MM sample), `tiny` (CPU seconds)).

`plain=True` selects the baseline row, config.method = "jointmae_plain": S1 and S2 concatenated along channels,
one token per position, random masking. Mask-module keys (mmrs/methods/jointmae.py):
  visible_fraction      visible share of the input tokens (2L for jointmae, L for plain); <= max_visible_fraction
  max_visible_fraction  the limit, at most 0.5 (the paper's ">= 50% less input")
  p_independent, p_complementary, p_drop   scenario weights (normalized); drop_s1_prob: P(S1 is the dropped one)
  lam                   loss = lam * L_S1 + (1 - lam) * L_S2
"""
from configs import mae_s2


def get_config(arg=None):
  c, arg = mae_s2.mae_family_config(arg, "jointmae", ("paired",), vit_b_steps=500_000, plain=False)
  if arg.plain:
    c.method = "jointmae_plain"
  del c.mask_ratio  # the mask module's visible_fraction replaces it
  c.visible_fraction = 0.25  # a quarter of the input pixels visible in every scenario (MAE's 75% masking)
  c.max_visible_fraction = 0.5
  c.p_independent, c.p_complementary, c.p_drop = 1 / 3, 1 / 3, 1 / 3
  c.drop_s1_prob = 0.5
  c.lam = 0.5
  return c
