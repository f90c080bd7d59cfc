"""mmrs: multi-modal (Sentinel-1 + Sentinel-2) remote-sensing pretraining in JAX/Flax.

`mmrs.load_encoder(path)` loads a converted encoder (see mmrs/finetune/encoder_api.py). Imports are lazy so that
`import mmrs` stays cheap (no jax import).
"""

__all__ = ["load_encoder"]


def __getattr__(name):
  if name == "load_encoder":
    from mmrs.finetune.encoder_api import load_encoder  # pylint: disable=g-import-not-at-top
    return load_encoder
  raise AttributeError(f"module 'mmrs' has no attribute {name!r}")
