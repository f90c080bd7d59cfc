r"""Data-pipeline throughput: records/s through the training path (read + decode + crop/flip/rot90 + batch).

    python -m benchmarks.data_throughput [--shards=DIR] [--workers=N] [--batch_size=B] [--image_size=S] \
        [--seconds=T] [--normalize=device,host]

`device` (the training default) leaves normalization to the jit step, so it is not counted here; `host` adds
per-batch float normalization in the pipeline. Besides wall-clock records/s it reports records per CPU-second
summed over the main process and its grain workers ("per core"), which stays meaningful on a busy machine.
Without --shards, a synthetic S1+S2 dataset (120 px, labels and mask, zstd shards as data_prep writes them) is
generated in a temporary directory. The last line printed is one JSON object.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags

from configs.common import dataset_config

_SHARDS = flags.DEFINE_string("shards", "", "Dataset directory or tfds: spec; empty = synthetic in a temp dir.")
_WORKERS = flags.DEFINE_integer("workers", 0, "grain mp_prefetch worker processes (0 = in process).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Batch size.")
_IMAGE = flags.DEFINE_integer("image_size", 96, "Crop size in pixels.")
_SECONDS = flags.DEFINE_float("seconds", 10.0, "Measured seconds per mode (after warm-up).")
_NORMALIZE = flags.DEFINE_list("normalize", ["device", "host"], "Modes to measure: device, host, none.")
_MODALITIES = flags.DEFINE_list("modalities", ["s1", "s2"], "Modalities the pipeline reads.")
_NUM_SYNTHETIC = flags.DEFINE_integer("num_synthetic", 512, "Synthetic S1+S2 records when --shards is empty.")
_SYNTHETIC_SIZE = flags.DEFINE_integer("synthetic_size", 120, "Synthetic record size in pixels.")
_READ_THREADS = flags.DEFINE_integer("read_threads", 2, "data.read_threads (threads per process).")


def _cpu_seconds_of_tree(root: int) -> float:
  """user+system CPU seconds of `root` and all its descendants (Linux /proc)."""
  tick = os.sysconf("SC_CLK_TCK")
  parents, cpu = {}, {}
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    parents[int(d)] = int(fields[1])
    cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
  total, stack = 0.0, [root]
  while stack:
    pid = stack.pop()
    total += cpu.get(pid, 0.0)
    stack.extend(p for p, pp in parents.items() if pp == pid)
  return total


def measure(shards: str, normalize: str) -> dict:
  from mmrs.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = dataset_config(shards, image_size=_IMAGE.value, workers=_WORKERS.value, read_threads=_READ_THREADS.value)
  pipe = pipeline.make_pipeline(cfg, modalities=tuple(_MODALITIES.value), global_batch_size=_BATCH.value, seed=0,
                                normalize=normalize)
  try:
    t_start = time.perf_counter()
    for _ in range(3):  # start the workers, fill the buffers
      next(pipe.iterator)
    startup = time.perf_counter() - t_start
    cpu0, t0, n = _cpu_seconds_of_tree(os.getpid()), time.perf_counter(), 0
    while time.perf_counter() - t0 < _SECONDS.value:
      batch = next(pipe.iterator)
      n += _BATCH.value
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds_of_tree(os.getpid()) - cpu0
  finally:
    pipe.close()
  shapes = {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()}
  return {"normalize": normalize, "records_per_s": round(n / wall, 1),
          "records_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None, "cpu_s": round(cpu, 2),
          "wall_s": round(wall, 2), "records": n, "startup_s": round(startup, 2), "batch": shapes}


def main(argv):
  del argv
  tmp = None
  shards = _SHARDS.value
  if not shards:
    from mmrs.data import synthetic  # pylint: disable=g-import-not-at-top

    tmp = tempfile.mkdtemp(prefix="mmrs_bench_")
    shards = os.path.join(tmp, "synthetic")
    t = time.perf_counter()
    synthetic.write_synthetic_dataset(shards, n_pairs=_NUM_SYNTHETIC.value, size=_SYNTHETIC_SIZE.value,
                                      num_shards=4, seed=0)
    print(f"generated {_NUM_SYNTHETIC.value} synthetic {_SYNTHETIC_SIZE.value} px S1+S2 records in "
          f"{time.perf_counter() - t:.1f}s at {shards}", flush=True)
  try:
    results = {}
    for mode in _NORMALIZE.value:
      results[mode] = measure(shards, mode)
      print(json.dumps(results[mode]), flush=True)
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)
  main_mode = "device" if "device" in results else next(iter(results))
  r = results[main_mode]
  summary = {"records_per_s": r["records_per_s"], "records_per_cpu_s": r["records_per_cpu_s"],
             "normalize": main_mode, "workers": _WORKERS.value, "batch_size": _BATCH.value,
             "image_size": _IMAGE.value, "modalities": _MODALITIES.value, "cpu_count": os.cpu_count(),
             "shards": _SHARDS.value or f"synthetic {_SYNTHETIC_SIZE.value} px x {_NUM_SYNTHETIC.value}",
             "load_avg_1m": round(os.getloadavg()[0], 2)}
  for mode, res in results.items():
    if mode != main_mode:
      summary[f"{mode}_normalize_records_per_s"] = res["records_per_s"]
      summary[f"{mode}_normalize_records_per_cpu_s"] = res["records_per_cpu_s"]
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
