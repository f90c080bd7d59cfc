"""Finetuning and evaluation: checkpoint conversion, the encoder API, export, downstream heads/method/metrics.

`run(config, workdir)` is what `python -m launch.main` calls for a config with a `finetune` section: it trains
`mmrs.finetune.method` with the pretraining loop (resuming like any run), validating every
`finetune.eval_every_steps` and keeping the best state (mmrs/finetune/validation.py), then evaluates that state
on config.data.eval (the test split) and writes results.json / results.md into the workdir. Submodules are imported
lazily.
"""


def run(config, workdir: str, *, logdir: str | None = None, allow_config_change: bool = False) -> dict:
  """Train (validating every finetune.eval_every_steps) + test the best validation state.

  Returns {"train": loop summary (without the state), "eval": results dict or None (preempted)}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import evaluate, method as method_lib, report, validation  # pylint: disable=g-import-not-at-top
  from mmrs.train import loop, mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top

  method = method_lib.build(config)  # fills config.bands / data.train.indices before the loop reads them
  evaluator = evaluate.Evaluator(config, method)  # one compiled predict function for validation and test
  selection = validation.Selection(config, workdir, evaluator)
  try:
    summary = loop.train(config, workdir, method=method, logdir=logdir, allow_config_change=allow_config_change,
                         hooks=(selection,))
    state = summary.pop("state")
    if summary.get("preempted"):
      logging.warning("Preempted at step %d: evaluation skipped (rerun the same command to resume).", summary["step"])
      return {"train": summary, "eval": None}
    split = config.data.eval.get("split", "test")
    with jax.set_mesh(mesh_lib.make_mesh(config.mesh)):
      params, method_state, step = selection.select(state, summary["step"])
      test = evaluator(params, method_state, split)
  finally:
    selection.close()
  result = evaluate.describe_run(config, method, step)
  result.update(selection.summary(summary["step"]), test=test, metrics=test["metrics"],
                num_examples=test["num_examples"], seconds=test["seconds"])
  if "coverage" in test:
    result["coverage"] = test["coverage"]
    logging.info("Coverage of split %s: %s", split, test["coverage"]["note"])
  logging.info("Test (%s, step %d; %s): %s", split, step, result["selection"]["note"], test["metrics"])
  if jax.process_index() == 0:
    report.write(workdir, result)
    metrics_lib.log_evaluation(logdir or workdir, step, "eval", test["metrics"])  # TensorBoard too
    print(report.table([result]), flush=True)
  return {"train": summary, "eval": result}
