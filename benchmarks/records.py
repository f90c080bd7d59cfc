"""The JSON-lines records benchmarks append (`--json_out`, benchmarks/results/*.jsonl): one object per run."""
import json
import time


def append(path: str, record: dict) -> None:
  """Appends `record`, stamped with the UTC time ("time"), as one line of `path`."""
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps({**record, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}) + "\n")
