"""Export a converted encoder to Hugging Face transformers (ViTModel) or timm naming (safetensors).

    python -m launch.export --checkpoint=ENCODER_DIR --format=hf|timm --out=PATH [--modalities=s2]

ENCODER_DIR is the output of `launch.convert_checkpoint`. `hf` writes a directory that
`transformers.ViTModel.from_pretrained(PATH)` loads (with preprocessor_config.json and a model card README.md);
`timm` writes PATH (a .safetensors file + sidecar JSON, or a directory with model.safetensors, a timm config.json
with pretrained_cfg / model_args, and a model card) in timm's VisionTransformer naming (ResNet: torchvision/timm
names). All carry the bands, channel order, normalization, pooling and fusion as JSON. See mmrs/finetune/export.py.
"""
from absl import flags

from launch import cli

flags.DEFINE_string("checkpoint", None, "A converted encoder directory (encoder.safetensors + encoder.json).")
flags.DEFINE_enum("format", "hf", ["hf", "timm"], "Export format.")
flags.DEFINE_string("out", None, "Output directory (hf) or .safetensors file / directory (timm).")
flags.DEFINE_string("modalities", "", "Modalities to fold into the patch embedding (empty = all the encoder has).")
flags.DEFINE_string("license", "apache-2.0", "Licence in the model card's front matter (mind the terms of the "
                    "pretraining data, e.g. cdla-permissive-1.0 for BigEarthNet).")
flags.mark_flags_as_required(["checkpoint", "out"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from mmrs.finetune import export  # pylint: disable=g-import-not-at-top

  mods = [m.strip() for m in FLAGS.modalities.split(",") if m.strip()] or None
  try:
    files = export.export(FLAGS.checkpoint, FLAGS.format, FLAGS.out, mods, license=FLAGS.license)
  except (FileNotFoundError, ValueError) as e:
    cli.fail(f"export: {e}")
  print("Wrote " + ", ".join(files))


if __name__ == "__main__":
  cli.run(main)
