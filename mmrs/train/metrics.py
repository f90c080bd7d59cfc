"""Observability: metrics.jsonl, TensorBoard (tensorboardX, no TensorFlow), a progress line, and MFU.

MFU = method FLOPs per sample x samples/s / (mesh devices x peak FLOP/s per device). The peak is the dense bf16
number of the accelerator from `PEAK_TFLOPS` (matched on `device.device_kind`), or `config.peak_flops_per_device`
when set. A device kind missing from the table (CPUs included) has no honest peak: MFU is reported as n/a rather
than against a measured matmul. The devices are those of the run's mesh, not `jax.device_count()`.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

# Dense bf16 peak TFLOP/s per chip (vendor specs). Longest match on device_kind wins ("tpu v5 lite" before "tpu v5").
PEAK_TFLOPS = {
    "tpu v4": 275.0,
    "tpu v5 lite": 197.0,  # v5e
    "tpu v5e": 197.0,
    "tpu v5p": 459.0,
    "tpu v5": 459.0,  # v5p reports "TPU v5"
    "tpu v6 lite": 918.0,  # v6e (Trillium)
    "tpu v6e": 918.0,
    "a100": 312.0,
    "h100 pcie": 756.0,
    "h100": 989.0,  # SXM / HBM3
    "h200": 989.0,
}
# High-bandwidth memory per chip / GPU in bytes (vendor specs), for launch.aot's "fits" verdict; same matching.
# Sources: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB HBM per chip);
# NVIDIA A100/H100/H200 datasheets (A100 40/80 GB, H100 80 GB, H200 141 GB).
DEVICE_MEMORY_BYTES = {
    "tpu v4": 32 * 2**30,
    "tpu v5 lite": 16 * 2**30,
    "tpu v5e": 16 * 2**30,
    "tpu v5p": 95 * 2**30,
    "tpu v5": 95 * 2**30,
    "tpu v6 lite": 32 * 2**30,
    "tpu v6e": 32 * 2**30,
    "a100-sxm4-40gb": 40 * 10**9,
    "a100": 80 * 10**9,
    "h100": 80 * 10**9,
    "h200": 141 * 10**9,
}
_measured_cpu_peak: float | None = None


def _lookup(table: Mapping[str, float], kind: str) -> tuple[str, float] | None:
  kind = kind.lower()
  for key in sorted(table, key=len, reverse=True):
    if key in kind:
      return key, table[key]
  return None


def peak_flops_per_device(device: jax.Device | None = None, override: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the number comes from); NaN for a device kind missing from PEAK_TFLOPS (MFU n/a)."""
  if override and override > 0:
    return float(override), "config.peak_flops_per_device"
  device = device or jax.devices()[0]
  found = _lookup(PEAK_TFLOPS, device.device_kind)
  if found is None:
    return float("nan"), (f"no peak known for {device.device_kind!r}: MFU n/a (set config.peak_flops_per_device "
                          "to report one)")
  return found[1] * 1e12, f"spec sheet ({found[0]}, bf16 dense)"


def device_memory_bytes(device_kind: str) -> int | None:
  """HBM bytes per device from DEVICE_MEMORY_BYTES, None when unknown."""
  found = _lookup(DEVICE_MEMORY_BYTES, device_kind)
  return None if found is None else int(found[1])


def measure_matmul_flops(device: jax.Device, n: int = 512, iters: int = 8) -> float:
  """A short matmul benchmark (once per process; ~0.1 s on a laptop CPU). Informative only: not used for MFU."""
  global _measured_cpu_peak
  if _measured_cpu_peak is not None:
    return _measured_cpu_peak
  x = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(iters):
      y = f(x)
    y.block_until_ready()
    best = min(best, time.perf_counter() - t0)
  _measured_cpu_peak = 2 * n**3 * iters / best
  return _measured_cpu_peak


def total_peak_flops(devices: Sequence[jax.Device] | None = None, override: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of the run's devices (the mesh's; default all); NaN when the device kind has no known peak."""
  devices = list(devices) if devices is not None else jax.devices()
  per, source = peak_flops_per_device(devices[0], override)
  return per * len(devices), f"{source} x {len(devices)} devices"


def to_python(x: Any) -> Any:
  x = np.asarray(x)
  if x.size == 1:
    v = x.item()
    return bool(v) if x.dtype == bool else v
  return x.tolist()


class MetricsWriter:
  """Writes on process 0 only: the metric records (one JSON object per line) and TensorBoard events.

  A local logdir has one `metrics.jsonl`; a resume drops its lines after the resumed step (they are redone) and
  appends. Object stores (gs://) cannot append or rewrite in place safely, so a remote logdir gets one file per
  start, `metrics/<resume step>-<unix time>-<part>.jsonl`, rewritten whole at every record (a new part every
  REMOTE_PART_BYTES) and never overwritten by a later start; `read_metrics` merges both layouts the same way.
  TensorBoard event files are per writer (unique names) in both cases; for a remote logdir they are written to a
  local temporary folder and copied to `<logdir>/tensorboard/` at most every REMOTE_TB_SYNC_S and at close
  (tensorboardX's own gs:// writer re-uploads from `__del__`, needs google-cloud-storage credentials, and hangs two
  minutes when the storage is gone).
  """

  REMOTE_PART_BYTES = 256 * 1024
  REMOTE_TB_SYNC_S = 10.0

  def __init__(self, logdir: str | epath.Path, resume_step: int = 0, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.logdir = epath.Path(logdir)
    self._tb = None
    self._tb_local, self._tb_synced = None, 0.0
    if not self.enabled:
      return
    self.logdir.mkdir(parents=True, exist_ok=True)
    self.remote = is_remote(self.logdir)
    if self.remote:
      self._run = f"{min(int(resume_step), 10**12 - 1):012d}-{int(time.time())}"
      self._part, self._lines = 0, []
      self.path = self._part_path()
    else:
      self.path = self.logdir / "metrics.jsonl"
      self._drop_after(resume_step)  # lines from steps a resumed run will redo
      self._file = self.path.open("a")
    try:
      if self.remote:
        self._tb_local = tempfile.mkdtemp(prefix="mmrs_tensorboard_")
      self._tb = _summary_writer(self._tb_local or str(self.logdir / "tensorboard"))
    except Exception as e:  # pylint: disable=broad-except  (TensorBoard is optional; jsonl is the record)
      logging.warning("TensorBoard logging is off: %s", e)

  def _drop_after(self, step: int) -> None:
    if not self.path.exists():
      return
    keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
    self.path.write_text("".join(l + "\n" for l in keep))

  def _part_path(self) -> epath.Path:
    return self.logdir / "metrics" / f"{self._run}-{self._part:04d}.jsonl"

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
    if self.remote:
      if self._lines and sum(map(len, self._lines)) + len(line) > self.REMOTE_PART_BYTES:
        self._part, self._lines = self._part + 1, []
        self.path = self._part_path()
      self._lines.append(line)
      self.path.write_text("".join(self._lines))  # a whole object: readable at once, even after a kill -9
    else:
      self._file.write(line)
      self._file.flush()
    if self._tb is not None:
      prefix = f"{record['task']}/" if record.get("task") else ""
      for k, v in record.items():
        # Non-finite values (mfu on a CPU: n/a) stay in metrics.jsonl only; tensorboardX warns on each one.
        if k not in ("step", "task") and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
          self._tb.add_scalar(prefix + k, v, record["step"])
      self._sync_tensorboard()

  def write_image(self, tag: str, image: Any, step: int) -> None:
    """A picture in TensorBoard's Images tab: an (H, W, 3) uint8 array or the path of a PNG (e.g. the path that
    visualize.save_reconstruction_png returns)."""
    if not self.enabled or self._tb is None:
      return
    if isinstance(image, (str, epath.Path)):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      with Image.open(str(image)) as im:
        image = np.asarray(im.convert("RGB"))
    self._tb.add_image(tag, np.asarray(image, np.uint8), step, dataformats="HWC")
    self._tb.flush()
    self._sync_tensorboard(force=True)

  def write_hparams(self, config: Mapping[str, Any], metric_tags: Sequence[str] = ()) -> None:
    """The run's config in TensorBoard's HParams tab (nested keys flattened with "."), into the run's own event
    file so the HParams table links to its scalars; `metric_tags` are scalar tags to show beside (e.g. "mae/loss")."""
    if not self.enabled or self._tb is None:
      return
    from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top  (loaded with SummaryWriter)
    flat = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v, default=str)
            for k, v in _flatten(config).items()}
    for summary in hparams(flat, {t: 0.0 for t in metric_tags}):
      self._tb.file_writer.add_summary(summary)
    self._tb.flush()
    self._sync_tensorboard(force=True)

  def _sync_tensorboard(self, force: bool = False) -> None:
    """A remote logdir: copies the local event files to <logdir>/tensorboard (whole objects, same names)."""
    if self._tb_local is None or (not force and time.monotonic() - self._tb_synced < self.REMOTE_TB_SYNC_S):
      return
    self._tb.flush()
    for name in os.listdir(self._tb_local):
      (self.logdir / "tensorboard" / name).write_bytes(pathlib.Path(self._tb_local, name).read_bytes())
    self._tb_synced = time.monotonic()

  def close(self) -> None:
    if self.enabled:
      if not self.remote:
        self._file.close()
      if self._tb is not None:
        self._sync_tensorboard(force=True)  # (flushes first: nothing is left for close to write)
        self._tb.close()
        if self._tb_local is not None:
          shutil.rmtree(self._tb_local, ignore_errors=True)


def is_remote(path: str | epath.Path) -> bool:
  return "://" in str(path)


def read_metrics(logdir: str | epath.Path) -> list[dict[str, Any]]:
  """The records of `logdir` in order, as a reader sees the run's history: a start at step R replaces the earlier
  records of steps after R (they were redone). Reads `metrics.jsonl` and the per-start files of a remote logdir."""
  logdir = epath.Path(logdir)
  records: list[dict[str, Any]] = []
  local = logdir / "metrics.jsonl"
  if local.exists():
    records = [json.loads(l) for l in local.read_text().splitlines() if l.strip()]
  folder = logdir / "metrics"
  parts = sorted(folder.glob("*.jsonl"), key=lambda p: p.name) if folder.exists() else []
  run = None
  for part in parts:
    start = part.name.rsplit("-", 1)[0]
    if start != run:  # a new start: drop what it redoes
      run = start
      resume = int(start.split("-")[0])
      records = [r for r in records if r.get("step", 0) <= resume]
    records += [json.loads(l) for l in part.read_text().splitlines() if l.strip()]
  return records


def log_evaluation(logdir: str | epath.Path, step: int, split: str, metrics: Mapping[str, Any]) -> None:
  """Appends an evaluation ({"step", "task": split, metric: value}) to metrics.jsonl and TensorBoard (scalars
  "<split>/<metric>"), after training: one call per evaluation draws the validation / test curve. During training,
  write such a record through the loop's own MetricsWriter instead (this one opens the files again)."""
  writer = MetricsWriter(logdir, resume_step=2**62)  # drops no line: the run's records stay
  try:
    writer.write({"step": int(step), "task": split,
                  **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}})
  finally:
    writer.close()


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}.{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(_flatten(v, key))
    else:
      out[key] = v
  return out


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch (2+ s) when it is installed,
  only to accept torch tensors; we log Python floats."""
  import sys  # pylint: disable=g-import-not-at-top
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if blocked:
      del sys.modules["torch"]
  # tensorboardX names event files by the second: a unique suffix keeps a second writer in that second (an
  # evaluation logged right after training) from overwriting the first one's file.
  import uuid  # pylint: disable=g-import-not-at-top
  return SummaryWriter(logdir, flush_secs=30, filename_suffix=f".{uuid.uuid4().hex[:8]}")


def progress_line(step: int, total: int, losses: Mapping[str, float], images_per_s: float, mfu_value: float,
                  seconds_per_step: float) -> str:
  eta = (total - step) * seconds_per_step if seconds_per_step > 0 else float("nan")
  loss_txt = " ".join(f"{k} {v:.4g}" for k, v in losses.items())
  mfu_txt = f"{100 * mfu_value:.1f}%" if math.isfinite(mfu_value) else "n/a"
  return (f"step {step}/{total} | {loss_txt} | {images_per_s:,.0f} img/s | MFU {mfu_txt} | "
          f"ETA {format_duration(eta)}")


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
  """config.profile_steps "START:END" -> (START, END), steps [START, END) counted from 0; "" -> None."""
  spec = (spec or "").strip()
  if not spec:
    return None
  start, sep, end = spec.partition(":")
  try:
    out = (int(start), int(end))
  except ValueError:
    out = None
  if not sep or out is None or out[0] < 0 or out[1] <= out[0]:
    raise ValueError(f"config.profile_steps={spec!r}: use 'START:END' with 0 <= START < END (e.g. '20:25'), or '' "
                     "for no trace.")
  return out


class StepProfiler:
  """A jax.profiler trace of steps [START, END) (config.profile_steps), written under `logdir` in TensorBoard's
  profile-plugin layout (`plugins/profile/<run>/*.xplane.pb`): `tensorboard --logdir <logdir>` (with
  tensorboard-plugin-profile) or xprof shows it. Only process 0 traces; a resumed run past END traces nothing."""

  def __init__(self, spec: str, logdir: str | epath.Path):
    self.window = parse_profile_steps(spec)
    self.logdir = str(logdir)
    self.active = False

  def before_step(self, step: int) -> None:
    if self.window and not self.active and self.window[0] <= step < self.window[1] and jax.process_index() == 0:
      jax.profiler.start_trace(self.logdir)
      self.active = True
      logging.info("Profiling steps %d..%d into %s.", step, self.window[1] - 1, self.logdir)

  def after_step(self, done: int, state: Any) -> None:
    """`done`: steps completed; the trace stops once step END-1 has finished on the device."""
    if self.active and done >= self.window[1]:
      jax.block_until_ready(state)
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
