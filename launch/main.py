"""Entry point: `python -m launch.main --config=configs/mixmae.py:vit_b --workdir=DIR [--config.key=value ...]`.

Pretraining configs go to `mmrs.train.loop.train`; configs with a truthy `finetune` key go to `mmrs.finetune.run`.
The same command resumes: if DIR holds checkpoints, the run continues from the latest good one. Multi-host: run the
same command on every host, with --multihost on TPU VM slices (launch/tpu_vm.sh does); SLURM jobs are detected;
otherwise pass --coordinator_address, --num_processes and --process_id, or set MMRS_COORDINATOR_ADDRESS /
MMRS_NUM_PROCESSES / MMRS_PROCESS_ID / MMRS_LOCAL_DEVICE_IDS (launch/gpu_slurm.sh does).

Exit codes (wrappers and launch/gpu_slurm.sh act on them):
  0   finished: total_steps reached (a final checkpoint is saved)
  1   an unexpected error (traceback on stderr)
  2   a user error, as one `ERROR:` line (launch/cli.py): a config, flag or resume problem found before training
      (nothing was overwritten), or a missing or damaged input (shards, init_from)
  3   training stopped on a NaN/inf (config.on_nonfinite="stop"); the last good checkpoint is kept
  4   the processes could not connect (unreachable coordinator, busy port)
  5   the latest checkpoint could not be read (storage errors after retries) and is not proven damaged: nothing was
      moved; rerun when the storage is back
  6   the storage refused access to the checkpoints (permission, credentials, missing bucket): nothing was moved;
      fix access and rerun
  7   checkpoints exist but none restores (a damaged step is moved aside once per start; the message lists the
      steps and errors): rerun to try the previous step, or pass --allow_fresh_start to start again at step 0
  75  preempted (SIGTERM / a SLURM time-limit signal): a checkpoint of the current step was saved on every
      process; run the same command again to resume (EX_TEMPFAIL: "try again later")
"""
from __future__ import annotations

if __name__ == "__main__":
  # Before jax is imported: XLA_FLAGS and LD_PRELOAD count only from a process's start (launch/cpu_setup.py).
  from launch import cpu_setup  # pylint: disable=g-import-not-at-top
  cpu_setup.prepare()

import os  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch import cli
from launch import multiprocess

config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':variant,key=value'.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (local or gs://): checkpoints, config.json, metrics.")
flags.DEFINE_string("logdir", None, "Where metrics.jsonl / TensorBoard go (default: the workdir when local).")
flags.DEFINE_bool("allow_config_change", False,
                  "Resume even though config keys that change data order / model / optimizer layout differ.")
flags.DEFINE_bool("allow_fresh_start", False, "When checkpoints exist but none restores, move them aside and start "
                  "at step 0 (without it the run refuses: exit 7).")
flags.mark_flags_as_required(["config", "workdir"])
flags.adopt_module_key_flags(multiprocess)  # --coordinator_address, --multihost, ...: listed by --helpshort

EXIT_CONFIG_ERROR = 2  # a config / resume problem, found before training (or on resume)
EXIT_NONFINITE = 3  # training stopped on a NaN/inf (config.on_nonfinite="stop")
EXIT_START_FAILED = multiprocess.EXIT_START_FAILED  # 4: the processes could not connect
EXIT_CHECKPOINT_UNAVAILABLE = 5  # a checkpoint read failed transiently after retries; nothing moved
EXIT_CHECKPOINT_ACCESS = 6  # the storage refused access to the checkpoints; nothing moved
EXIT_NO_RESTORABLE_CHECKPOINT = 7  # checkpoints exist, none restores; refused to start again at step 0
EXIT_PREEMPTED = 75  # preempted, checkpoint saved: run again to resume (sysexits.h EX_TEMPFAIL)


def _default_logdir(workdir: str) -> str:
  if "://" not in workdir:
    return workdir
  # Appending to files on object stores is not supported; write metrics locally (launch/tpu_vm.sh syncs them).
  local = os.path.join(os.path.expanduser("~/mmrs_logs"), workdir.rstrip("/").rsplit("/", 1)[-1])
  logging.warning("--workdir is remote: metrics.jsonl and TensorBoard events go to %s (set --logdir to change).",
                  local)
  return local


def main(argv, *, method=None, task_data=None):
  """absl main. `method` / `task_data` are for scripts that bring their own (tests/train_toy_method.py)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  multiprocess.initialize(fail=_fail)
  _log_cpu_setup()
  config = flags.FLAGS.config
  workdir = flags.FLAGS.workdir
  kwargs = dict(logdir=flags.FLAGS.logdir or _default_logdir(workdir),
                allow_config_change=flags.FLAGS.allow_config_change)
  if not config.get("finetune"):
    kwargs["allow_fresh_start"] = flags.FLAGS.allow_fresh_start
  from mmrs.train import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import config_check  # pylint: disable=g-import-not-at-top
  from mmrs.train import loop  # pylint: disable=g-import-not-at-top
  new_workdir = "://" not in workdir and not os.path.exists(workdir)
  try:
    if config.get("finetune"):
      from mmrs import finetune  # pylint: disable=g-import-not-at-top
      out = finetune.run(config, workdir, **kwargs)
      summary = out["train"]
    else:
      summary = loop.train(config, workdir, method=method, task_data=task_data, **kwargs)
  except loop.NonFiniteError as e:
    _fail(e, EXIT_NONFINITE)
  except ckpt_lib.CheckpointUnavailable as e:
    # The processes may have left Orbax's barriers out of step: JAX's shutdown barrier at exit would then abort
    # this process (SIGABRT) and hide the exit code, so leave without it.
    _fail(e, EXIT_CHECKPOINT_UNAVAILABLE, skip_shutdown=True)
  except ckpt_lib.CheckpointAccessDenied as e:
    _fail(e, EXIT_CHECKPOINT_ACCESS, skip_shutdown=True)  # the same: processes may be out of step
  except ckpt_lib.NoRestorableCheckpoint as e:
    _fail(e, EXIT_NO_RESTORABLE_CHECKPOINT, skip_shutdown=True)
  except Exception as e:  # pylint: disable=broad-except
    if not isinstance(e, (config_check.ConfigError, ckpt_lib.CheckpointMismatch)) and not cli.is_user_error(e):
      raise  # a bug: traceback, exit 1
    if new_workdir:
      _remove_empty_dirs(workdir)  # a missing or damaged input leaves no empty run directory behind
    _fail(e, EXIT_CONFIG_ERROR)
  logging.info("Done: %s", {k: v for k, v in summary.items() if k != "state"})
  print(f"done step={summary['step']} preempted={summary['preempted']}", flush=True)
  if summary["preempted"]:
    # Not 0: a wrapper must be able to tell "stopped early, resume me" from "finished".
    sys.exit(EXIT_PREEMPTED)


def _log_cpu_setup() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == "cpu":
    from launch import cpu_setup  # pylint: disable=g-import-not-at-top
    logging.info("CPU run: allocator %s; XLA_FLAGS=%s (launch/cpu_setup.py)", cpu_setup.allocator_in_use(),
                 os.environ.get("XLA_FLAGS", "") or "-")


def _remove_empty_dirs(path: str) -> None:
  """Removes `path` and its subdirectories if they hold no file (what a run that failed on its input created)."""
  for root, _, _ in sorted(os.walk(path), key=lambda w: -len(w[0])):
    try:
      os.rmdir(root)  # only succeeds on an empty directory
    except OSError:
      pass


def _fail(error: Exception, code: int, skip_shutdown: bool = False):
  logging.error("%s", error)
  print("\n" + cli.error_line(error), file=sys.stderr, flush=True)
  if skip_shutdown:
    sys.stdout.flush()
    os._exit(code)  # pylint: disable=protected-access
  sys.exit(code)


if __name__ == "__main__":
  cli.run(main)
