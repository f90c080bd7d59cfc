"""DFC2020 land-cover segmentation (mIoU, average accuracy): `--config=configs/finetune/dfc2020.py:VARIANT[,...]`.

The paper's protocol (RS-BYOL, Jain et al.): linear probing of a frozen encoder on the DFC2020 data (a subset of
SEN12MS; "we used 900 images for the linear probing evaluation"), "Among the 10 classes, we excluded Savanna and
Snow/Ice, as these classes are rare in this subset of Sen12MS, and utilised 8 land cover classes". mmrs trains the
10-class head (labels are the 10 simplified IGBP classes) and REPORTS the paper's 8-class convention: miou /
average_accuracy average over the 8 (finetune.report_classes); miou_all / average_accuracy_all (10 classes) are kept
as extras.
The RS-BYOL row: "Both single and three channel RS-BYOL utilised the DeepLabV3 model architecture with a ResNet50
encoder ... we froze the weights of the encoder and trained only the decoder": `paper,init_from=<converted RS-BYOL
encoder>,modalities=s2 (or s1),head=aspp,frozen=True` (the ResNet at output stride 8 with its last two stages
dilated and DeepLabV3's ASPP head, mmrs/finetune/heads.py; the encoder's bands are the ones it was converted for).
The paper states neither the decoder's optimizer, steps nor crop; those are the paper variant's (AdamW, 10K
steps, 256 px). The MixMAE/JointMAE rows (ViT encoders): S1+S2 256 px patches, ViT-Lite decoder + segmentation
head (head=linear for a linear per-pixel probe). Where mmrs differs: the ViT head default is the MixMAE paper's
ViT-Lite decoder, the encoder is finetuned unless frozen=True, and the split is the contest's: its validation set
(986 images) trains, its test set (5,128) evaluates, where RS-BYOL used "900 images" it does not identify; the
contest has no separate validation split for model selection. Shards from
`python -m data_prep.sen12ms --dataset=dfc2020`.
Model selection: none (finetune.val_split=""): the contest's validation set is the training data here, so the
last step is tested and results.json says so.
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib
from mmrs.data import label_sets

PAPER_CLASSES = tuple(c for c in label_sets.DFC10_CLASSES if c not in ("Savanna", "Snow/Ice"))


def get_config(arg=None):
  c = finetune_config(arg, dataset="dfc2020", task="segmentation", label_set="dfc2020", num_classes=10,
                      modalities="s1,s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=256, head="vitlite",
                      shards="runs/data/dfc2020", train_split="val", eval_split="test", batch_size=64,
                      steps=10_000, paper_optimizer="adamw")
  c.finetune.report_classes = PAPER_CLASSES
  c.finetune.val_split = ""  # "val" is the training split here: no data is left for model selection
  return c
