"""Train-step throughput: steps/s, images/s, MFU and compiled memory of a config's tasks, on this machine's devices.

  python -m benchmarks.step_throughput --config=configs/mixmae.py:vit_b [--config.batch_size=256] [--steps=20]

By default batches are synthetic (random, already normalized, on device), so the number is the device step alone;
`--data=real` reads the config's datasets through the real pipeline (host loading and normalization included).
Tasks run in the config's schedule (alternating tasks interleave as in training). Prints a summary, then one JSON line
(last line) for scripts and benchmarks/RESULTS.md.
"""
from __future__ import annotations

import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from mmrs.train import config_check
from mmrs.train import data as data_lib
from mmrs.train import loop
from mmrs.train import mesh as mesh_lib
from mmrs.train import metrics as metrics_lib
from mmrs.train import schedule as schedule_lib
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib

config_flags.DEFINE_config_file("config", None, "Config file (as for launch/main.py).", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps per task first.")
flags.DEFINE_enum("data", "synthetic", ["synthetic", "real"], "Synthetic on-device batches, or the real pipeline.")
flags.DEFINE_integer("s2_channels", 13, "S2 bands of synthetic batches (13 = L1C) when config.data has no s2_bands.")
flags.DEFINE_list("byol_view_channels", ["1", "1"], "Channels of synthetic view1, view2 (RS-BYOL: one band each).")


def synthetic_batch(config, task, local_batch: int, s2_channels: int, view_channels=(1, 1)) -> dict[str, np.ndarray]:
  """Normalized float32 arrays shaped like the task's real batches."""
  d = config.data[task.dataset]
  size = d.image_size
  rng = np.random.default_rng(0)
  shape = lambda c: (local_batch, size, size, c)
  if task.batch_kind == "byol_views":  # the view sampler crops (data.image_size is 0: whole records reach it)
    shape = lambda c: (local_batch, config.views.image_size, config.views.image_size, c)
    return {f"view{i + 1}": rng.standard_normal(shape(c), np.float32) for i, c in enumerate(view_channels)}
  channels = {"s2": len(d.s2_bands.split(",")) if d.get("s2_bands") else s2_channels, "s1": 2}
  return {m: rng.standard_normal(shape(channels[m]), np.float32) for m in task.modalities}


def _minor_faults() -> int:
  """This process's minor page faults so far (fresh memory touched; e.g. a step's scratch buffers when the
  allocator returns them to the OS between steps): a load-independent allocator signal."""
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def benchmark(config, *, method=None, steps: int = 20, warmup: int = 3, real_data: bool = False,
              s2_channels: int = 13, view_channels=(1, 1), devices=None) -> dict:
  devices = list(devices) if devices is not None else jax.devices()
  method = method if method is not None else loop.build_method(config)
  config_check.validate(config, method, device_count=len(devices), process_count=jax.process_count(),
                        check_data=real_data)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  # MFU against the device kind's spec peak (or config.peak_flops_per_device); NaN (n/a) for a CPU.
  peak, peak_source = metrics_lib.total_peak_flops(list(mesh.devices.flat),
                                                   float(config.get("peak_flops_per_device", 0.0)))
  tasks = {t.name: t for t in method.tasks}
  schedule = schedule_lib.TaskSchedule(list(tasks), config.get("task_schedule", "alternate"),
                                       config_check.to_dict(config.get("task_weights")))
  local = config.batch_size // jax.process_count()
  with jax.set_mesh(mesh):
    if real_data:
      task_data = data_lib.build_task_data(config, method, jax.process_index(), jax.process_count())
      iters = {n: data_lib.PeekableIterator(td.iterator) for n, td in task_data.items()}
      normalize = {n: td.normalize for n, td in task_data.items()}
      first = {n: data_lib.numeric_arrays(it.peek()) for n, it in iters.items()}
    else:
      normalize = {n: None for n in tasks}
      first = {n: synthetic_batch(config, t, local, s2_channels, view_channels) for n, t in tasks.items()}
    sharding = mesh_lib.batch_sharding(mesh)
    shapes = {n: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()} for n, b in first.items()}
    normalized = {n: jax.eval_shape(normalize[n], shapes[n]) if normalize[n] else shapes[n] for n in tasks}
    example = state_lib.example_batch(normalized)
    # The train loop's own planning and compile path (mmrs/train/step.py).
    opt, layout = step_lib.plan_state(config, method, example, mesh, config.total_steps)
    options = config_check.to_dict(config.get("xla_compiler_options"))
    state = state_lib.create(method, opt, example, layout, jax.random.key(config.seed), options)
    steps_ = step_lib.compile_tasks(config, method, opt, layout, mesh,
                                    {n: step_lib.abstract_batch(shapes[n], config.batch_size) for n in tasks},
                                    normalize)
    compiled = {n: st.compiled for n, st in steps_.items()}
    memory = {n: st.memory for n, st in steps_.items()}
    compile_s = {n: st.seconds for n, st in steps_.items()}
    device_batches = {n: data_lib.global_batch(b, sharding, config.batch_size, n) for n, b in first.items()}

    def batch_for(name):
      if not real_data:
        return device_batches[name]
      return data_lib.global_batch(iters[name].next(), sharding, config.batch_size, name)

    step = 0
    for step in range(warmup * len(tasks)):
      name = schedule.task_name(step)
      state, metrics = compiled[name](state, batch_for(name), np.int32(step))
    jax.block_until_ready(state)
    flops = 0.0
    faults0 = _minor_faults()
    t0 = time.perf_counter()
    for step in range(warmup * len(tasks), warmup * len(tasks) + steps):
      name = schedule.task_name(step)
      state, metrics = compiled[name](state, batch_for(name), np.int32(step))
      flops += float(method.flops_per_sample(name)) * config.batch_size
    jax.block_until_ready((state, metrics))
    seconds = time.perf_counter() - t0
    faults = _minor_faults() - faults0
    if real_data:
      for td in task_data.values():
        if td.close is not None:
          td.close()
  return {
      "method": getattr(method, "name", config.method), "tasks": list(tasks), "batch_size": config.batch_size,
      "mesh": dict(mesh.shape), "devices": len(devices), "device_kind": devices[0].device_kind,
      "data": "real" if real_data else "synthetic", "steps": steps, "seconds": seconds,
      "minor_faults_per_step": faults / steps,
      "steps_per_s": steps / seconds, "images_per_s": steps * config.batch_size / seconds,
      "mfu": flops / seconds / peak if math.isfinite(peak) and peak > 0 else None, "peak_flops": peak, "peak_source": peak_source,
      "params": state_lib.count_params(state["params"]), "compile_s": compile_s, "memory_mib": memory,
      "last_loss": float(jnp.asarray(metrics["loss"])),
  }


def main(argv):
  del argv
  f = flags.FLAGS
  out = benchmark(f.config, steps=f.steps, warmup=f.warmup, real_data=f.data == "real", s2_channels=f.s2_channels,
                  view_channels=tuple(int(c) for c in f.byol_view_channels))
  print(f"{out['method']} on {out['devices']} x {out['device_kind']} (mesh {out['mesh']}), batch {out['batch_size']},"
        f" {out['data']} data: {out['steps_per_s']:.2f} steps/s, {out['images_per_s']:,.0f} images/s, "
        + (f"MFU {100 * out['mfu']:.1f}% of {out['peak_flops']:.3g} FLOP/s ({out['peak_source']})"
           if out["mfu"] is not None else f"MFU n/a ({out['peak_source']})"))
  for name, mem in out["memory_mib"].items():
    print(f"  {name}: compiled in {out['compile_s'][name]:.1f}s; per-device MiB "
          + (", ".join(f"{k}={v:,.1f}" for k, v in mem.items()) or "not reported"))
  print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
