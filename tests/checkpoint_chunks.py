"""Where an Orbax (OCDBT) checkpoint keeps each array chunk: for tests that damage exactly one chunk's bytes."""
from __future__ import annotations

import pathlib

import tensorstore as ts


def array_chunks(state_dir: str | pathlib.Path) -> list[tuple[str, str, int, int]]:
  """[(key, data file relative to state_dir, offset, length)] of the chunks stored outside the b-tree nodes (values
  above OCDBT's inline limit: the nodes are CRC-32C checked, these chunks are not), largest first."""
  kv = ts.KvStore.open({"driver": "file", "path": str(state_dir).rstrip("/") + "/"}).result()
  manifest = ts.ocdbt.dump(kv).result()
  todo, out = [manifest["versions"][-1]["root"]["location"]], []
  while todo:
    node = ts.ocdbt.dump(kv, node=todo.pop()).result()
    for entry in node.get("entries") or []:
      if "location" in entry:
        todo.append(entry["location"])
      elif "indirect_value" in entry:  # "value:<prefix>:<file>:<offset>:<length>"
        _, prefix, name, offset, length = entry["indirect_value"].split(":")
        out.append((entry["key"].decode(), prefix + name, int(offset), int(length)))
  return sorted(out, key=lambda c: -c[3])
