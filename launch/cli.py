"""The one place that turns a user's mistake into one line `ERROR: ...` and exit code 2, for every entry point.

Every launch/ and data_prep/ script ends with `cli.run(main)` instead of absl's `app.run(main)`; the console scripts
(launch/console.py) run those modules as `__main__`, so `mmrs-train` and `python -m launch.main` behave the same.

A user error is an exception whose message was written for the user (it names the file, key or flag and what to
do): a flag that does not parse, a `--config.KEY=...` override naming no config key, a missing shards / init_from
path, a damaged shard, a config the checks refuse. Anything else is a bug and keeps its traceback (exit 1).
The classes are listed by qualified name, so importing this module imports nothing heavy.
"""
from __future__ import annotations

import functools
import re
import sys

from absl import app
from absl import flags

EXIT_USER_ERROR = 2
_state = {"verbosity_given": False}

USER_ERRORS = frozenset({
    "builtins.FileNotFoundError",
    "launch.cli.UserError",
    "mmrs.train.config_check.ConfigError",
    "mmrs.train.checkpoint.CheckpointMismatch",
    "mmrs.train.aot.TopologyError",
    "mmrs.data.sources.ShardError",
    "mmrs.data.records.RecordError",
    "mmrs.data.transforms.BadRecordError",
    "mmrs.data.staging.StagingError",
    "mmrs.finetune.convert.ConversionError",
    "mmrs.finetune.robustness.RobustnessError",
    "data_prep.convert.BadInput",
    "data_prep.convert.ConversionError",
    "data_prep.pair_catalog.CatalogError",
})


class UserError(Exception):
  """Raised by an entry point for a mistake its message fully explains (e.g. a bad flag combination)."""


def is_user_error(error: BaseException, extra: tuple[type, ...] = ()) -> bool:
  if extra and isinstance(error, extra):
    return True
  return any(f"{c.__module__}.{c.__qualname__}" in USER_ERRORS for c in type(error).__mro__)


def error_line(error: BaseException | str) -> str:
  return f"ERROR: {error}"


def fail(error: BaseException | str, code: int = EXIT_USER_ERROR):
  """Prints `ERROR: <message>` on stderr and exits with `code` (no traceback)."""
  sys.stdout.flush()
  print(error_line(error), file=sys.stderr, flush=True)
  sys.exit(code)


def _override_message(error: AttributeError, argv: list[str]) -> str:
  """ml_collections raises AttributeError(KeyError("'KEY'\\nDid you mean ...")) for an override naming no key."""
  inner = error.args[0] if error.args else error
  text = str(inner.args[0]) if isinstance(inner, KeyError) and inner.args else str(inner)
  key, _, hint = text.partition("\n")
  key = key.strip("'\"")
  culprit = next((a.split("=", 1)[0] for a in argv[1:]
                  if a.startswith("--config.") and re.search(rf"[.]{re.escape(key)}(=|[.]|$)", a)), None)
  where = culprit or "a --config.KEY=VALUE override"
  return f"{where}: the config has no key {key!r}. {' '.join(hint.split())}".rstrip()


def _flag_error_line(text: str) -> str:
  """absl's message, on one line; a config file's own exception (ml_collections embeds its whole traceback) as
  its last line only."""
  head, tb, rest = text.partition("Traceback (most recent call last)")
  if tb:
    last = [line for line in rest.splitlines() if line.strip()][-1:]
    text = f"{head.rstrip()} {last[0].strip() if last else ''}"
  return " ".join(text.split())


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or config override reported as one line and exit 2 (absl: exit 1)."""
  try:
    rest = flags.FLAGS(argv)
    # Read now: absl sets --verbosity to 0 (INFO) right after this parser returns when the user did not give it.
    _state["verbosity_given"] = not flags.FLAGS["verbosity"].using_default_value
    return rest
  except flags.Error as e:
    fail(f"{_flag_error_line(str(e))} (--helpshort lists this program's flags)")
  except AttributeError as e:  # --config.KEY=... where the config has no KEY
    if any(a.startswith("--config.") for a in argv[1:]):
      fail(_override_message(e, argv))
    raise
  except Exception as e:  # pylint: disable=broad-except  (a config file's own check, e.g. ConfigError)
    if is_user_error(e):
      fail(e)
    raise


class LibraryNoise:
  """absl-log filter: drops other libraries' INFO lines (orbax's per-checkpoint chatter, jax's "Unable to initialize
  backend 'tpu'") and the warnings listed in HARMLESS; mmrs's own lines and every library ERROR stay."""
  LIBRARIES = ("/orbax/", "/grain/", "/jax/_src/", "/jaxlib/", "/etils/", "/tensorstore/")
  HARMLESS = ("Metadata file does not exist",)  # orbax, on every restore of a checkpoint written by mmrs

  def filter(self, record) -> bool:
    if not any(lib in record.pathname for lib in self.LIBRARIES):
      return True
    if record.levelno >= 40:
      return True
    return record.levelno >= 30 and not any(h in str(record.msg) for h in self.HARMLESS)


def _drop_closed_loop_reports(default_hook):
  """Orbax's failed restore of a damaged checkpoint (which mmrs then falls back past) leaves tensorstore callbacks
  aimed at its closed asyncio loop; Python reports each at garbage collection, hundreds of tracebacks of
  "RuntimeError: Event loop is closed". Everything else goes to the default hook."""
  def hook(unraisable):
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
      return
    default_hook(unraisable)
  return hook


def quiet_library_noise() -> None:
  """What an entry point does unless --verbosity is given: library chatter off (see LibraryNoise and
  _drop_closed_loop_reports). `--verbosity=0` (or higher) shows everything."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().addFilter(LibraryNoise())
  sys.unraisablehook = _drop_closed_loop_reports(sys.unraisablehook)


def run(main, user_errors: tuple[type, ...] = ()) -> None:
  """absl's `app.run(main)`, with user errors (USER_ERRORS, plus `user_errors`: a script's own classes, which are
  `__main__.X` when it runs as a script) as `ERROR: ...` and exit 2."""

  @functools.wraps(main)
  def guarded(argv):
    if not _state["verbosity_given"]:
      quiet_library_noise()
    try:
      return main(argv)
    except Exception as e:  # pylint: disable=broad-except
      if is_user_error(e, user_errors):
        fail(e)
      raise

  app.run(guarded, flags_parser=parse_flags)
