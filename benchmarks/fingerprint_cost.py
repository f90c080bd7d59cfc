"""What the checkpoint value fingerprints (mmrs/train/fingerprint.py, issue 26) cost per save on the demo config.

`python -m benchmarks.fingerprint_cost [--config=demo] [--repeats=6]`: initializes the config's train state (from its
abstract batches: no data needed), then times `Checkpointer.save` with the fingerprints and without (the fingerprint
function replaced by a no-op), alternated, and `fingerprint.compute` alone. Prints one line per figure.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time

import jax
import numpy as np

from configs import mixmae
from mmrs import methods
from mmrs.train import aot
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import fingerprint
from mmrs.train import mesh as mesh_lib
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib


def demo_state(variant: str):
  config = mixmae.get_config(variant)
  method = methods.build(config)
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices())
  batches = aot.abstract_batches(config, method, config.batch_size)
  normalize = aot.normalizers(config, method)
  example = state_lib.example_batch({n: jax.eval_shape(normalize[n], b) if normalize[n] else b
                                     for n, b in batches.items()})
  with jax.set_mesh(mesh):
    optimizer, layout = step_lib.plan_state(config, method, example, mesh, config.total_steps)
    return state_lib.create(method, optimizer, example, layout, jax.random.key(0))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="demo", help="variant of configs/mixmae.py")
  parser.add_argument("--repeats", type=int, default=6)
  args = parser.parse_args()
  state = demo_state(args.config)
  leaves = jax.tree.leaves(state)
  t0 = time.perf_counter()
  fingerprint.compute(state)
  first = time.perf_counter() - t0
  real = fingerprint.compute
  times = {"with": [], "without": []}
  root = tempfile.mkdtemp(prefix="mmrs_fingerprint_cost_")
  checkpointer = ckpt_lib.Checkpointer(root + "/c", keep=2)
  try:
    step = 0
    for _ in range(args.repeats):
      for mode in times:
        fingerprint.compute = real if mode == "with" else (lambda s: ({}, True))
        step += 1
        t0 = time.perf_counter()
        checkpointer.save(step, state, {}, {})
        times[mode].append(time.perf_counter() - t0)  # the save call: fingerprints + the copy to host
        checkpointer.wait()
  finally:
    fingerprint.compute = real
    checkpointer.close()
    shutil.rmtree(root, ignore_errors=True)
  alone = []
  for _ in range(10):
    t0 = time.perf_counter()
    fingerprint.compute(state)
    alone.append(time.perf_counter() - t0)
  print(f"state: {state_lib.count_params(state['params']):,} params, {len(leaves)} arrays, "
        f"{sum(x.nbytes for x in leaves) / 2**20:.1f} MiB; first fingerprint (compiles) {first:.2f} s")
  for mode, values in times.items():
    print(f"save() {mode} fingerprints: median {np.median(values):.3f} s, all {[round(v, 3) for v in values]}")
  print(f"fingerprint.compute alone: median {np.median(alone):.3f} s, min {min(alone):.3f} s")


if __name__ == "__main__":
  main()
