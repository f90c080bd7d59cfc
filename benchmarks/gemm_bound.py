"""The train step's GEMMs alone, in XLA and in PyTorch: how much of the gap to PyTorch is the matmul kernels.

  python -m benchmarks.gemm_bound --method=mixmae --size=S --image_size=128 --batch=32 [--iters=3] [--repeats=2]
      [--threads=N] [--hlo_dump=DIR] [--json_out=results.jsonl]

1. Compiles mmrs's real step (a `benchmarks.peer` jax child: one untimed step, XLA dump on) and reads every `dot`
   of the optimized step HLO (top level and inside fusions): operand and output shapes, batch and contracting
   dimensions, and how often each occurs. `--hlo_dump=DIR` reads an existing dump instead.
2. Times each distinct dot alone, in a child process per side, alternating (XLA, PyTorch, XLA, PyTorch...):
   XLA: a jitted `jax.lax.dot_general` with exactly those dimension numbers on row-major operands of those shapes;
   PyTorch: `torch.matmul` on the same row-major operands, transposed as views (BLAS reads transposed operands
   in place, as PyTorch's own backward does). float32; each side its framework's default threads (`--threads`
   pins both). Per dot the median of `--iters` calls after one warm-up call.
3. Prints per-dot times, the step's sum (time x occurrences) per side, and last one JSON line
   {"method", "dots", "distinct_dots", "gflop", "xla_gemm_s", "torch_gemm_s", "ratio_torch_over_xla", ...}.

Reading: "xla_gemm_s / torch_gemm_s" is what the step's matmuls alone cost in XLA relative to PyTorch on this
machine. If mmrs's step / PyTorch's step (benchmarks.peer) is no worse than that, the remaining gap is XLA's GEMM
kernels, not mmrs's code. The XLA side times the dot on default layouts; inside the step XLA may fuse a bias add or
pick a different operand layout, so this bounds the kernels, not the step's every choice.
"""
from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INST = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w+)\((.*?)\)(.*)$")
_DIMS = re.compile(r"(lhs_batch_dims|rhs_batch_dims|lhs_contracting_dims|rhs_contracting_dims)=\{([\d,]*)\}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.gemm_bound", description=__doc__.split("\n\n")[0])
  p.add_argument("--method", choices=("mae_s2", "mixmae"), default="mixmae")
  p.add_argument("--size", default="S")
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--iters", type=int, default=3, help="Timed calls per dot (median), after one warm-up call.")
  p.add_argument("--repeats", type=int, default=2, help="Alternating XLA/PyTorch child runs (median per dot).")
  p.add_argument("--threads", type=int, default=0, help="Pin both sides to N cores/threads (0 = defaults).")
  p.add_argument("--hlo_dump", default="", help="Read the dots from this XLA dump instead of compiling the step.")
  p.add_argument("--json_out", default="", help="Append the full record (every dot) to this file.")
  p.add_argument("--side", choices=("xla", "torch"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--dots_file", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def parse_dots(hlo_text: str) -> list[dict]:
  """Every f32/bf16 `dot` of an optimized HLO module: {"lhs", "rhs", "out" shapes, "dtype", "dims": {lhs_batch,
  rhs_batch, lhs_contracting, rhs_contracting}, "count", "op_name"} (identical dots merged, counted)."""
  shapes, dots = {}, []
  for line in hlo_text.splitlines():
    m = _INST.match(line)
    if not m:
      continue
    name, dtype, dims, opcode, operands, rest = m.groups()
    shapes[name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
    if opcode == "dot":
      names = re.findall(r"%([\w.\-]+)", operands) or [o.strip() for o in operands.split(",")]
      dnums = {k.replace("_dims", ""): tuple(int(d) for d in v.split(",") if d) for k, v in _DIMS.findall(rest)}
      op_name = re.search(r'op_name="([^"]*)"', rest)
      dots.append((names, dtype, shapes[name][1], dnums, op_name.group(1) if op_name else ""))
  merged: dict = collections.OrderedDict()
  for names, dtype, out, dnums, op_name in dots:
    lhs, rhs = (shapes[n][1] for n in names)
    full = {k: dnums.get(k, ()) for k in ("lhs_batch", "rhs_batch", "lhs_contracting", "rhs_contracting")}
    key = (lhs, rhs, out, dtype, tuple(sorted(full.items())))
    if key not in merged:
      merged[key] = {"lhs": list(lhs), "rhs": list(rhs), "out": list(out), "dtype": dtype,
                     "dims": {k: list(v) for k, v in full.items()}, "count": 0, "op_name": op_name}
    merged[key]["count"] += 1
  return list(merged.values())


def flops(dot: dict) -> float:
  """2 x (output elements) x (contracted size)."""
  contracted = math.prod(dot["lhs"][d] for d in dot["dims"]["lhs_contracting"])
  return 2.0 * math.prod(dot["out"]) * contracted


def describe(dot: dict) -> str:
  d = dot["dims"]
  batch = f" batch{d['lhs_batch']}" if d["lhs_batch"] else ""
  return (f"{'x'.join(map(str, dot['lhs']))} . {'x'.join(map(str, dot['rhs']))} -> {'x'.join(map(str, dot['out']))}"
          f"{batch} contract {d['lhs_contracting']}/{d['rhs_contracting']}")


def torch_dot(lhs, rhs, dims: dict):
  """`lax.dot_general(lhs, rhs, dims)` with torch.matmul: operands permuted (views) to (batch, free, contracting)
  x (batch, contracting, free); a reshape (which may copy) only where several free or contracting dims exist."""
  import torch  # pylint: disable=import-outside-toplevel
  lb, rb, lc, rc = (dims[k] for k in ("lhs_batch", "rhs_batch", "lhs_contracting", "rhs_contracting"))
  lf = [d for d in range(lhs.dim()) if d not in lb and d not in lc]
  rf = [d for d in range(rhs.dim()) if d not in rb and d not in rc]
  a = lhs.permute(*lb, *lf, *lc)
  b = rhs.permute(*rb, *rc, *rf)
  batch = [lhs.shape[d] for d in lb]
  m, k, n = math.prod(lhs.shape[d] for d in lf), math.prod(lhs.shape[d] for d in lc), math.prod(
      rhs.shape[d] for d in rf)
  if len(lf) != 1 or len(lc) != 1:
    a = a.reshape(*batch, m, k)
  if len(rf) != 1 or len(rc) != 1:
    b = b.reshape(*batch, k, n)
  out = torch.matmul(a, b)
  return out.reshape(*batch, *[lhs.shape[d] for d in lf], *[rhs.shape[d] for d in rf])


def _pin(n: int) -> None:
  if n > 0 and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])


def time_side(side: str, dots: list[dict], iters: int, threads: int) -> list[float]:
  """Median seconds per call of each dot on one side (runs in a child process)."""
  _pin(threads)
  out = []
  if side == "xla":
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    for dot in dots:
      d = dot["dims"]
      dn = ((tuple(d["lhs_contracting"]), tuple(d["rhs_contracting"])), (tuple(d["lhs_batch"]), tuple(d["rhs_batch"])))
      fn = jax.jit(lambda a, b, dn=dn: jax.lax.dot_general(a, b, dn))
      a = jax.random.normal(jax.random.key(0), dot["lhs"], jnp.float32)
      b = jax.random.normal(jax.random.key(1), dot["rhs"], jnp.float32)
      fn(a, b).block_until_ready()
      times = []
      for _ in range(iters):
        t0 = time.perf_counter()
        fn(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
      out.append(statistics.median(times))
  else:
    import torch  # pylint: disable=import-outside-toplevel
    if threads > 0:
      torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
      for dot in dots:
        a = torch.randn(dot["lhs"], generator=gen)
        b = torch.randn(dot["rhs"], generator=gen)
        torch_dot(a, b, dot["dims"])
        times = []
        for _ in range(iters):
          t0 = time.perf_counter()
          torch_dot(a, b, dot["dims"])
          times.append(time.perf_counter() - t0)
        out.append(statistics.median(times))
  return out


def step_dots(args) -> list[dict]:
  """The dots of mmrs's optimized step: from --hlo_dump, else compile it in a benchmarks.peer child with a dump."""
  dump = args.hlo_dump
  tmp = None
  if not dump:
    tmp = dump = tempfile.mkdtemp(prefix="gemm_bound_hlo_")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
    cmd = [sys.executable, "-m", "benchmarks.peer", f"--method={args.method}", f"--size={args.size}",
           f"--image_size={args.image_size}", f"--batch={args.batch}", "--steps=1", "--warmup=0", "--side=jax"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
      raise SystemExit(f"benchmarks.gemm_bound: compiling mmrs's step failed (exit {proc.returncode}):\n{tail}")
  files = glob.glob(os.path.join(dump, "*after_optimizations.txt"))
  if not files:
    raise SystemExit(f"benchmarks.gemm_bound: no *after_optimizations.txt in {dump}; dump with "
                     "XLA_FLAGS='--xla_dump_to=DIR --xla_dump_hlo_as_text' (or leave --hlo_dump unset).")
  with open(max(files, key=os.path.getsize), encoding="utf-8") as f:  # the step is the largest module
    dots = parse_dots(f.read())
  if tmp:
    shutil.rmtree(tmp, ignore_errors=True)
  return dots


def run_child(args, side: str, dots_file: str) -> list[float]:
  cmd = [sys.executable, "-m", "benchmarks.gemm_bound", f"--side={side}", f"--dots_file={dots_file}",
         f"--iters={args.iters}", f"--threads={args.threads}"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("[")]
  if proc.returncode or not lines:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise SystemExit(f"benchmarks.gemm_bound: the {side} side failed (exit {proc.returncode}):\n{tail}")
  return json.loads(lines[-1])


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.side:
    with open(args.dots_file, encoding="utf-8") as f:
      dots = json.load(f)
    print(json.dumps(time_side(args.side, dots, args.iters, args.threads)))
    return {}
  dots = step_dots(args)
  if not dots:
    raise SystemExit("benchmarks.gemm_bound: the step's optimized HLO has no dot instructions.")
  total_flops = sum(flops(d) * d["count"] for d in dots)
  print(f"{args.method} {args.size} {args.image_size} px b{args.batch}: {sum(d['count'] for d in dots)} dots, "
        f"{len(dots)} distinct, {total_flops / 1e9:.1f} GFLOP per step; {args.repeats} x (XLA, PyTorch), "
        f"median of {args.iters} calls per dot", flush=True)
  with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
    json.dump(dots, f)
    dots_file = f.name
  runs = {"xla": [], "torch": []}
  try:
    for r in range(args.repeats):
      for side in ("xla", "torch"):
        runs[side].append(run_child(args, side, dots_file))
        step_s = sum(t * d["count"] for t, d in zip(runs[side][-1], dots))
        print(f"  repeat {r + 1} {side:<5}: GEMMs of one step {step_s:.3f} s", flush=True)
  finally:
    os.remove(dots_file)
  med = {s: [statistics.median(rep[i] for rep in runs[s]) for i in range(len(dots))] for s in runs}
  print()
  print("| dot (lhs . rhs -> out, dims) | count | GFLOP each | XLA ms | PyTorch ms | XLA/PyTorch | where (first) |")
  print("|---|---|---|---|---|---|---|")
  order = sorted(range(len(dots)), key=lambda i: -med["xla"][i] * dots[i]["count"])
  for i in order:
    d = dots[i]
    print(f"| {describe(d)} | {d['count']} | {flops(d) / 1e9:.3f} | {1e3 * med['xla'][i]:.2f} | "
          f"{1e3 * med['torch'][i]:.2f} | {med['xla'][i] / med['torch'][i]:.2f} | {d['op_name'][-60:]} |")
  xla_s = sum(t * d["count"] for t, d in zip(med["xla"], dots))
  torch_s = sum(t * d["count"] for t, d in zip(med["torch"], dots))
  print(f"\nstep GEMMs: XLA {xla_s:.3f} s ({total_flops / xla_s / 1e9:.0f} GFLOP/s), PyTorch {torch_s:.3f} s "
        f"({total_flops / torch_s / 1e9:.0f} GFLOP/s): PyTorch/XLA speed {xla_s / torch_s:.3f}x")
  summary = {"method": args.method, "size": args.size, "image_size": args.image_size, "batch": args.batch,
             "dots": sum(d["count"] for d in dots), "distinct_dots": len(dots),
             "gflop": round(total_flops / 1e9, 2), "xla_gemm_s": round(xla_s, 4), "torch_gemm_s": round(torch_s, 4),
             "ratio_torch_over_xla": round(xla_s / torch_s, 4), "threads": args.threads,
             "ld_preload": os.environ.get("LD_PRELOAD", "")}
  if args.json_out:
    records.append(args.json_out, {**summary, "per_dot": [{**d, "xla_s": med["xla"][i], "torch_s": med["torch"][i]}
                                                          for i, d in enumerate(dots)]})
  print(json.dumps(summary))
  return summary


if __name__ == "__main__":
  main()
