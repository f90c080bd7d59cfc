"""BigEarthNet-MM, 19 classes, multi-label (mAP): `--config=configs/finetune/bigearthnet.py:VARIANT[,key=value...]`.

paper: the MixMAE paper's setup: S2 L2A (12 bands; an L1C-pretrained encoder is converted with the L2A bands, i.e.
B10 dropped), linear probe on the mean-pooled tokens, 112 px centre/random crops of the 120 px patches (a multiple
of the patch size 16), batch 4096 would be the paper's: 256 here, 30K steps; shards from
`python -m data_prep.bigearthnet_mm --splits_dir=...` (official train / val / test). modalities=s1 or s1,s2 give
the JointMAE paper's S1 / S1+S2 rows (convert the encoder with those modalities).
demo / tiny: the bundled sample (one split: train = eval, a smoke test).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  return finetune_config(arg, dataset="bigearthnet", task="multilabel", label_set="ben19", num_classes=19,
                         modalities="s2", s2_bands=bands_lib.S2_L2A_BANDS, image_size=112, head="linear",
                         shards="runs/data/bigearthnet_mm", eval_split="test", batch_size=256, steps=30_000)
