"""The downstream Method: frozen vs finetuned gradients, heads, the label-fraction subset, and one end-to-end run
(train with the pretraining loop, evaluate, results files) on the bundled BigEarthNet-MM sample."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.finetune import bigearthnet, dfc2020, eurosat
from mmrs import bands as B
from mmrs.data import pipeline
from mmrs.finetune import convert, method as method_lib, subsets
from mmrs.models import resnet

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "bigearthnet_mm")


@pytest.fixture(scope="module")
def sample_shards(tmp_path_factory):
  from data_prep import bigearthnet_mm
  out = str(tmp_path_factory.mktemp("data") / "ben")
  bigearthnet_mm.convert_dataset(SAMPLE, out, num_shards=1, workers=0)
  return out  # 17 records: 6 pairs, 8 S2-only, 3 S1-only; one split "train"


def _batch(method, config, b=2, size=32):
  ft = config.finetune
  rng = np.random.default_rng(0)
  batch = {m: jnp.asarray(rng.normal(size=(b, size, size, len(config.bands[m].split(","))))) for m in method.modalities}
  if ft.task == "multilabel":
    batch[method.label_key] = jnp.asarray(rng.random((b, ft.num_classes)) < 0.3, jnp.float32)
  elif ft.task == "class":
    batch[method.label_key] = jnp.asarray(rng.integers(0, ft.num_classes, b), jnp.int32)
  else:
    batch[method.label_key] = jnp.asarray(rng.integers(-1, ft.num_classes, (b, size, size)), jnp.int32)
  return batch


def _random_init(method, batch):
  """(params, state) with random values from the init's shapes (no init compile: slow on CPU)."""
  shapes = jax.eval_shape(method.init, jax.random.key(0), batch)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray((p[-1].key in ("scale", "var")) + 0.1 * rng.normal(size=x.shape), np.float32),
      nn.meta.unbox(shapes))


def _norm(tree):
  return float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(tree)))


def test_frozen_encoder_gets_no_gradient_and_only_the_head_trains():
  methods = {f: method_lib.build(eurosat.get_config(f"tiny,frozen={f}")) for f in (True, False)}  # ViT + MLP head
  config = eurosat.get_config("tiny")
  batch = _batch(methods[True], config)
  params, state = _random_init(methods[True], batch)
  for frozen, m in methods.items():
    assert m.tasks[0].param_prefixes == (("head",) if frozen else ("encoder", "head"))
    grads = jax.jit(jax.grad(lambda p: m.loss_fn(p, state, batch, jax.random.key(1), True)[0]))(params)
    assert _norm(grads["head"]) > 0
    assert (_norm(grads["encoder"]) == 0) == frozen


def test_segmentation_heads_give_per_pixel_logits():
  for head in ("vitlite", "linear"):
    config = dfc2020.get_config(f"tiny,head={head}")  # S1 + S2, 10 classes
    m = method_lib.build(config)
    batch = _batch(m, config)
    params, state = jax.eval_shape(m.init, jax.random.key(0), batch)
    out = jax.eval_shape(m.predict, nn.meta.unbox(params), state, batch)
    loss = jax.eval_shape(lambda p: m.loss_fn(p, state, batch, jax.random.key(1), True)[0], nn.meta.unbox(params))
    assert out.shape == (2, 32, 32, 10) and loss.shape == ()
    assert ("decoder" in params["head"]) == (head == "vitlite")


def test_label_fraction_subset_from_the_shards_is_deterministic_and_covers_classes(sample_shards):
  config = bigearthnet.get_config(f"tiny,shards={sample_shards},label_fraction=0.5")
  config.finetune.subset_mode = "balanced"
  rows = subsets.read_label_rows(config.data.train, ("s2",), "train", "ben19")
  assert rows.shape == (14, 19)  # pairs + S2-only records: the pipeline's index space for S2 input
  idx = subsets.training_indices(config, ("s2",))
  assert len(idx) == 7 and np.array_equal(idx, subsets.training_indices(config, ("s2",)))
  method_lib.prepare_config(config)
  assert np.array_equal(config.data.train.indices, idx)
  pipe = pipeline.make_pipeline(config.data.train, modalities=("s2",), global_batch_size=4, seed=0, shuffle=False,
                                repeat=False, drop_remainder=False)
  assert pipe.num_records == len(idx)
  assert sum(int(b["valid"].sum()) for b in pipe.iterator) == len(idx)  # one pass reads only the subset
  rare = np.argsort(rows.sum(0))
  present = [c for c in rare if rows[:, c].any()][:3]
  assert all(rows[idx, c].any() for c in present)  # the rarest classes are in the subset


def test_default_subset_is_random_by_record_id_so_s2_and_s1_s2_runs_share_places(sample_shards):
  config = bigearthnet.get_config(f"tiny,shards={sample_shards},label_fraction=0.5,subset_seed=3")
  assert config.finetune.subset_mode == "random"
  chosen = {}
  for mods in (("s2",), ("s1", "s2")):
    ids, _ = subsets.read_ids_and_label_rows(config.data.train, mods, "train", "ben19")
    idx = subsets.training_indices(config, mods)
    chosen[mods] = {ids[i] for i in idx}
    want = {i for i in ids if subsets.id_hash(i, 3) < 0.5}
    assert chosen[mods] == want
  assert chosen[("s1", "s2")] <= chosen[("s2",)]  # the S1+S2 index space is the paired part of the S2 one
  ids, _ = subsets.read_ids_and_label_rows(config.data.train, ("s1", "s2"), "train", "ben19")
  assert chosen[("s1", "s2")] == chosen[("s2",)] & set(ids)
  assert len(subsets.random_by_id([f"r{i}" for i in range(1000)], 0.1, 0)) == pytest.approx(100, abs=30)


def _resnet_encoder(tmp_path):
  """A converted RS-BYOL-style ResNet-18 encoder that takes one band (B04)."""
  module = resnet.ResNet("resnet18")
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)), train=False))
  rng = np.random.default_rng(0)
  v = jax.tree_util.tree_map_with_path(
      lambda p, x: np.asarray((p[-1].key in ("scale", "var")) + 0.05 * rng.normal(size=x.shape), np.float32),
      nn.meta.unbox(shapes))
  stats = {"s2": {"bands": list(B.S2_10_20M_BANDS), "mean": [900.0] * 10, "std": [600.0] * 10}}
  variables, meta = convert.convert({"online": {"backbone": v["params"]}}, {"batch_stats": {"backbone": v["batch_stats"]}},
                                    trained_bands={"s2": B.S2_10_20M_BANDS}, normalization=stats, modalities="s2",
                                    image_size=32, bands="B04")
  out = str(tmp_path / "encoder")
  convert.save(out, variables, meta)
  return out, variables


def test_frozen_finetune_run_end_to_end(sample_shards, tmp_path):
  """launch.main's path for a finetune config: train with the loop, then evaluate and write results."""
  from mmrs import finetune

  enc_dir, pretrained = _resnet_encoder(tmp_path)
  config = bigearthnet.get_config(f"tiny,shards={sample_shards},init_from={enc_dir},frozen=True,head=mlp")
  config.xla_compiler_options = {"xla_backend_optimization_level": 0}  # halves CPU compile time
  workdir = str(tmp_path / "run")
  out = finetune.run(config, workdir)
  assert config.bands.s2 == "B04" and config.data.train.s2_bands == "B04"  # the data follow the encoder's bands
  assert out["train"]["step"] == config.total_steps
  state = jax.device_get(finetune_state(workdir))
  for key, want in convert.flatten(pretrained["params"]).items():
    np.testing.assert_array_equal(convert.flatten(state[0]["encoder"])[key], want)  # frozen: not one bit moved
  for key, want in convert.flatten(pretrained["batch_stats"]).items():
    np.testing.assert_array_equal(convert.flatten(state[1]["batch_stats"]["encoder"])[key], want)
  result = json.loads(open(os.path.join(workdir, "results.json")).read())
  assert result["num_examples"] == 14  # every S2 record once: the padded last batch is masked out
  assert set(result["metrics"]) >= {"map_micro", "map_macro", "f1_micro", "f1_macro"}
  assert result["scenario"] == "frozen" and result["step"] == config.total_steps
  assert "| bigearthnet | s2 | mlp | frozen | 100% |" in open(os.path.join(workdir, "results.md")).read()


def finetune_state(workdir):
  params, state, _ = convert.read_checkpoint(workdir)
  return params, state


@pytest.mark.parametrize("fusion,tokens", [("concat", 2 * 16), ("sum", 16)])
def test_s1_s2_fusion_feeds_the_encoder_2l_tokens_or_l(fusion, tokens):
  """concat: one token per (position, modality), as JointMAE/MixMAE pretrained; sum: one per position."""
  from configs.finetune import sen12ms  # pylint: disable=g-import-not-at-top
  config = sen12ms.get_config(f"tiny,fusion={fusion}")  # S1 + S2, 32 px, patch 8: L = 16
  m = method_lib.build(config)
  batch = _batch(m, config)
  seen = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "encode":
      seen.append(args[0].shape)
    return next_fun(*args, **kwargs)

  params, state = jax.eval_shape(m.init, jax.random.key(0), batch)
  with nn.intercept_methods(record):
    out = jax.eval_shape(m.predict, nn.meta.unbox(params), state, batch)
  assert out.shape == (2, 10) and seen[-1][1] == tokens
  result = m.flops_per_sample("finetune")
  assert result > 0


def test_paper_variants_finetune_with_the_papers_optimizer():
  from configs.finetune import sen1floods11  # pylint: disable=g-import-not-at-top
  assert bigearthnet.get_config("paper").optimizer.name == "adafactor"  # MixMAE paper: AdaFactor for all training
  assert sen1floods11.get_config("paper").optimizer.name == "adafactor"
  assert eurosat.get_config("paper").optimizer.name == "adamw"  # RS-BYOL's probe names none
  assert bigearthnet.get_config("demo").optimizer.name == "adamw"
  assert dfc2020.get_config("paper").finetune.report_classes[0] == "Forest"


def test_segmentation_loss_is_the_mean_over_labelled_pixels_only():
  """Label -1 pixels add nothing to the loss or the pixel accuracy, and do not dilute the mean (a value test)."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
  labels = rng.integers(0, 3, (2, 4, 4))
  labels[0, :2] = -1  # 8 of 32 pixels unlabelled
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  keep = labels >= 0
  want = -np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0][keep].mean()
  loss, metrics = method_lib.task_loss("segmentation", jnp.asarray(logits), jnp.asarray(labels))
  assert float(loss) == pytest.approx(float(want), rel=1e-5)
  assert float(metrics["pixel_accuracy"]) == pytest.approx(float((logits.argmax(-1) == labels)[keep].mean()))
  # Whatever the logits at the unlabelled pixels, the loss is the same.
  other = logits.copy()
  other[0, :2] = 50.0 * rng.normal(size=other[0, :2].shape)
  assert float(method_lib.task_loss("segmentation", jnp.asarray(other), jnp.asarray(labels))[0]) == \
      pytest.approx(float(loss), rel=1e-6)
