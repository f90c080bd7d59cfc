"""Hosts agree before step 1: every process fingerprints what it is about to train on and they compare.

Per-node dataset copies that differ, a host with another checkout or another config override would otherwise train
silently on duplicated or dropped records (each process reads its rows of a global order computed from its own
copy). Fields: `config` (after overrides; dataset paths and the compilation cache directory left out, as they may
differ per node), one `data.<name>` per dataset (its manifest, including the record counts), `sample_order` (seed,
batch size, each dataset's shuffle offset and shard groups), `code` (mmrs source digest and version, jax version).

`check(config)` gathers every process's fingerprint (one small all-gather) and raises `HostsDisagree`, naming the
first process/host and the fields that differ from process 0, on every process; launch.main exits 2.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import socket

import jax
import numpy as np

from mmrs.train import config_check

_MAX_BYTES = 8192  # the gathered record (JSON), padded: a few short fields per dataset
_PER_HOST_KEYS = ("shards", "compilation_cache_dir")  # paths that may differ per node


class HostsDisagree(config_check.ConfigError):
  """Processes of one run would train on different data, config or code."""


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _strip(d):
  if isinstance(d, dict):
    return {k: _strip(v) for k, v in d.items() if k not in _PER_HOST_KEYS}
  return d


def _manifest(shards: str) -> str:
  if shards.startswith("tfds:"):
    return f"{shards} (tfds: not fingerprinted)"
  from mmrs.data import sources  # pylint: disable=g-import-not-at-top
  from mmrs.data import staging  # pylint: disable=g-import-not-at-top
  try:
    manifest = staging.read_manifest(shards)[1] if staging.is_remote(shards) else sources.read_manifest(shards)
  except Exception as e:  # pylint: disable=broad-except  (a dataset the method does not read; its own error later)
    return f"no readable manifest ({type(e).__name__})"
  counts = manifest.get("counts", {})
  records = sum(v for v in counts.values() if isinstance(v, int)) if isinstance(counts, dict) else "?"
  return f"manifest {_digest(manifest)}, {records} records"


def _code() -> str:
  root = pathlib.Path(__file__).resolve().parents[1]
  h = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
  try:
    version = importlib.metadata.version("mmrs")
  except importlib.metadata.PackageNotFoundError:
    version = "not installed"
  return f"mmrs {version} source {h.hexdigest()[:12]}, jax {jax.__version__}"


def compute(config) -> dict[str, str]:
  """{field: short description} of this process (identical on every process of a consistent run)."""
  cfg = config_check.to_dict(config)
  data = cfg.get("data", {}) or {}
  out = {"config": _digest(_strip(cfg)), "code": _code()}
  order = {"seed": cfg.get("seed"), "batch_size": cfg.get("batch_size")}
  for name, d in sorted(data.items()):
    if isinstance(d, dict) and d.get("shards"):
      out[f"data.{name}"] = _manifest(str(d["shards"]))
      order[name] = {k: d.get(k) for k in ("shuffle_seed_offset", "shard_groups") if k in d}
  out["sample_order"] = json.dumps(order, sort_keys=True)
  return out


def check(config) -> None:
  """Compares the fingerprints of all processes (a no-op in one process); raises HostsDisagree on a mismatch."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "fields": compute(config)}).encode()
  if len(mine) > _MAX_BYTES:
    raise ValueError(f"host fingerprint of {len(mine)} bytes exceeds {_MAX_BYTES}")
  buf = np.zeros(_MAX_BYTES, np.uint8)
  buf[:len(mine)] = np.frombuffer(mine, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(buf))
  records = [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]
  ref = records[0]["fields"]
  for i, rec in enumerate(records[1:], start=1):
    fields = rec["fields"]
    differ = sorted(k for k in set(ref) | set(fields) if ref.get(k) != fields.get(k))
    if differ:
      detail = "; ".join(f"{k}: {fields.get(k, 'missing')!r} vs {ref.get(k, 'missing')!r}" for k in differ)
      raise HostsDisagree(
          f"hosts disagree before step 1: process {i} on host {rec['host']} differs from process 0 on host "
          f"{records[0]['host']} in {', '.join(differ)} ({detail}). Give every host the same dataset copy, "
          "config and code.")
