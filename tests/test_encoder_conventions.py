"""One normalization and one pooling convention for an encoder (mmrs/finetune/encoder_api.py): load_encoder,
finetuning and the exports use encoder.json's statistics and pooling."""
import json

import numpy as np
import pytest

import mmrs
from mmrs import bands as B
from mmrs.finetune import encoder_api, heads
from mmrs.finetune import method as method_lib
from mmrs.train import data as data_lib
from sample_data import shards  # pylint: disable=unused-import  (a fixture)
import tiny_encoder


@pytest.fixture(scope="module")
def l2a_encoder(tmp_path_factory):
  """An encoder converted for the sample's 12 L2A bands, with statistics unlike the sample's stats.json."""
  out = tmp_path_factory.mktemp("enc") / "enc"
  return tiny_encoder.write_encoder(out, tiny_encoder.vit_params(), image_size=32, bands=B.S2_L2A_BANDS)


def _finetune_config(shards, encoder, normalization):
  from configs.finetune import bigearthnet
  config = bigearthnet.get_config(f"tiny,shards={shards},init_from={encoder},frozen=True")
  config.finetune.normalization = normalization
  return config


@pytest.mark.parametrize("normalization", ["encoder", "dataset"])
def test_finetuning_standardizes_with_the_encoder_statistics(shards, l2a_encoder, normalization):
  config = _finetune_config(shards, l2a_encoder, normalization)
  method = method_lib.build(config)
  task_data = data_lib.build_task_data(config, method, 0, 1)["finetune"]
  try:
    batch = {k: np.asarray(v) for k, v in next(task_data.iterator).items()}
  finally:
    if task_data.close:
      task_data.close()
  raw = batch["s2"].astype(np.float32)
  got = np.asarray(task_data.normalize(dict(batch))["s2"])
  if normalization == "encoder":
    norm = tiny_encoder.NORM["s2"]
    idx = B.band_indices(norm["bands"], B.S2_L2A_BANDS)
    mean, std = np.asarray(norm["mean"])[idx], np.asarray(norm["std"])[idx]
    # what load_encoder's normalize gives for the same raw pixels
    np.testing.assert_allclose(got, mmrs.load_encoder(l2a_encoder).normalize(s2=raw)["s2"], rtol=1e-6, atol=1e-6)
    assert task_data.stats["s2"]["mean"] == pytest.approx(list(mean))  # what a checkpoint of this run records
  else:
    stats = json.load(open(f"{shards}/stats.json"))["s2"]
    idx = B.band_indices(stats["bands"], B.S2_L2A_BANDS)
    mean, std = np.asarray(stats["mean"])[idx], np.asarray(stats["std"])[idx]
  np.testing.assert_allclose(got, (raw - mean) / std, rtol=1e-5, atol=1e-4)


def test_unknown_normalization_is_a_clear_error(shards, l2a_encoder):
  method = method_lib.build(_finetune_config(shards, l2a_encoder, "stats"))
  with pytest.raises(ValueError, match="finetune.normalization='stats'"):
    method.input_normalizer(encoder_api.encoder_normalizer(method.meta))


def test_encoder_pools_like_the_heads(tmp_path):
  enc_dir = tiny_encoder.write_encoder(tmp_path / "enc", tiny_encoder.vit_params())
  enc = mmrs.load_encoder(enc_dir)
  assert enc.pooling == "mean"
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 13)).astype(np.float32)
  tokens = enc.embed(s2=x)
  np.testing.assert_allclose(enc.pool(tokens), np.asarray(tokens)[:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_allclose(enc.pool(tokens), heads.pool_tokens(tokens, "mean", True), rtol=1e-6)
  meta = json.load(open(tmp_path / "enc" / "encoder.json"))
  meta["pooling"] = "cls"
  assert encoder_api.pooling(meta) == "cls"
  meta["pooling"] = "max"
  with pytest.raises(ValueError, match="pooling='max'"):
    encoder_api.pooling(meta)
