"""Performance flags and the GPU memory fraction (mmrs/train/perf_flags.py): what the launchers export, that the
user's own settings win, and that jaxlib parses every GPU flag (a training process on CPU with the GPU job's
XLA_FLAGS starts). tests/test_aot_target.py checks the target compilers (libtpu, the CUDA plugin) accept them."""
import json
import os
import pathlib
import subprocess
import sys

from mmrs.train import perf_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _job_env(platform, **env):
  """The environment a job gets after running the launcher's export lines, starting from `env`."""
  exports = subprocess.run([sys.executable, "-m", "launch.perf_flags", f"--platform={platform}"], cwd=REPO,
                           capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"], **env}).stdout
  out = subprocess.run(["bash", "-c", f"set -u\n{exports}\nenv -0"], capture_output=True, text=True, check=True,
                       env={"PATH": os.environ["PATH"], **env}).stdout
  return dict(line.split("=", 1) for line in out.split("\0") if "=" in line)


def test_gpu_job_gets_flags_and_memory_fraction_and_user_settings_win():
  env = _job_env("gpu")
  assert env["XLA_CLIENT_MEM_FRACTION"] == "0.90" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
  for name, (value, _) in perf_flags.GPU_XLA_FLAGS.items():
    assert f"--{name}={value}" in env["XLA_FLAGS"].split()
  # The user's flags come after ours (XLA takes the last), and a flag they set is not repeated.
  env = _job_env("gpu", XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/d",
                 XLA_PYTHON_CLIENT_MEM_FRACTION="0.8")
  words = env["XLA_FLAGS"].split()
  assert words[-2:] == ["--xla_gpu_enable_latency_hiding_scheduler=false", "--xla_dump_to=/tmp/d"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in words
  # jax 0.10.2 refuses both fraction variables at once: the user's (older) name stays alone.
  assert "XLA_CLIENT_MEM_FRACTION" not in env and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8"


def test_tpu_job_gets_libtpu_flags():
  env = _job_env("tpu", LIBTPU_INIT_ARGS="--xla_enable_async_all_gather=false")
  words = env["LIBTPU_INIT_ARGS"].split()
  assert words[-1] == "--xla_enable_async_all_gather=false" and "--xla_enable_async_all_gather=true" not in words
  assert "--xla_tpu_enable_async_collective_fusion=true" in words
  assert perf_flags.shell_exports("cpu") == "" and perf_flags.compiler_options("cpu") == {}


def test_memory_fraction_jax_gets():
  assert perf_flags.gpu_memory_fraction({})[0] == perf_flags.GPU_MEM_FRACTION
  assert perf_flags.gpu_memory_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".75"})[0] == 0.75
  assert perf_flags.gpu_memory_fraction({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})[0] == 1.0
  json_line = subprocess.run([sys.executable, "-m", "launch.perf_flags", "--platform=gpu", "--format=json"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout
  report = json.loads(json_line)
  assert report["compiler_options"]["xla_gpu_enable_latency_hiding_scheduler"] is True
  assert report["compiler_options"]["xla_gpu_all_gather_combine_threshold_bytes"] == 134217728


def test_launchers_export_the_flags(tmp_path):
  """The job script of gpu_slurm.sh and the worker command of tpu_vm.sh carry the flags (dry runs: no cluster)."""
  gpu = subprocess.run(["bash", "launch/gpu_slurm.sh", "--nodes=1", "--gpus_per_node=8", "--config=configs/mixmae.py",
                        f"--workdir={tmp_path}/g", "--dry_run"], cwd=REPO, capture_output=True, text=True, check=True)
  assert perf_flags.shell_exports("gpu", {}) in gpu.stdout
  tpu = subprocess.run(["bash", "launch/tpu_vm.sh", "--name=t", "--zone=z", "--accelerator=v5p-8",
                        "--config=configs/mixmae.py", "--workdir=gs://b/r", "--dry_run"], cwd=REPO,
                       capture_output=True, text=True, check=True)
  assert "LIBTPU_INIT_ARGS" in tpu.stdout and "xla_tpu_overlap_compute_collective_tc=true" in tpu.stdout


def test_jaxlib_parses_the_gpu_flags():
  """XLA dies on an unknown name in XLA_FLAGS; a job's CPU-side client parses the same variable."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=perf_flags.environment("gpu", {})["XLA_FLAGS"])
  ok = subprocess.run([sys.executable, "-c", "import jax; print(jax.numpy.ones(2).sum())"], env=env,
                      capture_output=True, text=True)
  assert ok.returncode == 0 and "2.0" in ok.stdout, ok.stderr[-2000:]
  env["XLA_FLAGS"] += " --xla_gpu_no_such_flag=true"  # the check above can fail
  bad = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(2)"], env=env, capture_output=True,
                       text=True)
  assert bad.returncode != 0 and "xla_gpu_no_such_flag" in bad.stderr
