"""A tiny two-task method and in-memory data for the train-system tests.

Also a config file (`get_config`) and a script: `python -m tests.train_toy_method --config=tests/train_toy_method.py
--workdir=DIR` runs launch/main.py's entry point with the fake data below (subprocess tests: kill -9, 2 processes).

The method mirrors AuxMAE's shape: a shared "encoder" and two decoders, task "recon" (S2 -> S2 at random masked
pixels, trains encoder + decoder_s2) and task "cross" (S2 -> S1, trains encoder + decoder_s1), plus a method state
(an EMA of the encoder, updated after every step, like BYOL's target).
"""
from __future__ import annotations

import functools
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from configs import common
from mmrs.methods.base import Task
from mmrs.train import data as data_lib

S2_BANDS = ("B02", "B03", "B04")
S1_BANDS = ("VV", "VH")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = common.base_config()
  c.method = "tests.train_toy_method:build"
  c.batch_size = 8
  c.total_steps = 8
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_checkpoints = 3
  c.mesh = "data=-1,fsdp=1"
  c.fsdp_min_size = 64
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 2
  c.optimizer.weight_decay = 1e-2
  c.model = ml_collections.ConfigDict(dict(width=16, ema=0.9))
  c.data = ml_collections.ConfigDict(dict(a=common.dataset_config(image_size=4), b=common.dataset_config(image_size=4)))
  # Tests compile many small programs: LLVM -O0 halves CPU compile time (the numbers differ from -O2, so every run
  # compared in a test uses this config).
  c.xla_compiler_options = ml_collections.ConfigDict({"xla_backend_optimization_level": 0})
  # Test-only knobs (-1 = off; see FakeIterator): a NaN in task 'cross' at this batch index, a SIGTERM to this
  # process when this batch index is read, the tasks to train.
  c.toy = ml_collections.ConfigDict(dict(nan_at=-1, sigterm_at=-1, tasks="recon,cross"))
  return c


def _hash_uniform(rng, shape, dtype=jnp.float32):
  """A cheap stand-in for jax.random (threefry takes ~2 s to compile on a small CPU; tests compile many steps)."""
  k = jax.random.key_data(rng).astype(jnp.uint32)
  i = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
  h = (i * jnp.uint32(2654435761)) ^ k[0]
  h = (h ^ (h >> 15)) * jnp.uint32(2246822519) ^ k[1]
  h = h ^ (h >> 13)
  return (h >> 8).astype(dtype) / jnp.asarray(2**24, dtype)


def _init(rng, shape, dtype=jnp.float32):
  return (_hash_uniform(rng, shape, dtype) - 0.5) * (2.0 / np.sqrt(shape[0]))


class _Net(nn.Module):
  width: int
  out: int

  @nn.compact
  def __call__(self, x):
    dense = lambda n, axes, name: nn.Dense(n, kernel_init=nn.with_logical_partitioning(
        _init, axes), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, axes[1:]), name=name)
    h = nn.gelu(dense(self.width, ("channels", "embed"), "in")(x))
    h = nn.gelu(dense(self.width, ("embed", "mlp"), "hidden")(h))
    return dense(self.out, ("mlp", "channels"), "out")(h) if self.out else h


class ToyMethod:
  name = "toy"

  def __init__(self, config):
    self.width = config.model.width
    self.ema = config.model.ema
    names = config.toy.tasks.split(",") if "toy" in config else ["recon", "cross"]
    all_tasks = {
        "recon": Task("recon", "a", ("s2",), self._recon_loss, param_prefixes=("encoder", "decoder_s2")),
        "cross": Task("cross", "b", ("s1", "s2"), self._cross_loss, param_prefixes=("encoder", "decoder_s1")),
    }
    self.tasks = [all_tasks[n] for n in names]
    self.encoder = _Net(self.width, 0)
    self.decoder_s2 = _Net(self.width, len(S2_BANDS))
    self.decoder_s1 = _Net(self.width, len(S1_BANDS))

  def init(self, rng, batch):
    r1, r2, r3 = jax.random.split(rng, 3)
    enc = self.encoder.init(r1, batch["s2"])["params"]
    h = jnp.zeros(batch["s2"].shape[:-1] + (self.width,))
    params = {"encoder": enc, "decoder_s2": self.decoder_s2.init(r2, h)["params"],
              "decoder_s1": self.decoder_s1.init(r3, h)["params"]}
    return params, {"ema_encoder": jax.tree.map(jnp.copy, nn.meta.unbox(enc))}

  def _encode(self, params, x):
    return self.encoder.apply({"params": params["encoder"]}, x)

  def _masked_recon(self, params, x, rng):
    mask = (_hash_uniform(rng, x.shape[:-1] + (1,)) < 0.5).astype(x.dtype)  # 1 = hidden pixel
    return mask, self.decoder_s2.apply({"params": params["decoder_s2"]}, self._encode(params, x * (1 - mask)))

  def _recon_loss(self, params, state, batch, rng, train):
    del train
    x = batch["s2"]
    mask, pred = self._masked_recon(params, x, rng)
    loss = jnp.sum(mask * (pred - x) ** 2) / (jnp.sum(mask) * x.shape[-1] + 1)
    return loss, ({"masked_fraction": mask.mean()}, state)

  def _cross_loss(self, params, state, batch, rng, train):
    del rng, train
    pred = self.decoder_s1.apply({"params": params["decoder_s1"]}, self._encode(params, batch["s2"]))
    loss = jnp.mean((pred - batch["s1"]) ** 2)
    return loss, ({"s1_mse": loss}, state)

  def reconstruct(self, params, state, batch, rng):
    del state
    x = batch["s2"]
    mask, pred = self._masked_recon(params, x, rng)
    return {"seen": {"s2": x * (1 - mask)}, "reconstruction": {"s2": pred}, "target": {"s2": x}}

  def update_state(self, params, state, step):
    del step
    return {"ema_encoder": jax.tree.map(lambda e, p: self.ema * e + (1 - self.ema) * p, state["ema_encoder"],
                                        params["encoder"])}

  def flops_per_sample(self, task_name):
    del task_name
    return 6.0 * 16 * (3 * self.width + 2 * self.width**2)


def build(config):
  return ToyMethod(config)


# ------------------------------------------------------------------------------------------------ fake data


class FakeIterator:
  """Deterministic in-memory batches: batch i of process p depends only on (seed, p, i). State = {"index": i}.

  `nan_at`: batch index whose S1 is NaN. `sigterm_at`: batch index at which the process sends itself SIGTERM (a
  preemption notice). `block_at`: batch index at which next() sleeps forever (a process that
  is alive but stuck after its checkpoint, for the kill -9 test; set by $MMRS_TOY_BLOCK_AT).
  """

  def __init__(self, seed, process_index, local_batch, size, modalities, nan_at=-1, block_at=-1, sigterm_at=-1):
    self.seed, self.process_index, self.local_batch, self.size = seed, process_index, local_batch, size
    self.modalities, self.nan_at, self.block_at, self.sigterm_at = modalities, nan_at, block_at, sigterm_at
    self.index = 0

  def next(self):
    if self.index == self.block_at:
      print(f"FakeIterator: blocking at batch {self.index}", flush=True)
      while True:
        time.sleep(60)
    if self.index == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    rng = np.random.default_rng((self.seed, self.process_index, self.index))
    shape = (self.local_batch, self.size, self.size)
    batch = {"id": np.array([f"p{self.process_index}_{self.index}_{i}" for i in range(self.local_batch)])}
    if "s2" in self.modalities:
      batch["s2"] = rng.integers(0, 10000, shape + (len(S2_BANDS),)).astype(np.uint16)
    if "s1" in self.modalities:
      batch["s1"] = rng.normal(-15, 5, shape + (len(S1_BANDS),)).astype(np.float32)
      if self.index == self.nan_at:
        batch["s1"][0, 0, 0, 0] = np.nan
    self.index += 1
    return batch

  __next__ = next

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = int(state["index"])


def normalize(batch):
  out = dict(batch)
  if "s2" in out:
    out["s2"] = out["s2"].astype(jnp.float32) / 5000.0 - 1.0
  if "s1" in out:
    out["s1"] = (out["s1"] + 15.0) / 5.0
  return out


def fake_data(config, method, process_index, process_count, *, nan_task="cross"):
  """The `task_data` factory for `mmrs.train.loop.train`."""
  toy = config.get("toy", ml_collections.ConfigDict(dict(nan_at=-1, sigterm_at=-1)))
  block_at = int(os.environ.get("MMRS_TOY_BLOCK_AT", "-1"))  # env, not config: the resumed run must match it
  out = {}
  for i, task in enumerate(method.tasks):
    it = FakeIterator(config.seed + 100 * i, process_index, config.batch_size // process_count,
                      config.data[task.dataset].image_size, task.modalities,
                      nan_at=toy.nan_at if task.name == nan_task else -1, block_at=block_at,
                      sigterm_at=toy.sigterm_at)
    out[task.name] = data_lib.TaskData(iterator=it, normalize=normalize,
                                       bands={"s2": S2_BANDS, "s1": S1_BANDS},
                                       stats={"source": "toy"},
                                       workers=int(config.data[task.dataset].get("workers", 0)))  # recorded only
  return out


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from launch import main as launch_main  # pylint: disable=g-import-not-at-top
  app.run(functools.partial(launch_main.main, task_data=fake_data))
