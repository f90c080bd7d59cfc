"""One process of tests/test_shard_groups.py's share test: builds its pipeline (staging a file:// "bucket" into its
own stage directory), reads global batches, and reports what it touched.

    python -m tests.shard_share_run URL STAGE_DIR PROCESS_INDEX PROCESS_COUNT BATCHES OUT_JSON

OUT_JSON: the shard files this process holds open, the bytes it read (/proc/self/io rchar: every read syscall,
the staging copy included), the files in its stage directory, and the record keys of its rows per global batch.
"""
import json
import os
import sys

from configs.common import dataset_config
from mmrs.data import pipeline as pipeline_lib

BATCH = 8


def rchar() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def open_shards() -> list[str]:
  out = []
  for fd in os.listdir("/proc/self/fd"):
    try:
      target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
      continue
    if target.endswith(".array_record"):
      out.append(os.path.basename(target))
  return sorted(out)


def main(url, stage_dir, index, count, batches, out):
  before = rchar()
  cfg = dataset_config(url, image_size=16, stage_dir=stage_dir, thread_prefetch=0)  # read only what is asked
  pipe = pipeline_lib.make_pipeline(cfg, modalities=("s1", "s2"), global_batch_size=BATCH, seed=5,
                                    process_index=int(index), process_count=int(count))
  keys = [[str(k) for k in next(pipe.iterator)["record_key"]] for _ in range(int(batches))]
  report = dict(open_shards=open_shards(), bytes_read=rchar() - before, served_groups=list(pipe.served_groups),
                staged=sorted(n for n in os.listdir(stage_dir) if n.endswith(".array_record")), keys=keys)
  pipe.close()
  with open(out, "w") as f:
    json.dump(report, f)


if __name__ == "__main__":
  main(*sys.argv[1:])
