"""Pretraining checkpoint -> encoder-only checkpoint (encoder.safetensors + encoder.json) for finetuning/export.

    python -m launch.convert_checkpoint --checkpoint=WORKDIR_OR_STEP --out=DIR --modalities=s2|s1|s1,s2 \
        --image_size=N [--patch_size=P] [--bands=B02,B03,...]

Keeps the encoder only, the requested modalities' entry layers, the requested bands (by name, any order; e.g. the
12 L2A bands of an L1C-pretrained model drop B10), and records bands, normalization, image size and the source run.
See mmrs/finetune/convert.py for what each step does.
"""
from absl import flags

from launch import cli

flags.DEFINE_string("checkpoint", None, "Pretraining workdir, its checkpoints/ folder, or one step folder.")
flags.DEFINE_string("out", None, "Output directory (encoder.safetensors + encoder.json).")
flags.DEFINE_string("modalities", "s2", "Entry layers to keep: s2, s1 or s1,s2.")
flags.DEFINE_integer("image_size", None, "Input image size (pixels) the encoder will be used at.")
flags.DEFINE_integer("patch_size", 0, "New patch size (0 = keep); the entry kernel is resampled (FlexiViT PI-resize).")
flags.DEFINE_string("bands", "", "Comma-separated S2 and/or S1 band names, in input order (empty = as pretrained).")
flags.mark_flags_as_required(["checkpoint", "out", "image_size"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mmrs.finetune import convert  # pylint: disable=g-import-not-at-top

  try:
    meta = convert.convert_checkpoint(FLAGS.checkpoint, FLAGS.out, modalities=FLAGS.modalities,
                                      image_size=FLAGS.image_size, bands=FLAGS.bands or None,
                                      patch_size=FLAGS.patch_size or None)
  except (convert.ConversionError, FileNotFoundError, ValueError) as e:
    cli.fail(f"convert_checkpoint: {e}")
  print(f"Wrote {FLAGS.out}: {meta['architecture']['kind']} encoder, modalities {meta['modalities']}, "
        f"bands {meta['bands']}, image size {meta['image_size']}, patch size {meta['patch_size']}, "
        f"from step {meta['source'].get('step')} of {meta['source'].get('checkpoint')}.")


if __name__ == "__main__":
  cli.run(main)
