"""Shared config pieces: the ViT size table, `parse_arg`, and the training keys every method uses.

Every method config (`configs/<method>.py`) starts from `base_config()` and adds its `model`, `method`, `data`
and `optimizer` sections. `get_config(arg)` takes a variant name (`tiny`, `demo`, `vit_b`, ...) optionally followed
by `,key=value` pairs (big_vision style), parsed by `parse_arg`.
"""
import ml_collections

# name: (width, depth, mlp_dim, num_heads). ViT-Lite is the ~21M-parameter decoder of the MixMAE paper.
VIT_SIZES = {
    "mu": (32, 2, 64, 2),  # test-only micro size: compiles in seconds on a CPU
    "tiny": (192, 12, 768, 3),
    "lite": (512, 8, 2048, 16),  # ViT-Lite decoder: 8 blocks x 512 wide = 25.2M params incl. norms
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
}


def vit_size(name: str) -> dict:
  if name not in VIT_SIZES:
    raise ValueError(f"Unknown ViT size {name!r}; choose one of {sorted(VIT_SIZES)} (configs/common.py VIT_SIZES).")
  width, depth, mlp_dim, heads = VIT_SIZES[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads)


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
  c.compute_dtype = "float32"  # float32 | bfloat16 (params stay float32)
  c.on_nonfinite = "stop"  # stop | skip: what a NaN/inf loss does
  c.task_schedule = "alternate"  # alternate | weighted (see task_weights)
  c.task_weights = ml_collections.ConfigDict()  # task name -> integer weight, for `weighted`
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adafactor", learning_rate=1e-3, warmup_steps=10, schedule="cosine", end_lr_fraction=0.0,
      weight_decay=0.0, clip_norm=1.0, momentum=0.9, b1=0.9, b2=0.95,
      restart_period_steps=0, restart_mult=2, min_learning_rate=0.0, eps=1e-8, nesterov=False,
      # Adafactor (see mmrs/train/optimizers.py for why these defaults).
      adafactor_momentum=0.0, adafactor_decay_rate=0.8, adafactor_min_dim_to_factor=128, adafactor_clipping=1.0,
  ))
  c.xla_compiler_options = ml_collections.ConfigDict()  # passed to jit(...).lower().compile(compiler_options=)
  c.task_lr_multipliers = ml_collections.ConfigDict()  # task name -> float
  return c


def dataset_config(shards: str = "", **overrides) -> ml_collections.ConfigDict:
  """One entry of `config.data`: where a task reads its records and how they are augmented."""
  d = ml_collections.ConfigDict(dict(
      shards=shards,  # a directory with *.array_record + stats.json, or tfds:NAME[:split]@DATA_DIR
      image_size=96,  # random-crop size in pixels (multiple of the patch size)
      random_resized_crop=False,
      flips=True,
      rot90=True,
      workers=0,  # grain mp_prefetch workers; pinned so a resumed run sees the same data
      shuffle_seed_offset=0,
      on_bad="fail",  # fail | skip: undecodable or invalid records
      s2_bands="",  # comma-separated subset/order; empty = all bands in the shards
  ))
  d.update(overrides)
  return d
