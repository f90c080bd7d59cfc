"""One persistent compilation cache entry for every process of a CPU multi-process test run.

JAX keys a cache entry by the devices' topology fingerprint, and on CPU each process's fingerprint is its own
(jax._src.cache_key._hash_accelerator_config; on GPU the key is made process-invariant, on TPU the topology is
global). Only process 0 writes entries, so on CPU every other process missed every time and compiled anew: ~25 s
per start of the tiny MAE job on a loaded 2-core host, while process 0 waited for it at the start-up barrier.

`enable()` keys CPU programs by their device kinds instead (jax's own fallback where a backend has no topology), so
process 1 loads what process 0 wrote; process 1 executing process 0's serialized CPU executable was checked to give
the same collective results. Tests only: production runs are GPU/TPU, whose keys already agree across processes.
"""
from __future__ import annotations

import runpy
import sys


def enable() -> None:
  from jax._src import cache_key  # pylint: disable=g-import-not-at-top

  real = cache_key._hash_accelerator_config  # pylint: disable=protected-access

  def hash_accelerator_config(hash_obj, devices):
    if all(d.platform == "cpu" for d in devices.flat):
      return cache_key._hash_devices(hash_obj, devices)  # pylint: disable=protected-access
    return real(hash_obj, devices)

  cache_key._hash_accelerator_config = hash_accelerator_config  # pylint: disable=protected-access


if __name__ == "__main__":
  # python -m tests.cpu_cache_share MODULE ARGS...: runs MODULE as __main__ (as `python -m MODULE ARGS...`).
  enable()
  module = sys.argv.pop(1)
  sys.argv[0] = module
  runpy.run_module(module, run_name="__main__", alter_sys=True)
