"""The train loop: validate, build, restore or init, compile once per task, then step, log, checkpoint.

The loop does not know the method: it runs `method.tasks`, one per step, chosen by `TaskSchedule` (a pure function of
the step). The host never waits on the device between steps: a step's metrics stay on device until the log step,
and they are fetched after the next step has been dispatched. Before a checkpoint every pending metric is fetched,
so a state is saved only when all steps since the last check are known to be finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import itertools
import math
import os
import tempfile
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from mmrs.train import checkpoint as ckpt_lib
from mmrs.train import compile_cache
from mmrs.train import config_check
from mmrs.train import data as data_lib
from mmrs.train import host_agreement
from mmrs.train import mesh as mesh_lib
from mmrs.train import metrics as metrics_lib
from mmrs.train import optimizers
from mmrs.train import schedule as schedule_lib
from mmrs.train import state as state_lib
from mmrs.train import step as step_lib


_RUN_STARTS = itertools.count()  # Trainer.run's start barrier keys (several processes)


class NonFiniteError(FloatingPointError):
  """A step produced NaN/inf with config.on_nonfinite='stop'."""


def build_method(config):
  """`config.method` is a registry name (mmrs.methods) or 'package.module:function' for out-of-tree methods."""
  if ":" in config.method:
    module, _, fn = config.method.partition(":")
    return getattr(importlib.import_module(module), fn)(config)
  from mmrs import methods  # pylint: disable=g-import-not-at-top
  return methods.build(config)


def train(config, workdir: str, *, method=None, task_data: Mapping[str, data_lib.TaskData] | Callable | None = None,
          logdir: str | None = None, allow_config_change: bool = False,
          devices: list[jax.Device] | None = None, hooks: Sequence["StepHook"] = (),
          allow_fresh_start: bool = False) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest checkpoint). Returns a small summary dict.

  `method` / `task_data` may be passed in (tests, notebooks); by default they are built from the config.
  `task_data` may be a factory `(config, method, process_index, process_count) -> {task: TaskData}`.
  `devices` restricts the mesh to some devices (default: all). `hooks`: `StepHook`s run between steps (finetuning's
  periodic validation, mmrs/finetune/validation.py). `allow_fresh_start`: when checkpoints exist but none restores,
  move them aside and start at step 0 instead of refusing (checkpoint.Checkpointer.restore_latest).
  """
  devices = list(devices) if devices is not None else jax.devices()
  config_check.resolve_compute_dtype(config, devices[0].platform)
  config_check.validate(config, None, device_count=len(devices), process_count=jax.process_count())
  method = method if method is not None else build_method(config)
  config_check.validate(config, method, device_count=len(devices), process_count=jax.process_count(),
                        check_data=task_data is None)
  host_agreement.check(config)  # several processes: same config, dataset copies and code, or all stop here
  with contextlib.ExitStack() as cleanup:  # closes in reverse: trainer, data pipelines, checkpointer (waits)
    checkpointer = ckpt_lib.Checkpointer(epath.Path(workdir) / "checkpoints", keep=config.get("keep_checkpoints", 3))
    cleanup.callback(checkpointer.close)
    _check_resume_early(checkpointer, config, allow_config_change)
    if task_data is None:
      task_data = data_lib.build_task_data(config, method, jax.process_index(), jax.process_count())
    elif callable(task_data):
      task_data = task_data(config, method, jax.process_index(), jax.process_count())
    for td in task_data.values():
      if td.close is not None:
        cleanup.callback(td.close)
    missing = [t.name for t in method.tasks if t.name not in task_data]
    if missing:
      raise ValueError(f"No data for task(s) {missing}.")
    compile_cache.configure(config.get("compilation_cache_dir", ""), workdir)
    mesh = mesh_lib.make_mesh(config.mesh, devices)
    peak_flops, peak_source = metrics_lib.total_peak_flops(list(mesh.devices.flat),
                                                           float(config.get("peak_flops_per_device", 0.0)))
    if math.isfinite(peak_flops):
      logging.info("Peak %.3g FLOP/s for MFU (%s).", peak_flops, peak_source)
    else:
      logging.info("No peak FLOP/s known for %s: MFU n/a (set config.peak_flops_per_device to report one).",
                   mesh.devices.flat[0].platform)
    with jax.set_mesh(mesh):
      trainer = Trainer(config, epath.Path(workdir), method, dict(task_data), mesh, checkpointer,
                        epath.Path(logdir) if logdir else None, allow_config_change, peak_flops, hooks,
                        allow_fresh_start)
      cleanup.callback(trainer.close)
      return trainer.run()


def _check_resume_early(checkpointer: ckpt_lib.Checkpointer, config, allow_change: bool) -> None:
  """Compares the config with the latest checkpoint's before data workers start or anything compiles."""
  step = checkpointer.latest_step()
  if step is None:
    return
  try:
    meta = checkpointer.read_meta(step)
  except Exception:  # pylint: disable=broad-except  (a damaged checkpoint: restore_latest falls back past it)
    return
  try:
    config_check.check_resume(meta.get("config", {}), config_check.to_dict(config), allow_change, log=False)
  except config_check.ConfigError as e:
    raise ckpt_lib.CheckpointMismatch(str(e)) from None


class StepHook:
  """Work the loop runs between training steps, outside the timed training window (e.g. finetuning's periodic
  validation). The loop calls `start` once the state is restored or initialized (`trainer.step` tells which), then
  after every step `due(step)` and, when it is true, `run(trainer)` (the queued steps have finished; `trainer.state`
  is the state after `trainer.step` steps, valid until the next step donates it), and `finish(trainer)` after the
  last step when the run was not preempted. Every process calls them in the same order (they may run collectives).
  """

  def start(self, trainer: "Trainer") -> None:
    del trainer

  def due(self, step: int) -> bool:
    del step
    return False

  def run(self, trainer: "Trainer") -> None:
    del trainer

  def finish(self, trainer: "Trainer") -> None:
    del trainer


@dataclasses.dataclass
class _Pending:
  step: int  # completed steps after this one (1-based), as logged
  task: str
  metrics: dict[str, jax.Array]


class Trainer:

  def __init__(self, config, workdir: epath.Path, method, task_data: dict[str, data_lib.TaskData],
               mesh: jax.sharding.Mesh, checkpointer: ckpt_lib.Checkpointer, logdir: epath.Path | None,
               allow_config_change: bool, peak_flops: float, hooks: Sequence[StepHook] = (),
               allow_fresh_start: bool = False):
    self.config, self.workdir, self.method, self.mesh = config, workdir, method, mesh
    self.hooks = tuple(hooks)
    self.tasks = {t.name: t for t in method.tasks}
    self.task_index = {t.name: i for i, t in enumerate(method.tasks)}
    self.data = task_data
    self.iters = {name: data_lib.PeekableIterator(td.iterator) for name, td in task_data.items()}
    self.schedule = schedule_lib.TaskSchedule(list(self.tasks), config.get("task_schedule", "alternate"),
                                              config_check.to_dict(config.get("task_weights")))
    self.batch_size = config.batch_size
    self.total_steps = config.total_steps
    self.allow_config_change = allow_config_change
    self.allow_fresh_start = allow_fresh_start
    self.peak_flops = peak_flops
    self.compiler_options = config_check.to_dict(config.get("xla_compiler_options"))  # optional key
    self.logdir = logdir or workdir
    self.pending: list[_Pending] = []
    self.skipped = 0
    self.preemption = ckpt_lib.PreemptionWatcher()
    self.checkpointer = checkpointer
    self.writer = None
    self._visualize_fns: dict[str, Any] = {}
    self._visualize_broken = False

  # ---------------------------------------------------------------------------------------------------- setup

  def _setup(self) -> None:
    local = {n: data_lib.numeric_arrays(it.peek()) for n, it in self.iters.items()}
    self.local_abstract = {n: {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in b.items()}
                           for n, b in local.items()}
    normalized = {n: jax.eval_shape(self.data[n].normalize, self.local_abstract[n]) if self.data[n].normalize
                  else self.local_abstract[n] for n in self.tasks}
    example = state_lib.example_batch(normalized)
    # The optimizer's state layout does not depend on the schedule length, which comes from the checkpoint that
    # actually restores (a checkpoint whose meta cannot be read never restores, so it cannot change the schedule).
    self.decay_steps = self._decay_steps(None)
    self.optimizer, self.layout = step_lib.plan_state(self.config, self.method, example, self.mesh, self.decay_steps)
    restored = self.checkpointer.restore_latest(self.layout.abstract, check_meta=self._check_meta,
                                                allow_fresh_start=self.allow_fresh_start)
    decay_steps = self._decay_steps(restored.meta) if restored is not None else self.decay_steps
    if decay_steps != self.decay_steps:
      self.decay_steps = decay_steps
      self.optimizer, self.layout = step_lib.plan_state(self.config, self.method, example, self.mesh,
                                                        self.decay_steps)
    if restored is None:
      self.step = 0
      self.state = state_lib.create(self.method, self.optimizer, example, self.layout,
                                    jax.random.key(self.config.seed), self.compiler_options)
      logging.info("Initialized a new run in %s (%s parameters).", self.workdir,
                   f"{state_lib.count_params(self.state['params']):,}")
    else:
      self.step, self.state = restored.step, restored.state
      for name, st in restored.data_states.items():
        if name in self.iters:
          self.iters[name].set_state(st)
      logging.info("Resumed %s at step %d.", self.workdir, self.step)
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(self.config.to_json_best_effort(indent=2, sort_keys=True))
    self.writer = metrics_lib.MetricsWriter(self.logdir, resume_step=self.step)
    self.writer.write_hparams(config_check.to_dict(self.config), [f"{t}/loss" for t in self.tasks])
    self._compile()

  def _decay_steps(self, meta: Mapping[str, Any] | None) -> int:
    """The LR schedule's length: config.optimizer.decay_steps if set, else the first run's total_steps.

    The first run saves it in the checkpoint metadata (`meta`: the restored checkpoint's, None for a new run), so a
    resume with a larger (or smaller) config.total_steps continues the same schedule instead of jumping to another
    point of a stretched one; set config.optimizer.decay_steps to stretch it on purpose.
    """
    explicit = int(self.config.optimizer.get("decay_steps", 0) or 0)
    saved = None
    if meta is not None:
      saved = meta.get("decay_steps") or meta.get("config", {}).get("total_steps")
    if explicit:
      if saved and int(saved) != explicit:
        logging.warning("config.optimizer.decay_steps=%d differs from the checkpoint's schedule length %d: the "
                        "learning rate changes at this resume.", explicit, int(saved))
      return explicit
    if saved:
      if int(saved) != self.total_steps:
        logging.warning("config.total_steps=%d differs from the first run's %d; the learning-rate schedule keeps its "
                        "length of %d steps (set config.optimizer.decay_steps to change it).", self.total_steps,
                        int(saved), int(saved))
      return int(saved)
    return self.total_steps

  def _check_meta(self, meta: dict) -> None:
    try:
      config_check.check_resume(meta.get("config", {}), config_check.to_dict(self.config), self.allow_config_change)
    except config_check.ConfigError as e:
      raise ckpt_lib.CheckpointMismatch(str(e)) from None
    workers = {n: td.workers for n, td in self.data.items()}
    saved = meta.get("workers", workers)
    if saved != workers:  # fine: the data do not depend on the worker count (global sample order, pipeline.py)
      logging.info("Resuming with %s data worker(s) per task (the checkpoint ran with %s): same batches.", workers,
                   saved)

  def _compile(self) -> None:
    hits = [compile_cache.hits()]

    def log(name, step):
      cached = " (loaded from the persistent compilation cache)" if compile_cache.hits() > hits[0] else ""
      hits[0] = compile_cache.hits()
      logging.info("Compiled task %r in %.1fs%s; per-device memory (MiB): %s", name, step.seconds, cached,
                   ", ".join(f"{k}={v:,.1f}" for k, v in step.memory.items()) or "not reported by this backend")

    batches = {n: step_lib.abstract_batch(self.local_abstract[n], self.batch_size) for n in self.tasks}
    steps = step_lib.compile_tasks(self.config, self.method, self.optimizer, self.layout, self.mesh, batches,
                                   {n: self.data[n].normalize for n in self.tasks}, on_compiled=log)
    self.compiled = {n: s.compiled for n, s in steps.items()}

  # ----------------------------------------------------------------------------------------------------- loop

  def run(self) -> dict[str, Any]:
    self._setup()
    if jax.process_count() > 1:  # restore, data workers and compiling take longer on a busy host: start step 1
      # together (CPU/gloo gives up on a collective whose peers are 30 s late; a coordination-service barrier waits)
      from orbax.checkpoint import multihost as ocp_multihost  # pylint: disable=g-import-not-at-top
      # The key counts this process's runs (every process calls train() the same number of times; a key may be
      # used once): not the workdir, which may be spelled differently on each host.
      ocp_multihost.get_barrier_sync_fn()(key=f"mmrs_train_start_{next(_RUN_STARTS)}", timeout_ms=600_000)
    cfg = self.config
    log_every = cfg.log_every_steps
    ckpt_every = cfg.get("checkpoint_every_steps", 0)
    vis_every = cfg.get("visualize_every_steps", 0)
    sharding = mesh_lib.batch_sharding(self.mesh)
    self._window_start, self._paused = (self.step, time.perf_counter()), 0.0
    self.last_losses: dict[str, float] = {}
    log_due = None
    preempted = False
    start_interval, vis_done = (self.step // vis_every if vis_every else 0), {}
    profiler = metrics_lib.StepProfiler(cfg.get("profile_steps", ""), self.logdir / "tensorboard")
    self._call_hooks("start")
    while self.step < self.total_steps:
      if self.preemption.reached(self.step):
        logging.warning("Preemption: saving step %d and exiting.", self.step)
        self._save()
        preempted = True
        break
      name = self.schedule.task_name(self.step)
      batch = data_lib.global_batch(self.iters[name].next(), sharding, self.batch_size, name)
      profiler.before_step(self.step)
      self.state, metrics = self.compiled[name](self.state, batch, np.int32(self.step))
      self.step += 1
      profiler.after_step(self.step, self.state)
      self.pending.append(_Pending(self.step, name, metrics))
      if log_due is not None:  # the next step is already queued: fetching now costs the device nothing
        self._flush(upto=log_due)
        log_due = None
      if self.step % log_every == 0:
        log_due = self.step
      # Every task gets a PNG in each interval (with alternating tasks, a plain `step % every` would always hit
      # the same task): the first step of each task once the interval is reached.
      if vis_every and self.step // vis_every > vis_done.get(name, start_interval):
        vis_done[name] = self.step // vis_every
        self._visualize(name, batch)
      if any(h.due(self.step) for h in self.hooks):
        self._call_hooks("run", only_due=True)
      if ckpt_every and self.step % ckpt_every == 0:
        self._save()
    profiler.stop()
    if not preempted and self.checkpointer.latest_step() != self.step:
      self._save()
    self._flush(upto=self.step)
    if not preempted:
      self._call_hooks("finish")
    self.checkpointer.wait()
    return {"step": self.step, "losses": dict(self.last_losses), "skipped_steps": self.skipped,
            "preempted": preempted, "state": self.state}

  def _call_hooks(self, what: str, only_due: bool = False) -> None:
    """Runs `what` of every hook (of the due ones with only_due); its time is a pause, not training time."""
    if not self.hooks:
      return
    jax.block_until_ready(self.state)  # queued training steps finish first: that time is training, not pause
    t0 = time.perf_counter()
    for hook in self.hooks:
      if not only_due or hook.due(self.step):
        getattr(hook, what)(self)
    self._paused += time.perf_counter() - t0

  def _save(self) -> None:
    self._flush(upto=self.step)  # raises before saving if a step since the last check was not finite
    t0 = time.perf_counter()
    meta = {"seed": self.config.seed, "config": config_check.to_dict(self.config), "tasks": list(self.tasks),
            "bands": {n: _jsonable(td.bands) for n, td in self.data.items()},
            "stats": {n: _jsonable(td.stats) for n, td in self.data.items()},
            "workers": {n: td.workers for n, td in self.data.items()}, "mesh": self.config.mesh,
            "decay_steps": self.decay_steps}
    states = {n: it.get_state() for n, it in self.iters.items()}
    if self.checkpointer.save(self.step, self.state, states, meta):
      logging.info("Saving checkpoint %d (async).", self.step)
    self._paused += time.perf_counter() - t0  # not training time: keep it out of images/s and the ETA

  def _flush(self, upto: int) -> None:
    """Fetches pending metrics of steps <= upto, checks finiteness, writes one record per task."""
    ready = [p for p in self.pending if p.step <= upto]
    if not ready:
      return
    self.pending = [p for p in self.pending if p.step > upto]
    values = jax.device_get([p.metrics for p in ready])
    now = time.perf_counter()
    per_task: dict[str, list[dict]] = {}
    for p, m in zip(ready, values):
      if not bool(m["finite"]):
        self._nonfinite(p, m)
        continue
      per_task.setdefault(p.task, []).append(m)
    start_step, start_time = self._window_start
    steps = upto - start_step
    elapsed = max(now - start_time - self._paused, 1e-9)
    self._window_start, self._paused = (upto, now), 0.0
    images_per_s = steps * self.batch_size / elapsed
    flops = sum(self._flops(p.task) * self.batch_size for p in ready)
    mfu = flops / elapsed / self.peak_flops if flops and self.peak_flops > 0 else float("nan")  # NaN peak: n/a
    for task, ms in per_task.items():
      mean = {k: float(np.mean([metrics_lib.to_python(m[k]) for m in ms])) for k in ms[0] if k != "finite"}
      self.last_losses[task] = mean["loss"]
      record = {"step": upto, "task": task, **mean, "steps_in_window": len(ms), "images_per_s": images_per_s,
                "mfu": mfu, "skipped_steps": self.skipped}
      if self.data[task].skipped is not None:
        record["skipped_records"] = int(self.data[task].skipped())
      self.writer.write(record)
    if jax.process_index() == 0:
      logging.info(metrics_lib.progress_line(upto, self.total_steps, self.last_losses, images_per_s, mfu,
                                             elapsed / max(steps, 1)))

  def _flops(self, task: str) -> float:
    try:
      return float(self.method.flops_per_sample(task))
    except Exception:  # pylint: disable=broad-except  (MFU is informative; never stop training for it)
      return 0.0

  def _nonfinite(self, p: _Pending, m: Mapping[str, Any]) -> None:
    detail = f"loss={metrics_lib.to_python(m['loss'])}, grad_norm={metrics_lib.to_python(m['grad_norm'])}"
    if self.config.get("on_nonfinite", "stop") == "skip":
      self.skipped += 1
      logging.warning("Skipped step %d (task %r): non-finite %s; the state was left unchanged (%d skipped so far).",
                      p.step, p.task, detail, self.skipped)
      return
    raise NonFiniteError(
        f"Step {p.step} (task {p.task!r}) produced a non-finite value ({detail}). Training stopped without saving; "
        f"the last good checkpoint is step {self.checkpointer.latest_step()} in {self.workdir / 'checkpoints'}. "
        "Check the data of that step, lower config.optimizer.learning_rate or raise clip_norm, or set "
        "config.on_nonfinite='skip' to skip such steps.")

  def _visualize(self, name: str, batch) -> None:
    """Reconstruction PNGs (methods with `reconstruct`); a failure here is logged, never fatal."""
    if self._visualize_broken or not hasattr(self.method, "reconstruct"):
      return
    if self.tasks[name].batch_kind != "images":
      return
    jax.block_until_ready(self.state)  # queued training steps finish first: that time is training, not pause
    t0 = time.perf_counter()
    try:
      from mmrs.methods import visualize  # pylint: disable=g-import-not-at-top
      if name not in self._visualize_fns:
        normalize = self.data[name].normalize
        idx = self.task_index[name]

        def fn(params, method_state, batch, step):
          batch = jax.tree.map(lambda x: x[:4], normalize(batch) if normalize else batch)
          return self.method.reconstruct(params, method_state, batch, step_lib.step_rng(self.config.seed, step, idx))
        self._visualize_fns[name] = jax.jit(fn, out_shardings=mesh_lib.replicated(self.mesh))
      out = jax.device_get(self._visualize_fns[name](self.state["params"], self.state["method_state"], batch,
                                                     np.int32(self.step)))
      if jax.process_index() == 0:
        path = self.logdir / "reconstructions" / f"step_{self.step:08d}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:  # a gs:// logdir: the PNG is drawn locally, then uploaded
          local = os.path.join(tmp, path.name) if metrics_lib.is_remote(path) else str(path)
          visualize.save_reconstruction_png(out, self.data[name].bands, local)
          if local != str(path):
            path.write_bytes(epath.Path(local).read_bytes())
          self.writer.write_image(f"reconstructions/{name}", local, self.step)
    except Exception as e:  # pylint: disable=broad-except
      self._visualize_broken = True
      logging.warning("Reconstruction PNGs are off for this run: %s: %s", type(e).__name__, e)
    self._paused += time.perf_counter() - t0

  def close(self) -> None:
    self.preemption.close()
    if self.writer is not None:
      self.writer.close()


def _jsonable(x: Any) -> Any:
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  return x
