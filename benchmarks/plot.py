"""Peer-benchmark results -> one PNG: images/s per config, mmrs vs PyTorch eager (and torch.compile where run).

  python -m benchmarks.plot --out=benchmarks/peer.png RESULTS.jsonl [MORE.jsonl ...]

Input: the records `python -m benchmarks.peer ... --json_out=FILE` appends (one JSON object per line; the summary
line benchmarks.peer prints last is accepted too, labelled by method only). matplotlib is an optional benchmark
dependency (requirements-bench.txt).
"""
from __future__ import annotations

import argparse
import json
import sys

from mmrs import atomic_io

SERIES = (("jax_images_per_s", "mmrs (JAX/XLA)", "#1f77b4"), ("torch_images_per_s", "PyTorch eager", "#ff7f0e"),
          ("torch_compile_images_per_s", "PyTorch torch.compile", "#2ca02c"))


def load(paths: list[str]) -> list[dict]:
  records = []
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        line = line.strip()
        if not line:
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise SystemExit(f"{path}:{n}: not a JSON line ({e.msg}); pass the file benchmarks.peer --json_out wrote.")
        if "jax_images_per_s" not in rec:
          raise SystemExit(f"{path}:{n}: not a benchmarks.peer record (no 'jax_images_per_s').")
        records.append(rec)
  if not records:
    raise SystemExit(f"No benchmarks.peer records in {', '.join(paths)}.")
  return records


def label(rec: dict) -> str:
  if "size" not in rec:
    return rec["method"]
  return (f"{rec['method']}\nViT-{rec['size']}/{rec['image_size']}px b{rec['batch']}\n{rec['dtype']}"
          f"{' ' + rec['ld_preload'].rsplit('/', 1)[-1].split('.so')[0] if rec.get('ld_preload') else ''}")


def plot(records: list[dict], out: str, title: str = "") -> str:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  series = [s for s in SERIES if any(r.get(s[0]) is not None for r in records)]
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(max(5.0, 1.9 * len(records) + 1.5), 4.2))
  for i, (key, name, color) in enumerate(series):
    xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(records))]
    ys = [r.get(key) or 0.0 for r in records]
    bars = ax.bar(xs, ys, width, label=name, color=color)
    for bar, rec, y in zip(bars, records, ys):
      if y and key == "jax_images_per_s" and rec.get("ratio_vs_eager"):  # None where the eager side failed
        ax.annotate(f"{rec['ratio_vs_eager']:.2f}x eager", (bar.get_x() + bar.get_width() / 2, y),
                    ha="center", va="bottom", fontsize=7)
  ax.set_xticks(range(len(records)), [label(r) for r in records], fontsize=7)
  ax.set_ylabel("images/s (median over repeats)")
  kinds = sorted({r.get("device_kind", "?") for r in records})
  ax.set_title(title or f"Train step, mmrs vs PyTorch ({', '.join(kinds)})", fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  atomic_io.write_with(out, lambda tmp: fig.savefig(tmp, dpi=120))  # a reader never sees half a PNG
  plt.close(fig)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.plot", description=__doc__.split("\n\n")[0])
  p.add_argument("inputs", nargs="+", help="JSONL files written by benchmarks.peer --json_out")
  p.add_argument("--out", required=True, help="PNG path")
  p.add_argument("--title", default="")
  args = p.parse_args(argv)
  print(plot(load(args.inputs), args.out, args.title))


if __name__ == "__main__":
  main(sys.argv[1:])
