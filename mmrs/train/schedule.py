"""Which task trains at a step (alternating-task training): a pure function of the step, so a resumed run replays
exactly the tasks of an uninterrupted one.

"alternate": tasks in turn (t0, t1, t0, t1, ...). "weighted": integer weights {task: w} give a cycle of sum(w) steps
in which each task appears w times, spread out evenly (smooth weighted round-robin, e.g. {a: 3, b: 1} -> a a b a).
"""
from __future__ import annotations

from typing import Mapping, Sequence

KINDS = ("alternate", "weighted")


class TaskSchedule:

  def __init__(self, task_names: Sequence[str], kind: str = "alternate", weights: Mapping[str, int] | None = None):
    self.task_names = tuple(task_names)
    if not self.task_names:
      raise ValueError("The method has no tasks to train.")
    if kind not in KINDS:
      raise ValueError(f"config.task_schedule={kind!r}: choose one of {KINDS}.")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(self.task_names))
    if unknown:
      raise ValueError(f"config.task_weights names unknown task(s) {unknown}; this method's tasks are "
                       f"{list(self.task_names)}.")
    if kind == "alternate":
      self.cycle = tuple(range(len(self.task_names)))
    else:
      w = [weights.get(n, 1) for n in self.task_names]
      if any(not isinstance(x, int) or x < 0 for x in w) or sum(w) == 0:
        raise ValueError(f"config.task_weights={weights}: weights must be non-negative integers, not all zero.")
      self.cycle = _smooth_round_robin(w)

  def task_index(self, step: int) -> int:
    return self.cycle[step % len(self.cycle)]

  def task_name(self, step: int) -> str:
    return self.task_names[self.task_index(step)]


def _smooth_round_robin(weights: Sequence[int]) -> tuple[int, ...]:
  total, current, out = sum(weights), [0] * len(weights), []
  for _ in range(total):
    current = [c + w for c, w in zip(current, weights)]
    best = max(range(len(weights)), key=lambda i: (current[i], -i))
    current[best] -= total
    out.append(best)
  return tuple(out)
