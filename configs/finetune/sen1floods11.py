"""Sen1Floods11 water segmentation (IoU of the water class, -1 ignored): `--config=configs/finetune/sen1floods11.py:...`.

paper: the MixMAE paper's setup: S2 only (13 L1C bands; the paper drops S1), 512 px chips, ViT-Lite decoder +
segmentation head, 30K steps (batch 4096 in the paper: 32 here); frozen=True for the frozen-encoder row. Shards
from `python -m data_prep.sen1floods11` (hand-labelled train / val / test / bolivia splits).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  c = finetune_config(arg, dataset="sen1floods11", task="segmentation", label_set="sen1floods11", num_classes=2,
                      modalities="s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=512, head="vitlite",
                      shards="runs/data/sen1floods11", eval_split="test", batch_size=32, steps=30_000)
  c.finetune.class_names = ("not_water", "water")  # -> metric iou_water
  return c
