"""Helper processes (grain workers) that exit when the process that started them dies.

grain workers ignore SIGTERM on purpose (mmrs/data/pipeline.py: a preemption notice must not kill them before the
training process saves). But when the training process itself dies without stopping them (kill -9, an OOM kill),
they are orphaned: they keep the task's stdout open (srun waits 60 s, "Abandoning IO", before it notices the task
ended, while the other tasks sit in a failed collective) and they outlive the job on the node, holding memory.

`exit_with_parent()` starts a daemon thread that ends this process once its parent is gone (its parent pid changes:
reparented to init or a subreaper). Not PR_SET_PDEATHSIG: that fires when the *thread* that started the process
exits, and grain starts its workers from short-lived threads (interleave's make-iterator pool).
"""
from __future__ import annotations

import os
import threading
import time

POLL_S = 0.2


def exit_with_parent(poll_s: float = POLL_S) -> None:
  parent = os.getppid()
  if parent == 1:  # already orphaned before this ran
    os._exit(1)  # pylint: disable=protected-access

  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(1)  # pylint: disable=protected-access  (no cleanup: the parent that would consume it is gone)

  threading.Thread(target=watch, name="mmrs-exit-with-parent", daemon=True).start()
