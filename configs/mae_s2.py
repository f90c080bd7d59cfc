"""S2 MAE baseline: `--config=configs/mae_s2.py:VARIANT[,key=value...]`.

Variants:
- `vit_b` (default, the MixMAE paper's baseline): ViT-B/16 encoder, ViT-Lite decoder (512 wide, 6 blocks,
  16 heads, ~21M params: mmrs/models/sizes.py), S2 L1C 13 bands, 128 px, mask 75%, Adafactor, batch 4096, 500K steps
  (the number of S2-MAE updates AuxMAE makes in its 1M alternating steps), bfloat16 compute.
- `demo`: the bundled real BigEarthNet-MM sample (120 px L2A chips, 12 bands) cropped to 96 px, patch 16,
  ViT-Tiny encoder, a 2-block 192-wide decoder, batch 16, 300 steps: CPU minutes.
- `tiny`: "mu" encoder (32 wide, 2 blocks) and a 1-block "mu" decoder, 32 px crops, patch 8, batch 8, 10 steps:
  CPU seconds.
Arguments: `shards=PATH` (overrides every dataset's shards).

Keys read by mmrs/methods/mae.py (and auxmae.py / mixmae.py, which build on `mae_family_config`):
  model.encoder / model.decoder: size names of configs/common.py VIT_SIZES; model.decoder_depth (0 = the size's);
  model.patch_size, model.use_cls_token, model.dropout_rate, model.attention (auto | xla | head_major | cudnn:
  auto = cuDNN flash attention on GPU for bfloat16, head_major on CPU; mmrs/models/vit.py attend()); compute_dtype (float32 | bfloat16 | auto; params float32);
  bands.s2 / bands.s1: the bands the model expects, in order (the data pipelines select them: data.*.s2_bands
  follows bands.s2); mask_ratio; norm_pix_loss (per-patch normalized pixel targets, MAE's option; off = the
  papers' plain MSE); data.<dataset>.image_size (crop size, a multiple of the patch size; also the FLOP count's).
"""
import ml_collections

from configs import common
from mmrs import bands as bands_lib

SAMPLE_SHARDS = "runs/data/bigearthnet_mm_sample"  # data_prep converts the bundled BigEarthNet-MM sample here
PRETRAIN_SHARDS = "runs/data/s1s2_pairs"  # paired S1/S2 L1C shards (SSL4EO-S12-like); set data.*.shards


def mae_family_config(arg, method: str, datasets: tuple[str, ...], vit_b_steps: int, **extra_args):
  """The config shared by mae_s2, auxmae and mixmae; `datasets` are the config.data entries the tasks read."""
  arg = common.parse_arg(arg, variant="vit_b", shards="", **extra_args)
  c = common.base_config()
  c.method = method
  c.model = ml_collections.ConfigDict(dict(
      encoder="B", decoder="lite", decoder_depth=0, patch_size=16, use_cls_token=True, dropout_rate=0.0,
      attention="auto",
      scan_layers=False,  # nn.scan over the encoder/decoder blocks (stacked params; compiles one block, not depth)
      remat_policy="none",  # none | full | dots_saveable | dots_with_no_batch_dims_saveable | save_qkv_proj
  ))
  c.mask_ratio = 0.75
  c.norm_pix_loss = False
  c.bands = ml_collections.ConfigDict(dict(s2=",".join(bands_lib.S2_L1C_BANDS), s1=",".join(bands_lib.S1_BANDS)))

  variant = arg.variant
  if variant == "vit_b":
    image_size, shards = 128, PRETRAIN_SHARDS
    c.batch_size, c.total_steps = 4096, vit_b_steps
    c.compute_dtype = "auto"  # bfloat16 on GPU/TPU (float32 params/optimizer), float32 on a CPU
    c.log_every_steps, c.checkpoint_every_steps, c.visualize_every_steps = 100, 5000, 10000
    # Adafactor as in the paper (no lr/schedule given there: big_vision's MAE-style absolute lr and warmup).
    c.optimizer.update(dict(name="adafactor", learning_rate=1e-3, warmup_steps=10_000, schedule="cosine",
                            weight_decay=0.0, clip_norm=1.0))
    c.mesh = "data=-1,fsdp=1"
  elif variant == "demo":
    c.bands.s2 = ",".join(bands_lib.S2_L2A_BANDS)
    c.model.update(encoder="tiny", decoder="tiny", decoder_depth=2, patch_size=16)
    image_size, shards = 96, SAMPLE_SHARDS
    c.batch_size, c.total_steps = 16, 300
    c.log_every_steps, c.checkpoint_every_steps, c.visualize_every_steps = 10, 100, 100
    c.optimizer.update(dict(name="adamw", learning_rate=5e-4, warmup_steps=30, schedule="cosine",
                            weight_decay=0.05, b1=0.9, b2=0.95, clip_norm=1.0))
  elif variant == "tiny":
    c.bands.s2 = ",".join(bands_lib.S2_L2A_BANDS)
    c.model.update(encoder="mu", decoder="mu", decoder_depth=1, patch_size=8)
    image_size, shards = 32, SAMPLE_SHARDS
    c.batch_size, c.total_steps = 8, 10
    c.log_every_steps, c.checkpoint_every_steps, c.visualize_every_steps = 1, 5, 0
    c.optimizer.update(dict(name="adamw", learning_rate=1e-3, warmup_steps=2, schedule="cosine",
                            weight_decay=0.0, b1=0.9, b2=0.95, clip_norm=1.0))
  else:
    raise ValueError(f"configs/{method}.py: unknown variant {variant!r}; use vit_b, demo or tiny.")

  c.data = ml_collections.ConfigDict()
  for name in datasets:
    # s2_bands follows config.bands.s2 (a reference): the data delivers exactly the bands the model expects.
    c.data[name] = common.dataset_config(arg.shards or shards, image_size=image_size, s2_bands=c.bands.get_ref("s2"))
    if variant == "vit_b":
      # A pod host must feed its chips: MixMAE ViT-B/16 at 40 % MFU needs ~8,700 records/s per v4 host and ~14,600
      # per v5p host; the pipeline gives ~300 records per CPU-second on 264 px SSL4EO-size records (benchmarks/
      # RESULTS.md, "Input throughput per host"), i.e. ~29 / ~49 busy cores. 32 worker processes (each with
      # read_threads=2) cover a v4 host; raise to 48 on v5p (--config.data.paired.workers=48). AuxMAE's two
      # datasets alternate steps, so they share the 32.
      c.data[name].workers = 32 // len(datasets)
  return c, arg


def get_config(arg=None):
  c, _ = mae_family_config(arg, "mae_s2", ("s2_only",), vit_b_steps=500_000)
  return c
