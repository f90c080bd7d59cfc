"""Checks benchmarks/gpu_suite.sh runs first on a machine: what it runs with, and whether cuDNN attention works.

  python -m benchmarks.device.check versions     # Python, platform, package versions, jax's and torch's devices
  python -m benchmarks.device.check attention    # cuDNN flash attention vs XLA's on the ViT-B step's shapes

`attention` jit-compiles and runs `jax.nn.dot_product_attention(implementation="cudnn")`, forward and backward in
bfloat16, at the shapes of the suite's models (ViT-B/16 encoder at 128 px: 65 and 17 tokens, 12 heads of 64; the
ViT-Lite decoder: 65 tokens, 16 heads of 32), and compares it with the XLA path. It exits 1 with the error when
cuDNN attention fails to trace, compile or run, or disagrees; the suite then runs every JAX stage with
config.model.attention=xla, so one cuDNN problem cannot take down all of them.
"""
from __future__ import annotations

import importlib.metadata
import json
import platform
import sys

PACKAGES = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
            "tensorstore", "numpy", "ml-collections", "grain", "array-record", "portpicker", "etils", "absl-py",
            "torch", "triton", "matplotlib")
# (batch, tokens, heads, head_dim): encoder (MixMAE full sequence / MAE-S2 visible quarter + CLS), decoder.
SHAPES = ((32, 65, 12, 64), (32, 17, 12, 64), (32, 65, 16, 32))


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
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  def loss(impl):
    def f(q, k, v):
      return jax.nn.dot_product_attention(q, k, v, implementation=impl).astype(jnp.float32).square().sum()
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))

  results = []
  for shape in SHAPES:
    q, k, v = (jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(3))
    (val, grads), (ref_val, ref_grads) = loss("cudnn")(q, k, v), loss("xla")(q, k, v)
    grad_err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                   for g, r in zip(grads, ref_grads))
    rel = abs(float(val) - float(ref_val)) / max(abs(float(ref_val)), 1e-6)
    results.append({"shape": shape, "loss_rel_diff": rel, "grad_max_abs_diff": grad_err})
    if not rel < 2e-2 or not grad_err < 0.5:  # bf16: both paths round differently; these catch wrong results
      raise SystemExit(f"cuDNN attention disagrees with XLA's at {shape}: {results[-1]}")
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
