"""Reads a converted dataset back for the converter tests: every record of one split, through the manifest."""
import json
import os

from array_record.python import array_record_module

from mmrs.data import records


def read_split(out: str, split: str = "train") -> dict[str, dict]:
  """Record id -> the decoded record (with its metadata) plus "group", the shard group (e.g. "pairs") it was in."""
  with open(os.path.join(out, "manifest.json")) as f:
    groups = json.load(f)["splits"].get(split, {})
  recs = {}
  for group, files in sorted(groups.items()):
    for fn in files:
      reader = array_record_module.ArrayRecordReader(os.path.join(out, fn))
      for blob in reader.read_all():
        rec = records.decode(blob, meta=True)
        recs[rec["id"]] = dict(rec, group=group)
      reader.close()
  return recs
