"""XLA:CPU dot/fusion options and the allocator, A/B/A/B on mmrs's real train step, beside PyTorch eager.

  python -m benchmarks.cpu_flags --method=mae_s2 --size=S --image_size=128 --batch=32
      [--variants=default,onednn,xnn_dot,...] [--allocators=system,jemalloc] [--repeats=2] [--steps=10]
      [--torch_compile] [--json_out=benchmarks/results/cpu_flags.jsonl]

Each trial is one `benchmarks.peer` child (the jax side: compile, warm-up, timed steps) started with that variant's
XLA_FLAGS and that allocator's LD_PRELOAD/MALLOC_CONF; PyTorch eager (and torch.compile with --torch_compile) runs
once per repeat and allocator as the reference. Order per repeat: allocator by allocator, every variant, then
PyTorch, so each variant is measured between the others (A/B/A/B), never all its repeats in a row.

The loss after the timed steps is printed per trial, and its relative difference to the default's: another GEMM
library rounds differently (~1e-6), fast-math more; launch/cpu_setup.py enables only variants that win here with
float32-rounding-sized differences, and the test suite (tests/test_flat_dot.py's pinned losses and gradients
included) runs under what it enables. Which library each variant's dots really compile to is printed first. Variant names are in VARIANTS below;
`--variants=name=--xla_flag=value` adds one of your own. Prints one table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

from benchmarks import peer
from benchmarks import records
from launch import cpu_setup
from launch.cpu_setup import JEMALLOC_CONF

# XLA:CPU options of the installed jaxlib (0.10.2; `XLA_FLAGS=--help`). Its dots run in YNNPACK fusions by default
# (`"kind":"__ynn_fusion"` in the compiled HLO, though --help calls the default list empty); an empty YNN list gives
# them back to XLA's own emitter (Eigen). The XNNPACK and oneDNN dot options are accepted but change nothing in this
# build (the dots stay in YNN fusions, or go to Eigen with YNN off): `dot_library` below shows it per variant.
VARIANTS = {
    "default": "",
    "eigen_dots": "--xla_cpu_experimental_ynn_fusion_type=",  # YNNPACK off: XLA's own dot emitter
    "ynn_all": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",  # elementwise ops and reductions too
    "onednn": "--xla_cpu_use_onednn=true",
    "xnn_dot": "--xla_cpu_experimental_xnn_fusion_type=dot",
    "onednn_dot": "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_experimental_onednn_fusion_type=dot",
    "xnn_graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "fast_math": "--xla_cpu_enable_fast_math=true",  # changes the math: reported, never enabled by default
}
DOT_PROBE = ("import re, jax, jax.numpy as jnp; f = jax.jit(lambda x, y: jax.nn.gelu(x @ y + 1.0)); "
             "t = f.lower(jnp.ones((256, 384)), jnp.ones((384, 512))).compile().as_text(); "
             "k = sorted(set(re.findall(r'\"kind\":\"__([a-z_]+)\"', t))); print(','.join(k) or 'xla')")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--method", choices=("mae_s2", "mixmae"), default="mae_s2")
  p.add_argument("--size", default="S")
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--variants", default="default,onednn,xnn_dot,ynn_dot",
                 help="Comma-separated names from VARIANTS, or name=FLAGS for your own (FLAGS without commas).")
  p.add_argument("--allocators", default="system,jemalloc")
  p.add_argument("--jemalloc", default=cpu_setup.jemalloc_path({}) or cpu_setup.JEMALLOC_PATHS[0],
                 help="libjemalloc.so.2 (default: the first one launch/cpu_setup.py finds, as a training run would)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--torch_compile", action="store_true")
  p.add_argument("--no_torch", action="store_true", help="Skip the PyTorch reference (flags only).")
  p.add_argument("--json_out", default="")
  return p.parse_args(argv)


def variants(spec: str) -> dict[str, str]:
  out = {}
  for item in filter(None, spec.split(",")):
    name, _, flags = item.partition("=")
    if not flags and name not in VARIANTS:
      raise SystemExit(f"--variants: unknown '{name}' (known: {', '.join(VARIANTS)}; or name=--xla_flag=value)")
    out[name] = flags if flags else VARIANTS[name]
  return out


def allocator_env(name: str, lib: str) -> dict[str, str]:
  if name == "system":
    return {"LD_PRELOAD": "", "MALLOC_CONF": "", "MMRS_ALLOCATOR": "system"}
  if name == "jemalloc":
    if not os.path.exists(lib):
      raise SystemExit(f"--allocators=jemalloc: {lib} not found (apt-get install libjemalloc2, or --jemalloc=PATH)")
    return {"LD_PRELOAD": lib, "MALLOC_CONF": JEMALLOC_CONF, "MMRS_ALLOCATOR": "jemalloc"}
  raise SystemExit(f"--allocators: unknown '{name}' (system, jemalloc)")


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      fields = {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in f if ":" in l)}
    return ", ".join(f"{k} {fields[k]}" for k in ("vendor_id", "model name", "cpu family", "model") if k in fields)
  except OSError:
    return platform.processor()


def dot_library(xla_flags: str) -> str:
  """Which library a dense layer's dot (+ bias, GELU) compiles to under these flags: ynn_fusion, xnn_fusion, ... or
  'xla' (XLA's own emitter)."""
  env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", DOT_PROBE], env=env, capture_output=True, text=True, check=False)
  return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "error"


def trial(peer_argv: list[str], side: str, env: dict[str, str]) -> dict:
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    return peer.run_child(peer_argv, side)
  except peer.SideFailed as e:
    return {"error": str(e)[-1500:]}
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  vs = variants(args.variants)
  allocs = [a for a in args.allocators.split(",") if a]
  peer_argv = [f"--method={args.method}", f"--size={args.size}", f"--image_size={args.image_size}",
               f"--batch={args.batch}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  user_flags = os.environ.get("XLA_FLAGS", "")
  torch_sides = [] if args.no_torch else ["torch"] + (["torch_compile"] if args.torch_compile else [])
  print(f"{args.method} ViT-{args.size} {args.image_size} px b{args.batch}; {cpu_model()}; "
        f"{args.repeats} repeats x {args.steps} steps; XLA_FLAGS before the variant: {user_flags or '-'}", flush=True)
  libs = {name: dot_library(f"{user_flags} {flags}".strip()) for name, flags in vs.items()}
  for name, flags in vs.items():
    print(f"  {name:<12} XLA_FLAGS+={flags or '-'}: dots compile to {libs[name]}", flush=True)
  rows = []
  for r in range(args.repeats):
    for alloc in allocs:
      aenv = allocator_env(alloc, args.jemalloc)
      for name, flags in vs.items():
        # MMRS_CPU_SETUP=off: the peer child must run exactly these flags, not mmrs/cpu_setup.py's choice.
        env = {**aenv, "XLA_FLAGS": f"{user_flags} {flags}".strip(), "MMRS_CPU_SETUP": "off"}
        out = trial(peer_argv, "jax", env)
        rows.append({"repeat": r + 1, "allocator": alloc, "side": "jax", "variant": name, "xla_flags": flags, **out})
        print(f"  r{r + 1} {alloc:<8} mmrs  {name:<12} " + (
            f"{out['images_per_s']:7.2f} images/s  loss {out['last_loss']:.6f}  "
            f"faults/step {out.get('minor_faults_per_step') or 0:,.0f}" if "error" not in out else
            f"FAILED: {out['error'].splitlines()[-1]}"), flush=True)
      for side in torch_sides:
        out = trial(peer_argv, side, {**aenv, "XLA_FLAGS": user_flags})
        rows.append({"repeat": r + 1, "allocator": alloc, "side": side, "variant": "-", **out})
        print(f"  r{r + 1} {alloc:<8} {peer.LABELS[side]:<18} " + (
            f"{out['images_per_s']:7.2f} images/s  loss {out['last_loss']:.6f}" if "error" not in out else
            f"FAILED: {out['error'].splitlines()[-1]}"), flush=True)
  summary = summarize(rows, allocs, vs, torch_sides, libs)
  print_table(summary, args.repeats)
  if args.json_out:
    records.append(args.json_out, {"benchmark": "cpu_flags", "cpu": cpu_model(), "method": args.method,
                                   "size": args.size, "image_size": args.image_size, "batch": args.batch,
                                   "steps": args.steps, "rows": rows, "summary": summary})
  print(json.dumps(summary))
  return summary


def summarize(rows, allocs, vs, torch_sides, libs) -> list[dict]:
  def ok(**kw):
    return [r for r in rows if "error" not in r and all(r[k] == v for k, v in kw.items())]
  out = []
  for alloc in allocs:
    ref = {s: ok(allocator=alloc, side=s) for s in torch_sides}
    ref_med = {s: statistics.median(x["images_per_s"] for x in rs) if rs else None for s, rs in ref.items()}
    base = ok(allocator=alloc, side="jax", variant="default")
    base_loss = base[0]["last_loss"] if base else None
    for name in vs:
      rs = ok(allocator=alloc, side="jax", variant=name)
      med = statistics.median(x["images_per_s"] for x in rs) if rs else None
      out.append({"allocator": alloc, "variant": name, "dots": libs[name], "images_per_s": [round(x["images_per_s"], 2) for x in rs],
                  "median": round(med, 2) if med else None, "loss": rs[0]["last_loss"] if rs else None,
                  "loss_rel_diff": abs(rs[0]["last_loss"] / base_loss - 1) if rs and base_loss else None,
                  **{f"vs_{s}": round(med / m, 3) if med and m else None for s, m in ref_med.items()}})
    for s in torch_sides:
      out.append({"allocator": alloc, "variant": peer.LABELS[s],
                  "images_per_s": [round(x["images_per_s"], 2) for x in ref[s]],
                  "median": round(ref_med[s], 2) if ref_med[s] else None,
                  "loss": ref[s][0]["last_loss"] if ref[s] else None})
  return out


def print_table(summary, repeats):
  refs = sorted({k for row in summary for k in row if k.startswith("vs_")})
  print(f"\n| allocator | side / XLA variant | {' | '.join(f'repeat {i + 1}' for i in range(repeats))} | median "
        f"images/s | loss | {' | '.join(refs)} |")
  print(f"|---|---|{'---|' * repeats}---|---|{'---|' * len(refs)}")
  for row in summary:
    vals = row["images_per_s"] + ["-"] * (repeats - len(row["images_per_s"]))
    loss = "-" if row["loss"] is None else f"{row['loss']:.6f}" + (
        f" ({row['loss_rel_diff']:.1e})" if row.get("loss_rel_diff") else "")
    print(f"| {row['allocator']} | {row['variant']}{' (' + row['dots'] + ')' if row.get('dots') else ''} | {' | '.join(map(str, vals))} | {row['median']} | {loss} | "
          + " | ".join(f"{row[k]}x" if row.get(k) else "-" for k in refs) + " |")


if __name__ == "__main__":
  main()
