"""The record format: one record = one place, with S1, S2 or both, raw dtypes, optional labels and metadata.

Bytes layout (no TensorFlow, no protobuf; decoding is one small JSON parse plus zero-copy `np.frombuffer` views):

    b"MMRS" | uint8 version | uint32 header_len (little endian) | header JSON (utf-8) | pad to 8 | array bytes ...

The header holds the id, band names, labels and, per array, dtype/shape/offset. Metadata (coordinates, CRS,
acquisition times, source, licence) is a second JSON blob, parsed only when asked for (`decode(..., meta=True)`),
so the training path never pays for it.

Arrays: `s2` (H, W, C) uint16 reflectance x 1e4; `s1` (H, W, 2) float32 dB (non-finite / no-data replaced by
`bands.S1_NODATA_FILL_DB` and flagged in `s1_valid` (H, W) uint8, present only when something was replaced);
`mask` (H, W) int16 segmentation labels with -1 = ignore.
S1 no-data: a record whose S1 has more than `MAX_S1_NODATA_FRACTION` no-data pixels counts as S1-missing (the
converters drop its S1 and keep the record S2-only; the pipeline treats such S1 as absent). Below that, `s1_valid`
travels through the pipeline with the pixels: normalization sets invalid pixels to 0 and every reconstruction loss
leaves them out.
Labels: a dict such as {"corine43": [3, 17], "ben19": [2, 11], "class": 4} (lists of class indices, or an int).
"""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from mmrs import bands as bands_lib

MAGIC = b"MMRS"
VERSION = 1
ARRAY_DTYPES = {"s2": np.uint16, "s1": np.float32, "s1_valid": np.uint8, "mask": np.int16}
_PREFIX = struct.Struct("<4sBI")
# More S1 no-data than this (fraction of pixels) and the record's S1 counts as missing: with half the scene filled,
# the encoder would mostly see the fill value and the loss would rest on a few pixels.
MAX_S1_NODATA_FRACTION = 0.5


class RecordError(ValueError):
  """A record that cannot be decoded or fails validation; the message says which and why."""


def encode(record: dict[str, Any]) -> bytes:
  """Serializes a record dict (keys: id, s2, s2_bands, s1, s1_bands, s1_valid, mask, labels, meta)."""
  rid = str(record.get("id", ""))
  if not rid:
    raise RecordError("A record needs a non-empty 'id'.")
  header: dict[str, Any] = {"id": rid, "arrays": {}, "labels": record.get("labels") or {}}
  for key in ("s2_bands", "s1_bands"):
    if record.get(key) is not None:
      header[key] = list(record[key])
  blobs, offset = [], 0
  for key, dtype in ARRAY_DTYPES.items():
    arr = record.get(key)
    if arr is None:
      continue
    arr = np.asarray(arr)
    if arr.dtype != dtype:
      raise RecordError(f"Record {rid}: array {key!r} must be {np.dtype(dtype).name}, got {arr.dtype}.")
    data = np.ascontiguousarray(arr).tobytes()
    header["arrays"][key] = {"dtype": np.dtype(dtype).str, "shape": list(arr.shape), "offset": offset}
    blobs.append(data)
    offset += len(data)
  meta = json.dumps(record.get("meta") or {}, sort_keys=True, separators=(",", ":")).encode()
  header["meta_offset"] = offset
  header["meta_len"] = len(meta)
  blobs.append(meta)
  hdr = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
  pad = (-(_PREFIX.size + len(hdr))) % 8
  return b"".join([_PREFIX.pack(MAGIC, VERSION, len(hdr)), hdr, b" " * pad, *blobs])


def decode(data: bytes, meta: bool = False) -> dict[str, Any]:
  """Returns the record dict; arrays are read-only views into `data`. Raises RecordError on corruption."""
  if len(data) < _PREFIX.size:
    raise RecordError(f"Record is truncated ({len(data)} bytes).")
  magic, version, hdr_len = _PREFIX.unpack_from(data)
  if magic != MAGIC or version != VERSION:
    raise RecordError(f"Not an mmrs record (magic {magic!r}, version {version}).")
  body_start = _PREFIX.size + hdr_len
  body_start += (-body_start) % 8
  try:
    header = json.loads(data[_PREFIX.size:_PREFIX.size + hdr_len])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RecordError(f"Record header is corrupted: {e}") from None
  out: dict[str, Any] = {"id": header["id"], "labels": header.get("labels", {})}
  for key in ("s2_bands", "s1_bands"):
    if key in header:
      out[key] = tuple(header[key])
  buf = memoryview(data)
  for key, spec in header["arrays"].items():
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"]))
    start = body_start + spec["offset"]
    if start + count * dtype.itemsize > len(data):
      raise RecordError(f"Record {header['id']}: array {key!r} is truncated.")
    out[key] = np.frombuffer(buf, dtype, count, start).reshape(spec["shape"])
  if meta:
    start = body_start + header["meta_offset"]
    out["meta"] = json.loads(bytes(buf[start:start + header["meta_len"]]) or b"{}")
  return out


def modalities(record: dict[str, Any]) -> tuple[str, ...]:
  return tuple(m for m in ("s1", "s2") if record.get(m) is not None)


def s1_nodata_fraction(record: dict[str, Any]) -> float:
  """Fraction of the record's S1 pixels flagged invalid in `s1_valid` (0 when there is no mask)."""
  sv = record.get("s1_valid")
  return 0.0 if sv is None or not sv.size else 1.0 - float(np.count_nonzero(sv)) / sv.size


def clean_s1(s1_db: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
  """Replaces non-finite S1 values (NaN, and -inf dB = 0 in linear power, the usual no-data).

  Returns (float32 array with fills, uint8 validity mask or None when everything was valid).
  """
  s1 = np.asarray(s1_db, np.float32)
  valid = np.isfinite(s1)
  if valid.all():
    return s1, None
  s1 = np.where(valid, s1, np.float32(bands_lib.S1_NODATA_FILL_DB)).astype(np.float32)
  return s1, valid.all(axis=-1).astype(np.uint8)


def validate(record: dict[str, Any], max_invalid_s1_fraction: float = MAX_S1_NODATA_FRACTION) -> list[str]:
  """Problems that make a record unusable for training (empty list = fine). Used by converters and pipelines."""
  rid = record.get("id", "?")
  problems = []
  s1, s2 = record.get("s1"), record.get("s2")
  if s1 is None and s2 is None:
    problems.append(f"{rid}: has neither S1 nor S2")
  if s2 is not None:
    if s2.ndim != 3:
      problems.append(f"{rid}: S2 must be (H, W, C), got shape {s2.shape}")
    elif record.get("s2_bands") is not None and s2.shape[-1] != len(record["s2_bands"]):
      problems.append(f"{rid}: S2 has {s2.shape[-1]} channels but {len(record['s2_bands'])} band names")
    if s2.dtype != np.uint16:
      problems.append(f"{rid}: S2 dtype must be uint16, got {s2.dtype}")
    elif not s2.any():
      problems.append(f"{rid}: S2 scene is all zero (no data)")
  if s1 is not None:
    if s1.ndim != 3 or s1.shape[-1] != 2:
      problems.append(f"{rid}: S1 must be (H, W, 2) VV/VH, got shape {s1.shape}")
    if s1.dtype != np.float32:
      problems.append(f"{rid}: S1 dtype must be float32 dB, got {s1.dtype}")
    elif not np.isfinite(s1).all():
      problems.append(f"{rid}: S1 has NaN/inf values (clean them with records.clean_s1 first)")
    sv = record.get("s1_valid")
    if sv is not None and (1.0 - sv.mean()) > max_invalid_s1_fraction:
      problems.append(f"{rid}: {100 * (1 - sv.mean()):.0f}% of S1 pixels are no-data")
  if s1 is not None and s2 is not None and s1.shape[:2] != s2.shape[:2]:
    problems.append(f"{rid}: S1 grid {s1.shape[:2]} differs from S2 grid {s2.shape[:2]}")
  mask = record.get("mask")
  if mask is not None:
    ref = s2 if s2 is not None else s1
    if ref is not None and mask.shape != ref.shape[:2]:
      problems.append(f"{rid}: mask shape {mask.shape} differs from image grid {ref.shape[:2]}")
  return problems
