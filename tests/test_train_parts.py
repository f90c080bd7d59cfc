"""Unit tests of the train system's parts: mesh rules, schedules, optimizers, config checks, checkpoint items."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import config_check
from mmrs.train import data as data_lib
from mmrs.train import distributed
from mmrs.train import mesh as mesh_lib
from mmrs.train import metrics as metrics_lib
from mmrs.train import optimizers
from mmrs.train import schedule as schedule_lib

# ------------------------------------------------------------------------------------------------------ mesh


def test_parse_mesh_spec():
  assert mesh_lib.parse_mesh_spec("data=-1,fsdp=2", 8) == {"data": 4, "fsdp": 2}
  assert mesh_lib.parse_mesh_spec("fsdp=-1", 8) == {"data": 1, "fsdp": 8}
  assert mesh_lib.parse_mesh_spec("data=8", 8) == {"data": 8, "fsdp": 1}
  for bad, msg in [("data=3,fsdp=2", "needs 6 devices"), ("model=2", "unknown axis 'model'"),
                   ("data=-1,fsdp=-1", "only one axis"), ("data=-1,fsdp=3", "do not divide"), ("data=x", "integer")]:
    with pytest.raises(ValueError, match=msg):
      mesh_lib.parse_mesh_spec(bad, 8)


def test_param_spec_rule():
  spec = mesh_lib.param_spec
  assert spec((64, 128), ("embed", "mlp"), 2, 1000) == P(None, "fsdp")  # largest eligible dim
  assert spec((64, 128), ("embed", "heads"), 2, 1000) == P("fsdp")  # only embed/mlp are eligible
  assert spec((64, 128), ("embed", "mlp"), 2, 10**6) == P()  # too small
  assert spec((63, 127), ("embed", "mlp"), 2, 10) == P()  # nothing divides
  assert spec((6, 1024), None, 4, 10) == P(None, "fsdp")  # unannotated: shape fallback
  assert spec((64, 128), ("embed", "mlp"), 1, 10) == P()  # no fsdp axis


def test_adafactor_statistics_follow_their_param():
  mesh = mesh_lib.make_mesh("data=4,fsdp=2")
  params = {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32), "b": jax.ShapeDtypeStruct((512,), jnp.float32)}
  leader = {"w": P(None, "fsdp"), "b": P()}
  state = jax.eval_shape(optax.scale_by_factored_rms().init, params)
  specs = mesh_lib.follower_specs(state, leader, params, mesh, min_size=100)
  assert specs.v_row["w"] == P()  # (256,): the fsdp-split column dim was reduced away
  assert specs.v_col["w"] == P("fsdp")  # (512,)
  assert specs.v["b"] == P()


# ------------------------------------------------------------------------------------------------ schedules


def test_task_schedule():
  s = schedule_lib.TaskSchedule(["a", "b"])
  assert [s.task_name(i) for i in range(5)] == ["a", "b", "a", "b", "a"]
  w = schedule_lib.TaskSchedule(["a", "b"], "weighted", {"a": 3, "b": 1})
  names = [w.task_name(i) for i in range(400)]
  assert names.count("a") == 300 and names[:4] == ["a", "a", "b", "a"]
  assert [w.task_name(i) for i in range(1000, 1008)] == [w.task_name(i) for i in range(1000, 1008)]
  with pytest.raises(ValueError, match="config.task_weights names unknown task"):
    schedule_lib.TaskSchedule(["a"], "weighted", {"c": 1})
  with pytest.raises(ValueError, match="config.task_schedule"):
    schedule_lib.TaskSchedule(["a"], "random")


def opt_config(**kw):
  c = common.base_config().optimizer
  c.update(kw)
  return c


def test_warmup_cosine_schedule():
  f = optimizers.lr_schedule(opt_config(learning_rate=1.0, warmup_steps=10, end_lr_fraction=0.1), total_steps=110)
  lrs = np.array([float(f(s)) for s in range(111)])
  assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
  assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55, abs=1e-6)
  assert lrs[110] == pytest.approx(0.1) and np.all(np.diff(lrs[10:]) <= 1e-7)


@pytest.mark.parametrize("mult,starts", [(2, [0, 10, 30, 70]), (1, [0, 10, 20, 30])])
def test_cosine_warm_restarts(mult, starts):
  f = optimizers.lr_schedule(opt_config(learning_rate=0.2, min_learning_rate=0.002, warmup_steps=0,
                                        restart_period_steps=10, restart_mult=mult), total_steps=100)
  lrs = np.array([float(f(s)) for s in range(75)])
  for start in starts:
    assert lrs[start] == pytest.approx(0.2)  # a restart
    assert lrs[start - 1] < 0.02 if start else True  # the end of the previous period is near the minimum
  assert lrs.min() >= 0.002 - 1e-7


def test_schedule_config_errors():
  with pytest.raises(ValueError, match="restart_period_steps"):
    optimizers.lr_schedule(opt_config(schedule="cosine_restarts"), 10)
  with pytest.raises(ValueError, match="config.optimizer.schedule='linear'"):
    optimizers.lr_schedule(opt_config(schedule="linear", restart_period_steps=5), 10)


def test_weight_decay_mask():
  params = {"encoder": {"Dense_0": {"kernel": np.ones((4, 4)), "bias": np.ones(4)},
                        "LayerNorm_0": {"scale": np.ones(4), "bias": np.ones(4)},
                        "patch_embed_s2": {"kernel": np.ones((48, 4))}, "pos_embed": np.ones((1, 9, 4)),
                        "cls": np.ones((1, 1, 4)), "mask_token": np.ones((1, 1, 4)),
                        "modality_embed": np.ones((2, 4)), "Embed_0": {"embedding": np.ones((10, 4))},
                        "norm1": {"kernel": np.ones((4, 4))}}}
  mask = optimizers.decay_mask(params)["encoder"]
  assert mask["Dense_0"] == {"kernel": True, "bias": False}
  assert mask["patch_embed_s2"]["kernel"] is True
  for k in ("pos_embed", "cls", "mask_token", "modality_embed"):
    assert mask[k] is False, k
  assert mask["Embed_0"]["embedding"] is False and mask["norm1"]["kernel"] is False
  assert not any(jax.tree.leaves(mask["LayerNorm_0"]))


def _toy_params():
  return {"enc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}, "dec": {"kernel": jnp.full((4, 2), 2.0)}}


@pytest.mark.parametrize("name", optimizers.OPTIMIZERS)
def test_optimizers_descend_and_only_move_given_groups(name):
  cfg = opt_config(name=name, learning_rate=0.05, warmup_steps=0, weight_decay=1e-3, clip_norm=1.0)
  opt = optimizers.make_optimizer(cfg, ("enc", "dec"), total_steps=100)
  params = _toy_params()
  state = opt.init(params)
  loss = lambda p: jnp.sum((p["enc"]["kernel"] - 3.0) ** 2)
  first = float(loss(params))
  for step in range(20):
    grads = jax.grad(loss)({"enc": params["enc"]})
    new_enc, new_state, lr, _ = opt.update(grads, {"enc": state["enc"]}, {"enc": params["enc"]}, step)
    params, state = {**params, **new_enc}, {**state, **new_state}
  assert float(loss(params)) < first
  np.testing.assert_array_equal(params["dec"]["kernel"], 2.0)  # never in an update: no decay, no momentum
  assert float(lr) == pytest.approx(0.05 * 0.5 * (1 + np.cos(np.pi * 19 / 100)), rel=1e-5)


def test_adafactor_weight_decay_is_lr_scaled():
  # With lr = 0 nothing moves (optax.adafactor(weight_decay_rate=...) would still decay: DESIGN §7).
  cfg = opt_config(name="adafactor", learning_rate=1.0, warmup_steps=0, weight_decay=0.1, schedule="constant")
  opt = optimizers.make_optimizer(cfg, ("enc",), total_steps=10)
  params = {"enc": _toy_params()["enc"]}
  state = opt.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  new, _, _, _ = opt.update(zero, state, params, 0, lr_multiplier=0.0)
  jax.tree.map(np.testing.assert_array_equal, new, params)
  new, _, _, _ = opt.update(zero, state, params, 0, lr_multiplier=1.0)
  np.testing.assert_allclose(new["enc"]["kernel"], 0.9)  # decayed by lr * wd
  np.testing.assert_array_equal(new["enc"]["bias"], 1.0)  # biases are not decayed


def test_gradient_clipping_uses_one_global_norm():
  cfg = opt_config(name="sgd", learning_rate=1.0, warmup_steps=0, momentum=0.0, clip_norm=1.0, schedule="constant")
  opt = optimizers.make_optimizer(cfg, ("a", "b"), total_steps=10)
  params = {"a": jnp.zeros(1), "b": jnp.zeros(1)}
  grads = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
  new, _, _, norm = opt.update(grads, opt.init(params), params, 0)
  assert float(norm) == pytest.approx(5.0)
  np.testing.assert_allclose([new["a"][0], new["b"][0]], [-0.6, -0.8], rtol=1e-6)


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass
class _Task:
  name: str
  dataset: str = "a"


class _Method:
  tasks = [_Task("t1"), _Task("t2", "b")]


def _config():
  c = common.base_config()
  c.data = ml_collections.ConfigDict(dict(a=common.dataset_config(), b=common.dataset_config()))
  return c


def test_validate_errors_name_keys(tmp_path):
  c = _config()
  config_check.validate(c, _Method(), device_count=8, process_count=2, check_data=False)
  cases = [("batch_size", 63, "config.batch_size=63 does not divide by the 2 processes"),
           ("on_nonfinite", "ignore", "config.on_nonfinite='ignore'"),
           ("total_steps", 0, "config.total_steps=0"),
           ("task_schedule", "x", "config.task_schedule")]
  for key, value, msg in cases:
    c = _config()
    c[key] = value
    with pytest.raises(config_check.ConfigError, match=msg):
      config_check.validate(c, _Method(), device_count=8, process_count=2, check_data=False)
  c = _config()
  c.optimizer.name = "lamb"
  with pytest.raises(config_check.ConfigError, match="config.optimizer.name='lamb'"):
    config_check.validate(c, _Method(), device_count=8, process_count=1, check_data=False)
  c = _config()
  c.task_lr_multipliers = ml_collections.ConfigDict({"t3": 2.0})
  with pytest.raises(config_check.ConfigError, match=r"task_lr_multipliers names unknown task\(s\) \['t3'\]"):
    config_check.validate(c, _Method(), device_count=8, process_count=1, check_data=False)
  c = _config()
  del c.data["b"]
  with pytest.raises(config_check.ConfigError, match="reads dataset 'b' but config.data has no such entry"):
    config_check.validate(c, _Method(), device_count=8, process_count=1, check_data=False)
  c = _config()
  with pytest.raises(config_check.ConfigError, match="config.data.a.shards is empty"):
    config_check.validate(c, _Method(), device_count=8, process_count=1)
  (tmp_path / "ok").mkdir()
  (tmp_path / "ok" / "manifest.json").write_text("{}")
  c.data.a.shards = c.data.b.shards = str(tmp_path / "ok")
  config_check.validate(c, _Method(), device_count=8, process_count=1)


def test_resume_conflicts():
  saved = _config().to_dict()
  now = _config()
  now.total_steps = 10**6
  now.mesh = "data=-1,fsdp=4"
  now.optimizer.learning_rate = 5e-4
  now.batch_size = 128
  now.data.a.workers = 8  # safe: the data do not depend on how many processes/threads read them
  now.data.b.read_threads = 4
  now.data.b.shuffle_seed_offset = 1  # another sample order: breaking
  now.optimizer.name = "adamw"
  now.data.b.on_bad = "skip"
  now.model = ml_collections.ConfigDict(dict(attention="auto"))  # a key added by a code update
  breaking, warnings = config_check.resume_conflicts(saved, now.to_dict())
  assert breaking == ["batch_size: 64 -> 128", "data.b.shuffle_seed_offset: 0 -> 1",
                      "optimizer.name: 'adafactor' -> 'adamw'"]
  assert warnings == ["data.b.on_bad: 'fail' -> 'skip'", "model.attention: '<unset>' -> 'auto'",
                      "optimizer.learning_rate: 0.001 -> 0.0005"]
  with pytest.raises(config_check.ConfigError, match="--allow_config_change"):
    config_check.check_resume(saved, now.to_dict())
  config_check.check_resume(saved, now.to_dict(), allow_change=True)


# ------------------------------------------------------------------------------------------- data, ckpt, misc


class _Counter:
  def __init__(self):
    self.i = 0

  def next(self):
    self.i += 1
    return {"x": np.full((2, 1), self.i)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, s):
    self.i = s["i"]


def test_peekable_iterator_keeps_checkpoint_state_exact():
  it = data_lib.PeekableIterator(_Counter())
  assert it.peek()["x"][0, 0] == 1 and it.get_state() == {"i": 0}  # peeking consumed nothing
  assert it.next()["x"][0, 0] == 1 and it.get_state() == {"i": 1}
  it.peek()
  it.set_state({"i": 5})  # a restore drops the peeked batch
  assert it.next()["x"][0, 0] == 6


def test_iterator_states_refuse_another_process_count(tmp_path):
  handler = ckpt_lib.IteratorStatesHandler()
  (tmp_path / "process_0-of-2.json").write_text(json.dumps({"states": {"t": {"i": 1}}}))
  (tmp_path / "process_1-of-2.json").write_text(json.dumps({"states": {"t": {"i": 1}}}))
  with pytest.raises(ckpt_lib.CheckpointMismatch, match="cannot be re-split"):
    handler.restore(tmp_path)
  handler.save(tmp_path, ckpt_lib.IteratorStatesSave({"t": {"i": 3}, "u": b"grain-bytes"}))
  assert handler.restore(tmp_path) == {"t": {"i": 3}, "u": b"grain-bytes"}


def test_global_pipeline_states_restore_on_another_process_count(tmp_path):
  """mmrs pipeline states (global sample order) written by 2 processes restore on 1: one position, counters summed."""
  handler = ckpt_lib.IteratorStatesHandler()
  pins = {"seed": 1, "global_batch_size": 8}
  for i, skipped in enumerate((2, 3)):
    state = {"mmrs_pipeline": pins, "global_batches": 5, "mmrs_skipped": skipped}
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps({"states": {"t": state}}))
  assert handler.restore(tmp_path) == {"t": {"mmrs_pipeline": pins, "global_batches": 5, "mmrs_skipped": 5}}
  (tmp_path / "process_1-of-2.json").write_text(json.dumps({"states": {"t": {"mmrs_pipeline": pins,
                                                                            "global_batches": 6}}}))
  with pytest.raises(ValueError, match="disagree"):
    handler.restore(tmp_path)
  (tmp_path / "process_1-of-2.json").unlink()
  with pytest.raises(FileNotFoundError, match="incomplete"):
    handler.restore(tmp_path)


def test_distributed_needs_all_three_settings(monkeypatch):
  for k in (distributed.ENV_ADDRESS, distributed.ENV_NUM, distributed.ENV_ID, "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert distributed.initialize() is False  # a single process needs nothing
  with pytest.raises(ValueError, match="needs all of"):
    distributed.initialize(coordinator_address="127.0.0.1:1234")
  with pytest.raises(ValueError, match="heartbeat_timeout"):
    distributed.initialize(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0, heartbeat_timeout_s=0)


@dataclasses.dataclass
class _Device:
  device_kind: str
  platform: str = "tpu"


def test_peak_table():
  for kind, tflops in [("TPU v4", 275), ("TPU v5 lite", 197), ("TPU v5p", 459), ("TPU v6 lite", 918),
                       ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H200", 989)]:
    assert metrics_lib.peak_flops_per_device(_Device(kind))[0] == tflops * 1e12, kind


def test_progress_line():
  line = metrics_lib.progress_line(1200, 10000, {"s2_mae": 0.41234, "s2_to_s1": 0.9}, 1234.5, 0.412, 0.5)
  assert line == "step 1200/10000 | s2_mae 0.4123 s2_to_s1 0.9 | 1,234 img/s | MFU 41.2% | ETA 1h13m"
