"""Downstream metrics in numpy, accumulated batch by batch over an evaluation split.

Each accumulator has `update(outputs, labels, valid)` (host numpy; `valid` masks the padding of a last partial
batch) and `result() -> dict` with the metric names used in results tables:
  multilabel:   map_micro, map_macro (average precision, as sklearn's `average_precision_score`), f1_micro,
                f1_macro (at probability 0.5), num_classes_without_positives, and map_macro_present when that
                count is not 0
  class:        accuracy, f1_macro, precision_weighted, recall_weighted, f1_weighted
  segmentation: miou, average_accuracy, pixel_accuracy, and iou_<name> per class (e.g. iou_water)
Classification and segmentation metrics stream through a confusion matrix; average precision needs a ranking, so
the multi-label accumulator keeps the scores (19 floats per image: 10 MB for BigEarthNet's 125k test images).
Averages follow sklearn's conventions: multi-label macro F1 over every class column (a class absent from labels
and predictions counts 0, as sklearn's f1_score(average="macro") on multi-hot arrays); single-label macro F1 and
weighted scores over the classes present in the labels or the predictions (zero_division=0); macro AP over every
class column, a class without a positive label counting 0 (sklearn's average_precision_score(average="macro"),
which warns about it), so map_macro is comparable with numbers computed by sklearn; where a split lacks some class,
map_macro_present averages over the classes that have a positive (the convention that skips them) and
num_classes_without_positives says how many were counted 0. mIoU and average accuracy average over classes with
at least one positive label (mIoU: a non-empty union), so a class absent from a small split does not count as 0.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
  """AP of one binary problem = sum_n (R_n - R_{n-1}) P_n over distinct score thresholds (sklearn's definition)."""
  labels = np.asarray(labels).astype(bool).ravel()
  scores = np.asarray(scores, np.float64).ravel()
  npos = labels.sum()
  if npos == 0:
    return float("nan")
  order = np.argsort(-scores, kind="mergesort")
  s, y = scores[order], labels[order]
  # Last index of each run of equal scores: ties are one threshold.
  last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
  tp = np.cumsum(y)[last]
  fp = (last + 1) - tp
  precision = tp / (tp + fp)
  recall = tp / npos
  return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1_from_counts(tp, fp, fn):
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def _safe_div(a, b):
  return np.where(b > 0, a / np.maximum(b, 1e-300), 0.0)


class MultiLabelMetrics:
  """Multi-hot labels (B, C) and logits or probabilities (B, C)."""

  def __init__(self, num_classes: int, from_logits: bool = True, threshold: float = 0.5):
    self.num_classes, self.from_logits, self.threshold = num_classes, from_logits, threshold
    self._scores: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []

  def update(self, outputs, labels, valid=None):
    outputs, labels = np.asarray(outputs, np.float32), np.asarray(labels)
    if valid is not None:
      keep = np.asarray(valid).astype(bool)
      outputs, labels = outputs[keep], labels[keep]
    probs = 1.0 / (1.0 + np.exp(-outputs)) if self.from_logits else outputs
    self._scores.append(probs)
    self._labels.append(labels.astype(np.uint8))

  def result(self) -> dict:
    scores = np.concatenate(self._scores) if self._scores else np.zeros((0, self.num_classes), np.float32)
    labels = np.concatenate(self._labels) if self._labels else np.zeros((0, self.num_classes), np.uint8)
    per_class = np.array([average_precision(labels[:, c], scores[:, c]) for c in range(self.num_classes)])
    pred = scores >= self.threshold
    y = labels.astype(bool)
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    present = np.isfinite(per_class)  # average_precision is nan for a class without a positive label
    out = {
        "map_micro": 100 * average_precision(labels, scores),
        "map_macro": 100 * float(np.where(present, per_class, 0.0).mean()),  # sklearn: an absent class counts 0
        "f1_micro": 100 * float(_f1_from_counts(tp.sum(), fp.sum(), fn.sum())),
        # Over every class column, an absent one (no label, no prediction) counting 0: sklearn's multi-label
        # f1_score(average="macro", zero_division=0).
        "f1_macro": 100 * float(_f1_from_counts(tp, fp, fn).mean()),
        "num_examples": int(len(labels)),
        "num_classes_without_positives": int((~present).sum()),
    }
    if not present.all():
      out["map_macro_present"] = 100 * float(per_class[present].mean()) if present.any() else float("nan")
    return out


class ConfusionMatrix:
  """A streaming (C, C) confusion matrix: rows = true class, columns = predicted; labels < 0 are ignored."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.matrix = np.zeros((num_classes, num_classes), np.int64)

  def add(self, pred, true, valid=None):
    pred, true = np.asarray(pred).ravel(), np.asarray(true).ravel()
    keep = true >= 0
    if valid is not None:  # (B,) example validity -> every element of that example
      keep &= np.repeat(np.asarray(valid).astype(bool).ravel(), true.size // max(np.asarray(valid).size, 1))
    true, pred = true[keep], pred[keep]
    if true.size and true.max() >= self.num_classes:
      raise ValueError(f"Label {int(true.max())} is out of range for num_classes={self.num_classes} "
                       "(config finetune.num_classes).")
    self.matrix += np.bincount(true * self.num_classes + pred, minlength=self.num_classes**2).reshape(
        self.num_classes, self.num_classes)


def _predictions(outputs, labels) -> np.ndarray:
  """Logits (one more axis than the labels) -> argmax; already-argmaxed predictions pass through."""
  outputs, labels = np.asarray(outputs), np.asarray(labels)
  return (outputs.argmax(-1) if outputs.ndim == labels.ndim + 1 else outputs).astype(np.int64)


class ClassMetrics:
  """Single-label classification: integer labels (B,) and logits (B, C) (or predicted classes (B,))."""

  def __init__(self, num_classes: int):
    self.cm = ConfusionMatrix(num_classes)

  def update(self, outputs, labels, valid=None):
    self.cm.add(_predictions(outputs, labels), np.asarray(labels).astype(np.int64), valid)

  def result(self) -> dict:
    m = self.cm.matrix.astype(np.float64)
    tp, support, predicted = np.diag(m), m.sum(1), m.sum(0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _f1_from_counts(tp, predicted - tp, support - tp)
    present = (support + predicted) > 0
    total = m.sum()
    w = support / max(total, 1)
    return {
        "accuracy": 100 * float(tp.sum() / max(total, 1)),
        "f1_macro": 100 * float(f1[present].mean()) if present.any() else 0.0,
        "precision_weighted": 100 * float((w * precision).sum()),
        "recall_weighted": 100 * float((w * recall).sum()),
        "f1_weighted": 100 * float((w * f1).sum()),
        "num_examples": int(total),
    }


class SegmentationMetrics:
  """Per-pixel labels (B, H, W) with -1 = ignore, and logits (B, H, W, C) (or predicted classes (B, H, W))."""

  def __init__(self, num_classes: int, class_names: Sequence[str] = (), report_classes: Sequence[int] = ()):
    """report_classes: the class indices the paper averages over (e.g. DFC2020's 8 of 10: RS-BYOL "excluded
    Savanna and Snow/Ice"); miou / average_accuracy then average over those and miou_all / average_accuracy_all
    over every class are reported too. Empty = every class."""
    self.cm = ConfusionMatrix(num_classes)
    self.class_names = tuple(class_names)
    self.report_classes = tuple(int(c) for c in report_classes)

  def update(self, outputs, labels, valid=None):
    self.cm.add(_predictions(outputs, labels), np.asarray(labels).astype(np.int64), valid)

  def result(self) -> dict:
    m = self.cm.matrix.astype(np.float64)
    tp, support, predicted = np.diag(m), m.sum(1), m.sum(0)
    union = support + predicted - tp
    iou = _safe_div(tp, union)
    def averages(classes):
      sel = np.zeros(len(tp), bool)
      sel[list(classes)] = True
      u, s = sel & (union > 0), sel & (support > 0)
      return (100 * float(iou[u].mean()) if u.any() else 0.0,
              100 * float(_safe_div(tp, support)[s].mean()) if s.any() else 0.0)

    miou, aa = averages(self.report_classes or range(len(tp)))
    out = {"miou": miou, "average_accuracy": aa, "pixel_accuracy": 100 * float(tp.sum() / max(m.sum(), 1)),
           "num_pixels": int(m.sum())}
    if self.report_classes:
      out["miou_all"], out["average_accuracy_all"] = averages(range(len(tp)))
    for c, name in enumerate(self.class_names):
      out[f"iou_{metric_name(name)}"] = 100 * float(iou[c])
    return out


def metric_name(class_name: str) -> str:
  """'not water' -> 'not_water', 'Urban/Built-up' -> 'urban_built_up'."""
  return re.sub(r"[^0-9a-z]+", "_", class_name.lower()).strip("_")


def make_metrics(task: str, num_classes: int, class_names: Sequence[str] = (), report_classes: Sequence[int] = ()):
  """The accumulator for `finetune.task` (multilabel | class | segmentation)."""
  if task == "multilabel":
    return MultiLabelMetrics(num_classes)
  if task == "class":
    return ClassMetrics(num_classes)
  if task == "segmentation":
    return SegmentationMetrics(num_classes, class_names, report_classes)
  raise ValueError(f"finetune.task={task!r} is unknown; choose multilabel, class or segmentation.")
