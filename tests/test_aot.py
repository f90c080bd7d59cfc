"""launch.aot: compile every task for a topology (cpu:N here), report per-device memory, refuse what cannot fit."""
import importlib.util
import io
import json

import ml_collections
import pytest

import train_toy_method as toy
from configs import mixmae
from launch import aot as aot_cli
from mmrs.train import aot
from mmrs.train import gpu_target


def _toy_config(**overrides):
  config = toy.get_config()
  config.bands = ml_collections.ConfigDict(dict(s2=",".join(toy.S2_BANDS), s1=",".join(toy.S1_BANDS)))
  config.update(overrides)
  return config


def _run(config, topology, **kwargs):
  out = io.StringIO()
  code = aot_cli.run(config, topology, out=out, **kwargs)
  text = out.getvalue()
  return code, text, json.loads(text.strip().splitlines()[-1])


def test_cpu_topology_compiles_every_task_and_prints_one_json_line():
  code, text, report = _run(_toy_config(mesh="data=4,fsdp=2"), "cpu:8")
  assert code == 0, text
  assert report["topology"] == "cpu:8" and report["devices"] == 8 and report["fits"] is True
  assert report["device_memory_bytes"] > 0 and report["mesh"] == {"data": 4, "fsdp": 2}
  assert set(report["tasks"]) == {"recon", "cross"}
  for numbers in report["tasks"].values():
    for key in ("per_device_peak_bytes", "per_device_argument_bytes", "per_device_param_and_opt_bytes",
                "flops_per_step", "compile_s"):
      assert numbers[key] > 0, key
    assert numbers["per_device_peak_bytes"] >= numbers["per_device_argument_bytes"] - numbers["per_device_alias_bytes"]
  assert "task recon" in text and "task cross" in text  # the tables come before the JSON line


def test_param_and_optimizer_bytes_fall_as_one_over_fsdp():
  per = {}
  for n in (1, 2, 4, 8):
    config = mixmae.get_config("tiny")
    config.model.encoder, config.mesh, config.fsdp_min_size = "B", f"data={8 // n},fsdp={n}", 2**12
    code, _, report = _run(config, "cpu:8", plan_only=True)  # launch.aot --plan_only: the layout, no compile
    assert code == 0 and report["tasks"] == {} and report["mesh"] == {"data": 8 // n, "fsdp": n}
    per[n] = report["per_device_param_and_opt_bytes"]
  for n in (2, 4, 8):  # a few small leaves (biases of non-embed axes) stay replicated: within 2% of 1/N
    assert per[1] / n <= per[n] <= 1.02 * per[1] / n, per


def test_does_not_fit_and_bad_mesh_fail_fast_with_numbers(capsys):
  code, _, report = _run(_toy_config(), "cpu:8", device_memory_gb=1e-7)
  assert code == aot_cli.EXIT_DOES_NOT_FIT and report["fits"] is False
  assert report["per_device_param_and_opt_bytes"] > report["device_memory_bytes"]
  assert "DOES NOT FIT" in capsys.readouterr().err
  out = io.StringIO()
  assert aot_cli.run(_toy_config(mesh="data=3,fsdp=1"), "cpu:8", out=out) == aot_cli.EXIT_CONFIG_ERROR
  assert "config.mesh" in capsys.readouterr().err
  assert aot_cli.run(_toy_config(), "cpu:999", out=out) == aot_cli.EXIT_CONFIG_ERROR
  assert "xla_force_host_platform_device_count=999" in capsys.readouterr().err


def test_compiler_out_of_memory_is_a_does_not_fit_answer(monkeypatch, capsys):
  def refuse(*args, **kwargs):  # what libtpu's compiler raises for a program larger than HBM
    raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
                       "(43.54G) exceeds available HBM (30.75G).")
  monkeypatch.setattr(aot.step_lib, "compile_tasks", refuse)
  code, _, report = _run(_toy_config(), "cpu:8")
  assert code == aot_cli.EXIT_DOES_NOT_FIT and report["fits"] is False and "43.54G" in report["compile_error"]
  err = capsys.readouterr().err
  assert "DOES NOT FIT" in err and "remat" in err


def test_tpu_names():
  assert aot.tpu_topology_name("v5p-128") == "v5p:4x4x4"
  assert aot.tpu_topology_name("v4-32") == "v4:2x2x4"
  assert aot.tpu_topology_name("v5e-256") == "v5e:16x16"
  assert aot.tpu_topology_name("v6e-8") == "v6e:2x4"
  assert aot.tpu_topology_name("v5p:2x2x1") == "v5p:2x2x1"
  assert aot.tpu_topology_name("v5p-8") == "v5p:2x2x1"  # unit dimensions last: libtpu refuses v5p:1x2x2
  with pytest.raises(aot.TopologyError, match="power of two"):
    aot.tpu_topology_name("v5e-24")
  with pytest.raises(aot.TopologyError, match="--gpu_target_config"):  # no built-in description: say how to give one
    aot.topology_devices("8xQ9000")


def _has_cuda_plugin():
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def test_gpu_names_and_target_description():
  assert gpu_target.parse_gpu_topology("8xH100") == (8, "h100") and gpu_target.parse_gpu_topology("v5p-8") is None
  assert gpu_target.topology_shape(8) == "1x1x8" and gpu_target.topology_shape(32) == "1x4x8"
  with pytest.raises(aot.TopologyError, match="whole hosts of 8"):
    aot.topology_devices("12xH100")
  text = gpu_target.target_config_text("h100")
  assert "core_count: 132" in text and "major: 9 minor: 0" in text and '"NVIDIA H100 80GB HBM3"' in text


def test_gpu_deviceless_options_leave_the_config_alone():
  config = _toy_config()
  config.lock()
  before = config.xla_compiler_options.to_dict()
  out = gpu_target.with_deviceless_options(config)
  assert out.xla_compiler_options.to_dict() == {**before, "xla_gpu_enable_triton_gemm": False}
  assert config.xla_compiler_options.to_dict() == before  # the caller's config is unchanged
  with config.unlocked():
    config.xla_compiler_options.xla_gpu_enable_triton_gemm = True  # the user's choice wins
  assert gpu_target.with_deviceless_options(config) is config


@pytest.mark.skipif(_has_cuda_plugin(), reason="jax's CUDA plugin is installed: the GPU target compiles instead")
def test_gpu_topology_without_cuda_plugin_fails_in_one_line(capsys):
  out = io.StringIO()
  assert aot_cli.run(_toy_config(), "8xH100", out=out) == aot_cli.EXIT_CONFIG_ERROR
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "CUDA plugin" in err and "requirements-gpu-aot.txt" in err, err
  assert "GPU host" in err


# Real TPU (libtpu) and GPU (CUDA plugin) compiles: tests/test_aot_target.py (subprocesses with <venv>/aot-targets).
