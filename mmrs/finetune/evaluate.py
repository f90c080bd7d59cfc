"""Evaluation of a finetune run: one pass over config.data.eval, metrics, results.json + results.md.

`run_evaluation(config, params, state, workdir) -> dict` is what `launch.main` calls at the end of a finetune run
(params/state as the train loop holds them). The split is read once, in order (no shuffle, no repeat, centre
crops); the last partial batch is padded and its padding masked out (`valid`). Inputs are normalized with the
TRAINING data's statistics (what the model saw). Several processes: each reads its share of the records, the
batches become global arrays and the outputs are gathered to every process, so all compute the same metrics;
process 0 writes the files.

Standalone, on a finished run's latest checkpoint:
    python -m mmrs.finetune.evaluate --config=configs/finetune/bigearthnet.py:demo --workdir=runs/ft_demo
"""
from __future__ import annotations

import functools
import math
import time
from typing import Any

from absl import logging
import jax
import numpy as np

from mmrs.finetune import metrics as metrics_lib
from mmrs.finetune import report


def _class_names(config, label_set: str) -> tuple[str, ...]:
  names = tuple(config.finetune.get("class_names", ()) or ())
  if names:
    return names
  from mmrs.data import label_sets  # pylint: disable=g-import-not-at-top
  return label_sets.REGISTRY[label_set].names if label_set in label_sets.REGISTRY else ()


def _unbox(tree):
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def run_evaluation(config, params, state, workdir: str, *, method=None, step: int | None = None) -> dict:
  """Evaluates on config.data.eval; writes results.json / results.md into `workdir`; returns the result dict."""
  from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import method as method_lib  # pylint: disable=g-import-not-at-top

  method = method or method_lib.build(config)
  ft = config.finetune
  eval_cfg = config.data.eval
  pcount, pindex = jax.process_count(), jax.process_index()
  batch_size = int(config.get("eval_batch_size", 0) or config.batch_size)
  batch_size -= batch_size % pcount
  train_info = pipeline_lib.describe(config.data.train, method.modalities)
  pipe = pipeline_lib.make_pipeline(
      eval_cfg, modalities=method.modalities, global_batch_size=batch_size, seed=config.seed,
      process_index=pindex, process_count=pcount, normalize="none", split=eval_cfg.get("split", "test"),
      shuffle=False, repeat=False, drop_remainder=False)
  normalize = functools.partial(normalize_lib.normalize_batch,
                                normalizer=method.input_normalizer(train_info.normalizer))  # as in training
  params, state = _unbox(params), _unbox(state)
  label_key = method.label_key
  keep = set(method.modalities) | {label_key}

  @jax.jit
  def predict(params, state, batch):
    out = method.predict(params, state, normalize(batch))
    return out if ft.task == "multilabel" else out.argmax(-1)  # class ids: less to fetch than logits

  # Every process must run the same number of steps: its share is ceil or floor of N / processes.
  local_batch = batch_size // pcount
  steps = math.ceil(math.ceil(pipe.num_records / pcount) / local_batch)
  names = _class_names(config, ft.label_set)
  reported = tuple(ft.get("report_classes", ()) or ())
  unknown = [c for c in reported if c not in names]
  if unknown:
    raise ValueError(f"finetune.report_classes names {unknown}, not classes of {ft.label_set} ({list(names)}).")
  acc = metrics_lib.make_metrics(ft.task, method.num_classes, names, [names.index(c) for c in reported])
  start = time.perf_counter()
  template = None
  for _ in range(steps):
    try:
      local = next(pipe.iterator)
      local = {k: np.asarray(v) for k, v in local.items() if k in keep or k == "valid"}
      template = template or {k: np.zeros_like(v) for k, v in local.items()}
    except StopIteration:  # this process ran out one batch early: feed padding
      local = {k: np.zeros_like(v) for k, v in template.items()}
    out, labels, valid = _run(predict, params, state, local, label_key, batch_size)
    acc.update(out, labels, valid)
  pipe.close()
  result = _describe(config, method, eval_cfg, step)
  result["metrics"] = acc.result()
  result["num_examples"] = result["metrics"].get("num_examples", result["metrics"].get("num_pixels"))
  result["seconds"] = round(time.perf_counter() - start, 2)
  if pindex == 0:
    report.write(workdir, result)
  logging.info("Evaluation on %s: %s", eval_cfg.shards, result["metrics"])
  return result


def _run(predict, params, state, local, label_key, batch_size):
  """(outputs, labels, valid) of one batch as host numpy, global over processes."""
  if jax.process_count() == 1:
    images = {k: v for k, v in local.items() if k not in (label_key, "valid")}
    return np.asarray(predict(params, state, images)), local[label_key], local["valid"]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    raise RuntimeError("Multi-process evaluation needs the training mesh set (jax.set_mesh(mesh)) around it.")
  sharding = mesh_lib.batch_sharding(mesh)
  images = {k: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:])
            for k, v in local.items() if k not in (label_key, "valid")}
  out = predict(params, state, images)
  out = multihost_utils.process_allgather(out, tiled=True)
  labels = multihost_utils.process_allgather(local[label_key], tiled=False).reshape(
      (batch_size,) + local[label_key].shape[1:])
  valid = multihost_utils.process_allgather(local["valid"], tiled=False).reshape(batch_size)
  return np.asarray(out), labels, valid


def _describe(config, method, eval_cfg, step) -> dict[str, Any]:
  ft = config.finetune
  meta = method.meta or {}
  return dict(
      dataset=config.finetune.get("dataset", "") or ft.label_set, task=ft.task, label_set=ft.label_set,
      modalities=list(method.modalities), fusion=method.fusion if len(method.modalities) > 1 else "", head=ft.head, scenario="frozen" if ft.frozen else "finetuned",
      label_fraction=float(ft.label_fraction), split=eval_cfg.get("split", "test"), shards=eval_cfg.shards,
      init_from=config.get("init_from", "") or "random init", encoder_source=meta.get("source", {}),
      step=step, num_classes=method.num_classes)


def evaluate_checkpoint(config, workdir: str) -> dict:
  """Restores the latest checkpoint of a finetune run (params + method state) and evaluates it."""
  from mmrs.finetune import convert  # pylint: disable=g-import-not-at-top

  params, state, meta = convert.read_checkpoint(workdir)
  return run_evaluation(config, params, state, workdir, step=meta.get("step"))


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  result = evaluate_checkpoint(flags.FLAGS.config, flags.FLAGS.workdir)
  print(report.table([result]))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "A configs/finetune/*.py config.", lock_config=True)
  flags.DEFINE_string("workdir", None, "The finetune run's workdir (checkpoints/ inside).")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
