"""The suite's stages.jsonl (one JSON object per stage: name, status, seconds, result or error), read by both the
packer (benchmarks/device/pack.py) and the report (benchmarks/peer_report.py) — its own module so neither imports
the other."""
from __future__ import annotations

import json
import os


def read_stages(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]
