"""The persistent XLA compilation cache (`config.compilation_cache_dir`), so a requeued job does not recompile.

"auto" (the default) puts it in `<workdir>/compilation_cache`, a gs:// workdir included (jax reads and writes
remote cache folders through etils.epath; only process 0 writes entries: jax's compiler._cache_write, so a pod's
workers do not race on the bucket), "" turns it off, any other value is the directory. GPU/TPU keys agree across
processes, so every process loads what process 0 wrote; CPU keys hold each process's own topology (jax's
cache_key._hash_accelerator_config), so there only process 0 hits (tests/cpu_cache_share.py evens that out in tests).
The thresholds are lowered to zero so every step is cached, CPU steps included (jax's defaults skip compiles under
1 s). The cache is process-global jax state: the last `configure` wins. Cache hits are counted from jax's monitoring
events (`hits()`), and the train loop logs them per task.
"""
from __future__ import annotations

import os
import threading

import jax
from absl import logging

_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_hits = 0
_listening = False


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  global _hits
  if event == _HIT_EVENT:
    with _lock:
      _hits += 1


def hits() -> int:
  """Persistent-cache hits of this process so far (executables loaded instead of compiled)."""
  return _hits


def resolve_dir(setting: str | None, workdir: str) -> str | None:
  setting = (setting or "").strip()
  if setting == "auto":
    if "://" in str(workdir):
      return str(workdir).rstrip("/") + "/compilation_cache"
    return os.path.join(os.path.abspath(str(workdir)), "compilation_cache")
  return setting or None


def configure(setting: str | None, workdir: str) -> str | None:
  """Points jax's persistent cache at the resolved directory (or turns it off). Returns the directory or None."""
  global _listening
  from jax._src import compilation_cache  # pylint: disable=g-import-not-at-top  (reset_cache has no public alias)
  path = resolve_dir(setting, workdir)
  if not _listening:
    jax.monitoring.register_event_listener(_on_event)
    _listening = True
  if path == jax.config.jax_compilation_cache_dir:
    return path
  if path is not None:
    if "://" not in path:
      os.makedirs(path, exist_ok=True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit (0 = jax's default)
  jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()  # the cache object binds its directory once; rebind it
  logging.info("Persistent compilation cache: %s.", path or "off")
  return path
