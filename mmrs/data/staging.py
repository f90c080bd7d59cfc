"""Data on the pod: copy a remote dataset directory (gs://, or any etils.epath URL) to local disk before reading it.

The open-source ArrayRecord reader reads local files only, so a run whose `data.<name>.shards` is a URL stages the
files it needs first (`pipeline.describe` calls `stage_dataset`):

- what: manifest.json, stats.json, and the shard files of the split and groups the task reads that this process
  serves: with shard groups (mmrs.data.shard_groups) only the files of its groups, ~1/P of the dataset on P hosts;
  with one group (the default) every file, since a process then reads rows of every global batch from any shard.
- quota: `data.<name>.stage_quota_gb` (0 = none) caps what the stage directory may hold for this dataset (the files
  already there plus this process's missing ones); the free disk space is checked as well. A share that does not
  fit fails before any copy, naming the bytes needed and what to do (more hosts or shard groups, a bigger disk, or
  gcsfuse). Files of groups this host no longer serves (a resume on other hosts) are left where they are.
- where: `data.<name>.stage_dir`; empty (the default) = `$MMRS_STAGE_DIR` or `~/.cache/mmrs/staged`, plus a
  subdirectory named after the URL, so two datasets never share files. On a TPU VM use a local SSD / the boot disk;
  "none" reads the URL directly (only readers that support it, e.g. a tfds: spec or a gcsfuse path).
- verified: each file's size against the manifest's `files` entry (data_prep writes `bytes` and `sha256` per shard),
  and its sha256 when the manifest has one. A manifest from before checksums: sizes against the remote files only,
  with a warning. A checksum mismatch deletes the copy and copies again once; a second mismatch is an error that
  names the file.
- resumable and atomic: a file is copied into `NAME.partial`, appended from where an interrupted copy stopped, and
  renamed into place only once verified; the local manifest.json is written last, so a staged directory with a
  manifest holds every file the last staging asked for. A later run that finds the files (same manifest) copies nothing.
- one copier per host: processes sharing a host serialize on a file lock in the stage directory; the first copies,
  the others then find the files ready.
- errors: an unreachable bucket, missing credentials or a missing filesystem package (gs:// needs `gcsfs`:
  `pip install gcsfs`) give one line naming the URL and what to do.

`file://PATH` is treated as a remote URL too (copied through the same code): a dataset on a slow network filesystem
(NFS, a shared drive) staged to fast local disk; the tests use it to exercise the copy path.

Alternative: mount the bucket with gcsfuse (`gcsfuse --implicit-dirs BUCKET /mnt/data`) on every host and set
`data.<name>.shards=/mnt/data/PATH`: no local copy and no disk limit, but every read is a remote read (enable the
gcsfuse file cache for multi-epoch runs).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
from typing import Sequence

from absl import logging
from etils import epath

from mmrs import atomic_io

CHUNK = 8 << 20
_LOCK_NAME = ".mmrs_stage.lock"


class StagingError(RuntimeError):
  """A remote dataset that cannot be staged; the message names the URL/file and what to do."""


def is_remote(shards: str) -> bool:
  """A URL (gs://, s3://, file://, ...) rather than a local path or a tfds: spec."""
  return "://" in shards and not shards.startswith("tfds:")


def _remote_path(url: str) -> epath.Path:
  if url.startswith("file://"):
    return epath.Path(url[len("file://"):])
  return epath.Path(url)


def default_stage_dir(url: str) -> str:
  base = os.environ.get("MMRS_STAGE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mmrs", "staged")
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[1].strip("/"))
  return os.path.join(base, name)


def _unreachable(url: str, what: str, e: Exception) -> StagingError:
  hint = "check the URL and that this host can read it"
  if url.startswith("gs://"):
    hint = ("check the bucket name and credentials (`gcloud auth application-default login`, or a VM service "
            "account with storage read scope); gs:// needs the gcsfs package (`pip install gcsfs`)")
  return StagingError(f"Cannot read {what} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): "
                      f"{hint}. Or stage the data yourself and set data.<name>.shards to a local directory.")


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK), b""):
      h.update(chunk)
  return h.hexdigest()


def _copy_resumable(src: epath.Path, dst: str, size: int) -> int:
  """Appends src[offset:] to dst.partial (offset = what an interrupted copy left); returns the bytes copied now."""
  part = dst + ".partial"
  offset = os.path.getsize(part) if os.path.exists(part) else 0
  if offset > size:  # not a prefix of this file: start over
    os.remove(part)
    offset = 0
  if offset:
    logging.info("Resuming the copy of %s at byte %d of %d.", src, offset, size)
  copied = 0
  with src.open("rb") as fin, open(part, "ab") as fout:
    if offset:
      fin.seek(offset)
    for chunk in iter(lambda: fin.read(CHUNK), b""):
      fout.write(chunk)
      copied += len(chunk)
    fout.flush()
    os.fsync(fout.fileno())
  return copied


def stage_file(src: epath.Path, dst: str, size: int | None, sha256: str | None) -> bool:
  """Copies one file into place, verified (size; sha256 when known). Returns True when it copied anything."""
  if os.path.exists(dst) and (size is None or os.path.getsize(dst) == size):
    return False  # files are renamed into place only after verification
  if size is None:
    size = src.stat().length
  for attempt in range(2):
    _copy_resumable(src, dst, size)
    part = dst + ".partial"
    got = os.path.getsize(part)
    problem = None
    if got != size:
      problem = f"{got} bytes, expected {size}"
    elif sha256 and _sha256(part) != sha256:
      problem = "sha256 differs from the manifest's"
    if problem is None:
      os.replace(part, dst)
      return True
    os.remove(part)
    logging.warning("Staged copy of %s is damaged (%s)%s.", src, problem, "; copying again" if not attempt else "")
  raise StagingError(f"Staging {src} to {dst} failed twice ({problem}): the remote file does not match "
                     "manifest.json (regenerate or re-upload the dataset) or the copy is being corrupted.")


@contextlib.contextmanager
def _host_lock(directory: str):
  """One copier per host: processes on the same host (same stage dir) take turns."""
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _LOCK_NAME), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _files_to_stage(manifest: dict, split: str, groups: Sequence[str]) -> list[str]:
  splits = manifest.get("splits", {})
  return [name for g in groups for name in splits.get(split, {}).get(g, [])]


def read_manifest(url: str) -> tuple[str, dict]:
  """(text, parsed) of `url`/manifest.json; errors name the URL and what to do."""
  root = _remote_path(url)
  try:
    text = (root / "manifest.json").read_text()
  except FileNotFoundError:
    raise StagingError(f"{url}/manifest.json does not exist: data.shards must be a dataset directory written by "
                       "data_prep (upload the whole directory).") from None
  except Exception as e:  # pylint: disable=broad-except  (auth, network, missing filesystem package)
    raise _unreachable(url, f"{url}/manifest.json", e) from None
  try:
    return text, json.loads(text)
  except json.JSONDecodeError as e:
    raise StagingError(f"{url}/manifest.json is not valid JSON ({e}); re-upload the dataset.") from None


def _gb(n: int) -> str:
  return f"{n / 1e9:.3g} GB"


def _check_room(url: str, local: str, names: Sequence[str], files: dict, quota_bytes: int) -> None:
  """Refuses, before copying anything, a share that exceeds the quota or the free disk space."""
  sizes = {n: files.get(n, {}).get("bytes") for n in names}
  if None in sizes.values():
    return  # a manifest without sizes (old data_prep): nothing to check against; the copy itself will tell
  held = {n for n in os.listdir(local) if n in files and os.path.isfile(os.path.join(local, n))}
  missing = sum(int(b) for n, b in sizes.items() if n not in held)
  total = missing + sum(os.path.getsize(os.path.join(local, n)) for n in held)
  what = (f"this process's share of {url} ({len(names)} shard file(s), {_gb(sum(map(int, sizes.values())))}; "
          f"with the {len(held - set(names))} other file(s) staged there before, {_gb(total)})")
  todo = ("Run on more hosts or with more shard groups (data.<name>.shard_groups; a host then stages less), raise "
          "the quota or use a bigger disk, or read through a gcsfuse mount instead.")
  if quota_bytes and total > quota_bytes:
    raise StagingError(f"Staging {what} in {local} would exceed data.<name>.stage_quota_gb "
                       f"({_gb(quota_bytes)}). {todo}")
  free = shutil.disk_usage(local).free
  if missing > free:
    raise StagingError(f"Staging {what} in {local} needs {_gb(missing)} more but the disk has {_gb(free)} free. "
                       f"{todo}")


def stage_dataset(url: str, split: str, groups: Sequence[str], stage_dir: str | None = None,
                  names: Sequence[str] | None = None, quota_bytes: int = 0) -> str:
  """Stages `url` (a dataset directory written by data_prep) for (split, groups); returns the local directory.

  names: the shard files to stage (this process's shard groups); default: every file of (split, groups).
  quota_bytes: the most the stage directory may hold for this dataset (0: no quota). Files the manifest does not
  list for (split, groups) are not copied; the local manifest.json is the remote one, so the reader sees the whole
  dataset description but only opens the staged shards.
  """
  root = _remote_path(url)
  local = stage_dir or default_stage_dir(url)
  manifest_text, manifest = read_manifest(url)
  names = list(_files_to_stage(manifest, split, groups) if names is None else names)
  files = manifest.get("files") or {}
  with _host_lock(local):
    local_manifest = os.path.join(local, "manifest.json")
    if os.path.exists(local_manifest):
      with open(local_manifest) as f:
        if f.read() != manifest_text:  # the remote dataset changed: nothing staged before can be trusted
          logging.warning("%s changed since it was staged in %s: staging it again.", url, local)
          for name in os.listdir(local):
            if name != _LOCK_NAME:
              os.remove(os.path.join(local, name))
    _check_room(url, local, names, files, quota_bytes)
    missing_sums = [n for n in names if "sha256" not in files.get(n, {})]
    if missing_sums:
      logging.warning("%s/manifest.json has no checksums for %d shard file(s) (written before data_prep recorded "
                      "them): staged copies are checked by size only.", url, len(missing_sums))
    copied = 0
    for name in names:
      entry = files.get(name, {})
      try:
        copied += stage_file(root / name, os.path.join(local, name), entry.get("bytes"), entry.get("sha256"))
      except StagingError:
        raise
      except FileNotFoundError:
        raise StagingError(f"{url}/{name} is listed in manifest.json but missing: re-upload the whole dataset "
                           "directory.") from None
      except Exception as e:  # pylint: disable=broad-except
        raise _unreachable(url, f"{url}/{name}", e) from None
    if (root / "stats.json").exists():
      stage_file(root / "stats.json", os.path.join(local, "stats.json"), None, None)
    atomic_io.write_text(local_manifest, manifest_text)  # last: it vouches for the files staged above
  if copied:
    logging.info("Staged %d of %d file(s) of %s (split %s, groups %s) in %s.", copied, len(names), url, split,
                 list(groups), local)
  return local


def resolve(data_cfg, split: str, groups: Sequence[str], names: Sequence[str] | None = None) -> str:
  """`data_cfg.shards`, or the local directory it was staged to (remote URL and `stage_dir` != "none").

  names: the shard files this process reads (default: all of split/groups)."""
  shards = data_cfg.shards
  stage_dir = str(data_cfg.get("stage_dir", "") or "")
  if not is_remote(shards) or stage_dir == "none":
    return shards
  quota = int(float(data_cfg.get("stage_quota_gb", 0) or 0) * 1e9)
  return stage_dataset(shards, split, groups, stage_dir or None, names=names, quota_bytes=quota)
