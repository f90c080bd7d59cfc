"""launch.aot compiles the TARGET's program (issue 20): the same config for cpu:2, a v5p slice (libtpu) and 8xH100
(jax's CUDA plugin), each checked from its compiled HLO: the attention the target chooses (mmrs/target.py; no CPU
head-major layout on TPU/GPU), raw uint16 S2 inputs normalized in the step, the launchers' performance flags accepted
by the target's compiler, and on GPU the memory JAX's allocator really gets.

The target compilers live in <venv>/aot-targets/{tpu,gpu} (.ci/run installs them; see launch/aot.py), which only
`python -m launch.aot` puts on its path, so those compiles run as subprocesses. Without them the tests skip, except
under CI=true, where they must run.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mae_s2
from configs import mixmae
from mmrs import target
from mmrs.data import records
from mmrs.models import vit
from mmrs.train import aot
from mmrs.train import gpu_target
from mmrs.train import perf_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGETS = pathlib.Path(sys.prefix) / "aot-targets"
# ViT "mu" encoder, 32 px, 12 bands; no CLS token: 16 tokens, an even count, which cuDNN takes for training.
CONFIG = ["--config=configs/mae_s2.py:tiny", "--config.compute_dtype=auto", "--config.model.use_cls_token=False"]
TOPOLOGY = {"tpu": "v5p-8", "gpu": "8xH100"}
ATTENTION = {"cpu": ["head_major"], "tpu": ["xla"], "gpu": ["cudnn"]}
H100_BYTES = 84_978_434_048  # mmrs/train/gpu_target.py: what CUDA reports for an H100 80GB


def _tiny_config():
  config = mae_s2.get_config("tiny")
  config.compute_dtype = "auto"
  config.model.use_cls_token = False
  return config


def _start(platform, out_dir):
  """`python -m launch.aot` for the platform's topology, or None (skip; under CI=true: fail) without its compiler."""
  where = TARGETS / platform
  if not where.is_dir():
    msg = (f"{where} is missing: pip install --no-deps --target {where} -r requirements-{platform}-aot.txt "
           "(.ci/run does)")
    if os.environ.get("CI") == "true":
      pytest.fail(f"CI must compile for real targets: {msg}")
    return msg
  env = {k: v for k, v in os.environ.items() if k not in perf_flags.MEM_FRACTION_VARS}
  cmd = [sys.executable, "-m", "launch.aot", *CONFIG, f"--topology={TOPOLOGY[platform]}",
         f"--dump_hlo_dir={out_dir / platform}"]
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
  """platform -> (report, HLO text) or a skip reason; the TPU and GPU compiles run while cpu:2 compiles here."""
  out_dir = tmp_path_factory.mktemp("aot_target")
  procs = {p: _start(p, out_dir) for p in TOPOLOGY}
  results = {"cpu": (aot.compile_for(_tiny_config(), "cpu:2", hlo_dir=str(out_dir / "cpu")),
                     (out_dir / "cpu" / "s2_mae.hlo.txt").read_text())}
  for platform, proc in procs.items():
    if isinstance(proc, str):
      results[platform] = proc
      continue
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, f"launch.aot --topology={TOPOLOGY[platform]} exited {proc.returncode}: {stderr[-3000:]}"
    results[platform] = (json.loads(stdout.strip().splitlines()[-1]),
                         (out_dir / platform / "s2_mae.hlo.txt").read_text())
  return results


def _get(compiled, platform):
  if isinstance(compiled[platform], str):
    pytest.skip(compiled[platform])
  return compiled[platform]


@pytest.mark.parametrize("platform", ["cpu", "tpu", "gpu"])
def test_the_target_program(compiled, platform):
  report, hlo = _get(compiled, platform)
  assert report["platform"] == platform and report["fits"] is True
  task = report["tasks"]["s2_mae"]
  # Attention: the target's implementation, never the CPU's head-major layout on an accelerator.
  want = ATTENTION[platform]
  assert task["attention"] == want and aot.attention_implementations(hlo) == want
  assert ("__cudnn$fmha" in hlo) == (platform == "gpu")  # cuDNN's fused kernels, compiled without a GPU
  if platform != "cpu":
    assert "attention_head_major" not in hlo
    assert report["compute_dtype"] == "bfloat16"
  # Inputs: the pipeline's raw uint16 S2, normalized inside the compiled step (no float32 image argument).
  entry = next(line for line in hlo.splitlines() if line.startswith("ENTRY"))
  per_device = 8 // report["devices"]
  assert f"u16[{per_device},32,32,12]" in entry, entry[:400]
  assert not re.search(r"f32\[\d+,32,32,12\]", entry) and task["input_dtypes"] == {"s2": "uint16"}
  # Performance flags: the launchers' flags were compile options, and the target's compiler took them (an unknown
  # name fails the compile: "No such compile option").
  assert perf_flags.compiler_options(platform).items() <= report["compiler_options"].items()


def test_gpu_fit_is_against_what_jax_allocator_gets(compiled):
  report, _ = _get(compiled, "gpu")
  assert report["device_memory_bytes"] == int(H100_BYTES * perf_flags.GPU_MEM_FRACTION)
  assert "XLA_CLIENT_MEM_FRACTION" in report["memory_source"]


def test_gpu_device_memory_follows_the_memory_fraction():
  class Gpu:  # a compile-only CUDA device as launch.aot sees it
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  total = gpu_target.total_memory_bytes(gpu_target.target_config_text("h100"))
  assert total == H100_BYTES
  assert aot.device_memory([Gpu()], None, total, environ={})[0] == int(total * 0.90)
  mem, source = aot.device_memory([Gpu()], None, total, environ={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.75"})
  assert mem == int(total * 0.75) and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75" in source  # JAX's default: 59.4 GiB
  assert aot.device_memory([Gpu()], 50 * 2**30, total, environ={})[0] == 50 * 2**30  # --device_memory_gb wins


def test_choices_come_from_the_platform_compiled_for():
  assert target.choices("cpu") == target.Choices("cpu", "float32", "head_major")
  assert target.choices("tpu") == target.Choices("tpu", "bfloat16", "xla")
  assert target.choices("gpu").attention == "cudnn" and target.choices("gpu", jnp.float32).attention == "xla"
  q = jax.ShapeDtypeStruct((2, 5, 4, 8), jnp.float32)
  for platform, want in (("cpu", "attention_head_major"), ("tpu", "attention_xla")):
    with target.compiling_for(platform):  # this host is a CPU: only the context says "tpu"
      # A new function per platform, as compile_step's jit is: jax caches a trace per function and shapes.
      text = jax.jit(lambda *a: vit.attend(*a)).lower(q, q, q).as_text(debug_info=True)  # pylint: disable=unnecessary-lambda
    assert want in text and "attention_head_major" not in text.replace(want, ""), platform
  with pytest.raises(ValueError, match="cpu, gpu, tpu"):
    target.choices("metal")


def test_abstract_batches_are_what_the_pipeline_delivers():
  config = mixmae.get_config("tiny")
  method = __import__("mmrs.methods", fromlist=["build"]).build(config)
  batches = aot.abstract_batches(config, method, 8)
  normalize = aot.normalizers(config, method)
  for name, batch in batches.items():
    for key, spec in batch.items():
      assert spec.dtype == np.dtype(records.ARRAY_DTYPES[key]), (name, key)
    if "s1" in batch:
      assert batch["s1_valid"].shape == batch["s1"].shape[:3]
    normalized = jax.eval_shape(normalize[name], batch)
    assert all(normalized[m].dtype == np.float32 for m in ("s1", "s2") if m in batch)
