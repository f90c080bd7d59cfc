"""A CPU training run is fast without the user knowing about allocators or XLA:CPU options.

`prepare()` runs first thing in `python -m launch.main` / `mmrs-train` (before jax is imported), on CPU runs only:
1. XLA:CPU dot options chosen per CPU from what /proc/cpuinfo reports (CPU_XLA_FLAGS: only options measured to win
   on that CPU family with unchanged losses, benchmarks/cpu_flags.py and benchmarks/RESULTS.md); a flag the user
   already has in XLA_FLAGS wins.
2. jemalloc told to keep the pages it frees. XLA:CPU mallocs the step's temporaries every step and glibc returns
   large blocks to the kernel on free, so every step faults hundreds of thousands of fresh pages in (MixMAE ViT-S b32:
   ~390k per step, 1.24-1.25x slower; benchmarks/RESULTS.md "Allocator"). LD_PRELOAD only works from the start of a
   process, so the process re-executes itself once (same PID, same arguments) with it; grain workers inherit it.
   Without libjemalloc2 installed: one note on stderr saying how to get it.
Opt-outs: MMRS_ALLOCATOR=system (glibc, no re-exec), MMRS_CPU_SETUP=off (nothing at all). Standard library only.

"A CPU run" = JAX_PLATFORMS starts with cpu, or it is unset and no accelerator plugin (libtpu, jax's CUDA/ROCm
plugins) is installed: a GPU or TPU host is left exactly as it was (its host allocations are not the step's).
"""
from __future__ import annotations

import importlib.util
import os
import platform
import sys
from typing import Mapping, MutableMapping

JEMALLOC_CONF = "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
JEMALLOC_PATHS = (f"/usr/lib/{platform.machine()}-linux-gnu/libjemalloc.so.2",  # Debian, Ubuntu
                  "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2", "/usr/local/lib/libjemalloc.so.2")
ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin")

# (what /proc/cpuinfo must report, XLA flags, evidence). The first matching row's flags are used; a CPU with no row
# keeps XLA's defaults. A row is added with its measurement (`python -m benchmarks.cpu_flags`, A/B/A/B, losses
# unchanged; benchmarks/RESULTS.md "XLA:CPU options per CPU"), never without: the same option can lose elsewhere.
# Measured and kept at the default: Eigen dots instead of YNNPACK (0.74-0.84x on Zen 3); the XNNPACK/oneDNN dot
# options do nothing in jaxlib 0.10.2 (its dots stay in YNNPACK fusions); YNN elementwise/reduce fusions (0.94x).
CPU_XLA_FLAGS: list[tuple[dict[str, str], tuple[str, ...], str]] = [
    ({"vendor_id": "AuthenticAMD", "cpu family": "25", "model": "1"},  # Zen 3 EPYC (Milan)
     ("--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",),
     "XNNPACK graph fusion of the elementwise subgraphs around the dots; 2 vCPUs, jemalloc, 2026-12-07: MAE-S2 "
     "ViT-S b32 30.25 -> 35.54 images/s (1.17x), MixMAE 10.37 -> 10.84 (1.05x, within noise), losses bit-identical"),
]


def prepare(environ: MutableMapping[str, str] | None = None, argv: list[str] | None = None) -> None:
  environ = os.environ if environ is None else environ
  if environ.get("MMRS_CPU_SETUP", "").lower() == "off" or not is_cpu_run(environ):
    return
  add_xla_flags(environ, xla_flags_for(cpuinfo()))
  reexec_with_jemalloc(environ, sys.orig_argv if argv is None else argv)


def is_cpu_run(environ: Mapping[str, str]) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  return not any(importlib.util.find_spec(p) is not None for p in ACCELERATOR_PLUGINS)


def cpuinfo(path: str = "/proc/cpuinfo") -> dict[str, str]:
  """The first processor's fields (vendor_id, cpu family, model, model name, flags ...); {} where unreadable."""
  fields: dict[str, str] = {}
  try:
    with open(path, encoding="utf-8") as f:
      for line in f:
        if not line.strip():
          break  # end of the first processor's block
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
  except OSError:
    pass
  return fields


def xla_flags_for(info: Mapping[str, str]) -> tuple[str, ...]:
  for match, flags, _ in CPU_XLA_FLAGS:
    if all(_matches(info.get(k, ""), v) for k, v in match.items()):
      return flags
  return ()


def _matches(value: str, want: str) -> bool:
  if want.startswith("has:"):  # a CPU feature flag, e.g. "has:avx512f"
    return want[4:] in value.split()
  return value == want


def add_xla_flags(environ: MutableMapping[str, str], flags: tuple[str, ...]) -> None:
  current = environ.get("XLA_FLAGS", "")
  have = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in have]  # the user's own setting of a flag wins
  if extra:
    environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def jemalloc_path(environ: Mapping[str, str]) -> str | None:
  if environ.get("MMRS_JEMALLOC"):
    return environ["MMRS_JEMALLOC"] if os.path.exists(environ["MMRS_JEMALLOC"]) else None
  return next((p for p in JEMALLOC_PATHS if os.path.exists(p)), None)


def reexec_with_jemalloc(environ: MutableMapping[str, str], argv: list[str]) -> None:
  """Replaces this process with the same command under jemalloc (returns where nothing is to be done)."""
  choice = environ.get("MMRS_ALLOCATOR", "jemalloc")
  if choice == "system" or "jemalloc" in environ.get("LD_PRELOAD", ""):
    return  # opted out, or already preloaded (a user's own LD_PRELOAD, or after the re-exec)
  if choice != "jemalloc":
    raise SystemExit(f"MMRS_ALLOCATOR={choice}: use jemalloc (the default) or system")
  lib = jemalloc_path(environ)
  if lib is None:
    where = f"MMRS_JEMALLOC={environ['MMRS_JEMALLOC']} does not exist" if environ.get("MMRS_JEMALLOC") else (
        "libjemalloc.so.2 not found")
    print(f"note: {where}: CPU steps run with the system allocator, up to 1.25x slower (Debian/Ubuntu: apt-get "
          "install libjemalloc2; another path: MMRS_JEMALLOC=/path/libjemalloc.so.2; MMRS_ALLOCATOR=system "
          "silences this)", file=sys.stderr, flush=True)
    environ["MMRS_ALLOCATOR"] = "system"  # said once: not again in this process's children
    return
  environ["LD_PRELOAD"] = ":".join(filter(None, [lib, environ.get("LD_PRELOAD", "")]))
  environ.setdefault("MALLOC_CONF", JEMALLOC_CONF)  # a MALLOC_CONF the user set is kept
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], dict(environ))


def allocator_in_use(maps: str = "/proc/self/maps") -> str:
  """What this process really runs with, for the start-up log: 'jemalloc (...)' or 'system malloc'."""
  try:
    with open(maps, encoding="utf-8") as f:
      mapped = "libjemalloc" in f.read()
  except OSError:
    return "unknown"
  return f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '') or 'default'})" if mapped else "system malloc"
