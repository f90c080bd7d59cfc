"""Shard groups: the unit of a host's share of a dataset (the sample order over them: mmrs.data.pipeline).

A dataset's shard files (per split and modality group: paired, s2_only, s1_only) are dealt into G fixed groups:
shard i of each modality group's list goes to group i mod G, so every group gets the same number of files of each
kind (and, as the writer deals records round-robin, the same number of records within one). G divides each list's
length, or the dataset is refused. A global batch of B rows is G blocks of B/G rows; block j reads group j only, in
its own order. A process reads the blocks its rows fall in, so it opens, stages and reads only those groups' files:
with P processes holding contiguous row blocks and P dividing G, each serves G/P groups, disjoint from the others'.

G comes from `data.shard_groups` when set (> 0), else from the manifest's `shard_groups` (`DatasetWriter(...,
shard_groups=G)` records it when the dataset is written), else 1 (one group: today's single global permutation).
The pipeline pins G in its iterator state, so the run's first checkpoint fixes it: a resume with another G is
refused. Only repeating (training) pipelines without an index subset use groups: single passes (evaluation) and
label-fraction subsets read the plain global order.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


class ShardGroupError(ValueError):
  """A shard-group setting the dataset or the batch cannot satisfy; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a global batch maps onto G groups, and which files each group holds."""
  num_groups: int
  files: tuple[tuple[str, ...], ...]  # group j -> its shard file names (modality group by modality group)
  records: tuple[int, ...]  # group j -> its record count (from the manifest)
  rows_per_group: int  # B / G: rows [j*R, (j+1)*R) of every global batch read group j

  def group_of_row(self, row: int) -> int:
    return int(row) // self.rows_per_group

  def served(self, rows: Sequence[int]) -> tuple[int, ...]:
    """The groups the given rows of a global batch read (sorted)."""
    return tuple(sorted({self.group_of_row(r) for r in rows}))

  def files_of(self, groups: Sequence[int]) -> list[str]:
    return [name for j in groups for name in self.files[j]]


def resolve_count(configured: int, manifest: dict, where: str) -> int:
  """G: `data.shard_groups` when > 0, else the manifest's `shard_groups`, else 1."""
  count = int(configured or 0) or int(manifest.get("shard_groups", 0) or 0) or 1
  if count < 1:
    raise ShardGroupError(f"{where}: shard_groups={count} must be >= 1.")
  return count


def check_shard_count(num_shards: int, num_groups: int, what: str) -> None:
  """Refuses a shard count that the groups cannot split evenly (used by the writer and at start-up)."""
  if num_groups > 1 and num_shards % num_groups:
    raise ShardGroupError(
        f"{what} has {num_shards} shard file(s), which {num_groups} shard groups cannot split evenly: every group "
        f"must hold the same number of files. Write the dataset with a multiple of {num_groups} shards "
        f"(data_prep --num_shards; a split with fewer records than shards gets one file per record), or choose "
        f"data.shard_groups as a divisor of {num_shards}.")


def make_layout(manifest: dict, split: str, modality_groups: Sequence[str], num_groups: int,
                global_batch_size: int, where: str) -> Layout:
  """Deals the split's shard files into `num_groups` groups; checks the batch and the shard counts fit them."""
  if global_batch_size % num_groups:
    raise ShardGroupError(f"{where}: config.batch_size={global_batch_size} is not a multiple of the "
                          f"{num_groups} shard groups (each group fills an equal block of rows of every global "
                          "batch); choose a batch size that is, or another data.shard_groups.")
  per_shard = manifest.get("records_per_shard") or {}
  files: list[list[str]] = [[] for _ in range(num_groups)]
  for group in modality_groups:
    names = list(manifest.get("splits", {}).get(split, {}).get(group, []))
    check_shard_count(len(names), num_groups, f"{where} split {split!r} group {group!r}")
    for i, name in enumerate(names):
      files[i % num_groups].append(name)
  missing = [n for fs in files for n in fs if n not in per_shard]
  if num_groups > 1 and missing:
    raise ShardGroupError(f"{where} has no records_per_shard entry for {missing[:3]}: shard groups need the "
                          "record counts of every shard before opening any; regenerate the dataset with data_prep.")
  records = tuple(sum(int(per_shard.get(n, 0)) for n in fs) for fs in files)
  if num_groups > 1 and min(records) == 0:
    raise ShardGroupError(f"{where}: shard group {records.index(0)} of {num_groups} holds no records of split "
                          f"{split!r}; write more records per shard or choose fewer shard groups.")
  return Layout(num_groups, tuple(tuple(f) for f in files), records, global_batch_size // num_groups)


def group_seed(shuffle_seed: int, group: int) -> int:
  """Group j's shuffle seed: its own order is a function of (seed, epoch, group, position)."""
  return int(np.random.SeedSequence([int(shuffle_seed), 0x6A0, int(group)]).generate_state(1)[0])


class RangeSource:
  """Records [start, stop) of a random-access source (one group's files inside the concatenation this process
  opened)."""

  def __init__(self, source, start: int, stop: int):
    self._source, self._start, self._len = source, int(start), int(stop) - int(start)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i):
    i = int(i)
    if not 0 <= i < self._len:
      raise IndexError(i)
    return self._source[self._start + i]

  def __repr__(self):
    return f"RangeSource([{self._start}, {self._start + self._len}) of {self._source!r})"
