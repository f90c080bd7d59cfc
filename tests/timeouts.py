"""The one timeout the tests give a child process or a wait: a guard against a hang, never a speed budget. A loaded
2-core machine runs a test many times slower than a quiet one, and a test must not fail because of that (issue 22);
a test that measures time compares runs of one process instead (none asserts a duration)."""
import time

import pytest

HANG_GUARD_S = 1800


def wait_for(predicate, what: str, timeout_s: float = HANG_GUARD_S, poll_s: float = 0.2):
  """Polls `predicate` until it returns something truthy, and returns that; fails the test naming `what` after
  `timeout_s` (a hang guard, as above)."""
  deadline = time.monotonic() + timeout_s
  while not (value := predicate()):
    if time.monotonic() > deadline:
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(poll_s)
  return value
