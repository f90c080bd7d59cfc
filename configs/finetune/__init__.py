"""Finetune configs: one file per downstream dataset, all built by `finetune_config` here.

`--config=configs/finetune/<dataset>.py:VARIANT[,key=value...]`, run by `python -m launch.main` (a config with a
`finetune` section trains `mmrs.finetune.method` with the same loop, then evaluates and writes results.json/.md).
Variants: the dataset's paper-like default (`paper`: Adafactor for the MixMAE/JointMAE datasets, as the MixMAE
paper finetunes; AdamW for RS-BYOL's EuroSAT/DFC2020 probes; demo / tiny: AdamW), `demo` (the bundled BigEarthNet-MM sample; bigearthnet only),
`tiny` (a "mu" encoder at 32 px: seconds on a CPU; give `shards=`).
Model selection (all variants): every `finetune.eval_every_steps` steps (paper: total/10; demo: 10; tiny: 0 = after
the last step only) the state is evaluated on the eval shards' `val` split, the state with the best main metric
(mmrs/finetune/validation.py MAIN_METRICS) is kept and tested; results.json has val / test / selected_step. Shards
without a val split test the last step and say so. The papers do not describe their model selection.
Keys (all variants): init_from (a converted encoder directory, "" = random init), frozen (True = only the head
trains), head, label_fraction (0.01 / 0.1 / 0.5 / 1.0), subset_seed, modalities (s2 | s1 | s1+s2), fusion
(concat | sum: how S1+S2 meet in the encoder, mmrs/finetune/method.py; "" = the default: the layout the encoder
was pretrained with, encoder.json token_layout, concat for a random init), shards,
eval_shards, steps, batch_size, lr, modality_dropout; layer_decay and drop_path (the MAE finetune recipe; -1 = the variant's default).

The paper variant's finetune recipe (a trained ViT encoder, frozen=False): the MixMAE paper states only "a batch size
of 4096 and the AdaFactor optimizer" and the step counts; everything it leaves open is MAE's ViT-B finetune recipe
(He et al. 2022, official FINETUNE.md): layer-wise lr decay 0.65 (finetune.layer_decay), drop path 0.1
(model.drop_path_rate), lr = 5e-4 * batch_size / 256 (MAE's base lr and linear scaling rule), 5 % linear warmup
then cosine decay (MAE: 5 of 100 epochs), weight decay 0.05, AdamW's betas 0.9 / 0.999 where AdamW is used, no
gradient clipping (clip_norm=0; Adafactor clips its own updates at RMS 1). For ViT-L/H MAE uses layer_decay=0.75
and drop_path 0.2 / 0.3, lr 1e-3 * batch / 256: pass them. Not reproduced: MAE's ImageNet augmentations (RandAug,
mixup, cutmix, label smoothing, random erasing). Frozen runs (linear probes) keep lr 1e-3 (frozen_lr), no
layer decay, no drop path, and (ViT, linear head) MAE's affine-free BatchNorm before the head
(finetune.probe_batchnorm=auto), so the probe sees standardized features whatever the encoder's feature scale;
MAE's LARS optimizer and batch 16384 are not reproduced. demo / tiny: layer_decay 1.0 and drop_path 0 (off).

Config keys read by mmrs/finetune:
  init_from; finetune.{dataset, task (multilabel | class | segmentation), head (linear | mlp | vitlite), frozen,
  label_fraction, subset_mode (random | balanced | stratified), subset_seed, modalities, fusion (concat | sum | ""), label_set,
  num_classes, pool (mean | cls), normalization (encoder: init_from's encoder.json statistics | dataset: the data's
  stats.json; see mmrs/finetune/encoder_api.py), probe_batchnorm (auto: an affine-free BatchNorm before the linear
  head of a frozen ViT, MAE's linear-probe protocol | on | off; mmrs/finetune/heads.py), modality_dropout
  (S1+S2: per-sample probability of training without S1 or S2, through the encoder's missing-modality path; 0 =
  off, as the papers), mlp_hidden_dim, decoder (ViT size of the vitlite head), decoder_depth,
  class_names, report_classes (segmentation: the classes miou / average_accuracy average over; *_all = every class),
  eval_every_steps (validate every N steps; 0 = after the last step only), val_split (the validation split of the
  eval shards, "val"; "" = none: the last step is tested)};
  finetune.layer_decay (layer-wise lr decay, 1.0 = off);
  model.{backbone (vit | resnet18/50...), encoder, patch_size, use_cls_token, dropout_rate, drop_path_rate,
  scan_layers, remat_policy} and bands.{s2, s1}
  for a random init (with init_from they are filled from encoder.json); data.train / data.eval (+ split,
  label_set, indices: the label-fraction subset, filled by mmrs.finetune.method.prepare_config); eval_batch_size.
"""
import ml_collections

from configs import common
from mmrs import bands as bands_lib

SAMPLE_SHARDS = "runs/data/bigearthnet_mm_sample"
ARG_DEFAULTS = dict(variant="paper", init_from="", frozen=False, head="", label_fraction=1.0, subset_seed=0,
                    modalities="", fusion="", shards="", eval_shards="", steps=0, batch_size=0, lr=0.0)
ARG_DEFAULTS.update(layer_decay=-1.0, drop_path=-1.0)  # the MAE finetune recipe; -1 = the variant's default
ARG_DEFAULTS.update(modality_dropout=0.0)  # finetune.modality_dropout (S1+S2 runs)
# MAE's ViT-B finetune recipe (He et al. 2022, FINETUNE.md): what the paper variant uses where the papers say nothing.
MAE_RECIPE = dict(base_lr=5e-4, layer_decay=0.65, drop_path=0.1)


def finetune_config(arg, *, dataset: str, task: str, label_set: str, num_classes: int, modalities: str,
                    s2_bands: tuple[str, ...], image_size: int, head: str, shards: str, train_split: str = "train",
                    eval_split: str = "test", batch_size: int = 256, steps: int = 10_000, lr: float = 1e-4,
                    frozen_lr: float = 1e-3, frozen: bool = False, paper_optimizer: str = "adafactor"):
  """The config shared by every dataset; `arg` is the command line's `VARIANT,key=value,...`."""
  arg = common.parse_arg(arg, **dict(ARG_DEFAULTS, frozen=frozen))
  c = common.base_config()
  c.method = "finetune"
  c.init_from = arg.init_from
  c.model = ml_collections.ConfigDict(dict(backbone="vit", encoder="B", patch_size=16, use_cls_token=True,
                                           dropout_rate=0.0, attention="auto"))
  c.bands = ml_collections.ConfigDict(dict(s2=",".join(s2_bands), s1=",".join(bands_lib.S1_BANDS)))
  c.finetune = ml_collections.ConfigDict(dict(
      dataset=dataset, task=task, head=arg.head or head, frozen=arg.frozen, label_fraction=arg.label_fraction,
      subset_mode="random", subset_seed=arg.subset_seed, modalities=arg.modalities or modalities,
      fusion=arg.fusion, label_set=label_set, num_classes=num_classes, pool="mean", normalization="encoder",
      mlp_hidden_dim=128, decoder="lite", decoder_depth=0, class_names=(), report_classes=(),
      probe_batchnorm="auto", modality_dropout=arg.modality_dropout))
  c.eval_batch_size = 0  # 0 = batch_size
  # Model selection (mmrs/finetune/validation.py): validate on `val_split` of the eval shards every
  # `eval_every_steps` steps (0 = after the last step only) and test the state with the best main metric.
  c.finetune.eval_every_steps = 0
  c.finetune.val_split = "val"
  c.optimizer.update(dict(name="adamw", learning_rate=frozen_lr if arg.frozen else lr, warmup_steps=0,
                          schedule="cosine", weight_decay=0.0 if arg.frozen else 0.05, b1=0.9, b2=0.999,
                          clip_norm=1.0))

  variant = arg.variant
  if variant == "paper":
    # The MixMAE paper: "For all training procedures we used a batch size of 4096 and the AdaFactor optimizer"
    # (no lr or schedule given: mmrs keeps lr, warmup and cosine decay; batch: each dataset's file says why).
    c.optimizer.name = paper_optimizer  # adamw for RS-BYOL's probes (the paper names no optimizer for them)
    c.batch_size, c.total_steps = batch_size, steps
    c.optimizer.warmup_steps = steps // 20
    c.log_every_steps, c.checkpoint_every_steps = 100, 2000
  elif variant == "demo":
    if dataset != "bigearthnet":
      raise ValueError(f"configs/finetune/{dataset}.py: the `demo` variant needs the bundled BigEarthNet-MM sample; "
                       "use bigearthnet.py:demo, or `tiny,shards=DIR` with your own shards.")
    shards, image_size = SAMPLE_SHARDS, 96
    train_split = eval_split = "train"  # the sample has one split: a smoke test, not an evaluation
    c.model.update(encoder="tiny", patch_size=16)
    c.batch_size, c.total_steps = 8, 30
    c.optimizer.warmup_steps = 3
    c.log_every_steps, c.checkpoint_every_steps = 5, 30
    c.finetune.eval_every_steps = 10
    if c.finetune.head == "vitlite":
      c.finetune.decoder, c.finetune.decoder_depth = "tiny", 2
  elif variant == "tiny":
    image_size = 32
    c.model.update(encoder="mu", patch_size=8)
    c.finetune.update(decoder="mu", mlp_hidden_dim=16)
    c.batch_size, c.total_steps = 8, 4
    c.log_every_steps, c.checkpoint_every_steps = 2, 4
    if dataset == "bigearthnet":
      shards, train_split, eval_split = SAMPLE_SHARDS, "train", "train"
  else:
    raise ValueError(f"configs/finetune/{dataset}.py: unknown variant {variant!r}; use paper, demo or tiny.")
  if arg.steps:
    c.total_steps = arg.steps
  if variant == "paper":
    c.finetune.eval_every_steps = max(c.total_steps // 10, 1)  # 10 validations per run
  if arg.batch_size:
    c.batch_size = arg.batch_size
  if variant == "paper" and not arg.frozen:  # the MAE finetune recipe (module docstring)
    c.optimizer.learning_rate = MAE_RECIPE["base_lr"] * c.batch_size / 256
    c.optimizer.clip_norm = 0.0
    c.finetune.layer_decay, c.model.drop_path_rate = MAE_RECIPE["layer_decay"], MAE_RECIPE["drop_path"]
  else:
    c.finetune.layer_decay, c.model.drop_path_rate = 1.0, 0.0
  if arg.layer_decay >= 0:
    c.finetune.layer_decay = arg.layer_decay
  if arg.drop_path >= 0:
    c.model.drop_path_rate = arg.drop_path
  if arg.lr:
    c.optimizer.learning_rate = arg.lr

  train_shards = arg.shards or shards
  c.data = ml_collections.ConfigDict()
  c.data.train = common.dataset_config(train_shards, image_size=image_size, split=train_split,
                                       label_set=c.finetune.get_ref("label_set"), s2_bands=c.bands.get_ref("s2"),
                                       indices=())
  c.data.eval = common.dataset_config(arg.eval_shards or train_shards, image_size=image_size, split=eval_split,
                                      label_set=c.finetune.get_ref("label_set"), s2_bands=c.bands.get_ref("s2"),
                                      flips=False, rot90=False)
  return c
