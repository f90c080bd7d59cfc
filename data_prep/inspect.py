"""Prints what a dataset directory of mmrs shards holds, and checks it.

    python -m data_prep.inspect SHARDS_DIR [--format=text|json] [--limit=N] [--verify]

A summary from manifest.json (source, licence, counts, splits, bands, label sets, converter notes), then one line per
record (shard and index, id, modalities, array shapes and dtypes, label names resolved through the manifest's
`label_sets`, metadata), for the first `--limit` records (0 = all) in manifest order. `--format=json` writes JSON
Lines instead: one {"type": "summary", ...} object, then one {"type": "record", ...} object per record.

Checks, always: every shard the manifest lists opens and holds the number of records the manifest says (a truncated
file fails here). With `--verify`, every record of every shard is read and decoded, not only the printed ones
(ArrayRecord chunks carry hashes, so flipped bytes fail here). A failure exits with status 1 and names the shard
file and the record index.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator

import numpy as np
from absl import app, flags

from launch import cli

from mmrs.data import records


class ShardError(RuntimeError):
  """A shard that cannot be read: the message names the file (and the record index when known)."""


def load_manifest(data_dir: str) -> dict:
  path = os.path.join(data_dir, "manifest.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {data_dir} is not an mmrs dataset directory (written by a "
                            "data_prep converter).")
  with open(path) as f:
    return json.load(f)


def shard_files(manifest: dict) -> list[str]:
  """Shard file names in manifest order (split, group, index)."""
  return [name for groups in manifest.get("splits", {}).values() for names in groups.values() for name in names]


def _open(data_dir: str, name: str, expected: int | None):
  from array_record.python import array_record_module

  path = os.path.join(data_dir, name)
  if not os.path.exists(path):
    raise ShardError(f"{path}: shard listed in manifest.json is missing.")
  try:
    reader = array_record_module.ArrayRecordReader(path, "readahead_buffer_size:0,max_parallelism:0")
  except Exception as e:  # the C++ reader raises RuntimeError/ValueError with riegeli's message
    raise ShardError(f"{path}: cannot open the shard ({e}); it is corrupted or not an ArrayRecord file.") from None
  n = reader.num_records() if reader.ok() else 0
  if not reader.ok() or (expected is not None and n != expected):
    try:
      reader.close()
      detail = ""
    except Exception as e:  # closing a failed reader raises riegeli's reason
      detail = f" ({e})"
    raise ShardError(f"{path}: holds {n} readable records, manifest.json says {expected}; the file is truncated or "
                     f"corrupted{detail}. Re-run the converter.")
  return reader, n


def check_shards(data_dir: str, manifest: dict) -> int:
  """Opens every shard and checks its record count against the manifest; returns the total."""
  per_shard = manifest.get("records_per_shard", {})
  total = 0
  for name in shard_files(manifest):
    reader, n = _open(data_dir, name, per_shard.get(name))
    reader.close()
    total += n
  return total


def iter_records(data_dir: str, manifest: dict, limit: int = 0, meta: bool = True
                 ) -> Iterator[tuple[str, int, dict]]:
  """Yields (shard file, index, decoded record) in manifest order; raises ShardError naming shard and index."""
  per_shard = manifest.get("records_per_shard", {})
  done = 0
  for name in shard_files(manifest):
    reader, n = _open(data_dir, name, per_shard.get(name))
    try:
      for i in range(n):
        if limit and done >= limit:
          return
        try:
          data = reader.read([i])[0]
          rec = records.decode(data, meta=meta)
        except Exception as e:
          raise ShardError(f"{os.path.join(data_dir, name)}: record {i} is unreadable ({type(e).__name__}: {e}); "
                           "the shard is corrupted. Re-run the converter.") from None
        done += 1
        yield name, i, rec
    finally:
      reader.close()


def describe(rec: dict, label_sets: dict) -> dict[str, Any]:
  """A JSON-able summary of one decoded record."""
  arrays = {k: {"shape": list(rec[k].shape), "dtype": str(rec[k].dtype)}
            for k in records.ARRAY_DTYPES if rec.get(k) is not None}
  labels = {}
  for key, value in (rec.get("labels") or {}).items():
    names = (label_sets.get(key) or {}).get("names")
    idx = value if isinstance(value, list) else [value]
    labels[key] = [names[i] if names and isinstance(i, int) and 0 <= i < len(names) else i for i in idx]
  out = {"id": rec["id"], "modalities": list(records.modalities(rec)), "arrays": arrays, "labels": labels}
  for key in ("s2_bands", "s1_bands"):
    if key in rec:
      out[key] = list(rec[key])
  out["meta"] = rec.get("meta", {})
  return out


def summary(data_dir: str, manifest: dict) -> dict[str, Any]:
  per_shard = manifest.get("records_per_shard", {})
  splits = {split: {group: {"shards": len(names), "records": sum(per_shard.get(n, 0) for n in names)}
                    for group, names in groups.items()} for split, groups in manifest.get("splits", {}).items()}
  known = {"format", "source", "licence", "created_by", "args", "label_sets", "counts", "skipped_reasons",
           "skipped_items", "splits", "records_per_shard", "bands", "stats_from_split"}
  return {"dir": os.path.abspath(data_dir), "format": manifest.get("format"), "source": manifest.get("source"),
          "licence": manifest.get("licence"), "created_by": manifest.get("created_by"),
          "counts": manifest.get("counts", {}), "skipped_reasons": manifest.get("skipped_reasons", {}),
          "splits": splits, "bands": manifest.get("bands", {}),
          "label_sets": {k: {"kind": v.get("kind"), "classes": len(v.get("names", []))}
                         for k, v in manifest.get("label_sets", {}).items()},
          "notes": {k: v for k, v in manifest.items() if k not in known}}


def _kv(d: dict) -> str:
  return " ".join(f"{k}={v}" for k, v in d.items())


def format_summary_text(s: dict) -> str:
  lines = [f"dataset {s['dir']}  ({s['format']}, created by {s['created_by']})",
           f"source: {s['source']}  licence: {s['licence']}",
           f"counts: {_kv(s['counts'])}"]
  if s["skipped_reasons"]:
    lines.append(f"skipped: {_kv(s['skipped_reasons'])}")
  for split, groups in s["splits"].items():
    lines.append(f"split {split}: " + ", ".join(f"{g} {v['records']} records in {v['shards']} shards"
                                                for g, v in groups.items()))
  for m, b in s["bands"].items():
    lines.append(f"bands {m}: {','.join(b)}")
  for k, v in s["label_sets"].items():
    lines.append(f"labels {k}: {v['kind']}, {v['classes']} classes")
  for k, v in s["notes"].items():
    lines.append(f"{k}: {json.dumps(v, sort_keys=True)}")
  return "\n".join(lines)


def format_record_text(shard: str, index: int, d: dict) -> str:
  arrays = " ".join(f"{k}={tuple(v['shape'])}:{v['dtype']}" for k, v in d["arrays"].items())
  labels = " ".join(f"{k}=[{'; '.join(map(str, v))}]" for k, v in d["labels"].items()) or "-"
  meta = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(d["meta"].items()) if k != "id")
  return (f"[{shard.removesuffix('.array_record')} #{index}] {d['id']} {'+'.join(d['modalities'])} {arrays} "
          f"labels: {labels} meta: {meta}")


def inspect(data_dir: str, out=sys.stdout, fmt: str = "text", limit: int = 20, verify: bool = False) -> int:
  """Prints the summary and records; returns the number of records printed. Raises ShardError on corruption."""
  manifest = load_manifest(data_dir)
  check_shards(data_dir, manifest)
  s = summary(data_dir, manifest)
  label_sets = manifest.get("label_sets", {})
  print(json.dumps({"type": "summary", **s}, sort_keys=True) if fmt == "json" else format_summary_text(s), file=out)
  printed = 0
  for shard, i, rec in iter_records(data_dir, manifest, 0 if verify else limit):
    if limit and printed >= limit:
      continue  # --verify: keep decoding, stop printing
    d = describe(rec, label_sets)
    if fmt == "json":
      print(json.dumps({"type": "record", "shard": shard, "index": i, **d}, sort_keys=True, default=_jsonable),
            file=out)
    else:
      print(format_record_text(shard, i, d), file=out)
    printed += 1
  return printed


def _jsonable(x):
  return x.tolist() if isinstance(x, np.ndarray) else str(x)


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_enum("format", "text", ["text", "json"], "text, or JSON Lines (a summary object, then records).")
  flags.DEFINE_integer("limit", 20, "Print at most this many records (0 = all).")
  flags.DEFINE_bool("verify", False, "Read and decode every record of every shard, not only the printed ones.")


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("Usage: python -m data_prep.inspect SHARDS_DIR [--format=text|json] [--limit=N] [--verify]")
  try:
    inspect(argv[1], fmt=FLAGS.format, limit=FLAGS.limit, verify=FLAGS.verify)
  except (ShardError, FileNotFoundError, records.RecordError) as e:
    cli.fail(f"inspect: {e}")
  except BrokenPipeError:  # `| head`
    return 0
  return 0


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
