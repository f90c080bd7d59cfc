r"""Data-pipeline throughput: records/s through the training path (read + decode + crop/flip/rot90 + batch).

    python -m benchmarks.data_throughput [--shards=DIR] [--workers=N] [--batch_size=B] [--image_size=S] \
        [--seconds=T] [--normalize=device,host] [--read=crop|record]
    python -m benchmarks.data_throughput --ab_sizes=120,264 --image_size=128 --repeats=2   # issue 19's A/B table

`--ab_sizes`: for synthetic S1+S2 records of each size, the whole-record path (data.read=record) and the crop path
(data.read=crop) alternated A/B/A/B (`--repeats` pairs) at `--image_size` crops, each with records/s, records per
CPU-second and bytes read per record (/proc/self/io rchar of this process; workers=0 so every read is counted), plus
the floor: a plain numpy copy of the crop's bytes (S2 uint16 + S1 float32) out of a full-size record, per record.
It prints a markdown table, then one JSON object.

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
_READ = flags.DEFINE_string("read", "crop", "data.read: crop (only the rows a crop needs) or record (whole records).")
_AB_SIZES = flags.DEFINE_list("ab_sizes", [], "Synthetic record sizes for the record-vs-crop A/B table (see above).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "A/B pairs per size (--ab_sizes).")


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


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def measure(shards: str, normalize: str, read: str | None = None, image_size: int | None = None) -> dict:
  from mmrs.data import pipeline  # pylint: disable=g-import-not-at-top

  cfg = dataset_config(shards, image_size=image_size or _IMAGE.value, workers=_WORKERS.value, read_threads=_READ_THREADS.value,
                       read=read or _READ.value)
  pipe = pipeline.make_pipeline(cfg, modalities=tuple(_MODALITIES.value), global_batch_size=_BATCH.value, seed=0,
                                normalize=normalize)
  try:
    t_start = time.perf_counter()
    for _ in range(3):  # start the workers, fill the buffers
      next(pipe.iterator)
    startup = time.perf_counter() - t_start
    cpu0, t0, n, io0 = _cpu_seconds_of_tree(os.getpid()), time.perf_counter(), 0, _rchar()
    while time.perf_counter() - t0 < _SECONDS.value:
      batch = next(pipe.iterator)
      n += _BATCH.value
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds_of_tree(os.getpid()) - cpu0
    io = _rchar() - io0
  finally:
    pipe.close()
  shapes = {k: [list(v.shape), str(v.dtype)] for k, v in batch.items()}
  return {"normalize": normalize, "records_per_s": round(n / wall, 1),
          "records_per_cpu_s": round(n / cpu, 1) if cpu > 0 else None, "cpu_s": round(cpu, 2),
          "wall_s": round(wall, 2), "records": n, "startup_s": round(startup, 2), "batch": shapes,
          "read": read or _READ.value, "bytes_read_per_record": round(io / n) if _WORKERS.value == 0 else None}


def floor(size: int, crop: int, seconds: float) -> dict:
  """A plain numpy copy of a crop's bytes (13-band uint16 S2 + VV/VH float32 S1) out of a size x size record."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  s2 = rng.integers(0, 10000, (size, size, 13), dtype=np.uint16)
  s1 = rng.standard_normal((size, size, 2), dtype=np.float32)
  out2, out1 = np.empty((crop, crop, 13), np.uint16), np.empty((crop, crop, 2), np.float32)
  n, cpu0, t0 = 0, time.process_time(), time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    for _ in range(64):
      top, left = rng.integers(0, size - crop + 1, 2)
      np.copyto(out2, s2[top:top + crop, left:left + crop])
      np.copyto(out1, s1[top:top + crop, left:left + crop])
    n += 64
  cpu = time.process_time() - cpu0
  return {"records_per_cpu_s": round(n / cpu, 1), "bytes_per_record": out2.nbytes + out1.nbytes}


def ab_table() -> dict:
  """record vs crop, alternated, per synthetic size; plus the floor. Prints a markdown table."""
  from mmrs.data import synthetic  # pylint: disable=g-import-not-at-top

  rows, out = [], {}
  for size in map(int, _AB_SIZES.value):
    tmp = tempfile.mkdtemp(prefix="mmrs_bench_ab_")
    try:
      shards = os.path.join(tmp, "synthetic")
      synthetic.write_synthetic_dataset(shards, n_pairs=_NUM_SYNTHETIC.value, size=size, num_shards=4, seed=0)
      # A record smaller than --image_size (120 px BigEarthNet at 128) gets the largest patch-16 crop that fits.
      crop = _IMAGE.value if size >= _IMAGE.value else size // 16 * 16
      runs = {"record": [], "crop": []}
      for _ in range(_REPEATS.value):
        for read in ("record", "crop"):
          runs[read].append(measure(shards, "device", read, crop))
          print(json.dumps({"size": size, **runs[read][-1]}), flush=True)
      fl = floor(size, crop, _SECONDS.value)
      out[size] = {"runs": runs, "floor": fl, "crop": crop}
      for read in ("record", "crop"):
        r = runs[read]
        rows.append(f"| {size} px, {crop} px crop | {read} | " + " / ".join(f"{x['records_per_s']:,.0f}" for x in r) + " | "
                    + " / ".join(f"{x['records_per_cpu_s']:,.0f}" for x in r) + " | "
                    + " / ".join(f"{x['bytes_read_per_record'] / 1e6:.2f}" for x in r) + " |")
      rows.append(f"| {size} px, {crop} px crop | floor: numpy copy of the crop's bytes | – | {fl['records_per_cpu_s']:,.0f} | "
                  f"{fl['bytes_per_record'] / 1e6:.2f} (copied) |")
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  print(f"| record size | path | records/s (runs) | records per CPU-s (runs) | MB read per record (runs) |")
  print("|---|---|---|---|---|")
  print("\n".join(rows), flush=True)
  return out


def main(argv):
  del argv
  if _AB_SIZES.value:
    out = ab_table()
    print(json.dumps({"ab": {str(k): {"floor": v["floor"], "crop": v["crop"], **{read: [
        {key: r[key] for key in ("records_per_s", "records_per_cpu_s", "bytes_read_per_record")} for r in runs]
        for read, runs in v["runs"].items()}} for k, v in out.items()}, "image_size": _IMAGE.value,
                      "batch_size": _BATCH.value, "cpu_count": os.cpu_count(),
                      "load_avg_1m": round(os.getloadavg()[0], 2)}))
    return
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
             "read": _READ.value, "bytes_read_per_record": r["bytes_read_per_record"],
             "shards": _SHARDS.value or f"synthetic {_SYNTHETIC_SIZE.value} px x {_NUM_SYNTHETIC.value}",
             "load_avg_1m": round(os.getloadavg()[0], 2)}
  for mode, res in results.items():
    if mode != main_mode:
      summary[f"{mode}_normalize_records_per_s"] = res["records_per_s"]
      summary[f"{mode}_normalize_records_per_cpu_s"] = res["records_per_cpu_s"]
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
