"""Turn a benchmarks/gpu_suite.sh output folder into a dated Markdown section appended to benchmarks/RESULTS.md.

  python -m benchmarks.peer_report --suite_dir=runs/gpu_suite/STAMP [--results=benchmarks/RESULTS.md] [--command=...]

Reads the folder's `peer.jsonl` (benchmarks.peer records), `step_*.json` (last JSON line of
benchmarks.step_throughput; the name says method, batch and variant: noremat, remat, accumN), `data_*.json`
(benchmarks.data_throughput), `device.txt` and `stages.jsonl` (benchmarks/device/pack.py: failed and skipped stages
are listed with their error); plots peer.jsonl (benchmarks/plot.py) into `<results dir>/plots/` so the PNG link
in RESULTS.md survives outside the (git-ignored) run folder. The append is atomic (temp file + rename).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import time

from benchmarks.device.stages import read_stages
from mmrs import atomic_io

STEP_NAME = re.compile(r"step_(?P<method>\w+?)_b(?P<batch>\d+)_(?P<variant>remat|noremat|accum\d+)(?P<extra>_\w+)?\.json$")


def _read_json(path: str) -> dict | None:
  try:
    with open(path, encoding="utf-8") as f:
      text = f.read().strip()
    return json.loads(text.splitlines()[-1]) if text else None
  except (OSError, json.JSONDecodeError, IndexError):
    return None


def _fmt(x, spec=".1f", none="–"):
  return none if x is None else format(x, spec)


def _compiled_mib(memory: dict) -> float | None:
  totals = [m.get("total_mib") for m in (memory or {}).values() if m.get("total_mib")]
  return max(totals) if totals else None


def section(suite_dir: str, results_dir: str, command: str, archive: str = "") -> str:
  stamp = os.path.basename(os.path.normpath(suite_dir))
  device = ""
  if os.path.exists(os.path.join(suite_dir, "device.txt")):
    with open(os.path.join(suite_dir, "device.txt"), encoding="utf-8") as f:
      device = f.read().strip().replace("\n", "; ")
  peers = []
  if os.path.exists(os.path.join(suite_dir, "peer.jsonl")):
    with open(os.path.join(suite_dir, "peer.jsonl"), encoding="utf-8") as f:
      peers = [json.loads(l) for l in f if l.strip()]
  kinds = sorted({p["device_kind"] for p in peers}) or [device or "unknown device"]
  lines = [f"## GPU suite (`benchmarks/gpu_suite.sh`) — {time.strftime('%Y-%m-%d', time.gmtime())}, "
           f"{', '.join(kinds)}", "",
           f"Command: `{command}`; every output is in `{archive or suite_dir}` (logs, JSON). "
           f"Device: {device or 'n/a'}.", ""]

  lines += ["### Train step (mmrs, synthetic on-device batches)", "",
            "| method | encoder | batch | remat / accumulation | images/s | MFU | peak memory (MiB) | "
            "compiled memory (MiB) | source |",
            "|---|---|---|---|---|---|---|---|---|"]
  for p in peers:
    for r in (r for r in p["runs"] if r["side"] == "jax" and "error" not in r):
      mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "–"
      lines.append(f"| {p['method']} | ViT-{p['size']}/{p['image_size']}px | {p['batch']} | no | "
                   f"{r['images_per_s']:.1f} | {mfu} | {_fmt(r.get('peak_memory_mib'), ',.0f')} | "
                   f"{_fmt(_compiled_mib(r.get('memory_mib')), ',.0f')} | benchmarks.peer (jax side) |")
  for path in sorted(glob.glob(os.path.join(suite_dir, "step_*.json"))):
    m, out = STEP_NAME.search(os.path.basename(path)), _read_json(path)
    if not m or not out:
      continue
    mfu = f"{100 * out['mfu']:.1f} %" if out.get("mfu") else "–"
    variant = {"remat": "remat", "noremat": "no"}.get(m["variant"], m["variant"]) + (
        f" ({m['extra'][1:]})" if m["extra"] else "")  # e.g. no (perf_flags)
    lines.append(f"| {out['method']} | config | {out['batch_size']} | {variant} | "
                 f"{out['images_per_s']:.1f} | {mfu} | – | {_fmt(_compiled_mib(out.get('memory_mib')), ',.0f')} | "
                 f"`{os.path.basename(path)[:-5]}.log` |")
  lines.append("")

  if peers:
    lines += ["### mmrs vs PyTorch (`benchmarks.peer`: same model and step, sides alternating in child processes)",
              "", "| method | config | mmrs images/s | PyTorch eager | torch.compile | vs eager | vs compile | "
              "params (mmrs / PyTorch) | peak MiB (mmrs / PyTorch eager) |", "|---|---|---|---|---|---|---|---|---|"]
    for p in peers:
      peak = lambda side: next((r.get("peak_memory_mib") for r in p["runs"] if r["side"] == side), None)
      lines.append(
          f"| {p['method']} | ViT-{p['size']}/{p['image_size']}px, decoder {p['decoder']}x{p['decoder_depth']}, "
          f"b{p['batch']}, {p['dtype']} | {_fmt(p['jax_images_per_s'])} | {_fmt(p['torch_images_per_s'])} | "
          f"{_fmt(p['torch_compile_images_per_s'])} | {_fmt(p['ratio_vs_eager'], '.2f')}"
          f"{'x' if p['ratio_vs_eager'] else ''} | "
          f"{_fmt(p['ratio_vs_compile'], '.2f')}{'x' if p['ratio_vs_compile'] else ''} | "
          f"{_fmt(p['params_jax'], ',')} / {_fmt(p['params_torch'], ',')} | {_fmt(peak('jax'), ',.0f')} / "
          f"{_fmt(peak('torch'), ',.0f')} |")
    lines.append("")
    try:
      from benchmarks import plot  # pylint: disable=import-outside-toplevel
      png = os.path.join(results_dir, "plots", f"peer_{stamp}.png")
      plot.plot(peers, png)
      shutil.copyfile(png, os.path.join(suite_dir, "peer.png"))
      lines += [f"![mmrs vs PyTorch]({os.path.relpath(png, results_dir)})", ""]
    except ImportError:
      lines += ["(No plot: matplotlib is not installed; `pip install -r requirements-bench.txt`.)", ""]

  data_rows = []
  for path in sorted(glob.glob(os.path.join(suite_dir, "data_*.json"))):
    out = _read_json(path)
    if out:
      data_rows.append((os.path.basename(path)[:-5], out))
  if data_rows:
    lines += ["### Input pipeline (`benchmarks.data_throughput`, synthetic records)", "",
              "| run | summary |", "|---|---|"]
    for name, out in data_rows:
      lines.append(f"| {name} | " + ", ".join(f"{k} {_fmt(v, ',.1f') if isinstance(v, float) else v}"
                                              for k, v in out.items() if not isinstance(v, (dict, list))) + " |")
    lines.append("")

  items = []
  for s in read_stages(os.path.join(suite_dir, "stages.jsonl")):
    if s["status"] != "ok":
      why = (s.get("error_line") or "").replace("`", "'")
      code = f" (exit {s['exit']})" if s.get("exit") else ""
      items.append(f"{s['stage']}: {s['status']}{code}" + (f": {s['note']}" if s.get("note") else "")
                   + (f": `{why[:300]}`" if why else ""))
  if items:
    lines += ["Not measured in this run (or failed; the error's last lines):", ""] + [f"- {i}" for i in items] + [""]
  return "\n".join(lines)


def append(results: str, text: str) -> None:
  old = ""
  if os.path.exists(results):
    with open(results, encoding="utf-8") as f:
      old = f.read()
  atomic_io.write_text(results, old.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.peer_report", description=__doc__.split("\n\n")[0])
  p.add_argument("--suite_dir", required=True)
  p.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
  p.add_argument("--command", default="bash benchmarks/gpu_suite.sh")
  p.add_argument("--archive", default="", help="Where the suite's outputs end up, for the section's text "
                 "(default: --suite_dir).")
  args = p.parse_args(argv)
  if not os.path.isdir(args.suite_dir):
    raise SystemExit(f"--suite_dir={args.suite_dir}: no such folder (the output folder of benchmarks/gpu_suite.sh).")
  text = section(args.suite_dir, os.path.dirname(os.path.abspath(args.results)), args.command, args.archive)
  append(args.results, text)
  print(text)


if __name__ == "__main__":
  main()
