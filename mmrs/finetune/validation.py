"""Model selection during finetuning: validate every `finetune.eval_every_steps`, keep the best state, test that one.

`Selection` is a train-loop hook (mmrs.train.loop.StepHook). Every `eval_every_steps` steps (0: only after the last
step), and always after the last step, it evaluates the state on the validation split (`finetune.val_split` of
config.data.eval's shards) and logs the metrics as task "val" (metrics.jsonl + TensorBoard `val/<metric>`). When
the dataset's main metric (MAIN_METRICS: one per dataset, with its direction) improves, the state's params and
method state are saved to `<workdir>/best_checkpoint/<step>/` and the curve to `<workdir>/validation.json`.
`select()` then hands back the best state (restored from disk unless it is the final one) for the test evaluation.

Without a validation split (the shards have none, it is empty for the input modalities, or it is the training or
the test split, as DFC2020's contest "val" set that mmrs trains on), the last step is evaluated and the results
say so ("no validation split: evaluated the last step (...)").

Safe on disk and across preemption:
- best_checkpoint/ is its own Orbax CheckpointManager (max_to_keep=1, synchronous): a step is written into a
  temporary directory and renamed when complete, the previous best is deleted only after that, and the step
  carries its own JSON (step, metric, value, metrics), so the best-so-far is known from the checkpoint alone. The
  train state's checkpoints/ are untouched: resume works as for any run.
- validation.json (the curve, the best step) is written atomically (temporary file + rename) after the best
  checkpoint; if a run dies between the two, the best checkpoint's own JSON wins and its point joins the curve.
- A resumed run keeps the curve and the best-so-far and does not evaluate a step of the curve again: evaluations
  made after the last train checkpoint (the loop resumes exactly, so the resumed run recomputes those same states)
  stay valid, and a new best is always a later step. A run that starts from step 0 (no train checkpoint) starts a
  new curve.
"""
from __future__ import annotations

import json
import math
from typing import Any

from absl import logging
import jax
from etils import epath

from mmrs import atomic_io
from mmrs.train import loop as loop_lib

# dataset -> (metric, "max" | "min"): the number each paper reports first; model selection maximizes it.
MAIN_METRICS = {
    "bigearthnet": ("map_micro", "max"),  # MixMAE / JointMAE papers: mAP
    "eurosat": ("accuracy", "max"),
    "sen12ms": ("f1_weighted", "max"),  # JointMAE paper: weighted precision / recall / F1
    "dfc2020": ("miou", "max"),  # over the paper's 8 classes (finetune.report_classes)
    "sen1floods11": ("iou_water", "max"),  # MixMAE paper: IoU of the water class
}
TASK_METRICS = {"multilabel": ("map_micro", "max"), "class": ("accuracy", "max"), "segmentation": ("miou", "max")}
STATE_FILE = "validation.json"
BEST_DIR = "best_checkpoint"
NO_VAL = "no validation split: evaluated the last step"


def main_metric(config) -> tuple[str, str]:
  """(metric, "max" | "min") that selects the checkpoint: the dataset's (MAIN_METRICS), else the task's."""
  ft = config.finetune
  return MAIN_METRICS.get(ft.get("dataset", "")) or TASK_METRICS[ft.task]


def is_better(value: float, best: float | None, mode: str) -> bool:
  """True when `value` beats `best` (None: nothing yet). NaN never beats a number; a number beats NaN."""
  if best is None:
    return True
  if math.isnan(value):
    return False
  if math.isnan(best):
    return True
  return value > best if mode == "max" else value < best


def _numbers(metrics: dict) -> dict:
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Selection(loop_lib.StepHook):
  """The validation hook; `select(state, step)` after training gives (params, method_state, selected step)."""

  def __init__(self, config, workdir: str, evaluator):
    self.config, self.evaluator = config, evaluator
    self.workdir = epath.Path(workdir)
    self.every = int(config.finetune.get("eval_every_steps", 0) or 0)
    self.metric, self.mode = main_metric(config)
    self.split = str(config.finetune.get("val_split", "") or "")
    self.curve: list[dict] = []  # [{"step", "metrics", "num_examples"}], by step
    self.best: dict | None = None  # {"step", "value", "metrics", "num_examples"}
    self._manager = None
    self.reason = self._unavailable()
    self.available = not self.reason
    if not self.available:
      logging.warning("%s (%s).", NO_VAL, self.reason)

  def _unavailable(self) -> str:
    """Why there is no validation split ("" when there is one)."""
    from mmrs.data import sources  # pylint: disable=g-import-not-at-top
    data = self.config.data
    if not self.split:
      return "finetune.val_split is empty"
    if self.split == data.eval.get("split", "test"):
      return f"finetune.val_split={self.split!r} is the test split data.eval.split: selecting on it would overstate"
    if self.split == data.train.get("split", "train") and data.train.shards == data.eval.shards:
      return f"finetune.val_split={self.split!r} is the training split data.train.split"
    try:
      self.evaluator.describe(self.split)
    except sources.ShardError as e:
      return str(e)
    return ""

  # --- the hook ----------------------------------------------------------------------------------------------
  def start(self, trainer) -> None:
    if not self.available:
      return
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    from mmrs.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(
        ckpt_lib.absolute(self.workdir / BEST_DIR), item_names=("state", "selection"), options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "selection": ocp.JsonCheckpointHandler()})
    if trainer.step == 0:  # a new run: an earlier curve in this workdir belongs to states that no longer exist
      for step in self._manager.all_steps():
        self._manager.delete(step)
      self.curve, self.best = [], None
      self._write_state()
      return
    self._load()
    for entry in self.curve:  # the writer dropped metrics.jsonl lines after the resumed step: put these back
      if entry["step"] > trainer.step:
        trainer.writer.write({"step": entry["step"], "task": "val", **_numbers(entry["metrics"])})
    if self.best is not None:
      logging.info("Validation resumed: best %s %.4g at step %d; %d evaluation(s) so far.", self.metric,
                   self.best["value"], self.best["step"], len(self.curve))

  def due(self, step: int) -> bool:
    return self.available and self.every > 0 and step % self.every == 0 and not self._evaluated(step)

  def run(self, trainer) -> None:
    self.evaluate(trainer.state, trainer.step, trainer.writer)

  def finish(self, trainer) -> None:
    if self.available and not self._evaluated(trainer.step):
      self.evaluate(trainer.state, trainer.step, trainer.writer)

  # --- evaluation and selection ------------------------------------------------------------------------------
  def _evaluated(self, step: int) -> bool:
    return any(e["step"] == step for e in self.curve)

  def evaluate(self, state, step: int, writer=None) -> dict:
    out = self.evaluator(state["params"], state["method_state"], self.split)
    metrics = out["metrics"]
    if self.metric not in metrics:
      raise ValueError(f"Model selection needs metric {self.metric!r} (mmrs/finetune/validation.py MAIN_METRICS), "
                       f"but the validation evaluation gave {sorted(metrics)}: set finetune.dataset / "
                       "finetune.class_names to match the task.")
    entry = {"step": int(step), "metrics": metrics, "num_examples": out["num_examples"]}
    self.curve = sorted([e for e in self.curve if e["step"] != step] + [entry], key=lambda e: e["step"])
    if writer is not None:
      writer.write({"step": int(step), "task": "val", **_numbers(metrics)})
    value = float(metrics[self.metric])
    improved = is_better(value, None if self.best is None else self.best["value"], self.mode)
    if improved:
      self.best = dict(entry, value=value)
      self._save_best(state, self.best)
    self._write_state()
    logging.info("Validation at step %d: %s %.4g%s (best %.4g at step %d).", step, self.metric, value,
                 " (new best)" if improved else "", self.best["value"], self.best["step"])
    return entry

  def _save_best(self, state, best: dict) -> None:
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    tree = {"params": state["params"], "method_state": state["method_state"]}
    info = dict(best, metric=self.metric, mode=self.mode)
    self._manager.save(best["step"], force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(tree), selection=ocp.args.JsonSave(info)))
    self._manager.wait_until_finished()  # committed (and the previous best deleted) before validation.json names it

  def _write_state(self) -> None:
    if jax.process_index() != 0:
      return
    payload = {"metric": self.metric, "mode": self.mode, "split": self.split, "eval_every_steps": self.every,
               "best_step": None if self.best is None else self.best["step"],
               "best_value": None if self.best is None else self.best["value"], "curve": self.curve}
    self.workdir.mkdir(parents=True, exist_ok=True)
    atomic_io.write_json(self.workdir / STATE_FILE, payload, sort_keys=False)

  def _load(self) -> None:
    """The curve from validation.json and the best from the best checkpoint's own JSON (it wins)."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    path = self.workdir / STATE_FILE
    self.curve, self.best = [], None
    if path.exists():
      try:
        self.curve = list(json.loads(path.read_text()).get("curve", []))
      except (json.JSONDecodeError, AttributeError) as e:
        logging.warning("%s is unreadable (%s): the validation curve restarts from the best checkpoint.", path, e)
    step = self._manager.latest_step()
    if step is not None:
      info = dict(self._manager.restore(step, args=ocp.args.Composite(selection=ocp.args.JsonRestore()))["selection"])
      self.best = {k: info[k] for k in ("step", "value", "metrics", "num_examples")}
      if info.get("metric") != self.metric:
        logging.warning("The best checkpoint was selected by %s, this run selects by %s: its value is recomputed "
                        "from its metrics.", info.get("metric"), self.metric)
        self.best["value"] = float(info["metrics"].get(self.metric, float("nan")))
      if not self._evaluated(step):
        self.curve = sorted(self.curve + [{k: info[k] for k in ("step", "metrics", "num_examples")}],
                            key=lambda e: e["step"])

  def select(self, state, step: int) -> tuple[Any, Any, int]:
    """(params, method_state, step) to test: the best validation state, or the final one without validation."""
    if not self.available or self.best is None or self.best["step"] == step:
      return state["params"], state["method_state"], int(step)
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    tree = {"params": state["params"], "method_state": state["method_state"]}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)  # the live state's shardings: the compiled predict function is reused
    best = self._manager.restore(self.best["step"], args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))["state"]
    logging.info("Testing the best validation state: step %d (%s %.4g); the run ended at step %d.",
                 self.best["step"], self.metric, self.best["value"], step)
    return best["params"], best["method_state"], int(self.best["step"])

  def summary(self, last_step: int) -> dict:
    """results.json's "selection" and "val" entries."""
    selection = {"metric": self.metric, "mode": self.mode, "split": self.split or None,
                 "eval_every_steps": self.every}
    if not self.available or self.best is None:
      selection["note"] = f"{NO_VAL} ({self.reason or 'no validation evaluation was made'})"
      return {"selection": selection, "val": None, "selected_step": int(last_step)}
    selection["note"] = (f"best val {self.metric} ({self.mode}) of {len(self.curve)} evaluation(s): step "
                         f"{self.best['step']} of {last_step}")
    val = {"split": self.split, "metrics": self.best["metrics"], "num_examples": self.best["num_examples"],
           "curve": [{"step": e["step"], "metrics": e["metrics"]} for e in self.curve]}
    return {"selection": selection, "val": val, "selected_step": int(self.best["step"])}

  def close(self) -> None:
    if self._manager is not None:
      self._manager.close()
      self._manager = None
