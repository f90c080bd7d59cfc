"""Downstream metrics against scikit-learn on random data; label-fraction subsets; the results table."""
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from mmrs.finetune import metrics, report, subsets


def _feed(acc, outputs, labels, batch=37):
  """Streams in batches; the last partial batch is padded with garbage rows marked invalid (as evaluate.py does)."""
  n = len(labels)
  for start in range(0, n, batch):
    o, y = outputs[start:start + batch], labels[start:start + batch]
    pad = batch - len(y)
    valid = np.r_[np.ones(len(y), bool), np.zeros(pad, bool)]
    o = np.concatenate([o, np.repeat(o[:1], pad, 0) * 0 + 7]) if pad else o
    y = np.concatenate([y, np.repeat(y[:1], pad, 0)]) if pad else y
    acc.update(o, y, valid)


def test_multilabel_matches_sklearn():
  rng = np.random.default_rng(0)
  y = (rng.random((300, 7)) < np.linspace(0.05, 0.6, 7)).astype(np.float32)
  logits = np.round(rng.normal(size=(300, 7)) + 1.5 * y, 1)  # rounding makes ties, which AP must handle
  acc = metrics.MultiLabelMetrics(7)
  _feed(acc, logits, y)
  r = acc.result()
  p = 1 / (1 + np.exp(-logits))
  assert r["num_examples"] == 300
  assert r["map_micro"] == pytest.approx(100 * skm.average_precision_score(y, p, average="micro"), abs=1e-9)
  assert r["map_macro"] == pytest.approx(100 * skm.average_precision_score(y, p, average="macro"), abs=1e-9)
  assert r["f1_micro"] == pytest.approx(100 * skm.f1_score(y, p >= 0.5, average="micro"), abs=1e-9)
  assert r["f1_macro"] == pytest.approx(100 * skm.f1_score(y, p >= 0.5, average="macro"), abs=1e-9)


def test_multilabel_macro_f1_counts_an_absent_class_as_sklearn_does():
  rng = np.random.default_rng(1)
  y = (rng.random((50, 5)) < 0.4).astype(np.float32)
  y[:, 3] = 0  # class 3: no label ...
  logits = rng.normal(size=(50, 5)) + 2.0 * y
  logits[:, 3] = -9.0  # ... and no prediction
  acc = metrics.MultiLabelMetrics(5)
  acc.update(logits, y)
  p = 1 / (1 + np.exp(-logits))
  want = skm.f1_score(y, p >= 0.5, average="macro", zero_division=0)
  assert acc.result()["f1_macro"] == pytest.approx(100 * want, abs=1e-9)


def test_class_metrics_match_sklearn():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 6, 500)
  logits = rng.normal(size=(500, 6)) + 2.0 * np.eye(6)[y] * (rng.random(500) < 0.6)[:, None]
  acc = metrics.ClassMetrics(6)
  _feed(acc, logits, y)
  r = acc.result()
  pred = logits.argmax(1)
  p, rc, f, _ = skm.precision_recall_fscore_support(y, pred, average="weighted", zero_division=0)
  assert r["accuracy"] == pytest.approx(100 * skm.accuracy_score(y, pred))
  assert r["f1_macro"] == pytest.approx(100 * skm.f1_score(y, pred, average="macro"))
  assert (r["precision_weighted"], r["recall_weighted"], r["f1_weighted"]) == pytest.approx((100 * p, 100 * rc, 100 * f))


def test_segmentation_metrics_match_sklearn_and_ignore_minus_one():
  rng = np.random.default_rng(2)
  y = rng.integers(-1, 4, (10, 8, 8))
  logits = rng.normal(size=(10, 8, 8, 4)) + 1.5 * np.eye(4)[np.maximum(y, 0)]
  acc = metrics.SegmentationMetrics(4, ("a", "water", "c", "d"))
  _feed(acc, logits, y, batch=3)
  r = acc.result()
  keep = y.ravel() >= 0
  yt, yp = y.ravel()[keep], logits.argmax(-1).ravel()[keep]
  iou = skm.jaccard_score(yt, yp, average=None, labels=range(4))
  assert r["num_pixels"] == keep.sum()
  assert r["miou"] == pytest.approx(100 * iou.mean())
  assert r["iou_water"] == pytest.approx(100 * iou[1])
  assert r["average_accuracy"] == pytest.approx(100 * skm.balanced_accuracy_score(yt, yp))


def test_subsets_are_deterministic_and_class_balanced():
  rng = np.random.default_rng(3)
  y = rng.choice(5, size=2000, p=[0.4, 0.3, 0.15, 0.1, 0.05])
  rows = subsets.labels_to_multihot(y, 5)
  a = subsets.subset_indices(rows, 0.05, seed=7)
  assert np.array_equal(a, subsets.subset_indices(rows, 0.05, seed=7))
  assert not np.array_equal(a, subsets.subset_indices(rows, 0.05, seed=8))
  assert len(a) == 100 and np.all(np.diff(a) > 0)
  assert np.bincount(y[a], minlength=5).tolist() == [20] * 5  # balanced although the classes are not
  s = subsets.subset_indices(rows, 0.05, seed=7, mode="stratified")
  assert np.abs(np.bincount(y[s], minlength=5) - 0.05 * np.bincount(y)).max() <= 1
  assert len(subsets.subset_indices(rows, 1.0, seed=0)) == 2000


def test_subsets_multilabel_keeps_rare_classes_and_caps_at_what_exists():
  rng = np.random.default_rng(4)
  rows = rng.random((3000, 6)) < np.array([0.5, 0.4, 0.3, 0.2, 0.01, 0.002])
  idx = subsets.subset_indices(rows, 0.02, seed=0)
  counts = rows[idx].sum(0)
  assert len(idx) == 60
  assert counts[5] == rows[:, 5].sum()  # a class rarer than its share gives everything it has
  assert counts[4] >= min(rows[:, 4].sum(), 10)


def test_report_table_and_files(tmp_path):
  result = dict(dataset="bigearthnet", task="multilabel", modalities=["s1", "s2"], head="linear", scenario="frozen",
                label_fraction=0.1, split="test", num_examples=5, metrics={"map_macro": 51.234, "map_micro": 60.0})
  jpath, mpath = report.write(str(tmp_path), result)
  assert json.loads(open(jpath).read())["metrics"]["map_macro"] == 51.234
  md = open(mpath).read()
  header = md.splitlines()[2]
  assert header.index("map_micro") < header.index("map_macro")
  assert "| bigearthnet | s1+s2 | linear | frozen | 10% | test | 5 | 60.00 | 51.23 |" in md


def test_dfc2020_reports_the_papers_8_classes_and_keeps_the_10_class_figure():
  from configs.finetune import dfc2020  # pylint: disable=g-import-not-at-top
  config = dfc2020.get_config("tiny")
  names = config.finetune.report_classes
  assert len(names) == 8 and "Savanna" not in names and "Snow/Ice" not in names
  rng = np.random.default_rng(2)
  y = rng.integers(0, 10, size=(4, 16, 16))
  pred = np.where(rng.random(y.shape) < 0.6, y, rng.integers(0, 10, size=y.shape))
  keep = [c for c in range(10) if c not in (2, 7)]
  acc = metrics.make_metrics("segmentation", 10, (), keep)
  acc.update(pred, y)
  r = acc.result()
  jac = skm.jaccard_score(y.ravel(), pred.ravel(), labels=list(range(10)), average=None)
  assert r["miou"] == pytest.approx(100 * jac[keep].mean(), abs=1e-9)
  assert r["miou_all"] == pytest.approx(100 * jac.mean(), abs=1e-9)
  rec = skm.recall_score(y.ravel(), pred.ravel(), labels=list(range(10)), average=None)
  assert r["average_accuracy"] == pytest.approx(100 * rec[keep].mean(), abs=1e-9)


def test_multilabel_macro_ap_counts_an_absent_class_as_sklearn_does():
  """A class without a positive label: sklearn's macro AP counts it 0 (and warns); map_macro follows it, and
  map_macro_present / num_classes_without_positives state the other convention."""
  import warnings  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(2)
  y = (rng.random((60, 5)) < 0.4).astype(np.float32)
  y[:, 2] = 0  # class 2 has no positive in this split
  logits = rng.normal(size=(60, 5)) + 2.0 * y
  acc = metrics.MultiLabelMetrics(5)
  _feed(acc, logits, y)
  r = acc.result()
  p = 1 / (1 + np.exp(-logits))
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn: "No positive class found in y_true"
    want = skm.average_precision_score(y, p, average="macro")
  assert r["map_macro"] == pytest.approx(100 * want, abs=1e-9)
  present = [c for c in range(5) if c != 2]
  assert r["map_macro_present"] == pytest.approx(
      100 * skm.average_precision_score(y[:, present], p[:, present], average="macro"), abs=1e-9)
  assert r["num_classes_without_positives"] == 1
  y[0, 2] = 1  # every class present: one convention, no extra key
  full = metrics.MultiLabelMetrics(5)
  full.update(logits, y)
  r = full.result()
  assert r["num_classes_without_positives"] == 0 and "map_macro_present" not in r
