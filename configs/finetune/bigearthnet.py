"""BigEarthNet-MM, 19 classes, multi-label (mAP): `--config=configs/finetune/bigearthnet.py:VARIANT[,key=value...]`.

The papers' protocols:
- MixMAE paper (Linial et al.): S2 L2A (an L1C-pretrained ViT-B/16 adapted to L2A by finetuning), 120 x 120 px,
  19 classes, mAP; "for classification we used linear probing" with a finetune and a frozen row (Table 2), 30K
  steps, batch 4096, Adafactor.
- JointMAE paper (Zhang et al.): BigEarthNet-MM with S1, S2 and S1+S2 inputs (mAP), label fractions 1 / 10 / 50 /
  100 % (label_fraction=0.01 ...; random subsets, the default subset_mode).
paper variant: 12 L2A bands (B10 dropped when converting an L1C encoder), linear head on the mean-pooled tokens
(frozen=True: after MAE's affine-free BatchNorm, finetune.probe_batchnorm=auto, the linear-probe protocol MAE
defines and the MixMAE paper does not restate), Adafactor, 30K steps. Where mmrs differs: batch 256 (4096 does not fit one host; pass batch_size=4096 on a pod);
112 px crops instead of 120 px: the patch size 16 does not divide 120 and the paper does not say how it handled
that; cropping (random in training, centre in evaluation) keeps the sensor's pixels as they are (no resampling of
the 10/20/60 m bands) and loses a 4 px border that image-level labels barely depend on, where resizing to 128 px
would change the ground sampling distance the encoder was pretrained at (or give a 15 px effective patch).
modalities=s1 or s1+s2 give the JointMAE paper's S1 / S1+S2 rows (convert the encoder with those modalities;
fusion defaults to the encoder's pretraining token layout: concat for JointMAE, sum for its plain baseline, see
mmrs/finetune/method.py). Shards from `python -m data_prep.bigearthnet_mm --splits_dir=...`
(official train / val / test); the evaluation split is test.
Finetune recipe beyond what the paper states (optimizer, batch, steps): MAE's ViT-B recipe, layer_decay 0.65,
drop path 0.1, lr 5e-4 * batch / 256, 5 % warmup + cosine, weight decay 0.05 (configs/finetune/__init__.py).
demo / tiny: the bundled sample (one split: train = eval, a smoke test).
Model selection: map_micro on the official val split every 3K steps (paper variant).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  return finetune_config(arg, dataset="bigearthnet", task="multilabel", label_set="ben19", num_classes=19,
                         modalities="s2", s2_bands=bands_lib.S2_L2A_BANDS, image_size=112, head="linear",
                         shards="runs/data/bigearthnet_mm", eval_split="test", batch_size=256, steps=30_000)
