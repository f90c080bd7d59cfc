"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Every whole-file result, manifest, card and picture mmrs writes goes through here (one implementation instead of
one per module); files written piece by piece (shards, the embeddings GeoTIFF, staged copies) keep their own
`.partial`/`.tmp` + rename. Local paths: a uniquely named temporary file in the same directory, flushed and fsync'ed, then
`os.replace` (atomic on POSIX; two concurrent writers cannot share a temporary). Object-store paths (`gs://...`,
through etils.epath): written beside the target and renamed, the best that store offers.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any, Callable


def _is_remote(path) -> bool:
  return "://" in os.fspath(path)


def _umask() -> int:
  """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


@contextlib.contextmanager
def _replacing(path: str):
  """Yields a temporary file name in `path`'s directory; on success fsyncs it and renames it onto `path`, on error
  removes it (the previous `path`, if any, is untouched)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  stem, suffix = os.path.splitext(os.path.basename(path))
  # The real suffix stays last: savefig and rasterio choose the format from it.
  # Not mkstemp: its 0600 mode would survive the rename; the writer creates the file under the user's umask.
  tmp = os.path.join(directory, f"{stem}.tmp-{uuid.uuid4().hex[:8]}{suffix}")
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # some writers (safetensors' save_file) create their file 0600
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_text(path, text: str) -> str:
  """Writes `text` (UTF-8) to `path` atomically; returns the path as a string."""
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top  (0.2 s; only object stores need it)
    target = epath.Path(path)
    tmp = target.parent / f"{target.name}.tmp"
    tmp.write_text(text)
    tmp.replace(target)
    return os.fspath(path)
  with _replacing(os.fspath(path)) as tmp:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
  return os.fspath(path)


def write_json(path, obj: Any, *, sort_keys: bool = True, allow_nan: bool = True) -> str:
  """`obj` as indented JSON plus a newline (the layout every mmrs JSON file has)."""
  return write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


def write_with(path, save: Callable[[str], Any]) -> str:
  """Atomic write for libraries that save to a file name (PIL, matplotlib, safetensors): save(tmp) then rename.

  The temporary keeps `path`'s extension. An object-store path: saved to a local temporary folder, then uploaded
  beside the target and renamed (these libraries write local files only).
  """
  path = os.fspath(path)
  if _is_remote(path):
    import shutil  # pylint: disable=g-import-not-at-top
    import tempfile  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    target = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="mmrs_upload_") as folder:
      local = os.path.join(folder, target.name)
      save(local)
      tmp = target.parent / f"{target.name}.tmp"
      with open(local, "rb") as src, tmp.open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)  # streamed: weights can be gigabytes
      tmp.replace(target)
    return path
  with _replacing(path) as tmp:
    save(tmp)
  return path


def makedirs(path) -> None:
  """os.makedirs(path, exist_ok=True) for a local path; an object store has no folders to create (os.makedirs would
  make a local folder named "gs:")."""
  if not _is_remote(path):
    os.makedirs(os.fspath(path), exist_ok=True)


def read_text(path) -> str:
  """A local or object-store file's text (FileNotFoundError when it is absent)."""
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).read_text()
  with open(os.fspath(path), encoding="utf-8") as f:
    return f.read()


def read_bytes(path) -> bytes:
  if _is_remote(path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return epath.Path(path).read_bytes()
  with open(os.fspath(path), "rb") as f:
    return f.read()
