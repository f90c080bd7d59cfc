"""Checks benchmarks/gpu_suite.sh runs first on a machine: what it runs with, and whether cuDNN attention works.

  python -m benchmarks.device.check versions     # Python, platform, package versions, jax's and torch's devices
  python -m benchmarks.device.check attention    # cuDNN flash attention vs XLA's on the ViT-B step's shapes

`attention` jit-compiles and runs attention forward and backward in bfloat16 against XLA's: cuDNN flash attention
itself (`implementation="cudnn"`) at even token counts, which it accepts, then attention as the JAX stages will run
it (`mmrs.models.vit.attend(..., "auto")`, at the suite's models' shapes: the ViT-B/16 encoder at 128 px sees 65
and 17 tokens with 12 heads of 64, the ViT-Lite decoder 65 tokens with 16 heads of 32; "auto" takes cuDNN only
where jax accepts it forward and backward). It exits 1 with the error when either fails to trace, compile or run, or
disagrees; gpu_suite.sh then runs every JAX stage with config.model.attention=xla, so one cuDNN problem cannot take
down all of them. On a CPU there is no cuDNN: it exits 1 there by design (the smoke run's fallback path).
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "tensorstore", "numpy", "ml-collections", "grain", "array-record", "portpicker", "etils", "absl-py",
            "torch", "triton", "matplotlib")
# (batch, tokens, heads, head_dim): encoder (MixMAE full sequence / MAE-S2 visible quarter, + CLS), decoder.
MODEL_SHAPES = ((8, 65, 12, 64), (8, 17, 12, 64), (8, 65, 16, 32))
CUDNN_SHAPES = ((8, 64, 12, 64), (8, 64, 16, 32))  # even lengths: cuDNN's backward takes them


def versions() -> dict:
  out = {"python": platform.python_version(), "executable": sys.executable, "machine": platform.machine()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      continue
  try:
    import jax  # pylint: disable=import-outside-toplevel
    out["jax_backend"] = jax.default_backend()
    out["jax_devices"] = [d.device_kind for d in jax.devices()]
  except Exception as e:  # pylint: disable=broad-except  (reported, not fatal: the stages say the rest)
    out["jax_error"] = f"{type(e).__name__}: {e}"[:500]
  try:
    import torch  # pylint: disable=import-outside-toplevel
    out["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except Exception as e:  # pylint: disable=broad-except
    out["torch_error"] = f"{type(e).__name__}: {e}"[:500]
  return out


def attention() -> dict:
  import functools  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from mmrs import target  # pylint: disable=import-outside-toplevel
  from mmrs.models import vit  # pylint: disable=import-outside-toplevel

  def value_and_grads(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.square(fn(q, k, v).astype(jnp.float32)).sum(), (0, 1, 2)))

  xla = value_and_grads(functools.partial(jax.nn.dot_product_attention, implementation="xla"))

  def compare(label, shape, fn):
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
    try:
      val, grads = value_and_grads(fn)(q, k, v)
    except Exception as e:  # pylint: disable=broad-except  (any failure means: do not use this path)
      raise SystemExit(f"{label} attention at {shape} failed: {type(e).__name__}: {e}") from e
    ref_val, ref_grads = xla(q, k, v)
    grad_err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                   for g, r in zip(grads, ref_grads))
    rel = abs(float(val) - float(ref_val)) / max(abs(float(ref_val)), 1e-6)
    out = {"attention": label, "shape": shape, "loss_rel_diff": rel, "grad_max_abs_diff": grad_err}
    print(json.dumps(out), flush=True)
    if not rel < 2e-2 or not grad_err < 0.5:  # bf16: the paths round differently; these catch wrong results
      raise SystemExit(f"{label} attention disagrees with XLA's at {shape}: {out}")
    return out

  results = []
  for shape in CUDNN_SHAPES:  # first: without cuDNN (a CPU) the stages use XLA anyway, so stop here
    results.append(compare("cudnn", shape, functools.partial(jax.nn.dot_product_attention, implementation="cudnn")))
  for shape in MODEL_SHAPES:  # what the JAX stages run
    probe = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    chosen = target.choices(target.platform(), jnp.bfloat16).attention
    if chosen == "cudnn" and not vit._cudnn_trainable(probe, probe, probe):  # pylint: disable=protected-access
      chosen = "xla"
    results.append(compare(f"auto ({chosen})", shape, functools.partial(vit.attend, implementation="auto")))
  return {"attention": "cudnn", "backend": jax.default_backend(), "checked": results}


def main(argv=None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if argv not in (["versions"], ["attention"]):
    raise SystemExit("usage: python -m benchmarks.device.check versions|attention")
  out = versions() if argv == ["versions"] else attention()
  if argv == ["versions"]:
    for key, value in out.items():
      print(f"{key:>20}  {value}")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
