"""Train-loop scale features on the toy method: persistent compilation cache, profiler trace, honest MFU, and an LR
schedule that keeps its length when total_steps changes on resume."""
import glob
import json
import math
import os

import jax
import pytest

import train_toy_method as toy
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import compile_cache
from mmrs.train import config_check
from mmrs.train import loop
from mmrs.train import metrics as metrics_lib
from mmrs.train import optimizers


def _train(workdir, **overrides):
  config = toy.get_config()
  config.update(overrides)
  return loop.train(config, str(workdir), method=toy.build(config), task_data=toy.fake_data,
                    devices=jax.devices()[:2])


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Run 1: 3 steps, profiled at step 1, cache in its own dir. Run 2: the same workdir resumed with total_steps=6
  and a peak for MFU: it must load both steps from the cache."""
  workdir = tmp_path_factory.mktemp("run")
  cache = str(tmp_path_factory.mktemp("cache"))
  common = dict(compilation_cache_dir=cache, mesh="data=2,fsdp=1", checkpoint_every_steps=3)
  _train(workdir, total_steps=3, profile_steps="1:2", **common)
  entries_after_first = len(os.listdir(cache))
  hits = compile_cache.hits()
  _train(workdir, total_steps=6, peak_flops_per_device=1e9, **common)
  return dict(workdir=str(workdir), cache=cache, entries=entries_after_first, hits=compile_cache.hits() - hits)


def test_second_run_loads_its_steps_from_the_compilation_cache(runs):
  assert runs["entries"] >= 2  # both tasks' steps (and the init) were written
  assert runs["hits"] >= 2  # the resumed run compiled nothing it had compiled before
  assert compile_cache.resolve_dir("auto", "/tmp/w") == "/tmp/w/compilation_cache"
  assert compile_cache.resolve_dir("auto", "gs://b/w/") == "gs://b/w/compilation_cache"  # jax reads/writes gs:// itself
  assert compile_cache.resolve_dir("", "/tmp/w") is None


def test_profile_steps_write_a_tensorboard_trace(runs):
  traces = glob.glob(os.path.join(runs["workdir"], "tensorboard", "plugins", "profile", "*", "*.xplane.pb"))
  assert traces and os.path.getsize(traces[0]) > 0
  with pytest.raises(config_check.ConfigError, match="config.profile_steps"):
    config = toy.get_config()
    config.profile_steps = "5:2"
    config_check.validate(config, None, device_count=8, process_count=1)


def test_mfu_is_na_without_a_known_peak_and_uses_the_mesh_devices(runs):
  recs = _records(runs["workdir"])
  first, resumed = [r for r in recs if r["step"] <= 3], [r for r in recs if r["step"] > 3]
  assert first and all(math.isnan(r["mfu"]) for r in first)  # CPU: no honest peak -> n/a
  assert resumed and all(0 < r["mfu"] < math.inf for r in resumed)  # config.peak_flops_per_device
  per, source = metrics_lib.peak_flops_per_device(jax.devices()[0])
  assert math.isnan(per) and "n/a" in source
  assert metrics_lib.total_peak_flops(jax.devices()[:2], override=5.0)[0] == 10.0  # the mesh's 2, not all 8


def test_resume_with_more_total_steps_keeps_the_lr_schedule(runs):
  recs = {r["step"]: r for r in _records(runs["workdir"])}
  opt = toy.get_config().optimizer
  first_run = optimizers.lr_schedule(opt, 3)  # the schedule the first run trained with
  for step in range(1, 7):  # record of step s = the update at step index s - 1
    assert recs[step]["lr"] == pytest.approx(float(first_run(step - 1)), abs=1e-9), step
  assert float(optimizers.lr_schedule(opt, 6)(3)) > 0  # a stretched schedule would have jumped back up
  checkpointer = ckpt_lib.Checkpointer(os.path.join(runs["workdir"], "checkpoints"), keep=3)
  try:
    assert checkpointer.read_meta(6)["decay_steps"] == 3  # the first run's total_steps, carried on
  finally:
    checkpointer.close()


def test_paper_variants_compute_in_bfloat16_on_accelerators_only():
  from configs import mixmae, rsbyol  # pylint: disable=g-import-not-at-top
  for make in (lambda: mixmae.get_config("vit_b"), lambda: rsbyol.get_config("resnet50")):
    assert make().compute_dtype == "auto"
    for platform, want in (("tpu", "bfloat16"), ("gpu", "bfloat16"), ("cpu", "float32")):
      config = make()
      assert config_check.resolve_compute_dtype(config, platform) == want and config.compute_dtype == want
  assert mixmae.get_config("tiny").compute_dtype == "float32"
