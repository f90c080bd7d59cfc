"""Robustness evaluation (mmrs/finetune/stresses.py, robustness.py, launch/robustness.py): the stresses on raw
batches, and two tiny finetune runs of the bundled sample (S1+S2 and S2) evaluated under clouds / missing S1 or S2."""
import datetime as dt
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmrs import bands as bands_lib
from mmrs.finetune import robustness
from mmrs.finetune import stresses
from sample_data import shards  # pylint: disable=unused-import  (a fixture)

B, H, W = 3, 16, 16


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"s2": rng.integers(200, 3000, (B, H, W, 12)).astype(np.uint16),
          "s1": rng.normal(-15.0, 4.0, (B, H, W, 2)).astype(np.float32),
          "_id": np.arange(B, dtype=np.int32), "_rank": np.asarray([2, 0, 1], np.int32)}


CTX = stresses.Context(s2_bands=bands_lib.S2_L2A_BANDS, num_samples=B)


@pytest.mark.parametrize("name", ["clouds", "missing_s2", "missing_s1", "shift", "speckle"])
def test_every_stress_is_the_identity_at_severity_0(name):
  batch = _batch()
  fn = jax.jit(lambda b, v: stresses.apply(name, b, v, 0, CTX))
  out, present = fn(batch, np.float32(0.0))
  for m in ("s1", "s2"):
    np.testing.assert_array_equal(np.asarray(out[m]), batch[m].astype(np.float32))
  for keep in present.values():
    assert np.asarray(keep).all()
  # ... and each does something at its strongest severity.
  strongest = max(stresses.STRESSES[name].severities, key=lambda v: (v > 0, -v if name == "speckle" else v))
  out, present = fn(batch, np.float32(strongest))
  changed = any(not np.array_equal(np.asarray(out[m]), batch[m].astype(np.float32)) for m in ("s1", "s2"))
  assert changed or not all(np.asarray(k).all() for k in present.values())


def test_clouds_cover_exactly_and_leave_no_clear_pixel_at_100():
  key = jax.random.key(3)
  masks = jax.jit(lambda k, c: stresses.cloud_masks(k, 32, 32, c, CTX))
  cloud, shadow = masks(key, 30.0)
  assert int((np.asarray(cloud) > 0).sum()) == round(0.3 * 32 * 32)
  assert np.asarray(shadow).any() and not (np.asarray(shadow)[np.asarray(cloud) > 0] > 0).any()
  bigger, _ = masks(key, 60.0)
  assert ((np.asarray(bigger) > 0) >= (np.asarray(cloud) > 0)).all()  # coverage grows inside one field
  full, _ = masks(key, 100.0)
  assert (np.asarray(full) == 1.0).all()
  batch = _batch()
  out, _ = jax.jit(lambda b: stresses.apply("clouds", b, 100.0, 0, CTX))(batch)
  s2 = np.asarray(out["s2"])
  assert (s2 != batch["s2"]).all(axis=-1).all()  # no clear S2 pixel left
  spectrum = stresses.cloud_spectrum(bands_lib.S2_L2A_BANDS)
  ratio = s2 / spectrum  # every pixel is the flat cloud spectrum times one brightness per sample
  np.testing.assert_allclose(ratio, ratio[:, :1, :1, :1] * np.ones_like(ratio), rtol=1e-5)
  assert ((ratio[:, 0, 0, 0] >= 0.9) & (ratio[:, 0, 0, 0] <= 1.3)).all()
  np.testing.assert_array_equal(np.asarray(out["s1"]), batch["s1"])  # S1 untouched


def _hollstein(r):
  """Hollstein et al. 2016 (doi:10.3390/rs8080666) Fig. 8 decision tree on TOA reflectance."""
  if r["B03"] < 0.319:
    return "not cloud"
  if r["B05"] / r["B11"] < 4.33:
    if r["B11"] - r["B10"] < 0.255:
      return "cloud" if r["B06"] - r["B07"] < -0.016 else "cirrus"
    return "clear" if r["B01"] < 0.3 else "cloud"
  return "shadow/snow"


@pytest.mark.parametrize("brightness", [0.9, 1.1, 1.3])
def test_the_cloud_spectrum_is_a_cloud_for_hollsteins_classifier(brightness):
  assert _hollstein({b: v * brightness for b, v in stresses.CLOUD_REFLECTANCE.items()}) == "cloud"


@pytest.mark.parametrize("k", [1, 3])
def test_shift_moves_s1_by_exactly_k_pixels_and_keeps_s2(k):
  batch = _batch(1)
  out, _ = jax.jit(lambda b: stresses.apply("shift", b, float(k), 0, CTX))(batch)
  np.testing.assert_array_equal(np.asarray(out["s2"]), batch["s2"].astype(np.float32))
  keys = stresses.sample_keys(0, "shift", batch["_id"])
  for i in range(B):
    dr, dc = stresses.shift_direction(keys[i]) * k
    src, moved = batch["s1"][i], np.asarray(out["s1"][i])
    rows, cols = slice(max(dr, 0), H + min(dr, 0)), slice(max(dc, 0), W + min(dc, 0))
    src_rows, src_cols = slice(max(-dr, 0), H + min(-dr, 0)), slice(max(-dc, 0), W + min(-dc, 0))
    np.testing.assert_array_equal(moved[rows, cols], src[src_rows, src_cols])
    # Border: the pixels entering the frame repeat the input's nearest edge row/column.
    r_idx, c_idx = np.clip(np.arange(H) - dr, 0, H - 1), np.clip(np.arange(W) - dc, 0, W - 1)
    np.testing.assert_array_equal(moved, src[r_idx][:, c_idx])


def test_speckle_is_multiplicative_gamma_noise_in_linear_power():
  batch = {"s1": np.full((1, 64, 64, 2), -12.0, np.float32), "_id": np.zeros(1, np.int32)}
  fn = jax.jit(lambda b, v: stresses.apply("speckle", b, v, 0, CTX))
  for looks, want_var in ((1.0, 1.0), (16.0, 1 / 16)):
    out, _ = fn(batch, np.float32(looks))
    ratio = np.power(10.0, (np.asarray(out["s1"]) + 12.0) / 10.0)  # back to linear, relative to the clean power
    assert abs(ratio.mean() - 1.0) < 0.05 and abs(ratio.var() / want_var - 1.0) < 0.15


def test_missing_modality_fraction_is_exact():
  batch = dict(_batch(), _rank=np.arange(B, dtype=np.int32))
  fn = jax.jit(lambda b, v: stresses.apply("missing_s2", b, v, 0, CTX))
  for pct, n_off in ((0.0, 0), (34.0, 1), (67.0, 2), (100.0, 3)):
    _, present = fn(batch, np.float32(pct))
    assert int((~np.asarray(present["s2"])).sum()) == n_off


def test_time_gap_takes_the_nearest_other_date_at_least_the_gap_away():
  t = lambda d: dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=d)  # noqa: E731
  plan = robustness.TimeGapPlan(s2_time=[t(0), t(95), t(180), t(3)], s1_time=[t(1), t(96), t(182), t(2)],
                                place=["a", "a", "a", "b"], by_place={"a": [0, 1, 2], "b": [3]}, source=None,
                                decode=None)
  assert plan.replacement(0, 0) == 0 and plan.replacement(0, 30) == 1 and plan.replacement(0, 100) == 2
  assert plan.replacement(2, 80) == 1 and plan.replacement(2, 90) == 0 and plan.replacement(3, 30) is None


# --- end to end on two tiny finetune runs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory):
  import mmrs.finetune  # pylint: disable=g-import-not-at-top
  from configs.finetune import bigearthnet  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("runs")
  out = []
  for mods in ("s1+s2", "s2"):
    config = bigearthnet.get_config(f"tiny,shards={shards},modalities={mods},steps=2")
    config.checkpoint_every_steps = 2
    config.xla_compiler_options = {"xla_backend_optimization_level": 0}
    path = str(root / f"ft_{mods.replace('+', '')}")
    mmrs.finetune.run(config, path)
    out.append(path)
  return out


def _independent_single_modality_metric(path, modality):
  """The run evaluated with only `modality` given to its encoder, computed here without mmrs.finetune.robustness."""
  from mmrs.data import normalize, pipeline  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import convert, evaluate, method as method_lib, metrics  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(json.load(open(os.path.join(path, "config.json"))))
  method = method_lib.build(config)
  params, _, _ = convert.read_checkpoint(path)
  params = evaluate._unbox(params)  # pylint: disable=protected-access
  norm = pipeline.describe(config.data.train, method.modalities).normalizer
  pipe = pipeline.make_pipeline(config.data.eval, modalities=method.modalities, global_batch_size=8, seed=0,
                                normalize="none", split="train", shuffle=False, repeat=False, drop_remainder=False)
  acc = metrics.make_metrics("multilabel", 19)

  @jax.jit
  def predict(images):
    x = normalize.normalize_batch(images, norm)
    feats = method.encoder.apply({"params": params["encoder"]}, **x)  # the encoder sees one modality only
    return method.head.apply({"params": params["head"]}, feats)

  for b in pipe.iterator:
    acc.update(np.asarray(predict({modality: b[modality]})), b["label_ben19"], b["valid"])
  return acc.result()["map_micro"]


def test_robustness_end_to_end(runs, tmp_path):
  sev = {"clouds": [100], "missing_s2": [0, 100], "time_gap": [30]}
  result, shots = robustness.evaluate_runs(runs, ["clouds", "missing_s2", "time_gap"], sev,
                                           examples=1)
  paths = robustness.write_outputs(str(tmp_path / "out"), result, shots)
  saved = json.load(open(tmp_path / "out" / "robustness.json"))
  # The schema of the issue.
  assert saved["metric"] == "map_micro" and set(saved["runs"]) == {"ft_s1s2", "ft_s2"}
  for name, path in zip(("ft_s1s2", "ft_s2"), runs):
    r = saved["runs"][name]
    own = json.load(open(os.path.join(path, "results.json")))["metrics"]["map_micro"]
    assert r["clean"] == own  # severity 0 reproduces the run's own clean test metric exactly
    for rows in r["stresses"].values():
      assert [set(row) for row in rows] == [{"severity", "value", "n"}] * len(rows)
      assert rows[0] == {"severity": 0.0, "value": own, "n": r["n"]}
  assert saved["runs"]["ft_s1s2"]["n"] == 6 and saved["runs"]["ft_s2"]["n"] == 14
  assert set(saved["runs"]["ft_s1s2"]["stresses"]) == {"clouds", "missing_s2"}
  assert "one S1 acquisition per place" in saved["runs"]["ft_s1s2"]["skipped"]["time_gap"]
  assert set(saved["runs"]["ft_s2"]["stresses"]) == {"clouds"}  # the S2 run cannot lose S1 or S2
  # missing_s2 at 100 %: every sample goes through the encoder without S2 (missing_s1 is the same code path).
  s1s2 = saved["runs"]["ft_s1s2"]["stresses"]
  assert s1s2["missing_s2"][-1]["value"] == pytest.approx(_independent_single_modality_metric(runs[0], "s1"))
  assert s1s2["missing_s2"][-1]["value"] != s1s2["missing_s2"][0]["value"]
  # Pictures: one line per run that the stress applies to, labelled, and the example grids.
  assert {os.path.basename(p) for p in paths} >= {"robustness.json", "robustness.md", "robustness.png",
                                                  "examples_clouds.png", "examples_missing_s2.png"}
  assert all(os.path.getsize(p) > 0 for p in paths)
  fig = robustness.plot_curves(saved)
  panels = {ax.get_title(): ax for ax in fig.axes}
  assert len(panels["clouds"].get_lines()) == 2
  assert [t.get_text() for t in panels["clouds"].get_legend().get_texts()] == ["ft_s1s2 (s2+s1)", "ft_s2 (s2)"]
  assert len(panels["missing_s2"].get_lines()) == 1
  assert panels["clouds"].get_xlabel() == "cloud cover (%)" and panels["clouds"].get_ylabel() == "map_micro"
  assert "| ft_s2 | skipped:" in open(tmp_path / "out" / "robustness.md").read()


def test_time_gap_swaps_in_the_s1_of_another_date_of_the_same_place(tmp_path):
  """SSL4EO-like records (two places, seasons): S1 comes from the record at least `days` away; a place with one
  date drops out of that severity."""
  import types  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mmrs.data import writer  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  plan_in = [("A", "2021-01-05", "2021-01-06"), ("A", "2021-04-05", "2021-04-03"), ("A", "2021-07-05", "2021-07-05"),
             ("B", "2021-03-01", "2021-03-02")]
  out = str(tmp_path / "ssl")
  with writer.DatasetWriter(out) as w:
    for i, (loc, t2, t1) in enumerate(plan_in):
      w.add({"id": f"{loc}_{i}", "s2": rng.integers(1, 3000, (20, 20, 12)).astype(np.uint16),
             "s2_bands": bands_lib.S2_L2A_BANDS, "s1": np.full((20, 20, 2), -float(i), np.float32),
             "s1_bands": bands_lib.S1_BANDS,
             "meta": {"location": loc, "season": i, "s2_time": t2 + "T10:00:00", "s1_time": t1 + "T06:00:00"}})
    w.close()
  config = ml_collections.ConfigDict({"data": {"eval": common.dataset_config(out, image_size=16, split="train")}})
  run = types.SimpleNamespace(config=config, method=types.SimpleNamespace(modalities=("s2", "s1")))
  plan, why = robustness.time_gap_plan(run)
  assert plan is not None and not why
  images = {"s1": np.stack([np.full((16, 16, 2), -float(i), np.float32) for i in range(4)]),
            "s2": np.zeros((4, 16, 16, 12), np.uint16)}
  ids, valid = np.arange(4), np.ones(4, bool)
  same, keep = robustness._swap_s1(plan, images, ids, valid, 0.0, 4)  # pylint: disable=protected-access
  np.testing.assert_array_equal(same["s1"], images["s1"])
  assert keep.all()
  swapped, keep = robustness._swap_s1(plan, images, ids, valid, 60.0, 4)  # pylint: disable=protected-access
  # Record 0 (S2 on Jan 5): the nearest S1 >= 60 days away is record 1's (Apr 3); record 1 -> record 0's (Jan 6,
  # 89 days) beats record 2's (Jul 5, 91 days); record 2 -> record 1's (Apr 3); B has one date: left out.
  assert [float(swapped["s1"][i, 0, 0, 0]) for i in range(3)] == [-1.0, -0.0, -1.0]
  assert keep.tolist() == [True, True, True, False]
  np.testing.assert_array_equal(swapped["s2"], images["s2"])


def test_command_line_options_and_bad_runs(tmp_path):
  # In a child process: launch.robustness defines absl flags (e.g. --out) that another launch module imported by
  # another test file in this worker (launch.embed) defines too.
  code = ("import json\nfrom launch import robustness as cli\n"
          "print(json.dumps(cli.parse_severities(['clouds=50,0,100', 'shift=2'])))\n"
          "assert callable(cli.run)\n"  # the mmrs-robustness console entry point
          "try:\n  cli.parse_severities(['clouds'])\nexcept ValueError as e:\n  print('ERR', e)\n")
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert res.returncode == 0, res.stderr[-3000:]
  lines = res.stdout.strip().splitlines()
  assert json.loads(lines[0]) == {"clouds": [50.0, 0.0, 100.0], "shift": [2.0]}
  assert lines[1].startswith("ERR") and "STRESS=v1,v2" in lines[1]
  with pytest.raises(robustness.RobustnessError, match="has no config.json"):
    robustness.evaluate_runs([str(tmp_path)], ["clouds"])
  with pytest.raises(robustness.RobustnessError, match="unknown"):
    robustness.evaluate_runs([str(tmp_path)], ["fog"])
  with pytest.raises(robustness.RobustnessError, match="not among the stresses"):
    robustness.evaluate_runs([str(tmp_path)], ["clouds"], {"shift": [1]})


def test_clean_value_of_a_pretrained_run_is_its_results_json(shards, tmp_path):
  """A run finetuned from an encoder pretrained on other data (encoder.json statistics unlike the sample's
  stats.json) is evaluated by robustness with the statistics it was trained and tested with."""
  import mmrs.finetune  # pylint: disable=g-import-not-at-top
  import tiny_encoder  # pylint: disable=g-import-not-at-top
  from configs.finetune import bigearthnet  # pylint: disable=g-import-not-at-top
  enc = tiny_encoder.write_encoder(tmp_path / "enc", tiny_encoder.vit_params(), image_size=32,
                                   bands=bands_lib.S2_L2A_BANDS)
  config = bigearthnet.get_config(f"tiny,shards={shards},init_from={enc},steps=2")
  config.checkpoint_every_steps = 2
  config.xla_compiler_options = {"xla_backend_optimization_level": 0}
  path = str(tmp_path / "ft_pretrained")
  mmrs.finetune.run(config, path)
  result, _ = robustness.evaluate_runs([path], ["clouds"], {"clouds": [100]}, examples=0)
  own = json.load(open(os.path.join(path, "results.json")))["metrics"]["map_micro"]
  assert result["runs"]["ft_pretrained"]["clean"] == own


@pytest.mark.parametrize("bands", ["L1C", "L2A"])
def test_cloud_shadows_darken_the_surface_signal_only(bands):
  """L2A (surface reflectance): a full shadow scales the value by the shadow factor. L1C (top of atmosphere): the
  path reflectance stays and the atmospheric bands B01, B09, B10 are unchanged."""
  names = bands_lib.S2_L1C_BANDS if bands == "L1C" else bands_lib.S2_L2A_BANDS
  ctx = stresses.Context(s2_bands=names, num_samples=2)
  rng = np.random.default_rng(4)
  batch = {"s2": rng.integers(500, 4000, (2, 32, 32, len(names))).astype(np.uint16),
           "s1": np.zeros((2, 32, 32, 2), np.float32), "_id": np.arange(2, dtype=np.int32)}
  out, _ = jax.jit(lambda b: stresses.apply("clouds", b, 30.0, 0, ctx))(batch)
  out = np.asarray(out["s2"])
  floor = stresses.shadow_floor(names, bands == "L1C")
  checked = 0
  masks = jax.jit(jax.vmap(lambda k: stresses.cloud_masks(jax.random.split(k, 3)[0], 32, 32, 30.0, ctx)))
  for i, (cloud, shadow) in enumerate(zip(*masks(stresses.sample_keys(0, "clouds", batch["_id"])))):
    full = (np.asarray(shadow) == 1.0) & (np.asarray(cloud) == 0)
    raw, got = batch["s2"][i][full].astype(np.float32), out[i][full]
    checked += int(full.sum())
    for c, band in enumerate(names):
      if bands == "L1C" and band in ("B01", "B09", "B10"):
        np.testing.assert_array_equal(got[:, c], raw[:, c])  # the atmosphere's signal: no shadow
        continue
      path = floor[c]
      assert (bands == "L2A") == (path == 0)
      ratio = (got[:, c] - path) / (raw[:, c] - path)  # the surface part is scaled by the sample's shadow factor
      np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
      assert stresses.SHADOW_FACTOR[0] - 1e-5 <= ratio[0] <= stresses.SHADOW_FACTOR[1] + 1e-5
  assert checked > 0


def test_shift_brings_in_the_records_own_pixels_within_the_margin():
  """With ctx.margin = m the batch is the crop plus m real pixels per side: S1 moves on that frame and both
  modalities come back at the crop size, the entering pixels being the record's, not copies of the edge."""
  m, k = 3, 2
  rng = np.random.default_rng(5)
  wide = {"s2": rng.integers(200, 3000, (B, H + 2 * m, W + 2 * m, 12)).astype(np.uint16),
          "s1": rng.normal(-15.0, 4.0, (B, H + 2 * m, W + 2 * m, 2)).astype(np.float32),
          "_id": np.arange(B, dtype=np.int32)}
  ctx = stresses.Context(s2_bands=bands_lib.S2_L2A_BANDS, num_samples=B, margin=m)
  out, _ = jax.jit(lambda b, v: stresses.apply("shift", b, v, 0, ctx))(wide, np.float32(k))
  np.testing.assert_array_equal(np.asarray(out["s2"]), wide["s2"][:, m:m + H, m:m + W].astype(np.float32))
  for i, key in enumerate(stresses.sample_keys(0, "shift", wide["_id"])):
    dr, dc = stresses.shift_direction(key) * k
    np.testing.assert_array_equal(np.asarray(out["s1"][i]), wide["s1"][i, m - dr:m - dr + H, m - dc:m - dc + W])
  zero, _ = jax.jit(lambda b, v: stresses.apply("shift", b, v, 0, ctx))(wide, np.float32(0.0))
  np.testing.assert_array_equal(np.asarray(zero["s1"]), wide["s1"][:, m:m + H, m:m + W])  # the clean crop


def test_the_runner_reads_real_pixels_for_the_shift(runs):
  """The sample's records are 120 px and the run evaluates 32 px crops: a 4 px shift brings in record pixels."""
  result, shots = robustness.evaluate_runs([runs[0]], ["shift"], {"shift": [4]}, examples=2)
  entry = result["runs"]["ft_s1s2"]
  assert entry["shift_margin"] == 4 and [r["severity"] for r in entry["stresses"]["shift"]] == [0.0, 4.0]
  sh = shots["shift"]["ft_s1s2"]
  clean, moved = sh["images"][0]["s1"], sh["images"][1]["s1"]
  for i in range(2):
    dr, dc = stresses.shift_direction(stresses.sample_keys(0, "shift", np.arange(2))[i]) * 4
    entering = moved[i, :4] if dr > 0 else moved[i, -4:] if dr < 0 else moved[i, :, :4] if dc > 0 else moved[i, :, -4:]
    edge = clean[i, :1] if dr > 0 else clean[i, -1:] if dr < 0 else clean[i, :, :1] if dc > 0 else clean[i, :, -1:]
    assert not np.array_equal(entering, np.broadcast_to(edge, entering.shape))  # not replicated edge pixels
    inner = moved[i, 4:] if dr > 0 else moved[i, :-4] if dr < 0 else moved[i, :, 4:] if dc > 0 else moved[i, :, :-4]
    src = clean[i, :-4] if dr > 0 else clean[i, 4:] if dr < 0 else clean[i, :, :-4] if dc > 0 else clean[i, :, 4:]
    np.testing.assert_array_equal(inner, src)  # the rest is the clean crop, moved
