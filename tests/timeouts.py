"""The one timeout the tests give a child process or a wait: a guard against a hang, never a speed budget. A loaded
2-core machine runs a test many times slower than a quiet one, and a test must not fail because of that (issue 22);
a test that measures time compares runs of one process instead (none asserts a duration)."""
HANG_GUARD_S = 1800
