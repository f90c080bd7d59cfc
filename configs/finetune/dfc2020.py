"""DFC2020 land-cover segmentation, 10 classes (mIoU, average accuracy): `--config=configs/finetune/dfc2020.py:...`.

paper: S1+S2 256 px patches, ViT-Lite decoder + segmentation head (head=linear for a linear per-pixel probe),
frozen=True for RS-BYOL-style probing. Shards from `python -m data_prep.sen12ms --dataset=dfc2020` (splits val /
test: the contest's validation set trains, its test set evaluates, as RS-BYOL's probing does).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  return finetune_config(arg, dataset="dfc2020", task="segmentation", label_set="dfc2020", num_classes=10,
                         modalities="s1,s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=256, head="vitlite",
                         shards="runs/data/dfc2020", train_split="val", eval_split="test", batch_size=64,
                         steps=10_000)
