"""JointMAE: `--config=configs/jointmae.py:VARIANT[,plain=True][,key=value...]` (variants as configs/mae_s2.py:
`vit_b` (default; ViT-B/16 encoder, one ViT-Lite decoder with an S1 and an S2 head, Adafactor, batch 4096),
`demo` (the bundled BigEarthNet-MM sample), `tiny` (CPU seconds)).

`plain=True` selects the baseline row, config.method = "jointmae_plain": S1 and S2 concatenated along channels,
one token per position, random masking. Mask-module keys (mmrs/methods/jointmae.py):
  visible_fraction      visible share of the input tokens (2L for jointmae, L for plain); <= max_visible_fraction
  max_visible_fraction  the limit, at most 0.5 (the paper's ">= 50% less input")
  p_independent, p_complementary, p_drop   scenario weights (normalized); drop_s1_prob: P(S1 is the dropped one)
  lam                   loss = lam * L_S1 + (1 - lam) * L_S2
  complementary_visible all (complementary rows show L of 2L tokens) | matched (n, as the other scenarios)
  plain_loss            plain=True only: channels (an MAE on 2 + C_s2 channels, S1 weighted 2/15 with L1C) | lam

The mask-module ablation (the JointMAE paper's table: JointMAE vs its channel-concatenation baseline) is the two
defaults: `jointmae.py:vit_b` against `jointmae.py:vit_b,plain=True`. They differ in more than the mask module:
the plain loss weights S1 by its channel share (2/15) where JointMAE uses lam = 0.5, and JointMAE's complementary
rows show half the input where every other row shows a quarter. Two controls separate these effects:
  `plain=True,plain_loss=lam`               the plain encoder with JointMAE's lam-weighted loss;
  `complementary_visible=matched`           JointMAE with every scenario showing the same number of tokens.
(plain, channels) vs (plain, lam) measures the loss weighting; (plain, lam) vs (jointmae, matched) the mask module
at equal weighting and visibility; (jointmae, matched) vs (jointmae, all) the extra visibility of complementary
rows. Finetuning an encoder of either plain run: its encoder.json records token_layout "sum", which
finetune.fusion follows (mmrs/finetune/method.py).
"""
from configs import mae_s2


def get_config(arg=None):
  c, arg = mae_s2.mae_family_config(arg, "jointmae", ("paired",), vit_b_steps=500_000, plain=False,
                                    plain_loss="channels", complementary_visible="all")
  if arg.plain:
    c.method = "jointmae_plain"
    c.plain_loss = arg.plain_loss
  elif arg.plain_loss != "channels":
    raise ValueError(f"configs/jointmae.py: plain_loss={arg.plain_loss!r} applies to plain=True only.")
  del c.mask_ratio  # the mask module's visible_fraction replaces it
  c.visible_fraction = 0.25  # a quarter of the input pixels visible (MAE's 75% masking); complementary: half
  #                             unless complementary_visible="matched"
  c.max_visible_fraction = 0.5
  c.p_independent, c.p_complementary, c.p_drop = 1 / 3, 1 / 3, 1 / 3
  c.drop_s1_prob = 0.5
  c.lam = 0.5
  c.complementary_visible = arg.complementary_visible
  return c
