"""EuroSAT-MS, 10 classes, single-label (accuracy, macro F1): `--config=configs/finetune/eurosat.py:VARIANT[,...]`.

The paper's protocol (RS-BYOL): linear probing, "we froze the encoder weights and added a simple classifier head
... an MLP with a hidden dimension of 128, followed by batch normalisation layers, ReLU, and a softmax layer",
100 epochs, cross-entropy; F1 reported (mmrs reports accuracy and macro F1). No optimizer is named: mmrs uses AdamW.
paper: RS-BYOL's linear probing: frozen encoder + MLP head (hidden 128, BN, ReLU), 64 px, 13 L1C bands for a ViT
(for RS-BYOL's ResNet, convert with the band(s) to probe, e.g. --bands=B04, and the data follow them), 100 epochs
of the ~16K training images at batch 256 (~6.3K steps); shards from `python -m data_prep.eurosat` (Neumann et
al. train / val / test lists). tiny: give shards=DIR.
Model selection: accuracy on the val list (Neumann et al.) every 630 steps (paper variant).
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  return finetune_config(arg, dataset="eurosat", task="class", label_set="eurosat", num_classes=10,
                         modalities="s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=64, head="mlp",
                         shards="runs/data/eurosat", eval_split="test", batch_size=256, steps=6_300,
                         frozen=True, paper_optimizer="adamw")  # RS-BYOL probes a frozen encoder
