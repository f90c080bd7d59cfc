"""Prepare one of the mmrs TFDS datasets (array_record) from its manual_dir.

    python -m data_prep.tfds.prepare --dataset=mmrs_sen12ms --config=dfc2020 --manual_dir=DIR --data_dir=DIR \
        [--on_bad=fail|skip] [--workers=N]
    python -m data_prep.tfds.prepare --dataset=mmrs_bigearthnet_mm --manual_dir=DIR --data_dir=DIR [--keep_cloudy]
        (config v1 or v2 detected from manual_dir; read it back as tfds:mmrs_bigearthnet_mm/v2:train@DIR)
"""
from absl import app, flags

from launch import cli

flags.DEFINE_string("dataset", None, "Builder name (see data_prep/tfds/__init__.py).")
flags.DEFINE_string("config", None, "Builder config (sen12ms | dfc2020; s1s2 | s2; v1 | v2, detected from "
                    "manual_dir when not given).")
flags.DEFINE_string("manual_dir", None, "Folder with the downloaded, extracted archives.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir to write into.")
flags.DEFINE_enum("on_bad", "fail", ["fail", "skip"], "Bad input: stop with an error, or skip and count it.")
flags.DEFINE_integer("workers", 0, "Parallel reader processes (0 = in-process).")
flags.DEFINE_bool("keep_cloudy", False, "mmrs_bigearthnet_mm: keep the patches with cloud, shadow or seasonal snow "
                  "(left out by default, as the dataset's authors do), e.g. for pretraining.")
flags.mark_flags_as_required(["dataset", "manual_dir", "data_dir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from data_prep import tfds as tfds_builders  # pylint: disable=g-import-not-at-top
  from data_prep.tfds import common  # pylint: disable=g-import-not-at-top

  extra = {}
  if FLAGS.keep_cloudy:
    if FLAGS.dataset != "mmrs_bigearthnet_mm":
      raise app.UsageError(f"--keep_cloudy applies to mmrs_bigearthnet_mm only, not {FLAGS.dataset}.")
    extra["keep_cloudy"] = True
  b = common.prepare(tfds_builders.builder_class(FLAGS.dataset), FLAGS.manual_dir, FLAGS.data_dir, FLAGS.config,
                     on_bad=FLAGS.on_bad, workers=FLAGS.workers, **extra)
  splits = {k: v.num_examples for k, v in b.info.splits.items()}
  name = f"{FLAGS.dataset}/{b.builder_config.name}" if b.builder_config else FLAGS.dataset  # also when detected
  print(f"Prepared {name} in {FLAGS.data_dir}: {splits}; use data.shards=tfds:{name}:SPLIT@{FLAGS.data_dir}")


if __name__ == "__main__":
  cli.run(main, user_errors=(ValueError, FileNotFoundError))  # an unknown builder, a missing manual_dir
