"""Evaluation of a finetune run: one pass over a split of config.data.eval's shards, metrics, results files.

`Evaluator(config, method)(params, state, split)` evaluates one split; its jitted predict function is compiled once
and reused by every call (the validation curve during training and the final test, mmrs/finetune/validation.py).
`run_evaluation(config, params, state, workdir) -> dict` evaluates config.data.eval's split and writes results.json
/ results.md (`python -m mmrs.finetune.evaluate` below). A split is read once, in order (no shuffle, no repeat,
centre crops); the last partial batch is padded and its padding masked out (`valid`). Where the manifest counts
chips per split (Sen1Floods11), the result's "coverage" says how many of the published chips were evaluated.
Inputs are normalized with the TRAINING data's statistics (what the model saw). Several processes: on config.mesh
over all devices (the training layout), each process reads the rows of each global batch its devices hold, images,
labels and `valid` become global arrays and are gathered back in row order, so every process computes the metrics
of one process with all the devices; process 0 writes the files.

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


def layout(config, batch_size: int):
  """(mesh, batch size) of an evaluation: one process evaluates on its own (None, `batch_size`); several evaluate
  global batches on config.mesh over all devices (the training layout), the batch rounded down to a multiple of
  the mesh's batch shards (each process then reads the rows its devices hold: `process_rows`)."""
  if jax.process_count() == 1:
    return None, batch_size
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(config.mesh)
  shards = math.prod(mesh.shape.get(a, 1) for a in mesh_lib.BATCH_AXES)
  if batch_size < shards:
    raise ValueError(f"eval_batch_size / batch_size={batch_size} is below the {shards} batch shards of "
                     f"config.mesh={config.mesh!r}: raise it.")
  return mesh, batch_size - batch_size % shards


def process_rows(mesh, batch_size: int):
  """The rows of each global batch this process reads (None: all, one process)."""
  if mesh is None:
    return None
  from mmrs.train import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.batch_rows(mesh, batch_size)


def to_global(local: dict, batch_size: int, mesh) -> dict:
  """This process's rows of one batch (a tree of (rows, ...) numpy arrays) as global arrays of `batch_size` rows, placed
  where its devices hold them; a copy of `local` with one process (mesh None)."""
  if mesh is None:
    return dict(local)
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  sharding = mesh_lib.batch_sharding(mesh)
  return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, v, (batch_size,) + v.shape[1:]),
                      local)


def gather(tree, mesh):
  """Global batch arrays -> host numpy of every row, in global row order, on every process."""
  if mesh is None:
    return jax.tree.map(np.asarray, tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


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


class Evaluator:
  """Evaluates (params, method state) on any split of config.data.eval's shards.

  The predict function is jitted once per Evaluator and reused by every call (validation during training, the
  final test): the batches of every split have one shape (the last one is padded), and params with the training
  state's shardings hit the same compiled executable. `traces` counts how often it was traced (tests).
  """

  def __init__(self, config, method):
    from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top
    self.config, self.method = config, method
    self.ft = config.finetune
    self.mesh, self.batch_size = layout(config, int(config.get("eval_batch_size", 0) or config.batch_size))
    normalize = functools.partial(normalize_lib.normalize_batch,
                                  normalizer=method.training_normalizer())  # as in training
    names = _class_names(config, self.ft.label_set)
    reported = tuple(self.ft.get("report_classes", ()) or ())
    unknown = [c for c in reported if c not in names]
    if unknown:
      raise ValueError(f"finetune.report_classes names {unknown}, not classes of {self.ft.label_set} ({list(names)}).")
    self.names, self.reported = names, [names.index(c) for c in reported]
    self.traces = 0
    multilabel = self.ft.task == "multilabel"

    def predict(params, state, batch):
      self.traces += 1
      out = method.predict(params, state, normalize(batch))
      return out if multilabel else out.argmax(-1)  # class ids: less to fetch than logits

    self.predict = jax.jit(predict)

  def data_config(self, split: str):
    """config.data.eval reading `split` (a TFDS spec's own split is replaced by `split`)."""
    cfg = self.config.data.eval.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.split = split
      shards = str(cfg.shards)
      if shards.startswith("tfds:"):
        from mmrs.data import sources  # pylint: disable=g-import-not-at-top
        name, _, data_dir = sources.parse_tfds_spec(shards)
        cfg.shards = f"tfds:{name}" + (f"@{data_dir}" if data_dir else "")
    return cfg

  def describe(self, split: str):
    """The pipeline's DatasetInfo of `split` (raises sources.ShardError when the shards lack it)."""
    from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    return pipeline_lib.describe(self.data_config(split), self.method.modalities, split)

  def __call__(self, params, state, split: str) -> dict:
    """{"split", "metrics", "num_examples", "num_records", "seconds", "coverage"?} of one pass over `split`."""
    from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    pcount, pindex = jax.process_count(), jax.process_index()
    eval_cfg = self.data_config(split)
    rows = process_rows(self.mesh, self.batch_size)  # the rows this process's devices hold
    pipe = pipeline_lib.make_pipeline(
        eval_cfg, modalities=self.method.modalities, global_batch_size=self.batch_size, seed=self.config.seed,
        process_index=pindex, process_count=pcount, rows=rows, normalize="none", split=split, shuffle=False,
        repeat=False, drop_remainder=False)
    params, state = _unbox(params), _unbox(state)
    label_key = self.method.label_key
    keep = set(self.method.modalities) | {label_key}
    steps = math.ceil(pipe.num_records / self.batch_size)  # global batches (the last padded): the same everywhere
    acc = metrics_lib.make_metrics(self.ft.task, self.method.num_classes, self.names, self.reported)
    start = time.perf_counter()
    template = None
    try:
      for _ in range(steps):
        try:
          local = next(pipe.iterator)
          local = {k: np.asarray(v) for k, v in local.items() if k in keep or k == "valid"}
          template = template or {k: np.zeros_like(v) for k, v in local.items()}
        except StopIteration:  # this process ran out one batch early: feed padding
          local = {k: np.zeros_like(v) for k, v in template.items()}
        out, labels, valid = _run(self.predict, params, state, local, label_key, self.batch_size, self.mesh)
        acc.update(out, labels, valid)
    finally:
      pipe.close()
    metrics = acc.result()
    result = {"split": split, "metrics": metrics,
              "num_examples": metrics.get("num_examples", metrics.get("num_pixels")),
              "num_records": int(pipe.num_records), "seconds": round(time.perf_counter() - start, 2)}
    coverage = chip_coverage(pipe.manifest or {}, split, eval_cfg, self.method.modalities)
    if coverage:
      result["coverage"] = coverage
    return result


def chip_coverage(manifest: dict, split: str, data_cfg, modalities) -> dict | None:
  """How many of the split's published chips this evaluation scores, from the manifest's `coverage` section
  (written by data_prep.sen1floods11: chips per split, those with S1, the published count): an S1+S2 (or S1)
  evaluation reads the paired group only, so chips whose S1 was dropped are not scored. None without coverage."""
  from mmrs.data import sources  # pylint: disable=g-import-not-at-top
  cov = (manifest.get("coverage") or {}).get(split)
  if not cov:
    return None
  groups = tuple(data_cfg.get("groups", None) or sources.default_groups(modalities))
  evaluated = int(cov["chips"] if "s2_only" in groups else cov.get("chips_with_s1", cov["chips"]))
  out = {"evaluated_chips": evaluated, "chips_in_shards": int(cov["chips"])}
  published = cov.get("published_chips")
  if published is not None:
    out["published_chips"] = int(published)
  missing = (published if published is not None else cov["chips"]) - evaluated
  if missing > 0:
    why = []
    if evaluated < cov["chips"]:
      why.append(f"{cov['chips'] - evaluated} chip(s) without S1 are not read by a {'+'.join(modalities)} "
                 "evaluation (finetune.modalities=s2 scores them)")
    if published is not None and cov["chips"] < published:
      why.append(f"{published - cov['chips']} published chip(s) are not in the shards")
    out["note"] = (f"{evaluated} of the {published if published is not None else cov['chips']} "
                   f"{'published ' if published is not None else ''}{split} chips evaluated: " + "; ".join(why))
  else:
    out["note"] = f"all {evaluated} {'published ' if published is not None else ''}{split} chips evaluated"
  return out


def run_evaluation(config, params, state, workdir: str, *, method=None, step: int | None = None) -> dict:
  """Evaluates on config.data.eval; writes results.json / results.md into `workdir`; returns the result dict."""
  from mmrs.finetune import method as method_lib  # pylint: disable=g-import-not-at-top
  method = method or method_lib.build(config)
  split = config.data.eval.get("split", "test")
  out = Evaluator(config, method)(params, state, split)
  result = describe_run(config, method, step)
  result.update(test=out, **{k: out[k] for k in ("metrics", "num_examples", "seconds")})
  if "coverage" in out:
    result["coverage"] = out["coverage"]
  if jax.process_index() == 0:
    report.write(workdir, result)
  logging.info("Evaluation on %s split %s: %s", config.data.eval.shards, split, result["metrics"])
  return result


def _run(predict, params, state, local, label_key, batch_size, mesh):
  """(outputs, labels, valid) of one batch as host numpy, global over processes in global row order."""
  arrays = to_global(local, batch_size, mesh)
  labels, valid = arrays.pop(label_key), arrays.pop("valid")
  return gather((predict(params, state, arrays), labels, valid), mesh)


def describe_run(config, method, step) -> dict[str, Any]:
  """What was evaluated: dataset, task, inputs, head, scenario, labels, split, shards, encoder, step."""
  ft = config.finetune
  eval_cfg = config.data.eval
  meta = method.meta or {}
  return dict(
      dataset=config.finetune.get("dataset", "") or ft.label_set, task=ft.task, label_set=ft.label_set,
      modalities=list(method.modalities), fusion=method.fusion if len(method.modalities) > 1 else "", head=ft.head, scenario="frozen" if ft.frozen else "finetuned",
      probe_batchnorm=bool(getattr(method, "probe_batchnorm", False)),
      modality_dropout=float(getattr(method, "modality_dropout", 0.0)),
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
