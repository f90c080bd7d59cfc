"""Reads only the rows a crop needs from uncompressed ArrayRecord shards (`data.read="crop"`, the default).

Reading a record through ArrayRecord copies all of it (and hashes it) before the 128 px crop of a 264 px SSL4EO
record keeps 24 % of its pixels: ~1 ms of a ~1.7 ms record (benchmarks/data_throughput.py). An uncompressed shard
(data_prep's default) stores each record's bytes verbatim, so this reader goes to the file itself:

- riegeli layout: the file is 64 KiB blocks, each starting with a 24-byte block header; removing them gives the
  "logical" stream of chunks (40-byte chunk header, then data). `group_size:1` writes one record per chunk, a simple
  chunk: compression byte (0 = none), varint size of the sizes, the sizes, then the record's bytes.
- `ShardIndex` walks the chunk headers once per shard at open (one 40-byte read per record) and keeps where each
  record's bytes start; anything else (a compressed shard, another chunk type) is refused, so the pipeline falls
  back to ArrayRecord's reader.
- a record read is one small read of its prefix + header JSON (records.py layout), then `LazyArray`s: slicing rows
  [top, top+h) of an (H, W, C) array reads just those rows with one `preadv` that scatters the block headers into a
  scratch buffer. The pixels a crop needs arrive in one copy, before any dtype conversion; the crop's columns,
  flips and rot90 are views of it (mmrs.data.transforms).

What it does not do: verify riegeli's chunk hashes (ArrayRecord does on every read). Staged copies are sha256-checked
against the manifest (mmrs.data.staging); structure damage (magic, header JSON, sizes) still raises RecordError.
"""
from __future__ import annotations

import json
import math
import os
import struct
import threading

import numpy as np

from mmrs.data import records

BLOCK = 1 << 16
BLOCK_HEADER = 24
USABLE = BLOCK - BLOCK_HEADER
CHUNK_HEADER = 40
_HEAD_GUESS = 4096  # prefix + header JSON of a record fit in one read usually
_SCRATCH = bytearray(BLOCK_HEADER)  # block headers land here (never read; shared by all threads)


class NotCropReadable(ValueError):
  """The shard is not laid out as this reader expects (compressed, grouped, ...); use ArrayRecord's reader."""


def physical(logical: int) -> int:
  """File offset of a logical byte (block headers removed)."""
  return logical + BLOCK_HEADER * (logical // USABLE + 1)


def _segments(logical: int, size: int):
  """(file offset, length) pieces of the logical range [logical, logical + size), split at block headers."""
  while size > 0:
    n = min(size, USABLE - logical % USABLE)
    yield physical(logical), n
    logical += n
    size -= n


def read_logical(fd: int, logical: int, out: memoryview) -> None:
  """Fills `out` with the logical bytes starting at `logical`, in one preadv (block headers into scratch)."""
  buffers, offset, pos = [], None, 0
  for start, n in _segments(logical, len(out)):
    if offset is None:
      offset = start
    elif start != prev_end:  # a block header between two pieces
      buffers.append(memoryview(_SCRATCH)[:start - prev_end])
    buffers.append(out[pos:pos + n])
    pos += n
    prev_end = start + n
  if offset is None:
    return
  got = os.preadv(fd, buffers, offset)
  if got != sum(len(b) for b in buffers):
    raise records.RecordError(f"short read ({got} bytes) at logical offset {logical}: the shard is truncated")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    b = data[pos]
    value |= (b & 0x7F) << shift
    pos += 1
    if b < 0x80:
      return value, pos
    shift += 7


class ShardIndex:
  """Where each record's bytes start in one uncompressed ArrayRecord shard (group_size:1)."""

  def __init__(self, path: str, num_records: int):
    self.path = path
    self._fd = -1
    self._fd = os.open(path, os.O_RDONLY)
    try:
      self.starts, self.sizes = self._walk(num_records)
    except Exception:
      self.close()
      raise

  @property
  def fd(self) -> int:
    return self._fd

  def _read(self, logical: int, n: int) -> bytes:
    buf = bytearray(n)
    read_logical(self._fd, logical, memoryview(buf))
    return bytes(buf)

  def _walk(self, num_records: int):
    file_size = os.fstat(self._fd).st_size
    starts, sizes = np.zeros(num_records, np.int64), np.zeros(num_records, np.int64)
    pos, i = 0, 0
    while i < num_records:
      if physical(pos) + CHUNK_HEADER > file_size:
        raise NotCropReadable(f"{self.path}: {i} records found, {num_records} expected")
      header = self._read(pos, CHUNK_HEADER)
      data_size, = struct.unpack_from("<Q", header, 8)
      kind, count = header[24], int.from_bytes(header[25:32], "little")
      if kind == ord("r"):
        if count != 1:
          raise NotCropReadable(f"{self.path}: a chunk holds {count} records (not group_size:1)")
        head = self._read(pos + CHUNK_HEADER, min(data_size, 32))
        if head[0] != 0:
          raise NotCropReadable(f"{self.path}: compressed chunks (compression type {head[0]})")
        sizes_size, p = _varint(head, 1)
        size, _ = _varint(head, p)
        starts[i] = pos + CHUNK_HEADER + p + sizes_size
        sizes[i] = size
        i += 1
      elif kind not in (ord("s"), ord("p")):  # signature and padding chunks hold no records
        raise NotCropReadable(f"{self.path}: chunk type {chr(kind)!r} before record {i}")
      pos += CHUNK_HEADER + data_size
    return starts, sizes

  def record(self, i: int) -> dict:
    """The record dict of record i: id, labels, band names, `LazyArray`s (read on slicing)."""
    start, size = int(self.starts[i]), int(self.sizes[i])
    head = self._read(start, min(size, _HEAD_GUESS))
    magic, version, hdr_len = records._PREFIX.unpack_from(head)  # pylint: disable=protected-access
    if magic != records.MAGIC or version != records.VERSION:
      raise records.RecordError(f"Not an mmrs record (magic {magic!r}, version {version}).")
    end = records._PREFIX.size + hdr_len  # pylint: disable=protected-access
    if end > len(head):
      head = self._read(start, min(size, end))
    try:
      header = json.loads(head[records._PREFIX.size:end])  # pylint: disable=protected-access
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise records.RecordError(f"Record header is corrupted: {e}") from None
    body = end + (-end) % 8
    out = {"id": header["id"], "labels": header.get("labels", {})}
    for key in ("s2_bands", "s1_bands"):
      if key in header:
        out[key] = tuple(header[key])
    for key, spec in header["arrays"].items():
      dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
      if body + spec["offset"] + math.prod(shape) * dtype.itemsize > size:
        raise records.RecordError(f"Record {header['id']}: array {key!r} is truncated.")
      arr = LazyArray(self, start + body + spec["offset"], dtype, shape)
      out[key] = arr if len(shape) == 3 or key == "mask" else arr[:]  # small arrays (s1_valid): read whole
    return out

  def close(self) -> None:
    if self._fd >= 0:
      os.close(self._fd)
      self._fd = -1

  __del__ = close  # a dropped pipeline gives its descriptors back (as ArrayRecord's readers do)


class LazyArray:
  """An (H, W[, C]) array in a shard; `a[r0:r1, c0:c1]` reads rows r0..r1 only and returns a view of the columns."""

  def __init__(self, shard: ShardIndex, logical: int, dtype: np.dtype, shape: tuple[int, ...]):
    # Holds its shard (not just the descriptor): the file stays open while a record is in flight.
    self._shard, self._logical, self.dtype, self.shape = shard, logical, dtype, shape
    self.ndim = len(shape)
    self._row_bytes = math.prod(shape[1:]) * dtype.itemsize

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  def __getitem__(self, key):
    rows, cols = (key, slice(None)) if not isinstance(key, tuple) else (key[0], key[1] if len(key) > 1 else slice(None))
    if not isinstance(rows, slice) or rows.step not in (None, 1) or (isinstance(key, tuple) and len(key) > 2):
      raise TypeError(f"LazyArray supports [r0:r1, c0:c1] slicing only, got {key!r}")
    r0, r1, _ = rows.indices(self.shape[0])
    out = np.empty((max(0, r1 - r0),) + self.shape[1:], self.dtype)
    if out.size:
      read_logical(self._shard.fd, self._logical + r0 * self._row_bytes,
                   memoryview(out.reshape(-1).view(np.uint8)))
    return out[:, cols]

  def __array__(self, dtype=None, copy=None):
    del copy
    full = self[:]
    return full if dtype is None else full.astype(dtype)


class CropReadShards:
  """Random access like `sources.ArrayRecordShards` ((shard, index, payload)); payloads are record dicts whose pixel
  arrays are `LazyArray`s. Indexes are built per shard on first use (each grain worker builds its own)."""

  def __init__(self, paths, counts):
    self.paths = [str(p) for p in paths]
    self.names = [os.path.basename(p) for p in self.paths]
    self._counts = [int(c) for c in counts]
    self._ends = np.cumsum(self._counts).tolist()
    self._indexes: dict[int, ShardIndex] = {}
    self._lock = threading.Lock()
    for i in range(len(self.paths)):  # fail early (NotCropReadable: a truncated or other shard) at open
      self._index(i)

  def _index(self, i: int) -> ShardIndex:
    index = self._indexes.get(i)
    if index is None:
      with self._lock:
        index = self._indexes.get(i)
        if index is None:
          index = self._indexes[i] = ShardIndex(self.paths[i], self._counts[i])
    return index

  def __len__(self) -> int:
    return self._ends[-1]

  def __getitem__(self, index):
    index = int(index)
    i = int(np.searchsorted(self._ends, index, side="right"))
    pos = index - (self._ends[i - 1] if i else 0)
    try:
      payload = self._index(i).record(pos)
    except (OSError, records.RecordError, NotCropReadable, KeyError, ValueError) as e:
      payload = e  # on_bad decides
    return self.names[i], pos, payload

  def __getstate__(self):  # file descriptors do not travel to grain workers: they reopen
    state = dict(self.__dict__)
    state["_indexes"], state["_lock"] = {}, None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self):
    return f"CropReadShards({len(self.paths)} files, {len(self)} records)"
