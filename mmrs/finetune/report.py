"""Evaluation results: `results.json` (everything) and `results.md` (Markdown tables) in the run's workdir.

`write(workdir, result)` writes one run; `table(results)` renders any number of runs as one Markdown table (one row
per run, the test metrics, the union of their metrics as columns in a fixed order), e.g. to collect a
label-fraction sweep:
    python -m mmrs.finetune.report runs/ft_*  > table.md
A finetune run's result (mmrs/finetune/__init__.py run) holds "test" (and "metrics", the same numbers), "val" (the
selected state's validation metrics and the curve [{step, metrics}], or null without a validation split),
"selected_step", "selection" (metric, direction, note) and, for datasets whose manifest counts chips per split
(Sen1Floods11), "coverage" (evaluated vs published chips). results.md shows each as a table.
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Mapping, Sequence

from mmrs import atomic_io

# Column order of the metrics (others follow alphabetically).
METRIC_ORDER = ("map_micro", "map_macro", "f1_micro", "f1_macro", "accuracy", "precision_weighted",
                "recall_weighted", "f1_weighted", "iou_water", "miou", "average_accuracy", "pixel_accuracy")
RUN_COLUMNS = (("dataset", "dataset"), ("modalities", "input"), ("head", "head"), ("scenario", "encoder"),
               ("label_fraction", "labels"), ("split", "split"), ("num_examples", "n"))
JSON_FILE, MD_FILE = "results.json", "results.md"


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.2f}"
  if isinstance(value, (list, tuple)):
    return "+".join(str(v) for v in value)
  return str(value)


def _metric_columns(results: Sequence[Mapping[str, Any]]) -> list[str]:
  names = {k for r in results for k in r.get("metrics", {}) if not k.startswith("num_")}
  return [m for m in METRIC_ORDER if m in names] + sorted(names - set(METRIC_ORDER))


def table(results: Sequence[Mapping[str, Any]]) -> str:
  cols = _metric_columns(results)
  run_columns = RUN_COLUMNS + ((("selected_step", "selected step"),)
                               if any("selected_step" in r for r in results) else ())
  head = [title for _, title in run_columns] + cols
  lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  for r in results:
    row = []
    for key, _ in run_columns:
      v = r.get(key, "")
      row.append(f"{100 * v:g}%" if key == "label_fraction" and isinstance(v, (int, float)) else _fmt(v))
    row += [_fmt(r.get("metrics", {}).get(c, "")) for c in cols]
    lines.append("| " + " | ".join(row) + " |")
  return "\n".join(lines) + "\n"


def write(workdir: str, result: Mapping[str, Any]) -> tuple[str, str]:
  atomic_io.makedirs(workdir)
  json_path, md_path = os.path.join(workdir, JSON_FILE), os.path.join(workdir, MD_FILE)
  atomic_io.write_json(json_path, result)
  title = f"# {result.get('dataset', '')} {result.get('task', '')} evaluation\n\n"
  notes = "".join(f"- {k}: {_fmt(result[k])}\n" for k in ("init_from", "step", "label_set") if result.get(k) not in
                  (None, ""))
  atomic_io.write_text(md_path, title + table([result]) + ("\n" + notes if notes else "") + selection_tables(result))
  return json_path, md_path


def _rows(rows: Sequence[tuple[str, Mapping[str, Any]]], first: str) -> str:
  cols = _metric_columns([{"metrics": m} for _, m in rows])
  lines = ["| " + " | ".join([first] + cols) + " |", "|" + "|".join("---" for _ in range(len(cols) + 1)) + "|"]
  lines += ["| " + " | ".join([label] + [_fmt(m.get(c, "")) for c in cols]) + " |" for label, m in rows]
  return "\n".join(lines) + "\n"


def selection_tables(result: Mapping[str, Any]) -> str:
  """results.md's model-selection part: val vs test of the selected step, the validation curve, chip coverage."""
  out = []
  sel = result.get("selection") or {}
  if sel:
    out.append(f"\n## Model selection\n\n{sel.get('note', '')}\n")
  val, test = result.get("val"), result.get("test")
  if test:
    step = result.get("selected_step", result.get("step"))
    rows = ([(f"val ({val['split']}, n={val.get('num_examples')})", val["metrics"])] if val else [])
    rows.append((f"test ({test['split']}, n={test.get('num_examples')})", test["metrics"]))
    out.append(f"\nSelected step {step} ({sel.get('metric', '')}, {sel.get('mode', '')}):\n\n"
               + _rows(rows, "split"))
  if val and val.get("curve"):
    marked = [(f"**{e['step']}**" if e["step"] == result.get("selected_step") else str(e["step"]), e["metrics"])
              for e in val["curve"]]
    out.append("\nValidation curve (selected step in bold):\n\n" + _rows(marked, "step"))
  cov = result.get("coverage")
  if cov:
    out.append(f"\nCoverage: {cov.get('note', '')}\n")
  return "".join(out)


def read(workdir: str) -> dict:
  return json.loads(atomic_io.read_text(os.path.join(workdir, JSON_FILE)))  # a gs:// workdir too


if __name__ == "__main__":
  runs = [read(d) for d in sys.argv[1:] if os.path.exists(os.path.join(d, JSON_FILE))]
  sys.stdout.write(table(runs))
