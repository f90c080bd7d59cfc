"""Robustness of finetuned models: the test metric as the input is stressed (mmrs/finetune/stresses.py).

    result = evaluate_runs(["runs/ft_mixmae_s1s2", "runs/ft_mae_s2"], stresses=("clouds", "shift"))
    write_outputs("runs/robustness", result, examples)

A run is a finetune workdir (`python -m launch.main` with a configs/finetune config): its config.json says how it
was built and what its evaluation split is, checkpoints/ holds the model, results.json its own clean evaluation.
The run is rebuilt through the public entry points (`mmrs.finetune.method.build(config)`, `convert.read_checkpoint`)
and evaluated like `mmrs.finetune.evaluate`: the same split, order, centre crops, batch size, the normalization
training used (`method.training_normalizer()`: a pretrained encoder's encoder.json statistics, not the downstream
data's), and the same jitted `method.predict` for the clean pass, so severity 0 is the run's own clean metric bit
for bit (severity 0 of every stress is that clean pass; the stresses are identities there, tested).
The split is read once; every batch is evaluated clean and under every (stress, severity), each stress being one
compiled program for all its severities (severity is an argument, not a constant). The model is the state the
run's test metrics came from: the selected step (best_checkpoint/ where model selection kept it), else the newest.
Several processes (launch.robustness under SLURM or with --coordinator_address): as `mmrs.finetune.evaluate`, each
process reads the rows of each global batch its devices hold on config.mesh, the predictions are gathered back in
row order, and every process computes the numbers one process would (per-sample stress seeds and the missing-
modality draw are keyed by a sample's position in the split, not by batch row or process).

missing_s2 / missing_s1: the affected samples are predicted through the encoder's missing-modality path, i.e. the
run's method with that modality removed from its inputs (`ViTEncoder(s1=x)` instead of `(s2=..., s1=...)`), never
zeros posing as data. time_gap: where the split's records carry several acquisitions of one place (SSL4EO-S12
seasons: metadata `location`; pair_catalog output: `lon`/`lat`; both record `s1_time`/`s2_time`), each sample's S1
is replaced on the host by the S1 of another record of the same place whose acquisition is at least `severity`
days from this sample's S2 (the nearest such); samples without one are left out of that severity (its `n` says how
many remained). Data with one acquisition per place: time_gap is skipped with a message.

Outputs (`write_outputs`): robustness.json {"metric", "runs": {RUN: {"clean", "stresses": {STRESS: [{"severity",
"value", "n"}]}, "skipped": {STRESS: why}, "modality_dropout" (the finetune.modality_dropout the run trained with:
0 = its missing_s1 / missing_s2 rows are zero-shot), ...}}, "stresses": {STRESS: {"unit", "severities"}}, "seed"},
robustness.md (one table per stress), robustness.png (one panel per stress, one line per run) and
examples_<stress>.png (a few inputs at each severity).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import functools
import json
import math
import os
import time
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from mmrs import atomic_io
from mmrs.finetune import report
from mmrs.finetune import stresses as stresses_lib

EXAMPLES = 3  # samples shown per example grid


class RobustnessError(ValueError):
  """A run directory or option that cannot be evaluated; the message names it and what to do."""


@dataclasses.dataclass
class Run:
  name: str
  path: str
  config: Any
  method: Any
  params: Any
  state: Any
  results: dict  # results.json
  step: int | None


def reported_metrics(results: Mapping[str, Any]) -> dict:
  """The test metrics of a results.json (`metrics`, or `test.metrics` where validation and test are both kept)."""
  test = results.get("test")
  if isinstance(test, Mapping) and isinstance(test.get("metrics"), Mapping):
    return dict(test["metrics"])
  return dict(results.get("metrics") or {})


def load_run(path: str, name: str | None = None) -> Run:
  """Rebuilds a finetune run from its workdir: config.json, the checkpoint results.json was computed from."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import convert  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import method as method_lib  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import validation  # pylint: disable=g-import-not-at-top

  for f in ("config.json", report.JSON_FILE):
    if not os.path.exists(os.path.join(path, f)):
      raise RobustnessError(f"--runs: {path} has no {f}; give finetune workdirs (python -m launch.main with a "
                            "configs/finetune config, run to the end so it has evaluated).")
  with open(os.path.join(path, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if config.get("method") != "finetune":
    raise RobustnessError(f"--runs: {path}/config.json is a {config.get('method')!r} run, not a finetune run.")
  results = report.read(path)
  selected = results.get("selected_step")
  method = method_lib.build(config)
  best = os.path.join(path, validation.BEST_DIR, str(selected), "state")
  if selected is not None and os.path.isdir(best):
    # The state the test metrics were computed from (model selection keeps it apart from the train checkpoints,
    # which need not hold the selected step: the newest one is a later state).
    params, state = _read_state(best)
    return Run(name or os.path.basename(os.path.normpath(path)), path, config, method, params, state, results,
               int(selected))
  ckpt = path
  if selected is not None and os.path.isdir(os.path.join(path, "checkpoints", str(selected))):
    ckpt = os.path.join(path, "checkpoints", str(selected))
  params, state, meta = convert.read_checkpoint(ckpt)
  if results.get("step") is not None and meta.get("step") != results.get("selected_step", results["step"]):
    logging.warning("%s: results.json was computed at step %s but the newest checkpoint is step %s.", path,
                    results.get("selected_step", results["step"]), meta.get("step"))
  return Run(name or os.path.basename(os.path.normpath(path)), path, config, method, params, state, results,
             meta.get("step"))


def _read_state(state_dir: str) -> tuple[dict, dict]:
  """(params, method_state) of a {"params", "method_state"} Orbax tree (best_checkpoint/<step>/state) as host
  numpy arrays, as `convert.read_checkpoint` reads a train checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckptr = ocp.PyTreeCheckpointer()
  md = ckptr.metadata(state_dir)
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  want = {k: tree[k] for k in ("params", "method_state") if k in tree and tree[k]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
  out = ckptr.restore(state_dir, args=ocp.args.PyTreeRestore(item=want, restore_args=restore_args,
                                                             partial_restore=True))
  return out["params"], out.get("method_state") or {}


def primary_metric(results: Mapping[str, Any]) -> str:
  """The first metric of report.METRIC_ORDER the run reports (the column results tables lead with)."""
  names = [k for k in reported_metrics(results) if not k.startswith("num_")]
  for m in report.METRIC_ORDER:
    if m in names:
      return m
  if not names:
    raise RobustnessError("results.json has no metrics.")
  return sorted(names)[0]


def _without(method, modality: str):
  """The run's method with `modality` removed from its inputs: its encoder then takes the missing-modality path."""
  sub = copy.copy(method)
  sub.modalities = tuple(m for m in method.modalities if m != modality)
  return sub


def _finish(task: str, out):
  return out if task == "multilabel" else out.argmax(-1)  # as mmrs.finetune.evaluate


@dataclasses.dataclass
class Evaluator:
  """The jitted clean and stressed predictions of one run."""
  run: Run
  ctx: stresses_lib.Context
  seed: int

  def __post_init__(self):
    from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top
    method, task = self.run.method, self.run.config.finetune.task
    self.normalizer = method.training_normalizer()  # as training and mmrs.finetune.evaluate
    normalize = functools.partial(normalize_lib.normalize_batch, normalizer=self.normalizer)
    self._normalize = normalize

    @jax.jit
    def clean(params, state, batch):  # exactly mmrs.finetune.evaluate's predict
      out = method.predict(params, state, normalize(batch))
      return _finish(task, out)

    self.clean = clean
    self._stressed = {}

  def stressed(self, name: str):
    if name not in self._stressed:
      stress = stresses_lib.STRESSES[name]
      method, task, ctx, seed = self.run.method, self.run.config.finetune.task, self.ctx, self.seed
      sub = _without(method, stress.drops) if stress.drops else None
      normalize = self._normalize

      @jax.jit
      def fn(params, state, batch, severity):
        images, present = stresses_lib.apply(name, batch, severity, seed, ctx)
        x = normalize({m: images[m] for m in method.modalities})
        out = _finish(task, method.predict(params, state, x))
        for m, keep in present.items():
          alt = _finish(task, sub.predict(params, state, {k: v for k, v in x.items() if k != m}))
          out = stresses_lib._where_b(keep, out, alt)  # pylint: disable=protected-access
        return out

      self._stressed[name] = fn
    return self._stressed[name]

  def stressed_images(self, name: str):
    """jit (batch, severity) -> (raw stressed images, present) for the example grids."""
    return _stress_images_fn(name, self.ctx, self.seed)


@functools.lru_cache(maxsize=None)
def _stress_images_fn(name: str, ctx: stresses_lib.Context, seed: int):
  """One compiled program per (stress, context, seed), shared by the runs (it does not depend on the model)."""
  return jax.jit(lambda batch, severity: stresses_lib.apply(name, batch, severity, seed, ctx))


# --- time_gap: S1 from another acquisition of the same place -----------------------------------------------------

def _parse_time(s) -> dt.datetime | None:
  if not s:
    return None
  try:
    t = dt.datetime.fromisoformat(str(s).replace("Z", "+00:00"))
  except ValueError:
    return None
  return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _place(meta: Mapping[str, Any]):
  if meta.get("location") not in (None, ""):
    return ("location", str(meta["location"]))
  if meta.get("lon") is not None and meta.get("lat") is not None:
    return ("lonlat", round(float(meta["lon"]), 4), round(float(meta["lat"]), 4))
  return None


@dataclasses.dataclass
class TimeGapPlan:
  """Per eval record: the S1 times at its place. `replacement(i, days)` -> record index or None."""
  s2_time: list
  s1_time: list
  place: list
  by_place: dict
  source: Any
  decode: Any

  def replacement(self, i: int, days: float) -> int | None:
    best, best_gap = None, None
    t2 = self.s2_time[i]
    for j in self.by_place.get(self.place[i], ()):
      gap = abs((self.s1_time[j] - t2).total_seconds()) / 86400.0
      if gap >= days and (best_gap is None or gap < best_gap):
        best, best_gap = j, gap
    return best

  def s1_of(self, j: int) -> np.ndarray:
    return self.decode(self.source[j], np.random.default_rng(0))["s1"]


def _whole_records(data_cfg):
  """data_cfg reading whole encoded records (data.read="record"): the host-side reads here need the record's bytes
  (metadata, array shapes), not the crop reader's lazy arrays."""
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.read = "record"
  return cfg


def time_gap_plan(run: Run) -> tuple[TimeGapPlan | None, str]:
  """(plan, "") where the eval split has several S1 dates per place, else (None, why it is skipped)."""
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.data import records, transforms  # pylint: disable=g-import-not-at-top
  cfg, method = run.config, run.method
  eval_cfg = cfg.data.eval
  if eval_cfg.get("on_bad", "fail") != "fail" or eval_cfg.get("indices"):
    return None, "time_gap needs the eval split read whole and in order (data.eval.on_bad='fail', no indices)."
  info = pipeline_lib.describe(_whole_records(eval_cfg), method.modalities, eval_cfg.get("split", "test"))
  s2_t, s1_t, places = [], [], []
  for i in range(info.num_records):
    _, _, payload = info.source[i]
    if not isinstance(payload, (bytes, bytearray, memoryview)):
      return None, f"time_gap reads record metadata, which {eval_cfg.shards} (not mmrs shards) does not carry."
    meta = records.decode(payload, meta=True).get("meta") or {}
    s2_t.append(_parse_time(meta.get("s2_time")))
    s1_t.append(_parse_time(meta.get("s1_time")))
    places.append(_place(meta))
  if not all(s2_t) or not all(s1_t) or not all(places):
    return None, (f"the records of {eval_cfg.shards} do not all carry a place (location or lon/lat) and S1/S2 "
                  "acquisition times (s1_time, s2_time) in their metadata, so no other date can stand in.")
  by_place: dict = {}
  for i, p in enumerate(places):
    by_place.setdefault(p, []).append(i)
  if not any(len({s1_t[j] for j in js}) > 1 for js in by_place.values()):
    return None, f"{eval_cfg.shards} has one S1 acquisition per place: no other date to swap in."
  decode = transforms.DecodeAugment(modalities=("s1",), bands={"s1": info.bands["s1"]},
                                    image_size=eval_cfg.image_size, augment=False, flips=False, rot90=False,
                                    default_bands=info.stored_bands)
  return TimeGapPlan(s2_t, s1_t, places, by_place, info.source, decode), ""


# --- the evaluation ----------------------------------------------------------------------------------------------

def applicable(run: Run, name: str) -> str:
  """'' when the stress applies to the run, else why not."""
  stress = stresses_lib.STRESSES[name]
  mods = tuple(run.method.modalities)
  missing = [m for m in stress.needs if m not in mods]
  if missing:
    return f"the run takes {'+'.join(mods)}; {name} needs {'+'.join(stress.needs)}."
  if stress.drops and run.method.kind != "vit":
    return f"{name} needs a ViT encoder (the missing-modality path)."
  return ""


def evaluate_run(run: Run, stresses: Sequence[str], severities: Mapping[str, Sequence[float]], *, seed: int = 0,
                 metric: str | None = None, batch_size: int = 0, examples: int = EXAMPLES,
                 ctx_overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """(the run's entry of robustness.json, {stress: example images}) for one run."""
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  cfg, method = run.config, run.method
  ft = cfg.finetune
  metric = metric or primary_metric(run.results)
  eval_cfg = cfg.data.eval
  # Several processes: as mmrs.finetune.evaluate, global batches on config.mesh, each process reading the rows its
  # devices hold; what the metrics need is gathered back in row order on every process (`_Batch`).
  mesh, batch_size = evaluate_lib.layout(cfg, int(batch_size or cfg.get("eval_batch_size", 0) or cfg.batch_size))
  rows = evaluate_lib.process_rows(mesh, batch_size)
  read = dict(modalities=method.modalities, global_batch_size=batch_size, seed=cfg.seed, normalize="none",
              split=eval_cfg.get("split", "test"), shuffle=False, repeat=False, drop_remainder=False,
              process_index=jax.process_index(), process_count=jax.process_count(), rows=rows)
  pipe = pipeline_lib.make_pipeline(eval_cfg, **read)
  n_records = pipe.num_records
  margin = (shift_margin(run, max(severities["shift"])) if "shift" in stresses and not applicable(run, "shift")
            else 0)
  wide = None  # shift: the same records, in the same order, with `margin` more real pixels on every side
  if margin:
    wide_cfg = eval_cfg.copy_and_resolve_references()
    with wide_cfg.unlocked():
      wide_cfg.image_size = int(eval_cfg.image_size) + 2 * margin
    wide = pipeline_lib.make_pipeline(wide_cfg, **read)
  ctx = stresses_lib.Context(s2_bands=tuple(pipe.bands.get("s2", ())), num_samples=n_records,
                             **dict(dict(margin=margin), **dict(ctx_overrides or {})))
  ev = Evaluator(run, ctx, seed)
  params, state = evaluate_lib._unbox(run.params), evaluate_lib._unbox(run.state)  # pylint: disable=protected-access
  if mesh is not None:  # every device of the mesh holds the whole model
    from mmrs.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    params, state = jax.device_put((params, state), mesh_lib.replicated(mesh))
  skipped, plans = {}, {}
  todo = []
  for name in stresses:
    why = applicable(run, name)
    if not why and name == "time_gap":
      plans[name], why = time_gap_plan(run)
    if why:
      logging.warning("%s: %s skipped: %s", run.name, name, why)
      skipped[name] = why
    else:
      todo.append(name)
  # Missing modality: a seeded permutation of the split; rank < round(f * N) loses the modality.
  perm = np.random.default_rng([seed, 0x0D15]).permutation(n_records)
  rank = np.empty(n_records, np.int32)
  rank[perm] = np.arange(n_records, dtype=np.int32)

  def make_acc():
    return metrics_lib.make_metrics(ft.task, method.num_classes,
                                    evaluate_lib._class_names(cfg, ft.label_set))  # pylint: disable=protected-access

  clean_acc, clean_n = make_acc(), 0
  accs = {(s, v): [make_acc(), 0] for s in todo for v in severities[s] if v != 0}
  shots: dict = {}
  label_key = method.label_key
  start = time.perf_counter()
  local_rows = np.arange(batch_size) if rows is None else rows
  padding: dict = {}
  for b in range(math.ceil(n_records / batch_size)):  # global batches (the last padded): the same everywhere
    local = _next_or_padding(pipe, padding, "eval")
    valid = local["valid"]
    ids = b * batch_size + local_rows  # global positions in the split of this process's rows
    images = {m: local[m] for m in method.modalities}
    labels = local[label_key]
    wide_images = images
    if wide is not None:
      w = _next_or_padding(wide, padding, "wide")
      wide_labels = np.asarray(w[label_key])
      if wide_labels.ndim == 3:  # per-pixel labels: the wider read's centre is the evaluated crop
        wide_labels = wide_labels[:, margin:-margin, margin:-margin]
      if not (np.array_equal(np.asarray(w["valid"]), valid) and np.array_equal(wide_labels, labels)):
        raise RobustnessError(f"{run.name}: the shift stress's wider read of the split fell out of step with the "
                              "evaluation read; rerun with --stress excluding shift and report it.")
      wide_images = {m: np.asarray(w[m]) for m in method.modalities}
    extra = {"_id": ids.astype(np.int32), "_rank": np.where(ids < n_records, rank[np.minimum(ids, n_records - 1)],
                                                             n_records).astype(np.int32)}
    batch = _Batch(batch_size, mesh, images, wide_images, extra)
    labels, valid = batch.gather({label_key: labels, "valid": valid}).values()
    clean_acc.update(batch.fetch(ev.clean(params, state, batch.images)), labels, valid)
    clean_n += int(valid.sum())
    for name in todo:
      for v in severities[name]:
        if v == 0:
          continue
        acc = accs[(name, v)]
        if name == "time_gap":  # host-side: this process's rows get the S1 of another date
          swapped, keep = _swap_s1(plans[name], images, ids, local["valid"], v, n_records)
          out = batch.fetch(ev.clean(params, state, batch.put(swapped)))
          keep = batch.gather({"keep": keep})["keep"]
        else:
          out = batch.fetch(ev.stressed(name)(params, state, batch.stress_input(name), np.float32(v)))
          keep = valid
        acc[0].update(out, labels, keep)
        acc[1] += int(keep.sum())
      if examples and name not in shots:  # from the first batch, whole on every process
        whole = batch.whole(name)
        shots[name] = _example_shots(ev, plans.get(name), name, whole["images"], whole["extra"],
                                     whole["extra"]["_id"].astype(np.int64), valid, severities[name], examples,
                                     n_records)
  pipe.close()
  if wide is not None:
    wide.close()
  clean_metrics = clean_acc.result()
  if metric not in clean_metrics:
    raise RobustnessError(f"--metric={metric!r} is not a metric of {run.path} (it has "
                          f"{sorted(k for k in clean_metrics if not k.startswith('num_'))}).")
  clean = float(clean_metrics[metric])
  entry = {"path": run.path, "modalities": list(method.modalities), "step": run.step, "clean": clean,
           "reported_clean": reported_metrics(run.results).get(metric), "n": clean_n,
           # missing_s1 / missing_s2 measure a trained ability only where finetuning dropped modalities too
           "modality_dropout": float(ft.get("modality_dropout", 0.0)), "stresses": {},
           "shift_margin": margin,  # shift: real record pixels around the crop (beyond them: edge replication)
           "skipped": skipped, "seconds": 0.0}
  for name in todo:
    rows = []
    for v in severities[name]:
      if v == 0:
        rows.append({"severity": float(v), "value": clean, "n": clean_n})
      else:
        acc, n = accs[(name, v)]
        value = float(acc.result()[metric]) if n else float("nan")
        rows.append({"severity": float(v), "value": value, "n": n})
    entry["stresses"][name] = rows
  entry["seconds"] = round(time.perf_counter() - start, 2)
  if entry["reported_clean"] is not None and entry["reported_clean"] != clean:
    logging.warning("%s: the clean %s evaluated here (%s) differs from results.json (%s): the checkpoint or the "
                    "data changed since the run evaluated.", run.name, metric, clean, entry["reported_clean"])
  return entry, shots


def _next_or_padding(pipe, padding: dict, key: str) -> dict:
  """The pipeline's next batch of this process's rows as numpy; where this process ran out one batch before the
  others (its rows of the last global batch are all padding), zeros with valid=False, as mmrs.finetune.evaluate."""
  try:
    local = {k: np.asarray(v) for k, v in next(pipe.iterator).items()}
  except StopIteration:
    return dict(padding[key])
  padding.setdefault(key, {k: np.zeros_like(v) for k, v in local.items()})
  return local


class _Batch:
  """One evaluation batch: this process's rows (host numpy) and the same batch as global arrays for the jitted
  predictions (`mmrs.finetune.evaluate.to_global`). With one process everything stays as it is."""

  def __init__(self, batch_size, mesh, images, wide_images, extra):
    from mmrs.finetune import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
    self._ev, self._size, self._mesh = evaluate_lib, batch_size, mesh
    self.local = {"images": images, "wide": wide_images, "extra": extra}
    self.images = self.put(images)
    self._extra = self.put(extra)
    self._wide = self.images if wide_images is images else self.put(wide_images)

  def put(self, local: dict) -> dict:
    return self._ev.to_global(local, self._size, self._mesh)

  def fetch(self, out) -> np.ndarray:
    """Predictions on the global batch -> host numpy of every row, in row order."""
    return self._ev.gather(out, self._mesh)

  def gather(self, local: dict) -> dict:
    """This process's rows of host arrays -> every row of the batch, in row order, on every process."""
    return self.fetch(self.put(local)) if self._mesh is not None else local

  def stress_input(self, name: str) -> dict:
    """The images a stress reads (shift: the wider read) with the per-sample `_id` / `_rank`."""
    return dict(self._wide if name == "shift" else self.images, **self._extra)

  def whole(self, name: str) -> dict:
    """{"images", "extra"}: every row of the batch as host numpy (the example grids)."""
    return self.gather({"images": self.local["wide" if name == "shift" else "images"],
                        "extra": self.local["extra"]})


def shift_margin(run: Run, max_shift: float) -> int:
  """Real record pixels the shift stress can read around the evaluated crop: min(max shift, (record side - crop
  side) // 2) from the split's first record (mmrs shards read whole and in order); 0 = edge replication only."""
  from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from mmrs.data import records  # pylint: disable=g-import-not-at-top
  eval_cfg = run.config.data.eval
  size = int(eval_cfg.get("image_size", 0) or 0)
  if size <= 0 or eval_cfg.get("on_bad", "fail") != "fail" or eval_cfg.get("indices"):
    return 0
  info = pipeline_lib.describe(_whole_records(eval_cfg), run.method.modalities, eval_cfg.get("split", "test"))
  if not info.num_records:
    return 0
  payload = info.source[0][2]
  if not isinstance(payload, (bytes, bytearray, memoryview)):
    return 0  # not mmrs shards (TFDS): the record size is not known here
  rec = records.decode(payload)
  side = min(min(rec[m].shape[:2]) for m in run.method.modalities if m in rec)
  return max(0, min(int(math.ceil(max_shift)), (side - size) // 2))


def _swap_s1(plan: TimeGapPlan, images, ids, valid, days, n_records):
  s1 = np.array(images["s1"], copy=True)
  keep = np.array(valid, copy=True)
  for row, i in enumerate(ids):
    if i >= n_records or not valid[row]:
      continue
    j = plan.replacement(int(i), float(days))
    if j is None:
      keep[row] = False
    elif j != i:
      s1[row] = plan.s1_of(j)
  return dict(images, s1=s1), keep


def _example_shots(ev: Evaluator, plan, name, images, extra, ids, valid, severities, k, n_records) -> dict:
  """{"severities": [...], "images": [{modality: (k, H, W, C) raw} per severity], "present": [...]}"""
  k = int(min(k, valid.sum()))
  out = {"severities": [float(v) for v in severities], "images": [], "present": []}
  fn = None if name == "time_gap" else ev.stressed_images(name)
  for v in severities:
    if name == "time_gap":
      batch, keep = _swap_s1(plan, images, ids, valid, v, n_records) if v else (images, valid)
      imgs, present = batch, {"s1": keep}
    else:
      imgs, present = fn(dict(images, **extra), np.float32(v))
    out["images"].append({m: np.asarray(imgs[m])[:k] for m in ev.run.method.modalities})
    out["present"].append({m: np.asarray(p)[:k] for m, p in present.items()})
  return out


def evaluate_runs(paths: Sequence[str], stresses: Sequence[str] | None = None,
                  severities: Mapping[str, Sequence[float]] | None = None, *, seed: int = 0, metric: str = "",
                  batch_size: int = 0, examples: int = EXAMPLES,
                  ctx_overrides: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """(robustness.json content, {stress: {run: example shots}})."""
  stresses = tuple(stresses or stresses_lib.STRESSES)
  unknown = [s for s in stresses if s not in stresses_lib.STRESSES]
  if unknown:
    raise RobustnessError(f"--stress: unknown {unknown}; choose from {list(stresses_lib.STRESSES)}.")
  sev = {s: tuple(stresses_lib.STRESSES[s].severities) for s in stresses}
  for s, vals in (severities or {}).items():
    if s not in sev:
      raise RobustnessError(f"--severities names {s!r}, which is not among the stresses run ({list(sev)}).")
    vals = tuple(float(v) for v in vals)
    if not vals or any(v < 0 or not math.isfinite(v) for v in vals):
      raise RobustnessError(f"--severities {s}: give non-negative numbers, got {vals}.")
    sev[s] = (0.0,) + tuple(v for v in dict.fromkeys(vals) if v != 0.0)  # clean first, in the order given
  names = _run_names(paths)
  result = {"metric": None, "seed": seed,
            "stresses": {s: {"unit": stresses_lib.STRESSES[s].unit, "severities": list(sev[s])} for s in stresses},
            "runs": {}}
  shots: dict = {s: {} for s in stresses}
  for path, name in zip(paths, names):
    run = load_run(path, name)
    m = metric or result["metric"] or primary_metric(run.results)
    result["metric"] = m
    logging.info("Robustness of %s (%s)...", name, m)
    entry, run_shots = evaluate_run(run, stresses, sev, seed=seed, metric=m, batch_size=batch_size,
                                    examples=examples, ctx_overrides=ctx_overrides)
    result["runs"][name] = entry
    for s, sh in run_shots.items():
      shots[s][name] = dict(sh, bands={"s2": list(ev_bands(run)), "s1": ["VV", "VH"]})
  return result, shots


def ev_bands(run: Run) -> tuple[str, ...]:
  from mmrs import bands as bands_lib  # pylint: disable=g-import-not-at-top
  return bands_lib.parse_band_list(run.config.bands.get("s2", "")) or ()


def _run_names(paths: Sequence[str]) -> list[str]:
  base = [os.path.basename(os.path.normpath(p)) for p in paths]
  if len(set(base)) == len(base):
    return base
  return [os.path.normpath(p) for p in paths]


# --- outputs -----------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
  return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def _sev_label(v: float) -> str:
  return f"{v:g}"


def markdown(result: Mapping[str, Any]) -> str:
  lines = [f"# Robustness ({result['metric']})", ""]
  runs = result["runs"]
  lines.append("| run | input | clean | trained with modality dropout |")
  lines.append("|---|---|---|---|")
  for name, r in runs.items():
    p = r.get("modality_dropout", 0.0)
    trained = f"yes (p={p:g})" if p else ("no: missing_s1 / missing_s2 are zero-shot" if len(r["modalities"]) > 1
                                          else "n/a (one modality)")
    lines.append(f"| {name} | {'+'.join(r['modalities'])} | {_fmt(r['clean'])} | {trained} |")
  for s, spec in result["stresses"].items():
    lines += ["", f"## {s}: {result['metric']} by {spec['unit']}", ""]
    sevs = spec["severities"]
    lines.append("| run | " + " | ".join(_sev_label(v) for v in sevs) + " |")
    lines.append("|---|" + "---|" * len(sevs))
    for name, r in runs.items():
      rows = {row["severity"]: row for row in r["stresses"].get(s, [])}
      if not rows:
        lines.append(f"| {name} | skipped: {r['skipped'].get(s, '')} |" + " |" * (len(sevs) - 1))
        continue
      cells = [f"{_fmt(rows[v]['value'])} (n={rows[v]['n']})" if v in rows else "" for v in sevs]
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_curves(result: Mapping[str, Any], path: str | None = None):
  """One panel per stress, one line per run (metric vs severity, severities evenly spaced); returns the Figure."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(result["stresses"])
  cols = min(3, max(1, len(names)))
  rows = math.ceil(len(names) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
  for ax in axes.flat[len(names):]:
    ax.set_visible(False)
  for ax, s in zip(axes.flat, names):
    spec = result["stresses"][s]
    sevs = spec["severities"]
    for run, r in result["runs"].items():
      rows_ = r["stresses"].get(s)
      if not rows_:
        continue
      xs = [sevs.index(row["severity"]) for row in rows_]
      ax.plot(xs, [row["value"] for row in rows_], marker="o", label=f"{run} ({'+'.join(r['modalities'])})")
    ax.set_xticks(range(len(sevs)), [_sev_label(v) for v in sevs])
    ax.set_xlabel(spec["unit"])
    ax.set_ylabel(result["metric"])
    ax.set_title(s)
    ax.grid(alpha=0.3)
    if ax.get_lines():
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, "skipped for every run", ha="center", va="center", transform=ax.transAxes)
  fig.tight_layout()
  if path:
    _save(fig, path)
  return fig


def _save(fig, path: str, dpi: int = 110) -> None:
  atomic_io.write_with(path, lambda tmp: fig.savefig(tmp, dpi=dpi))


def _rgb(x: np.ndarray, bands: Sequence[str]) -> np.ndarray:
  """S2 raw (H, W, C) -> RGB in [0, 1] (B04, B03, B02 at reflectance 0..0.3, the usual true-colour stretch)."""
  idx = [list(bands).index(b) for b in ("B04", "B03", "B02")] if all(b in bands for b in ("B04", "B03", "B02")) \
      else [0, 0, 0]
  return np.clip(x[..., idx] / (0.3 * stresses_lib.REFLECTANCE_SCALE), 0, 1)


def _sar(x: np.ndarray) -> np.ndarray:
  """S1 dB (H, W, 2) -> grey VV in [0, 1] over -25..0 dB."""
  return np.clip((x[..., 0] + 25.0) / 25.0, 0, 1)


def plot_examples(stress: str, run_shots: Mapping[str, Any], unit: str, path: str | None = None):
  """A grid: rows = a few samples of each run, columns = severities; what the stress did to the inputs."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  drops = stresses_lib.STRESSES[stress].drops
  show = drops or ("s1" if stress in ("speckle", "time_gap") else "s2")
  rows = []
  for run, sh in run_shots.items():
    k = len(next(iter(sh["images"][0].values())))
    rows += [(run, sh, i) for i in range(k)]
  sevs = next(iter(run_shots.values()))["severities"] if run_shots else []
  fig, axes = plt.subplots(max(1, len(rows)), max(1, len(sevs)), figsize=(1.7 * max(1, len(sevs)) + 1,
                                                                          1.7 * max(1, len(rows)) + 0.6),
                           squeeze=False)
  for r, (run, sh, i) in enumerate(rows):
    for c, v in enumerate(sh["severities"]):
      ax = axes[r, c]
      ax.set_xticks([])
      ax.set_yticks([])
      imgs, present = sh["images"][c], sh["present"][c]
      if stress == "shift":  # misregistration shows as colour fringes: R = S1 VV, G = B = S2 brightness
        s2 = _rgb(imgs["s2"][i], sh["bands"]["s2"]).mean(-1)
        img = np.stack([_sar(imgs["s1"][i]), s2 / max(s2.max(), 1e-6), s2 / max(s2.max(), 1e-6)], -1)
      elif show == "s2":
        img = _rgb(imgs["s2"][i], sh["bands"]["s2"])
      else:
        img = _sar(imgs["s1"][i])
      if show in present and not bool(present[show][i]):
        ax.imshow(np.full(img.shape[:2], 0.5), cmap="gray", vmin=0, vmax=1)
        ax.text(0.5, 0.5, f"{show.upper()}\nabsent" if drops else "no other\ndate", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
      else:
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray", vmin=0, vmax=1)
      if r == 0:
        ax.set_title(_sev_label(v), fontsize=9)
      if c == 0:
        ax.set_ylabel(f"{run[:14]}\n#{i}", fontsize=7)
  fig.suptitle(f"{stress}: {unit} (columns)", fontsize=10)
  fig.tight_layout()
  if path:
    _save(fig, path, dpi=72)  # many small tiles: a low dpi keeps the file small
  return fig


def _strict(x):
  """NaN/inf (a metric with nothing to average) -> null, so robustness.json is strict JSON."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, Mapping):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  return x


def write_outputs(out: str, result: Mapping[str, Any], shots: Mapping[str, Any] | None = None) -> list[str]:
  """robustness.json / .md / .png and examples_<stress>.png into `out` (atomic writes); returns the paths."""
  os.makedirs(out, exist_ok=True)
  paths = []
  jpath = os.path.join(out, "robustness.json")
  atomic_io.write_json(jpath, _strict(result), sort_keys=False, allow_nan=False)
  mpath = os.path.join(out, "robustness.md")
  atomic_io.write_text(mpath, markdown(result))
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  ppath = os.path.join(out, "robustness.png")
  plt.close(plot_curves(result, ppath))
  paths += [jpath, mpath, ppath]
  for s, run_shots in (shots or {}).items():
    if run_shots:
      epath = os.path.join(out, f"examples_{s}.png")
      plt.close(plot_examples(s, run_shots, result["stresses"][s]["unit"], epath))
      paths.append(epath)
  return paths
