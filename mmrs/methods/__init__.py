"""Pretraining methods. `build(config)` returns the `Method` named by `config.method`."""
import importlib

# config.method -> module exposing `build(config) -> Method`.
REGISTRY = {
    "mae_s2": "mmrs.methods.mae",
    "auxmae": "mmrs.methods.auxmae",
    "mixmae": "mmrs.methods.mixmae",
    "jointmae": "mmrs.methods.jointmae",
    "jointmae_plain": "mmrs.methods.jointmae",
    "rsbyol": "mmrs.methods.byol",
    "finetune": "mmrs.finetune.method",  # downstream classification / segmentation, same train loop
}


def build(config):
  """The method of `config.method`; a compute_dtype of "auto" is resolved here for the default backend first
  (the train loop and launch.aot resolve it for their devices before: see mmrs/train/config_check.py)."""
  if config.get("compute_dtype") == "auto":
    from mmrs import target  # pylint: disable=g-import-not-at-top
    config.compute_dtype = target.choices(target.platform()).compute_dtype
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(REGISTRY)}.")
  return importlib.import_module(REGISTRY[name]).build(config)
