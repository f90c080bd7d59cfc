"""Compile time of the MixMAE train step: encoder depth 12 vs 24 (ViT-B width), blocks unrolled vs `nn.scan`
(config.model.scan_layers), optionally with remat. The step is lowered and compiled through the train loop's own
path (mmrs/train/step.py plan_state + compile_tasks) on one CPU device, batch 8 of 32 px images (compile time
depends on the program, not on the batch). Prints one JSON line per case.

  python -m benchmarks.compile_time --depths=12,24 --remat=none
"""
import json
import time

from absl import app
from absl import flags
import jax

flags.DEFINE_list("depths", ["12", "24"], "Encoder depths.")
flags.DEFINE_list("remat", ["none"], "config.model.remat_policy values.")
flags.DEFINE_list("scan", ["false", "true"], "config.model.scan_layers values.")


def measure(depth: int, scan: bool, remat: str) -> dict:
  from configs import mixmae  # pylint: disable=g-import-not-at-top
  from mmrs import methods  # pylint: disable=g-import-not-at-top
  from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import step as step_lib  # pylint: disable=g-import-not-at-top
  config = mixmae.get_config("tiny")
  config.model.update(encoder="B", decoder="lite", decoder_depth=8, patch_size=16, scan_layers=scan,
                      remat_policy=remat)
  for d in config.data.values():
    d.image_size = 32
  config.xla_compiler_options = {}
  method = methods.build(config)
  method.encoder = method.encoder.clone(depth=depth)
  batch = {"s2": jax.ShapeDtypeStruct((8, 32, 32, 12), "float32"),
           "s1": jax.ShapeDtypeStruct((8, 32, 32, 2), "float32")}
  mesh = mesh_lib.make_mesh("data=1,fsdp=1", jax.devices()[:1])
  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    optimizer, layout = step_lib.plan_state(config, method, state_lib.example_batch({"mixmae": batch}), mesh, 10)
    steps = step_lib.compile_tasks(config, method, optimizer, layout, mesh, {"mixmae": batch}, {})
    total = time.perf_counter() - t0
  return {"encoder_depth": depth, "decoder_depth": 8, "scan_layers": scan, "remat_policy": remat,
          "compile_s": round(steps["mixmae"].seconds, 1), "plan_plus_compile_s": round(total, 1)}


def main(argv):
  del argv
  for depth in flags.FLAGS.depths:
    for remat in flags.FLAGS.remat:
      for scan in flags.FLAGS.scan:
        print(json.dumps(measure(int(depth), scan.lower() == "true", remat)), flush=True)


if __name__ == "__main__":
  app.run(main)
