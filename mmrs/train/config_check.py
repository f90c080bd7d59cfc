"""Config validation before anything expensive starts, and the resume compatibility check.

Every error names the config key and says what to do: a typo or an impossible combination must fail in seconds on
the first host, not after the pod is up and the model compiled.
"""
from __future__ import annotations

from typing import Any, Mapping

from absl import logging
from etils import epath

from mmrs import target
from mmrs.train import mesh as mesh_lib
from mmrs.train import optimizers
from mmrs.train import schedule as schedule_lib


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


# Resuming with a different value of these is fine (they do not change the state, the data order or the math).
RESUME_SAFE = ("total_steps", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
               "visualize_every_steps", "on_nonfinite", "mesh", "fsdp_min_size", "peak_flops_per_device",
               "compilation_cache_dir", "profile_steps", "model.remat_policy",
               "finetune.eval_every_steps")  # validation frequency: the curve just gets other points
# ... and these settings of a dataset (`data.<dataset>.<key>`): how many processes/threads read and prefetch, which
# the data do not depend on (mmrs/data/pipeline.py: a global sample order, and a data state that is the number of
# global batches consumed). What does change the data (seed, batch_size, shards, image_size, ...) stays breaking.
# Where a host stages its share and how much room it has, and data.read (the same values either way,
# tests/test_crop_read.py), do not change the data either.
RESUME_SAFE_DATA_KEYS = ("workers", "read_threads", "worker_buffer_size", "thread_prefetch", "stage_dir",
                         "stage_quota_gb", "read")
# Allowed on resume with a warning (the run continues, but its curve is no longer one uninterrupted run). `on_bad`
# is here so that a run stopped by a bad record can be resumed with on_bad="skip".
# grad_accum_steps: the MAE family computes the same math with any k (mmrs/train/step.py); RS-BYOL's BatchNorm batch
# changes with it.
RESUME_WARN_PREFIXES = ("optimizer.", "task_lr_multipliers", "compute_dtype", "xla_compiler_options",
                        "grad_accum_steps")
RESUME_WARN_SUFFIXES = (".on_bad",)
# ... except these, which change the optimizer state's layout.
RESUME_BREAKING_OVERRIDES = ("optimizer.name", "optimizer.adafactor_momentum", "optimizer.adafactor_min_dim_to_factor")


def validate(config, method=None, *, device_count: int, process_count: int, check_data: bool = True) -> None:
  """Raises ConfigError for the first problem found."""
  _positive(config, "batch_size")
  _positive(config, "total_steps")
  _positive(config, "log_every_steps")
  if config.get("checkpoint_every_steps", 0) < 0:
    raise ConfigError("config.checkpoint_every_steps must be >= 0 (0 = only at the end).")
  if config.get("keep_checkpoints", 1) < 1:
    raise ConfigError("config.keep_checkpoints must be >= 1 (2+ lets a resume fall back past a damaged checkpoint).")
  _choice(config, "on_nonfinite", ("stop", "skip"))
  _choice(config, "compute_dtype", ("float32", "bfloat16", "auto"))
  try:
    sizes = mesh_lib.parse_mesh_spec(config.mesh, device_count)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  bs = config.batch_size
  if bs % process_count:
    raise ConfigError(f"config.batch_size={bs} does not divide by the {process_count} processes: each process "
                      "loads batch_size / process_count examples. Use a multiple of the process count.")
  shards = sizes["data"] * sizes["fsdp"]
  if bs % shards:
    raise ConfigError(f"config.batch_size={bs} does not divide by the {shards} batch shards of config.mesh="
                      f"{config.mesh!r} (data x fsdp over {device_count} devices). Use a multiple of {shards}.")
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"config.grad_accum_steps={accum!r} must be a positive integer (1 = no accumulation).")
  if (bs // shards) % accum:
    raise ConfigError(f"config.grad_accum_steps={accum} does not divide the {bs // shards} rows per batch shard "
                      f"(config.batch_size={bs} over {shards} data x fsdp shards): every micro-batch must keep "
                      "rows on every device. Use a divisor of that, or change batch_size.")
  try:
    from mmrs.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    metrics_lib.parse_profile_steps(config.get("profile_steps", ""))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  model = config.get("model")
  if model is not None and hasattr(model, "get") and "remat_policy" in model:
    from mmrs.models import vit  # pylint: disable=g-import-not-at-top
    if model.remat_policy not in vit.REMAT_POLICIES:
      raise ConfigError(f"config.model.remat_policy={model.remat_policy!r}: choose one of "
                        f"{sorted(vit.REMAT_POLICIES)}.")
  _check_optimizer(config)
  if method is None:
    return
  names = [t.name for t in method.tasks]
  try:
    schedule_lib.TaskSchedule(names, config.get("task_schedule", "alternate"), to_dict(config.get("task_weights")))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  unknown = sorted(set(to_dict(config.get("task_lr_multipliers"))) - set(names))
  if unknown:
    raise ConfigError(f"config.task_lr_multipliers names unknown task(s) {unknown}; the tasks are {names}.")
  for task in method.tasks:
    _check_dataset(config, task, check_data)


def resolve_compute_dtype(config, platform: str) -> str:
  """config.compute_dtype "auto" -> the platform's compute dtype (mmrs/target.py choices: bfloat16 on GPU/TPU with
  float32 params and optimizer state, float32 on CPU). Sets the key in place, so the saved config and the resume
  check see the resolved value. Returns it."""
  if config.get("compute_dtype", "float32") == "auto":
    config.compute_dtype = target.choices(platform).compute_dtype
  return config.get("compute_dtype", "float32")


def _check_optimizer(config) -> None:
  opt = config.get("optimizer")
  if opt is None:
    raise ConfigError("config.optimizer is missing (see configs/common.py base_config()).")
  if opt.get("name") not in optimizers.OPTIMIZERS:
    raise ConfigError(f"config.optimizer.name={opt.get('name')!r}: choose one of {optimizers.OPTIMIZERS}.")
  if not opt.get("learning_rate", 0) > 0:
    raise ConfigError(f"config.optimizer.learning_rate={opt.get('learning_rate')} must be > 0.")
  if opt.get("warmup_steps", 0) < 0:
    raise ConfigError("config.optimizer.warmup_steps must be >= 0.")
  try:
    optimizers.lr_schedule(opt, config.total_steps)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_dataset(config, task, check_data: bool) -> None:
  data = config.get("data")
  if data is None or task.dataset not in data:
    raise ConfigError(f"Task {task.name!r} reads dataset {task.dataset!r} but config.data has no such entry "
                      f"(it has {sorted(data) if data else []}).")
  d = data[task.dataset]
  key = f"config.data.{task.dataset}"
  patch = _patch_size(config)
  size = d.get("image_size")
  if patch and size and size % patch:
    raise ConfigError(f"{key}.image_size={size} is not a multiple of the patch size {patch} "
                      f"(config.model.patch_size). Use e.g. {size - size % patch or patch}.")
  if d.get("workers", 0) < 0:
    raise ConfigError(f"{key}.workers must be >= 0.")
  if not check_data:
    return
  shards = d.get("shards", "")
  if not shards:
    raise ConfigError(f"{key}.shards is empty: set --config.data.{task.dataset}.shards=DIR (a directory of "
                      "*.array_record shards with manifest.json and stats.json, made by data_prep/).")
  if shards.startswith("tfds:"):
    data_dir = shards.partition("@")[2]
    if data_dir and not epath.Path(data_dir).exists():
      raise ConfigError(f"{key}.shards={shards!r}: the TFDS data_dir {data_dir!r} does not exist.")
    return
  path = epath.Path(shards)
  if not path.exists():
    raise ConfigError(f"{key}.shards={shards!r} does not exist. Point it at a directory made by data_prep/.")
  if not (path / "manifest.json").exists():
    raise ConfigError(f"{key}.shards={shards!r} has no manifest.json: is it a finished data_prep/ output "
                      "(an interrupted conversion leaves none)?")


def _patch_size(config) -> int | None:
  model = config.get("model")
  if model is None:
    return None
  for key in ("patch_size", "patch"):
    if key in model and isinstance(model[key], int):
      return model[key]
  return None


def _positive(config, key: str) -> None:
  value = config.get(key)
  if not isinstance(value, int) or value <= 0:
    raise ConfigError(f"config.{key}={value!r} must be a positive integer.")


def _choice(config, key: str, choices: tuple[str, ...]) -> None:
  value = config.get(key, choices[0])
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r}: choose one of {choices}.")


def to_dict(x) -> dict:
  if x is None:
    return {}
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def resume_conflicts(saved: Mapping[str, Any], current: Mapping[str, Any]) -> tuple[list[str], list[str]]:
  """(breaking, warnings): human-readable differences between the checkpoint's config and this run's.

  Keys present on one side only (a code update added or retired a config key) are warnings: the state-tree check
  of the checkpoint still refuses a model or optimizer that no longer fits.
  """
  a, b = flatten(saved), flatten(current)
  breaking, warnings = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key, "<unset>") == b.get(key, "<unset>") or key in RESUME_SAFE or _safe_data_key(key):
      continue
    line = f"{key}: {a.get(key, '<unset>')!r} -> {b.get(key, '<unset>')!r}"
    one_sided = key not in a or key not in b
    warn = key.startswith(RESUME_WARN_PREFIXES) or key.endswith(RESUME_WARN_SUFFIXES)
    if one_sided or (warn and key not in RESUME_BREAKING_OVERRIDES):
      warnings.append(line)
    else:
      breaking.append(line)
  return breaking, warnings


def _safe_data_key(key: str) -> bool:
  parts = key.split(".")
  return len(parts) == 3 and parts[0] == "data" and parts[2] in RESUME_SAFE_DATA_KEYS


def check_resume(saved: Mapping[str, Any], current: Mapping[str, Any], allow_change: bool = False,
                 log: bool = True) -> None:
  """Raises ConfigError for breaking differences (unless allow_change); logs the others when `log`."""
  breaking, warnings = resume_conflicts(saved, current)
  if not log:
    warnings = []
  for w in warnings:
    logging.warning("Resuming with a changed config value %s", w)
  if breaking and not allow_change:
    raise ConfigError(
        "The config differs from the one this run's checkpoint was written with, in keys that change the data "
        "order, the model or the optimizer layout, so the run would not continue as one run:\n  "
        + "\n  ".join(breaking)
        + "\nUse the original values, start a fresh --workdir, or pass --allow_config_change if you mean it.")
  for b in breaking if log else []:
    logging.warning("Resuming with a changed config value (allowed by --allow_config_change) %s", b)
