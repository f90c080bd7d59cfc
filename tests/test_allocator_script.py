"""launch/allocator.sh (sourced by launch/demo.sh): the training process gets jemalloc with retained pages where the
library is installed, the system allocator otherwise or with MMRS_ALLOCATOR=system, and a bad value is an error."""
import os
import pathlib
import subprocess

import pytest

from timeouts import HANG_GUARD_S

ROOT = pathlib.Path(__file__).resolve().parents[1]
RETAIN = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
PRINT_ALLOCATOR = ("import os; maps = open('/proc/self/maps').read(); "
                   "print(os.environ.get('LD_PRELOAD', '-'), os.environ.get('MALLOC_CONF', '-'), 'jemalloc' in maps)")


def _run(cmd: str, **env: str) -> subprocess.CompletedProcess:
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "MMRS_ALLOCATOR",
                                                          "MMRS_JEMALLOC")}
  return subprocess.run(["bash", "-c", f"source launch/allocator.sh && with_allocator {cmd}"], cwd=ROOT,
                        capture_output=True, text=True, env={**base, **env}, timeout=HANG_GUARD_S)


def test_jemalloc_is_loaded_into_the_process_with_retained_pages():
  lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
  if not os.path.exists(lib):
    pytest.skip("libjemalloc2 is not installed here")
  out = _run(f'python3 -c "{PRINT_ALLOCATOR}"', MMRS_JEMALLOC=lib)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [lib, RETAIN, "True"]  # preloaded, configured, and really mapped


def test_system_allocator_when_asked_or_missing_and_a_bad_value_is_named(tmp_path):
  code = f'python3 -c "{PRINT_ALLOCATOR}"'
  assert _run(code, MMRS_ALLOCATOR="system").stdout.split() == ["-", "-", "False"]
  missing = _run(code, MMRS_JEMALLOC=str(tmp_path / "nope.so"))
  assert missing.returncode == 0 and missing.stdout.split() == ["-", "-", "False"]
  assert "not found" in missing.stderr and "MMRS_ALLOCATOR=system" in missing.stderr
  kept = _run("printenv MALLOC_CONF", MMRS_JEMALLOC="/bin/true", MALLOC_CONF="narenas:1")  # a user's conf wins
  assert kept.stdout.strip() == "narenas:1"
  bad = _run("true", MMRS_ALLOCATOR="tcmalloc")
  assert bad.returncode == 2 and "MMRS_ALLOCATOR=tcmalloc" in bad.stderr
