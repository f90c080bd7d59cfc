"""RS-BYOL (Jain et al.): `--config=configs/rsbyol.py:VARIANT[,key=value...]`.

Variants: `resnet50` (default; the paper: ResNet-50, SGD momentum + cosine warm restarts every 10 epochs x2,
lr 0.2 -> 0.002, weight decay 1e-5, batch 32, 400 epochs, tau 0.9), `resnet18`, `vit` (a ViT-S/16 backbone),
`demo` (the bundled BigEarthNet-MM sample, 120 px chips, ResNet-18, CPU minutes), `tiny` (ResNet-18 at 32 px,
batch 8: seconds on a CPU). Keys: view1 = one_band | three_bands | rgb, view2 = one_pol | vv_vh_copy | pol_two_ms
(the paper's RS-BYOL-1: one_band/one_pol; RS-BYOL-3: three_bands/vv_vh_copy; RGB-S1S2: rgb/pol_two_ms),
shards, steps_per_epoch (the paper's 90K pairs / batch 32 = 2813).

grad_accum_steps = k > 1 (configs/common.py): BatchNorm normalizes each micro-batch of batch_size / k rows with its
own statistics and updates the running averages k times per step (the EMA target moves once). Computing statistics
over the whole batch would need a second forward pass of every micro-batch, undoing the memory saving; and the
paper's BatchNorm batch is its whole batch of 32 on one GPU, so batch_size / k = 32 keeps the paper's statistics
while the optimizer batch grows (tests/test_grad_accum.py).
"""
import ml_collections

from configs import common
from mmrs.data import byol_views


def get_config(arg=None):
  arg = common.parse_arg(arg, variant="resnet50", view1="one_band", view2="one_pol", shards="",
                         steps_per_epoch=0, epochs=0)
  c = common.base_config()
  c.method = "rsbyol"
  c.model = ml_collections.ConfigDict(dict(
      backbone="resnet50",  # resnet18 | resnet34 | resnet50 | resnet101 | vit
      zero_init_residual=False,  # torchvision's default
      mlp_hidden_dim=256,  # projector/predictor hidden width: 256 in the paper (BYOL: 4096)
      proj_dim=256,  # projection/prediction size (BYOL's 256)
      vit=ml_collections.ConfigDict(dict(size="S", patch_size=16, pool="cls", attention="auto")),  # backbone = "vit"
  ))
  c.byol = ml_collections.ConfigDict(dict(
      tau=0.9,  # EMA decay of the target network (the paper's value; BYOL: 0.996)
      tau_schedule="constant",  # constant | cosine (BYOL: tau -> 1 over training)
  ))
  c.views = byol_views.default_views_config()
  c.views.view1, c.views.view2 = arg.view1, arg.view2

  variant = arg.variant
  if variant in ("resnet50", "resnet18", "vit"):
    c.model.backbone = variant
    c.compute_dtype = "auto"  # the paper variants: bfloat16 on GPU/TPU (float32 params/optimizer), float32 on CPU
    image_size, batch, steps_per_epoch, epochs = 224, 32, 2813, 400
    shards = "runs/data/sen12ms"  # the paper pretrains on SEN12MS (its 10/20 m bands); set shards=...
  elif variant == "demo":
    c.model.backbone = "resnet18"
    image_size, batch, steps_per_epoch, epochs = 96, 16, 10, 20
    shards = "runs/data/bigearthnet_mm_sample"
    c.log_every_steps, c.checkpoint_every_steps = 5, 100
  elif variant == "tiny":
    c.model.backbone = "resnet18"
    c.model.mlp_hidden_dim, c.model.proj_dim = 64, 32
    image_size, batch, steps_per_epoch, epochs = 32, 8, 2, 3
    shards = "runs/data/bigearthnet_mm_sample"
    c.log_every_steps, c.checkpoint_every_steps = 1, 5
  else:
    raise ValueError(f"configs/rsbyol.py: unknown variant {variant!r}; use resnet50, resnet18, vit, demo or tiny.")

  c.batch_size = batch
  c.steps_per_epoch = arg.steps_per_epoch or steps_per_epoch
  c.epochs = arg.epochs or epochs
  c.total_steps = c.epochs * c.steps_per_epoch
  c.views.image_size = image_size
  # The view sampler (method.record_transform) crops and augments each view from the whole record: the pipeline
  # hands it whole records (image_size=0) without flips/rotations, and does not normalize.
  c.data = ml_collections.ConfigDict(dict(paired=common.dataset_config(
      arg.shards or shards, image_size=0, random_resized_crop=False, flips=False, rot90=False)))
  c.optimizer.update(dict(
      name="sgd", momentum=0.9, learning_rate=0.2, min_learning_rate=0.002, warmup_steps=0,
      restart_period_steps=10 * c.steps_per_epoch, restart_mult=2,
      weight_decay=1e-5, clip_norm=0.0,  # 0 = no clipping (the paper does not clip)
  ))
  return c
