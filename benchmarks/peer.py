"""mmrs's train step against the same model and step in PyTorch, alternately, in one run.

  python -m benchmarks.peer --method=mae_s2 --size=S --image_size=128 --batch=32 [--dtype=float32|bfloat16]
      [--torch_compile] [--repeats=2] [--steps=10] [--warmup=3] [--json_out=results.jsonl]
  python -m benchmarks.peer --method=mixmae ... --hlo_only [--baseline_rev=REV]   # HLO layout-copy counts only

mmrs side: the training step itself (benchmarks/step_throughput.py: config validation, `make_step_fn`,
`compile_step`, Adafactor, global-norm clipping, the non-finite guard), on synthetic on-device batches.
PyTorch side: benchmarks/torch_vit.py, an independent implementation of the same model, masking and loss with
mmrs's Adafactor (benchmarks/torch_adafactor.py; torch.optim.Adafactor's update differs) and `clip_grad_norm_`
(eager, and with `--torch_compile` also `torch.compile`d). Both
count parameters; they must agree within 0.1 % or the run stops.

Model: encoder `--size` (mmrs/models/sizes.py), ViT-Lite-style decoder `--decoder` x `--decoder_depth` (defaults:
S -> tiny x 4, the ~24.9M-parameter MAE-S2 of the issue; B and larger -> lite x 8, the papers'), patch 16, S2 with
`--s2_bands` bands (12 = L2A), S1 VV+VH for MixMAE, mask ratio 0.75 / k = L/2.

Method of measurement: each side runs in its own child process (A/B/A/B... for `--repeats`), so neither side's
thread pools, allocator state or compile caches touch the other; children inherit this process's environment, so an
allocator preloaded with LD_PRELOAD (e.g. jemalloc) applies to both. Threads: each child uses its framework's
default, all cores the process may use (XLA's CPU thread pool; torch's intra-op threads = physical cores);
`--threads=N` pins both (torch.set_num_threads and the child's CPU affinity to N cores). Each child compiles,
runs `--warmup` untimed steps, then times `--steps` steps (device-synchronised). Per side the median over repeats
is reported. GPU: the PyTorch side uses CUDA when available (SDPA picks flash/efficient kernels in bf16; bf16 is
autocast with float32 params, as mmrs's compute_dtype); mmrs uses whatever jax's default backend is.

Prints a table, then (last line) one JSON object:
{"method", "jax_images_per_s", "torch_images_per_s", "torch_compile_images_per_s" (or null), "ratio_vs_eager",
"ratio_vs_compile" (or null), "params_jax", "params_torch", "device_kind"}. `--json_out` appends a fuller record
(config, every repeat) for benchmarks/plot.py.

A side that fails or outlasts `--side_timeout_s` does not take the others down: its values are null, its error text
goes into the record ("errors", and the run's "error"), the remaining sides still run, and the exit code is 1.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

from benchmarks import records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIDES = ("jax", "torch", "torch_compile")
LABELS = {"jax": "mmrs (JAX/XLA)", "torch": "PyTorch eager", "torch_compile": "PyTorch torch.compile",
          "jax_baseline": "mmrs @ baseline"}
_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
_HLO_INST = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w+)\(")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.peer", description=__doc__.split("\n\n")[0])
  p.add_argument("--method", choices=("mae_s2", "mixmae"), required=True)
  p.add_argument("--size", default="S", help="Encoder size (mmrs/models/sizes.py): S, B, ...")
  p.add_argument("--image_size", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--torch_compile", action="store_true", help="Also time torch.compile (a third side).")
  p.add_argument("--torch_compile_backend", default="inductor",
                 help="torch.compile's backend: inductor (what users get) or e.g. aot_eager (the same tracing without "
                      "kernel generation: gpu_suite.sh --cpu_smoke, where inductor's C++ builds take minutes).")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--steps", type=int, default=10, help="Timed steps per side and repeat.")
  p.add_argument("--warmup", type=int, default=3, help="Untimed steps first (compilation included).")
  p.add_argument("--decoder", default=None, help="Decoder size; default tiny for S and smaller, lite otherwise.")
  p.add_argument("--decoder_depth", type=int, default=None, help="Default 4 (tiny) / 8 (lite).")
  p.add_argument("--patch_size", type=int, default=16)
  p.add_argument("--s2_bands", type=int, choices=(12, 13), default=12, help="12 = L2A, 13 = L1C.")
  p.add_argument("--threads", type=int, default=0, help="Pin both sides to N cores/threads (0 = defaults).")
  p.add_argument("--fast_compile", action="store_true",
                 help="XLA backend optimization level 0 (tests only: quicker compile, unrepresentative speed).")
  p.add_argument("--baseline_rev", default="",
                 help="Also run mmrs's step as of this git revision (an exported copy), alternating: before/after.")
  p.add_argument("--hlo_stats", action="store_true",
                 help="Count the layout copies/transposes and dots in mmrs's optimized step HLO (an XLA dump).")
  p.add_argument("--hlo_only", action="store_true",
                 help="Only compile mmrs's step (and the baseline's) and print --hlo_stats; no PyTorch, no timing. The "
                      "counts do not depend on the machine's load.")
  p.add_argument("--json_out", default="", help="Append a full JSON record (for benchmarks/plot.py) to this file.")
  p.add_argument("--attention", default="", help="mmrs's config.model.attention (auto, xla, cudnn, head_major); "
                 "empty = the config's. gpu_suite.sh passes xla when its cuDNN check failed.")
  p.add_argument("--side_timeout_s", type=float, default=0,
                 help="Stop a side's child after this many seconds (0 = never); it is recorded as failed and the "
                      "other sides' numbers are kept.")
  p.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)  # internal: one child's side
  args = p.parse_args(argv)
  if args.decoder is None:
    args.decoder = "tiny" if args.size in ("mu", "tiny", "S") else "lite"
  if args.decoder_depth is None:
    args.decoder_depth = 4 if args.decoder == "tiny" else 8 if args.decoder == "lite" else 0
  for name in ("repeats", "steps", "batch", "image_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1")
  if args.image_size % args.patch_size:
    p.error(f"--image_size={args.image_size} must be a multiple of --patch_size={args.patch_size}")
  return args


def model_dims(args) -> tuple[dict, dict]:
  """(encoder, decoder) dims {"width", "depth", "mlp_dim", "heads"} from mmrs's size table (a jax-free module)."""
  from mmrs.models import sizes  # pylint: disable=import-outside-toplevel
  enc, dec = sizes.vit_size(args.size), sizes.vit_size(args.decoder)
  if args.decoder_depth:
    dec["depth"] = args.decoder_depth
  rename = lambda d: {"width": d["width"], "depth": d["depth"], "mlp_dim": d["mlp_dim"], "heads": d["num_heads"]}
  return rename(enc), rename(dec)


def _minor_faults() -> int:
  """Minor page faults of this process so far (see benchmarks/step_throughput.py): per timed step, both sides."""
  import resource  # pylint: disable=import-outside-toplevel
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _pin_threads(n: int) -> None:
  if n > 0 and hasattr(os, "sched_setaffinity"):
    cpus = sorted(os.sched_getaffinity(0))[:n]
    os.sched_setaffinity(0, cpus)


# ---------------------------------------------------------------------------------------------------------------
# The two sides (each runs in a child process).


def mmrs_config(args):
  """The mmrs config of this comparison: configs/<method>.py:vit_b (Adafactor, clip 1.0), resized."""
  import importlib  # pylint: disable=import-outside-toplevel
  from mmrs import bands as bands_lib  # pylint: disable=import-outside-toplevel
  c = importlib.import_module(f"configs.{args.method}").get_config("vit_b")
  c.model.encoder, c.model.decoder, c.model.decoder_depth = args.size, args.decoder, args.decoder_depth
  c.model.patch_size = args.patch_size
  c.bands.s2 = ",".join(bands_lib.S2_L2A_BANDS if args.s2_bands == 12 else bands_lib.S2_L1C_BANDS)
  for name in c.data:
    c.data[name].image_size = args.image_size
  c.batch_size = args.batch
  c.compute_dtype = args.dtype
  if args.attention:
    c.model.attention = args.attention
  if args.fast_compile:
    c.xla_compiler_options = {"xla_backend_optimization_level": 0}
  return c


def run_jax(args) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import step_throughput  # pylint: disable=import-outside-toplevel
  out = step_throughput.benchmark(mmrs_config(args), steps=args.steps, warmup=args.warmup,
                                  devices=jax.devices()[:1])
  stats = jax.devices()[0].memory_stats() or {}  # None on CPU
  res = {"images_per_s": out["images_per_s"], "params": out["params"], "device_kind": out["device_kind"],
         "compile_s": sum(out["compile_s"].values()), "last_loss": out["last_loss"],
         "memory_mib": out["memory_mib"], "mfu": out["mfu"], "peak_source": out["peak_source"],
         "minor_faults_per_step": out.get("minor_faults_per_step")}
  if "peak_bytes_in_use" in stats:
    res["peak_memory_mib"] = stats["peak_bytes_in_use"] / 2**20
  return res


def run_torch(args, compile_model: bool) -> dict:
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_vit  # pylint: disable=import-outside-toplevel
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.manual_seed(0)
  enc, dec = model_dims(args)
  model = torch_vit.build(args.method, enc=enc, dec=dec, patch_size=args.patch_size, s2_channels=args.s2_bands,
                          image_size=args.image_size)
  model.to(device).train()
  if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 on both sides (XLA: highest precision)
  from benchmarks import torch_adafactor  # pylint: disable=import-outside-toplevel  (mmrs's Adafactor, exactly)
  step = torch_vit.make_step(model, torch_adafactor.make_optimizer(model),
                             torch.bfloat16 if args.dtype == "bfloat16" else torch.float32,
                             compile_model=compile_model, compile_backend=args.torch_compile_backend)
  batch = torch_vit.synthetic_batch(args.method, args.batch, args.image_size, args.s2_bands, 2, device)
  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats()
  t0 = time.perf_counter()
  for _ in range(args.warmup):
    loss = step(batch)
  sync()
  warm_s = time.perf_counter() - t0
  faults0 = _minor_faults()
  t0 = time.perf_counter()
  for _ in range(args.steps):
    loss = step(batch)
  sync()
  seconds = time.perf_counter() - t0
  faults = _minor_faults() - faults0
  kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  out = {"images_per_s": args.steps * args.batch / seconds, "params": torch_vit.count_params(model),
         "device_kind": kind, "compile_s": warm_s, "last_loss": float(loss), "threads": torch.get_num_threads(),
         "minor_faults_per_step": faults / args.steps}
  if device.type == "cuda":
    out["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
  return out


def hlo_stats(dump_dir: str) -> dict:
  """Materialised layout copies (copy/transpose instructions and copy/transpose fusions outside fused computations,
  with their MiB), Eigen dots and YNN (XNNPACK) fusions in the largest optimized module of an XLA dump (the step)."""
  files = glob.glob(os.path.join(dump_dir, "*after_optimizations.txt"))
  if not files:
    return {}
  text = open(max(files, key=os.path.getsize), encoding="utf-8").read()
  stats = {"copies": 0, "copy_mib": 0.0, "dots": 0, "ynn_fusions": 0}
  fused = False
  for line in text.splitlines():
    if line and not line[0].isspace():  # a computation header: fusion bodies are not materialised
      fused = "fused" in line.split("(")[0] or "ynn" in line.split("(")[0]
      continue
    m = _HLO_INST.match(line)
    if fused or not m:
      continue
    name, dtype, dims, opcode = m.groups()
    size = _DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
    if opcode in ("copy", "transpose") or (opcode == "fusion" and name.startswith(("copy", "transpose"))):
      stats["copies"] += 1
      stats["copy_mib"] += size / 2**20
    elif opcode == "dot":  # XLA's own (Eigen) dot
      stats["dots"] += 1
    elif opcode == "fusion" and name.startswith("ynn"):  # XNNPACK-family fusions (most matmuls, some reductions)
      stats["ynn_fusions"] += 1
  stats["copy_mib"] = round(stats["copy_mib"], 1)
  return stats


def run_side(args) -> dict:
  _pin_threads(args.threads)
  if args.side == "jax":
    return run_jax(args)
  return run_torch(args, compile_model=args.side == "torch_compile")


# ---------------------------------------------------------------------------------------------------------------
# The parent: alternate the sides in child processes, then report.


def child_args(argv: list[str], side: str) -> list[str]:
  return [a for a in argv if not a.startswith("--side")] + [f"--side={side}"]


def export_revision(rev: str) -> str:
  """`git archive REV` of this repository into a temporary folder (no git state touched); returns the folder."""
  proc = subprocess.run(["git", "archive", "--format=tar", rev], cwd=REPO, capture_output=True, check=False)
  if proc.returncode:
    raise SystemExit(f"--baseline_rev={rev}: git archive failed: {proc.stderr.decode().strip()[-300:]}")
  out = tempfile.mkdtemp(prefix="peer_baseline_")
  tar_path = os.path.join(out, ".rev.tar")
  with open(tar_path, "wb") as f:
    f.write(proc.stdout)
  with tarfile.open(tar_path) as tar:
    tar.extractall(out, filter="data")
  os.remove(tar_path)
  return out


class SideFailed(RuntimeError):
  """One side's child failed or ran out of time: its error text, for the record; the other sides go on."""


def run_child(argv: list[str], side: str, tree: str = REPO, hlo: bool = False, timeout_s: float = 0) -> dict:
  argv = [a for a in argv if not a.startswith(("--baseline_rev", "--hlo_stats", "--hlo_only", "--json_out"))]
  cmd = [sys.executable, "-m", "benchmarks.peer", *child_args(argv, "jax" if side == "jax_baseline" else side)]
  env = dict(os.environ)
  dump = None
  if hlo and side.startswith("jax"):
    dump = tempfile.mkdtemp(prefix="peer_hlo_")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump} --xla_dump_hlo_as_text".strip()
  try:
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False,
                          timeout=timeout_s or None)
  except subprocess.TimeoutExpired as e:
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    tail = "\n".join(err.strip().splitlines()[-15:])
    raise SideFailed(f"the {LABELS[side]} side ran out of its {timeout_s:g}s (--side_timeout_s):\n{tail}") from None
  lines = [l for l in proc.stdout.strip().splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
    raise SideFailed(f"the {LABELS[side]} side failed (exit {proc.returncode}):\n{tail}")
  out = json.loads(lines[-1])
  if dump:
    out["hlo"] = hlo_stats(dump)
  return out


def hlo_only(argv: list[str], args, sides: list[str], trees: dict[str, str]) -> dict:
  """Compile mmrs's step per jax side (one untimed step runs: a baseline revision's peer.py knows no compile-only
  flag) and print the optimized HLO's stats, then one JSON line {"method", "hlo": {side: stats}}."""
  argv = [a for a in argv if not a.startswith(("--steps", "--warmup", "--repeats"))] + ["--steps=1", "--warmup=0"]
  out = {}
  try:
    for side in (s for s in sides if s.startswith("jax")):
      try:
        res = run_child(argv, side, trees[side], hlo=True)
      except SideFailed as e:
        raise SystemExit(f"benchmarks.peer: {e}") from None
      out[side] = {**res["hlo"], "loss": round(res["last_loss"], 4)}  # one step, same rng: equal math, equal loss
      print(f"  {LABELS[side]:<22} HLO {out[side]}", flush=True)
  finally:
    if args.baseline_rev:
      shutil.rmtree(trees["jax_baseline"], ignore_errors=True)
  summary = {"method": args.method, "hlo": out}
  print(json.dumps(summary))
  return summary


def summarize(args, runs: dict[str, list[dict]]) -> dict:
  """Medians per side; a side with no successful run (it failed) gives None, and so do its ratios."""
  med = {s: statistics.median(r["images_per_s"] for r in rs) for s, rs in runs.items() if rs}
  first = lambda side, key: runs[side][0][key] if runs.get(side) else None
  rnd = lambda x, n: None if x is None else round(x, n)
  ratio = lambda a, b: a / b if a is not None and b is not None else None
  jax_, eager, compiled = med.get("jax"), med.get("torch"), med.get("torch_compile")
  return {
      "method": args.method,
      "jax_images_per_s": rnd(jax_, 3),
      "torch_images_per_s": rnd(eager, 3),
      "torch_compile_images_per_s": rnd(compiled, 3),
      "ratio_vs_eager": rnd(ratio(jax_, eager), 4),
      "ratio_vs_compile": rnd(ratio(jax_, compiled), 4),
      "params_jax": first("jax", "params"),
      "params_torch": first("torch", "params") or first("torch_compile", "params"),
      "device_kind": next((rs[0]["device_kind"] for rs in runs.values() if rs), None),
  }


def main(argv=None) -> dict:
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.side is not None:
    print(json.dumps(run_side(args)))
    return {}
  sides = (["jax_baseline"] if args.baseline_rev else []) + ["jax", "torch"] + (
      ["torch_compile"] if args.torch_compile else [])
  trees = {s: REPO for s in sides}
  if args.baseline_rev:
    trees["jax_baseline"] = export_revision(args.baseline_rev)
    LABELS["jax_baseline"] = f"mmrs @ {args.baseline_rev}"
  enc, dec = model_dims(args)
  if args.hlo_only:
    return hlo_only(argv, args, sides, trees)
  print(f"{args.method}: encoder {args.size} {enc}, decoder {args.decoder} {dec}, {args.image_size} px, "
        f"patch {args.patch_size}, batch {args.batch}, {args.dtype}, {args.repeats} x {args.steps} timed steps "
        f"per side (after {args.warmup} warm-up); LD_PRELOAD={os.environ.get('LD_PRELOAD', '') or '-'} "
        f"MALLOC_CONF={os.environ.get('MALLOC_CONF', '') or '-'}", flush=True)
  runs: dict[str, list[dict]] = {s: [] for s in sides}
  errors: dict[str, str] = {}  # side -> why it failed; a failed side is not retried in later repeats
  rows = []
  for r in range(args.repeats):
    for side in (s for s in sides if s not in errors):
      try:
        out = run_child(argv, side, trees[side], hlo=args.hlo_stats and r == 0, timeout_s=args.side_timeout_s)
      except SideFailed as e:
        errors[side] = str(e)
        rows.append((side, r + 1, {"error": str(e)[-2000:]}))
        print(f"  {LABELS[side]:<22} repeat {r + 1}: FAILED: {e}", flush=True)
        continue
      runs[side].append(out)
      rows.append((side, r + 1, out))
      print(f"  {LABELS[side]:<22} repeat {r + 1}: {out['images_per_s']:8.2f} images/s "
            f"({1e3 * args.batch / out['images_per_s']:8.1f} ms/step), {out['params']:,} params, "
            f"compile+warm-up {out['compile_s']:.1f}s, loss {out['last_loss']:.4f}"
            + (f", {out['minor_faults_per_step']:,.0f} page faults/step" if out.get("minor_faults_per_step") else "")
            + (f", HLO {out['hlo']}" if out.get("hlo") else ""), flush=True)
      if not side.startswith("jax") and runs["jax"] and len(runs[side]) == 1:
        pj, pt = runs["jax"][0]["params"], out["params"]
        if abs(pj - pt) > 1e-3 * pj:
          raise SystemExit(f"benchmarks.peer: parameter counts differ by more than 0.1 %: mmrs {pj:,} vs PyTorch "
                           f"{pt:,}; the two models are not the same architecture.")
  if args.baseline_rev:
    shutil.rmtree(trees["jax_baseline"], ignore_errors=True)
  summary = summarize(args, runs)
  print()
  print(f"| side | {' | '.join(f'repeat {i + 1}' for i in range(args.repeats))} | median images/s | vs eager |")
  print(f"|---|{'---|' * args.repeats}---|---|")
  for side in sides:
    if not runs[side]:
      print(f"| {LABELS[side]} | failed: {errors[side].splitlines()[0]} |")
      continue
    vals = [f"{r['images_per_s']:.2f}" for r in runs[side]]
    med = statistics.median(r["images_per_s"] for r in runs[side])
    eager = summary["torch_images_per_s"]
    print(f"| {LABELS[side]} | {' | '.join(vals)} | {med:.2f} | {f'{med / eager:.3f}x' if eager else '–'} |")
  print(f"params: mmrs {summary['params_jax']}, PyTorch {summary['params_torch']}; device {summary['device_kind']}")
  if args.json_out:
    record = {**summary, "size": args.size, "decoder": args.decoder, "decoder_depth": args.decoder_depth,
              "image_size": args.image_size, "batch": args.batch, "dtype": args.dtype, "steps": args.steps,
              "repeats": args.repeats, "threads": args.threads, "baseline_rev": args.baseline_rev,
              "torch_compile_backend": args.torch_compile_backend if args.torch_compile else None,
              "ld_preload": os.environ.get("LD_PRELOAD", ""), "malloc_conf": os.environ.get("MALLOC_CONF", ""),
              "runs": [{"side": s, "repeat": r, **o} for s, r, o in rows], "errors": errors}
    records.append(args.json_out, record)
  print(json.dumps(summary))
  if errors:  # after the summary line: what ran is kept; the exit code still says that something did not
    sys.stdout.flush()
    raise SystemExit(f"benchmarks.peer: {len(errors)} of {len(sides)} sides failed ({', '.join(errors)}); the other "
                     "sides' numbers are in the summary line above" + (" and --json_out" if args.json_out else ""))
  return summary


if __name__ == "__main__":
  main()
