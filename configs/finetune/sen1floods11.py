"""Sen1Floods11 water segmentation (IoU of the water class, -1 ignored): `--config=configs/finetune/sen1floods11.py:...`.

The paper's protocol (MixMAE paper, Linial et al.): S2 only ("we use only the Sentinel-2 images it provides, and
dropped the Sentinel-1 images"), 13 L1C bands, 512 x 512 chips, 252 train / 90 test images, ViT-Lite decoder +
segmentation head, 30K steps, batch 4096, Adafactor, finetuned and frozen encoders; "The model trains to predict
the three provided classes: background, water, and clouds", and reports "the intersection-over-union (IoU) metric
achieved on the water class" (Table 1: "Label Classes 2 (existence of water)").
paper variant: the above with Adafactor and 30K steps. Where mmrs differs: batch 32 (4096 exceeds the 252 training
chips); two classes (not water, water) with -1 ignored instead of three: the hand-labelled masks mark clouds and
no-data with the same value -1, so a "cloud" class could only be trained on no-data pixels too; the reported
metric, water IoU (`iou_water`), is the paper's. frozen=True gives the frozen-encoder row. Shards from
`python -m data_prep.sen1floods11` (hand-labelled train / val / test / bolivia splits).
Finetune recipe beyond what the paper states (optimizer, batch, steps): MAE's ViT-B recipe, layer_decay 0.65,
drop path 0.1, lr 5e-4 * batch / 256, 5 % warmup + cosine, weight decay 0.05 (configs/finetune/__init__.py).
Model selection: iou_water on the 89 hand-labelled val chips (flood_valid) every 3K steps (paper variant);
results.json's coverage says how many of the published chips (train 252 / val 89 / test 90 / Bolivia 15) were
evaluated (an S1+S2 run cannot read chips whose S1 was dropped).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  c = finetune_config(arg, dataset="sen1floods11", task="segmentation", label_set="sen1floods11", num_classes=2,
                      modalities="s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=512, head="vitlite",
                      shards="runs/data/sen1floods11", eval_split="test", batch_size=32, steps=30_000)
  c.finetune.class_names = ("not_water", "water")  # -> metric iou_water
  return c
