"""Finetuning and evaluation: checkpoint conversion, the encoder API, export, downstream heads/method/metrics.

`run(config, workdir)` is what `python -m launch.main` calls for a config with a `finetune` section: it trains
`mmrs.finetune.method` with the pretraining loop (resuming like any run), then evaluates the final state on
config.data.eval and writes results.json / results.md into the workdir. Submodules are imported lazily.
"""


def run(config, workdir: str, *, logdir: str | None = None, allow_config_change: bool = False) -> dict:
  """Train + evaluate. Returns {"train": loop summary (without the state), "eval": results dict or None}."""
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from mmrs.finetune import evaluate, method as method_lib  # pylint: disable=g-import-not-at-top
  from mmrs.train import loop, mesh as mesh_lib  # pylint: disable=g-import-not-at-top

  method = method_lib.build(config)  # fills config.bands / data.train.indices before the loop reads them
  summary = loop.train(config, workdir, method=method, logdir=logdir, allow_config_change=allow_config_change)
  state = summary.pop("state")
  if summary.get("preempted"):
    logging.warning("Preempted at step %d: evaluation skipped (rerun the same command to resume).", summary["step"])
    return {"train": summary, "eval": None}
  with jax.set_mesh(mesh_lib.make_mesh(config.mesh)):
    result = evaluate.run_evaluation(config, state["params"], state["method_state"], workdir, method=method,
                                     step=summary["step"])
  if jax.process_index() == 0:
    from mmrs.finetune import report  # pylint: disable=g-import-not-at-top
    from mmrs.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    metrics_lib.log_evaluation(logdir or workdir, summary["step"], "eval", result["metrics"])  # TensorBoard too
    print(report.table([result]), flush=True)
  return {"train": summary, "eval": result}
