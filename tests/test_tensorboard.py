"""TensorBoard gets pictures (reconstruction PNGs), the run's hparams and evaluation curves (mmrs/train/metrics.py)."""
import io
import json
import struct

import numpy as np
from PIL import Image

from mmrs.train import metrics


def events(logdir):
  """Every summary value in the run's TensorBoard event files: [(step, tag, value proto)]."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  out = []
  for path in sorted((logdir / "tensorboard").glob("events.out.tfevents.*")):
    data = path.read_bytes()
    i = 0
    while i < len(data):  # TFRecord: length (8), crc (4), payload, crc (4)
      (n,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
      i += 12 + n + 4
      out += [(event.step, v.tag, v) for v in event.summary.value]
  return out


def test_images_hparams_and_evaluations_reach_tensorboard(tmp_path):
  picture = np.zeros((20, 30, 3), np.uint8)
  picture[:, :10, 0] = 255
  png = tmp_path / "p.png"
  Image.fromarray(picture).save(png)
  writer = metrics.MetricsWriter(tmp_path)
  writer.write_hparams({"method": "mixmae", "optimizer": {"learning_rate": 1e-3}, "mesh": ["data", -1]},
                       ["mixmae/loss"])
  writer.write({"step": 1, "task": "mixmae", "loss": 0.5})
  writer.write_image("reconstructions/mixmae", str(png), 1)
  writer.write_image("array", picture, 2)
  writer.close()
  metrics.log_evaluation(tmp_path, 3, "val", {"map_micro": 61.5, "num_examples": 14, "per_class": [1, 2]})
  got = events(tmp_path)
  tags = {tag for _, tag, _ in got}
  assert {"mixmae/loss", "reconstructions/mixmae", "array", "val/map_micro", "val/num_examples"} <= tags
  image = next(v for _, tag, v in got if tag == "reconstructions/mixmae").image
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string))), picture)
  hp = [v for _, tag, v in got if tag == "_hparams_/session_start_info"]
  assert hp, "no hparams session in the run's own event file"
  from tensorboardX.proto import plugin_hparams_pb2  # pylint: disable=import-outside-toplevel
  info = plugin_hparams_pb2.HParamsPluginData.FromString(hp[0].metadata.plugin_data.content).session_start_info
  assert info.hparams["method"].string_value == "mixmae"
  assert info.hparams["optimizer.learning_rate"].number_value == 1e-3
  assert info.hparams["mesh"].string_value == json.dumps(["data", -1])
  # metrics.jsonl keeps the run's lines and gains the evaluation
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(l["step"], l["task"]) for l in lines] == [(1, "mixmae"), (3, "val")]
  assert lines[1]["map_micro"] == 61.5 and "per_class" not in lines[1]


def test_a_cpu_run_n_a_mfu_stays_out_of_tensorboard(tmp_path, caplog):
  # On a CPU the progress line's MFU is n/a (NaN): metrics.jsonl keeps it, TensorBoard gets no NaN point (and
  # tensorboardX no "NaN or Inf found in input tensor" warning on every log step).
  writer = metrics.MetricsWriter(tmp_path)
  with caplog.at_level("WARNING"):
    writer.write({"step": 1, "task": "mixmae", "loss": 0.5, "mfu": float("nan"), "images_per_s": 30.0})
  writer.close()
  assert "NaN or Inf" not in caplog.text
  assert {tag for _, tag, _ in events(tmp_path)} == {"mixmae/loss", "mixmae/images_per_s"}
  assert np.isnan(json.loads((tmp_path / "metrics.jsonl").read_text())["mfu"])
