"""A CPU training run gets jemalloc with retained pages and its CPU's XLA options without the user asking
(launch/cpu_setup.py): the real `python -m launch.main`, stopped by a missing input right after its start-up log."""
import os
import subprocess
import sys

import pytest

from launch import cpu_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JEMALLOC = cpu_setup.jemalloc_path({})


def start(tmp_path, **env):
  """launch.main up to its first user error (shards missing): (exit code, stderr)."""
  env = {**{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF", "MMRS_ALLOCATOR")},
         "JAX_PLATFORMS": "cpu", **env}
  missing = tmp_path / "no_shards_here"
  out = subprocess.run([sys.executable, "-m", "launch.main", f"--config=configs/mae_s2.py:tiny,shards={missing}",
                        f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600, check=False)
  assert out.returncode == 2 and f"shards='{missing}' does not exist" in out.stderr, out.stderr[-2000:]
  return out.stderr


def test_a_cpu_run_reexecutes_itself_under_jemalloc_with_its_arguments(tmp_path):
  if JEMALLOC is None:
    assert os.environ.get("CI") != "true", ".ci/run installs libjemalloc2; it is missing"
    pytest.skip("libjemalloc2 not installed here (apt-get install libjemalloc2)")
  err = start(tmp_path)  # its arguments survived the re-exec: the error names the shards path given
  assert "CPU run: allocator jemalloc (MALLOC_CONF=retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1)" in err, err


def test_opt_out_and_a_missing_library_run_on_the_system_allocator(tmp_path):
  err = start(tmp_path, MMRS_ALLOCATOR="system")
  assert "CPU run: allocator system malloc" in err and "note:" not in err
  err = start(tmp_path, MMRS_JEMALLOC=str(tmp_path / "libjemalloc.so.2"))
  assert "CPU run: allocator system malloc" in err
  assert f"note: MMRS_JEMALLOC={tmp_path / 'libjemalloc.so.2'} does not exist" in err and "apt-get install" in err


def test_only_cpu_runs_are_touched():
  assert cpu_setup.is_cpu_run({"JAX_PLATFORMS": "cpu"})
  assert not cpu_setup.is_cpu_run({"JAX_PLATFORMS": "cuda,cpu"}) and not cpu_setup.is_cpu_run({"JAX_PLATFORMS": "tpu"})
  env = {"JAX_PLATFORMS": "tpu", "XLA_FLAGS": "--a=1"}
  cpu_setup.prepare(env, argv=["python", "-m", "launch.main"])  # would re-exec this test process if it acted
  assert env == {"JAX_PLATFORMS": "tpu", "XLA_FLAGS": "--a=1"}


def test_xla_options_are_chosen_per_cpu_and_the_users_own_win(monkeypatch, tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
                  "flags\t\t: fpu avx2 avx512f amx_bf16\n\nprocessor\t: 1\nvendor_id\t: Other\n")
  fields = cpu_setup.cpuinfo(str(info))
  assert fields["vendor_id"] == "GenuineIntel" and fields["model"] == "143"  # the first processor only
  monkeypatch.setattr(cpu_setup, "CPU_XLA_FLAGS", [
      ({"vendor_id": "AuthenticAMD"}, ("--amd=1",), "test"),
      ({"vendor_id": "GenuineIntel", "flags": "has:avx512f"}, ("--xla_cpu_use_onednn=true", "--b=2"), "test")])
  flags = cpu_setup.xla_flags_for(fields)
  assert flags == ("--xla_cpu_use_onednn=true", "--b=2")
  assert cpu_setup.xla_flags_for({"vendor_id": "GenuineIntel", "flags": "avx2"}) == ()
  env = {"XLA_FLAGS": "--xla_cpu_use_onednn=false"}
  cpu_setup.add_xla_flags(env, flags)
  assert env["XLA_FLAGS"] == "--xla_cpu_use_onednn=false --b=2"


def test_a_users_malloc_conf_is_kept_and_a_bad_choice_is_named(monkeypatch, tmp_path):
  lib = tmp_path / "libjemalloc.so.2"
  lib.write_bytes(b"")
  calls = []
  monkeypatch.setattr(os, "execve", lambda exe, argv, env: calls.append((argv, env)))
  env = {"MMRS_JEMALLOC": str(lib), "MALLOC_CONF": "narenas:1", "LD_PRELOAD": "/x/other.so"}
  cpu_setup.reexec_with_jemalloc(env, ["python", "-m", "launch.main", "--workdir=w"])
  (argv, new_env), = calls
  assert argv == [sys.executable, "-m", "launch.main", "--workdir=w"]
  assert new_env["LD_PRELOAD"] == f"{lib}:/x/other.so" and new_env["MALLOC_CONF"] == "narenas:1"
  cpu_setup.reexec_with_jemalloc(new_env, argv)  # already preloaded: no second re-exec
  assert len(calls) == 1
  with pytest.raises(SystemExit, match="MMRS_ALLOCATOR=tcmalloc: use jemalloc"):
    cpu_setup.reexec_with_jemalloc({"MMRS_ALLOCATOR": "tcmalloc"}, argv)
