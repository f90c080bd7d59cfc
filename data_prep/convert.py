"""The shared driver of every converter: parallel, ordered (so output is deterministic), with progress and ETA,
and `--on_bad=fail|skip` handling. A converter supplies a list of items and a picklable `build(item)` that
returns a list of (split, record) pairs or raises `BadInput` for a data problem. `parse_split_spec` / `split_of`
implement the shared `--split=train | hash:0.8,0.1,0.1` option (stable hash of the record id).
"""
from __future__ import annotations

import hashlib
import importlib
import multiprocessing
import os
import sys
import time
from typing import Callable, Sequence

from absl import flags, logging

from mmrs.data.writer import DatasetWriter
from mmrs.data import records
from mmrs.data import shard_groups as shard_groups_lib


class BadInput(ValueError):
  """A data problem in one item (missing band file, wrong shape/dtype, NaN in S1, all-zero S2, ...)."""


class ConversionError(RuntimeError):
  pass


def define_common_flags():
  """Flags every converter has. Call at import time of the converter's __main__ module."""
  flags.DEFINE_string("out", None, "Output dataset directory (replaced atomically when the conversion succeeds).")
  flags.DEFINE_integer("num_shards", 4, "ArrayRecord shards per split and modality group.")
  flags.DEFINE_enum("on_bad", "fail", ["fail", "skip"], "Bad input: stop with an error, or skip and count it.")
  flags.DEFINE_integer("workers", min(8, os.cpu_count() or 1), "Parallel reader processes (0 = in-process).")
  flags.DEFINE_integer("shard_groups", 0, "G shard groups recorded in the manifest: the training pipeline's default "
                       "data.<name>.shard_groups, with which a pod host stages and reads only its groups' shards "
                       "(mmrs/data/shard_groups.py); --num_shards must be a multiple of G. 0: not recorded.")
  flags.mark_flag_as_required("out")


def run_cli(module: str, function: str, **kwargs):
  """A converter's `main`: calls `data_prep.<module>.<function>(**kwargs)` through the package module (so spawned
  workers unpickle `data_prep.<module>.build`, not `__main__.build`) and turns a data or usage error into a one-line
  message and a non-zero exit instead of a traceback. The common `--shard_groups` goes to every converter (each
  hands it to its DatasetWriter); a `--num_shards` it does not divide is refused before any input is read."""
  mod = importlib.import_module(f"data_prep.{module}")
  if "shard_groups" in flags.FLAGS and "shard_groups" not in kwargs:
    kwargs["shard_groups"] = flags.FLAGS.shard_groups
  try:
    if kwargs.get("shard_groups") and "num_shards" in kwargs:
      shard_groups_lib.check_shard_count(int(kwargs["num_shards"]), int(kwargs["shard_groups"]),
                                         f"--num_shards={kwargs['num_shards']}: every split and modality group")
    return getattr(mod, function)(**kwargs)
  except (ValueError, FileNotFoundError, FileExistsError, ConversionError) as e:
    from launch import cli  # pylint: disable=g-import-not-at-top
    cli.fail(f"data_prep.{module}: {e}")


def _safe_build(args):
  build, item = args
  try:
    return ("ok", item, build(item))
  except (BadInput, records.RecordError) as e:
    return ("bad", item, str(e))
  except Exception as e:  # corrupted files surface as library errors (rasterio, json, ...): name the item
    return ("bad", item, f"{type(e).__name__}: {e}")


def _item_name(item) -> str:
  return item if isinstance(item, str) else getattr(item, "name", None) or str(item)


class Progress:
  def __init__(self, total: int, desc: str, every_s: float = 5.0):
    self.total, self.desc, self.every_s = total, desc, every_s
    self.start = self.last = time.time()

  def update(self, done: int, writer: DatasetWriter, force: bool = False):
    now = time.time()
    if not force and now - self.last < self.every_s:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else 0.0
    c = writer._counts
    pairs = sum(v for (_, g), v in c.items() if g == "paired")
    logging.info("%s: %d/%d items (%.1f/s, ETA %s) records=%d pairs=%d skipped=%d", self.desc, done, self.total,
                 rate, time.strftime("%H:%M:%S", time.gmtime(eta)), sum(c.values()), pairs,
                 sum(writer.skipped.values()))


def run(items: Sequence, build: Callable, writer: DatasetWriter, *, on_bad: str = "fail", workers: int = 0,
        desc: str = "convert", on_record: Callable[[str, dict], None] | None = None) -> dict:
  """Builds every item (in parallel, results in input order), writes the records, commits; returns the manifest.

  `on_record(split, record)` is called in this process for every record written (e.g. to count label
  statistics into the dicts given to the writer as `extra` / `extra_counts`).
  """
  if on_bad not in ("fail", "skip"):
    raise ValueError(f"on_bad must be 'fail' or 'skip', got {on_bad!r}.")
  progress = Progress(len(items), desc)
  pool = None
  with writer:
    try:
      jobs = [(build, item) for item in items]
      if workers and len(items) > 1:
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(items)))
        results = pool.imap(_safe_build, jobs, chunksize=max(1, min(16, len(items) // (4 * workers) or 1)))
      else:
        results = map(_safe_build, jobs)
      for done, (status, item, out) in enumerate(results, 1):
        if status == "ok":
          for split, record in out:
            try:
              writer.add(record, split)
            except records.RecordError as e:
              status, out = "bad", str(e)
              break
            if on_record is not None:
              on_record(split, record)
        if status == "bad":
          if on_bad == "fail":
            raise ConversionError(f"Bad input in {_item_name(item)}: {out}. Fix or remove it, or rerun with "
                                  "--on_bad=skip to skip such items and count them in manifest.json.")
          writer.skip(_item_name(item), out)
        progress.update(done, writer)
      progress.update(len(items), writer, force=True)
      manifest = writer.close()
    finally:
      if pool is not None:
        pool.terminate()
  c = manifest["counts"]
  print(f"{desc}: wrote {c['records']} records (pairs={c['pairs']}, s1_only={c['s1_only']}, "
        f"s2_only={c['s2_only']}, skipped={c['skipped']}) to {writer.out_dir}", file=sys.stderr)
  return manifest


def resolve_splits_dir(splits_dir: str | None, find: Callable[[], str | None], holds: str) -> str | None:
  """The --splits_dir flag of the converters with published split lists: "auto" -> find() (None where the lists are
  not found: --split decides), "" or "none" -> None, anything else must be a folder (`holds`: what it should hold,
  named in the error)."""
  if splits_dir == "auto":
    return find()
  if splits_dir in (None, "", "none"):
    return None
  if not os.path.isdir(splits_dir):
    raise ValueError(f"--splits_dir={splits_dir} is not a directory (use auto, none, or the folder holding {holds}).")
  return splits_dir


def parse_split_spec(spec: str) -> tuple[str, ...] | tuple[tuple[str, float], ...]:
  """'train' -> ('train',) (everything in one split); 'hash:0.8,0.1,0.1' -> (('train', .8), ('val', .1),
  ('test', .1)); 'hash:train=0.9,val=0.1' names the splits. Fractions must sum to 1."""
  spec = spec.strip()
  if not spec.startswith("hash:"):
    if not spec or not spec.replace("_", "").isalnum():
      raise ValueError(f"--split={spec!r}: give a split name (e.g. 'train') or 'hash:0.8,0.1,0.1'.")
    return (spec,)
  parts = [p.strip() for p in spec[len("hash:"):].split(",") if p.strip()]
  default_names = ("train", "val", "test")
  if not parts or (len(parts) > 3 and any("=" not in p for p in parts)):
    raise ValueError(f"--split={spec!r}: give 1-3 fractions ('hash:0.8,0.1,0.1') or named ones "
                     "('hash:train=0.9,val=0.1').")
  out = []
  for i, p in enumerate(parts):
    name, _, frac = p.rpartition("=") if "=" in p else (default_names[i], "", p)
    try:
      f = float(frac)
    except ValueError:
      raise ValueError(f"--split={spec!r}: {frac!r} is not a fraction.") from None
    if not 0 <= f <= 1:
      raise ValueError(f"--split={spec!r}: fraction {f} is outside [0, 1].")
    out.append((name.strip(), f))
  if abs(sum(f for _, f in out) - 1.0) > 1e-6:
    raise ValueError(f"--split={spec!r}: the fractions sum to {sum(f for _, f in out)}, not 1.")
  return tuple(out)


def split_of(record_id: str, spec) -> str:
  """The split of a record under a parsed spec: stable (sha256 of the id), independent of order and machine."""
  if len(spec) == 1 and isinstance(spec[0], str):
    return spec[0]
  u = int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "big") / 2.0**64
  acc = 0.0
  for name, frac in spec:
    acc += frac
    if u < acc:
      return name
  return spec[-1][0]


class PublishedCounts(dict):
  """The manifest's `published` section: the split sizes a full copy of a dataset has (with the source that says
  so), what this conversion found, and a warning for each split that came out smaller, so a partial download or a
  truncated split list is visible in manifest.json rather than discovered at evaluation time.

  It is a dict, given to DatasetWriter as `extra={"published": ...}` and updated while records are written (the
  writer reads it at close). `found[split]` counts what `count` / `set_found` report (records, or chips for a
  tiled dataset); `listed` optionally holds what the split lists or metadata named, to tell a short list from
  missing files.
  """

  def __init__(self, expected: dict[str, int], source: str, unit: str = "records",
               listed: dict[str, int] | None = None):
    super().__init__(unit=unit, source=source, expected=dict(expected), found={s: 0 for s in expected},
                     warnings=[])
    if listed is not None:
      self["listed"] = dict(listed)
    self._update()

  def count(self, split: str, n: int = 1) -> None:
    self.set_found(split, self["found"].get(split, 0) + n)

  def set_found(self, split: str, n: int) -> None:
    if split in self["expected"]:
      self["found"][split] = n
      self._update()

  def _update(self) -> None:
    unit, listed = self["unit"], self.get("listed", {})
    warnings = []
    for split, want in self["expected"].items():
      got = self["found"][split]
      if got < want:
        where = f" ({listed[split]} listed)" if split in listed else ""
        warnings.append(f"{split}: {got} {unit} found{where}, {want} published: not the full dataset")
      elif split in listed and listed[split] != want:
        warnings.append(f"{split}: the source lists {listed[split]} {unit}, {want} published: another release?")
    self["warnings"] = warnings

  def log(self, name: str) -> None:
    for w in self["warnings"]:
      logging.warning("%s: %s (published: %s)", name, w, self["source"])
