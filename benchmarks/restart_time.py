"""Restart-to-first-step time with and without the persistent compilation cache (config.compilation_cache_dir).

Runs `python -m launch.main` for one step of MixMAE `tiny` on the bundled BigEarthNet-MM sample (converted to a temp
dir first) in fresh workdirs: (1) cache off, (2) cache on but empty (cold: compiles and writes), (3) cache on and
filled (warm: a requeued job). Prints one JSON line per case: process wall time and the logged compile seconds.

  python -m benchmarks.restart_time [--config=configs/mixmae.py:tiny] [--override=model.encoder=B,batch_size=8]
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

flags.DEFINE_string("config", "configs/mixmae.py:tiny", "Config (its shards are replaced by the converted sample).")
flags.DEFINE_list("override", [], "Extra config overrides KEY=VALUE for every case, e.g. model.encoder=B,batch_size=8.")


def main(argv):
  del argv
  from data_prep import bigearthnet_mm  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(prefix="restart_time_")
  shards = os.path.join(root, "data")
  sample = os.path.join(os.path.dirname(bigearthnet_mm.__file__), "samples", "bigearthnet_mm")
  bigearthnet_mm.convert_dataset(sample, shards, num_shards=1)
  cache = os.path.join(root, "cache")
  for case, setting in (("off", ""), ("cold", cache), ("warm", cache)):
    workdir = os.path.join(root, f"run_{case}")
    cmd = [sys.executable, "-m", "launch.main", f"--config={flags.FLAGS.config},shards={shards}",
           f"--workdir={workdir}", "--config.total_steps=1", "--config.checkpoint_every_steps=0",
           f"--config.compilation_cache_dir={setting}"] + [f"--config.{kv}" for kv in flags.FLAGS.override]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    compiled = [float(x) for x in re.findall(r"Compiled task '[^']+' in ([0-9.]+)s", proc.stderr)]
    hit = "loaded from the persistent compilation cache" in proc.stderr
    print(json.dumps({"case": case, "exit": proc.returncode, "process_wall_s": round(wall, 1),
                      "step_compile_s": compiled, "cache_hit_logged": hit}), flush=True)


if __name__ == "__main__":
  app.run(main)
