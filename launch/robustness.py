"""How finetuned models hold up under clouds, a missing modality, S1/S2 misregistration, time gaps and speckle.

    python -m launch.robustness --runs=RUN_DIR[,RUN_DIR...] [--stress=clouds,missing_s2,missing_s1,shift,time_gap,speckle]
        [--severities=clouds=0,20,50,100 --severities=shift=0,4] [--out=DIR] [--seed=0] [--metric=map_micro]

Several processes (the tasks of a SLURM job, or --coordinator_address / --num_processes / --process_id on each, as
launch.main) evaluate together: each reads the rows of each batch its devices hold, the numbers are those of one
process, and process 0 writes the outputs.

Each RUN_DIR is a finetune workdir (`python -m launch.main --config=configs/finetune/...`). Writes robustness.json,
robustness.md, robustness.png and examples_<stress>.png into --out. Severity units: clouds and missing_* in % of
the image / of the samples, shift in pixels, time_gap in days, speckle in looks (0 = none). See
mmrs/finetune/robustness.py and mmrs/finetune/stresses.py.
"""
import sys

from absl import flags

from launch import cli
from launch import multiprocess

flags.DEFINE_list("runs", None, "Finetune workdirs, comma-separated.")
flags.DEFINE_list("stress", ["clouds", "missing_s2", "missing_s1", "shift", "time_gap", "speckle"],
                  "Stresses to apply (a stress a run cannot take is skipped with a message).")
flags.DEFINE_multi_string("severities", [], "STRESS=v1,v2,... (repeatable); default: each stress's own list. "
                          "Severity 0 (clean) is always included.")
flags.DEFINE_string("out", "runs/robustness", "Output directory.")
flags.DEFINE_integer("seed", 0, "Seed of every random stress (clouds, speckle, shift directions, missing samples).")
flags.DEFINE_string("metric", "", "Metric to report (default: the runs' leading results metric, e.g. map_micro).")
flags.DEFINE_integer("batch_size", 0, "Evaluation batch size (default: the run's; keep it for exact clean values).")
flags.DEFINE_integer("examples", 3, "Samples per run in the example grids (0 = no grids).")
flags.mark_flags_as_required(["runs"])
flags.adopt_module_key_flags(multiprocess)  # --coordinator_address, ...: listed by --helpshort
FLAGS = flags.FLAGS


def parse_severities(specs) -> dict:
  out = {}
  for spec in specs:
    name, sep, values = spec.partition("=")
    try:
      if not sep:
        raise ValueError
      out[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
      raise ValueError(f"--severities={spec!r}: write STRESS=v1,v2,... e.g. clouds=0,50,100.") from None
  return out


def main(argv):
  del argv
  multiprocess.initialize()  # several processes (a SLURM job's tasks, --coordinator_address ...): one evaluation
  import jax  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import robustness  # pylint: disable=g-import-not-at-top

  try:
    result, shots = robustness.evaluate_runs(
        FLAGS.runs, [s.strip() for s in FLAGS.stress if s.strip()], parse_severities(FLAGS.severities),
        seed=FLAGS.seed, metric=FLAGS.metric, batch_size=FLAGS.batch_size, examples=FLAGS.examples)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(f"robustness: {e}")
  if jax.process_index() != 0:  # every process holds the same result; process 0 writes it
    return
  paths = robustness.write_outputs(FLAGS.out, result, shots)
  sys.stdout.write(robustness.markdown(result))
  print("Wrote " + ", ".join(paths))


def run():
  """`main` under launch/cli.py, for callers that import this module (the mmrs-robustness script instead runs it as
  `__main__` through launch/console.py, so that --helpshort lists the flags above)."""
  cli.run(main)


if __name__ == "__main__":
  cli.run(main)
