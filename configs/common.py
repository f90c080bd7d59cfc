"""Shared config pieces: the ViT size table (from mmrs.models.sizes), `parse_arg`, and the training keys every method uses.

Every method config (`configs/<method>.py`) starts from `base_config()` and adds its `model`, `method`, `data`
and `optimizer` sections. `get_config(arg)` takes a variant name (`tiny`, `demo`, `vit_b`, ...) optionally followed
by `,key=value` pairs (big_vision style), parsed by `parse_arg`.
"""
import ml_collections

from mmrs.models.sizes import VIT_SIZES, vit_size  # noqa: F401  (the table lives in the library)


def parse_arg(arg: str | None, **defaults):
  """Parses 'variant,key=value,...' into a ConfigDict, with types taken from `defaults`."""
  out = ml_collections.ConfigDict(defaults)
  if not arg:
    return out
  for i, part in enumerate(arg.split(",")):
    if "=" not in part:
      if i != 0:
        raise ValueError(f"Config argument {arg!r}: only the first item may be a bare variant name, got {part!r}.")
      out.variant = part
      continue
    key, value = part.split("=", 1)
    if key not in defaults:
      raise ValueError(f"Config argument {arg!r}: unknown key {key!r}; known keys: {sorted(defaults)}.")
    kind = type(defaults[key])
    out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out


def base_config() -> ml_collections.ConfigDict:
  """Training keys common to every method (read by mmrs/train)."""
  c = ml_collections.ConfigDict()
  c.method = ""  # registry name in mmrs.methods (mae_s2, auxmae, mixmae, jointmae, rsbyol)
  c.seed = 0
  c.batch_size = 64  # global batch, split over processes and the mesh's data axes
  c.total_steps = 100
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  c.keep_checkpoints = 3
  c.visualize_every_steps = 0  # reconstruction PNGs; 0 = off
  c.mesh = "data=-1,fsdp=1"  # -1 fills with the remaining devices
  c.fsdp_min_size = 2**18  # parameters with fewer elements stay replicated
  c.compute_dtype = "float32"  # float32 | bfloat16 | auto (bf16 on GPU/TPU, f32 on CPU); params stay float32
  c.peak_flops_per_device = 0.0  # FLOP/s for MFU when the device kind is not in mmrs/train/metrics.py (0: n/a)
  c.compilation_cache_dir = "auto"  # persistent XLA cache: auto = <workdir>/compilation_cache (gs:// too); "" = off
  c.profile_steps = ""  # "START:END": a jax.profiler trace of steps [START, END) under <logdir>/profile
  c.on_nonfinite = "stop"  # stop | skip: what a NaN/inf loss does
  c.task_schedule = "alternate"  # alternate | weighted (see task_weights)
  c.task_weights = ml_collections.ConfigDict()  # task name -> integer weight, for `weighted`
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adafactor", learning_rate=1e-3, warmup_steps=10, schedule="cosine", end_lr_fraction=0.0,
      weight_decay=0.0, clip_norm=1.0, momentum=0.9, b1=0.9, b2=0.95,
      decay_steps=0,  # LR schedule length; 0 = the first run's total_steps (kept on resume, see mmrs/train/loop.py)
      restart_period_steps=0, restart_mult=2, min_learning_rate=0.0, eps=1e-8, nesterov=False,
      # Adafactor (see mmrs/train/optimizers.py for why these defaults).
      adafactor_momentum=0.0, adafactor_decay_rate=0.8, adafactor_min_dim_to_factor=128, adafactor_clipping=1.0,
      # Layer-wise lr decay (finetuning fills it from finetune.layer_decay; mmrs/train/optimizers.py).
      layer_decay=1.0, layer_decay_groups=("encoder",),
  ))
  c.xla_compiler_options = ml_collections.ConfigDict()  # passed to jit(...).lower().compile(compiler_options=)
  c.task_lr_multipliers = ml_collections.ConfigDict()  # task name -> float
  # Micro-batches per step (lax.scan in the step; batch_size stays the global batch). MAE family: the same losses
  # and gradients as 1 (mmrs/train/step.py); RS-BYOL: BatchNorm statistics per micro-batch of batch_size / k rows.
  c.grad_accum_steps = 1
  return c


def dataset_config(shards: str = "", **overrides) -> ml_collections.ConfigDict:
  """One entry of `config.data`: where a task reads its records and how they are augmented."""
  d = ml_collections.ConfigDict(dict(
      shards=shards,  # a directory with *.array_record + stats.json, or tfds:NAME[:split]@DATA_DIR
      image_size=96,  # random-crop size in pixels (multiple of the patch size)
      random_resized_crop=False,
      flips=True,
      rot90=True,
      workers=0,  # grain mp_prefetch workers (the data do not depend on the count: global sample order)
      shuffle_seed_offset=0,
      on_bad="fail",  # fail | skip: undecodable or invalid records
      s2_bands="",  # comma-separated subset/order; empty = all bands in the shards
      # shards given as a URL (gs://...) are copied here before reading (mmrs/data/staging.py); empty =
      # $MMRS_STAGE_DIR or ~/.cache/mmrs/staged/<url>; "none" = read the URL directly (e.g. a tfds: spec).
      stage_dir="",
      stage_quota_gb=0.0,  # the most the stage directory may hold for this dataset (0: no cap; staging.py)
      # G: a host reads/stages only the shards of its groups (mmrs/data/shard_groups.py); 0 = the manifest's
      # shard_groups, else 1 (every host reads every shard). Fixed for a run by its first checkpoint.
      shard_groups=0,
      read="crop",  # crop: read only the rows a crop needs (uncompressed shards; mmrs/data/crop_read.py) | record
  ))
  d.update(overrides)
  return d
