"""Pretraining methods. `build(config)` returns the `Method` named by `config.method`."""
import importlib

# config.method -> module in mmrs.methods exposing `build(config) -> Method`.
REGISTRY = {
    "mae_s2": "mae",
    "auxmae": "auxmae",
    "mixmae": "mixmae",
    "jointmae": "jointmae",
    "jointmae_plain": "jointmae",
    "rsbyol": "byol",
}


def build(config):
  name = config.method
  if name not in REGISTRY:
    raise ValueError(f"config.method={name!r} is not a known method; choose one of {sorted(REGISTRY)}.")
  return importlib.import_module(f"mmrs.methods.{REGISTRY[name]}").build(config)
