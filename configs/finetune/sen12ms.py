"""SEN12MS scene classification, 10 simplified IGBP classes (weighted precision / recall / F1):
`--config=configs/finetune/sen12ms.py:VARIANT[,key=value...]`.

The paper's protocol (JointMAE paper, Zhang et al.): the pretrained encoder finetuned on SEN12MS, "weighted
Precision, Recall, and F1-score" on the validation set, label fractions 1 / 10 / 50 / 100 %. The paper gives no
image size, head or schedule.
paper variant: S1+S2 (13 L1C bands + VV, VH; fusion = the encoder's pretraining token layout: concat, the 2L
tokens JointMAE pretrained on, or sum for its plain channel-concatenation baseline), finetuned ViT,
linear head, 128 px centre crops of the 256 px patches (mmrs's choice), label fractions by label_fraction=0.01 ...
(random subsets by record id), Adafactor. Where mmrs differs: it reports the test split (the paper's "validation
set" is not defined further). Shards from `python -m data_prep.sen12ms --dataset=sen12ms` (label set "sen12ms" =
the patch's majority class).
Model selection: f1_weighted on the val split every 2K steps (paper variant); the paper does not say how it
selected its model.
"""
from configs.finetune import finetune_config
from mmrs import bands as bands_lib


def get_config(arg=None):
  return finetune_config(arg, dataset="sen12ms", task="class", label_set="sen12ms", num_classes=10,
                         modalities="s1,s2", s2_bands=bands_lib.S2_L1C_BANDS, image_size=128, head="linear",
                         shards="runs/data/sen12ms", eval_split="test", batch_size=256, steps=20_000)
