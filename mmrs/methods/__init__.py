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
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(REGISTRY)}.")
  return importlib.import_module(REGISTRY[name]).build(config)
