"""The platform-dependent choices of the program, made in one place from the platform it is COMPILED FOR.

The train loop compiles for its real devices; launch.aot compiles on a CPU host for a target's devices (a TPU slice
through libtpu, NVIDIA GPUs through jax's CUDA plugin). So no model code may ask `jax.default_backend()`: under
launch.aot that is the host's CPU, and a v5p or H100 program would be compiled with the CPU's choices.

`choices(platform, dtype)` decides:
- `compute_dtype` (what config.compute_dtype="auto" becomes): float32 on CPU (XLA:CPU runs bf16 matmuls slowly and
  the tests compare float32 numbers), bfloat16 on GPU and TPU (params and optimizer state stay float32).
- `attention` (what model.attention="auto" becomes, mmrs/models/vit.py attend()): "head_major" on CPU (the layout
  XLA:CPU's batched dot takes without copies), "cudnn" (flash attention) on GPU for bfloat16/float16 activations,
  XLA's dot_product_attention otherwise (TPU, float32 GPU). attend() falls back to XLA's where jax refuses cuDNN
  for the shapes, forward or backward (an odd token count, e.g. 64 patches + CLS); a compile-only GPU (launch.aot)
  compiles cuDNN attention like a real one.
Inputs are the same on every platform, so they need no choice: the step receives batches as the pipeline stores
them (S2 uint16, S1 float32 dB, s1_valid uint8: mmrs/data/records.py ARRAY_DTYPES) and normalizes them on device
(mmrs/train/data.py, step.py); launch.aot compiles those raw inputs and the normalization too.

`platform()` is the platform being compiled for: the one `compiling_for` sets (mmrs/train/step.py compile_tasks
sets it from the mesh's devices, for the train loop and launch.aot alike), else jax's default backend.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp

PLATFORMS = ("cpu", "gpu", "tpu")
_COMPILING_FOR: contextvars.ContextVar[str | None] = contextvars.ContextVar("mmrs_compiling_for", default=None)


@dataclasses.dataclass(frozen=True)
class Choices:
  platform: str
  compute_dtype: str  # "float32" | "bfloat16"
  attention: str  # "head_major" | "xla" | "cudnn" (mmrs/models/vit.py ATTENTION_IMPLEMENTATIONS)


def choices(platform: str, dtype: Any = None) -> Choices:
  """The choices for `platform` ("cpu" | "gpu" | "tpu"); `dtype`: the activations' dtype (default: the platform's
  compute dtype), which decides whether cuDNN flash attention applies."""
  if platform not in PLATFORMS:
    raise ValueError(f"Platform {platform!r}: expected one of {', '.join(PLATFORMS)} (a jax device's .platform).")
  compute = "float32" if platform == "cpu" else "bfloat16"
  half = jnp.dtype(dtype if dtype is not None else compute) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if platform == "cpu":
    attention = "head_major"
  elif platform == "gpu" and half:
    attention = "cudnn"
  else:
    attention = "xla"
  return Choices(platform, compute, attention)


def platform() -> str:
  """The platform the program being traced is compiled for (see the module docstring)."""
  return _COMPILING_FOR.get() or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform_name: str) -> Iterator[None]:
  """Within: `platform()` is `platform_name` (tracing for a target that is not this host's backend)."""
  if platform_name not in PLATFORMS:
    raise ValueError(f"Platform {platform_name!r}: expected one of {', '.join(PLATFORMS)}.")
  token = _COMPILING_FOR.set(platform_name)
  try:
    yield
  finally:
    _COMPILING_FOR.reset(token)
