"""The PyTorch peer (benchmarks/torch_vit.py) is the same model as mmrs's, and benchmarks.peer runs end to end.

Skipped only where torch (an optional benchmark dependency, requirements-bench.txt) is not installed.
"""
import json
import os
import re
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")

from benchmarks import torch_vit  # pylint: disable=wrong-import-position
from configs import mae_s2 as mae_config  # pylint: disable=wrong-import-position
from configs import mixmae as mixmae_config  # pylint: disable=wrong-import-position
from mmrs.methods import mae as mae_lib  # pylint: disable=wrong-import-position
from mmrs.methods import masking  # pylint: disable=wrong-import-position
from mmrs.methods import mixmae as mixmae_lib  # pylint: disable=wrong-import-position
from mmrs.models import sizes  # pylint: disable=wrong-import-position

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dims(config):
  enc = sizes.vit_size(config.model.encoder)
  dec = sizes.vit_size(config.model.decoder)
  dec["depth"] = config.model.decoder_depth or dec["depth"]
  rename = lambda d: {"width": d["width"], "depth": d["depth"], "mlp_dim": d["mlp_dim"], "heads": d["num_heads"]}
  return rename(enc), rename(dec)


def nchw(x):
  return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def test_mae_s2_forward_matches_mmrs_on_the_same_weights():
  config = mae_config.get_config("tiny")
  method = mae_lib.build(config)
  x = jax.random.normal(jax.random.key(3), (3, 32, 32, 12))
  params, _ = method.init(jax.random.key(0), {"s2": x})
  params = nn.meta.unbox(params)
  rng = jax.random.key(7)
  pred, mask = method.mae.forward(params["encoder"], params["decoder"], x, rng, False)
  loss = method.mae.loss(params["encoder"], params["decoder"], x, rng, False)
  keep_ids = masking.mask_to_ids(~mask, int((~mask[0]).sum()))

  enc, dec = dims(config)
  model = torch_vit.build("mae_s2", enc=enc, dec=dec, patch_size=config.model.patch_size, s2_channels=12)
  torch_vit.load_mmrs_params(model, jax.device_get(params))
  assert torch_vit.count_params(model) == sum(p.size for p in jax.tree.leaves(params))
  with torch.no_grad():
    t_loss, t_pred, t_mask = model(nchw(x), torch.from_numpy(np.array(keep_ids)).long())
  np.testing.assert_array_equal(t_mask.numpy(), np.asarray(mask))
  np.testing.assert_allclose(t_pred.numpy(), np.asarray(pred), atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(float(t_loss), float(loss), rtol=1e-4)


def test_mixmae_forward_matches_mmrs_on_the_same_weights():
  config = mixmae_config.get_config("tiny")
  method = mixmae_lib.build(config)
  batch = {"s2": jax.random.normal(jax.random.key(3), (3, 32, 32, 12)),
           "s1": jax.random.normal(jax.random.key(4), (3, 32, 32, 2))}
  params, _ = method.init(jax.random.key(0), batch)
  params = nn.meta.unbox(params)
  rng = jax.random.key(7)
  preds, take_s2 = method.forward(params, batch, rng, False)
  loss, _ = method.loss(params, {}, batch, rng, False)

  enc, dec = dims(config)
  model = torch_vit.build("mixmae", enc=enc, dec=dec, patch_size=config.model.patch_size, s2_channels=12)
  torch_vit.load_mmrs_params(model, jax.device_get(params))
  assert torch_vit.count_params(model) == sum(p.size for p in jax.tree.leaves(params))
  with torch.no_grad():
    t_loss, t_preds, _ = model(nchw(batch["s2"]), nchw(batch["s1"]), torch.from_numpy(np.array(take_s2)))
  for m in ("s2", "s1"):
    np.testing.assert_allclose(t_preds[m].numpy(), np.asarray(preds[m]), atol=2e-4, rtol=1e-4)
  np.testing.assert_allclose(float(t_loss), float(loss), rtol=1e-4)


def test_torch_compile_traces_the_peer_once():
  """torch.compile of the peer model must not recompile on the second step (a position cache filled on first use
  did: a second multi-minute compile of ViT-B on a GPU). Dynamo's guards do not depend on the backend, so the cheap
  "eager" backend shows it; with and without the position tables made at construction."""
  import torch._dynamo  # pylint: disable=import-outside-toplevel
  dims_ = {"width": 32, "depth": 1, "mlp_dim": 64, "heads": 2}
  for method, sized in (("mixmae", {}), ("mae_s2", {"image_size": 16})):
    torch._dynamo.reset()
    model = torch_vit.build(method, enc=dims_, dec=dims_, patch_size=8, s2_channels=12, **sized)
    forward = torch.compile(model, backend="eager")
    batch = torch_vit.synthetic_batch(method, 2, 16, 12, 2, "cpu")
    with torch._dynamo.config.patch(error_on_recompile=True):
      for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
          forward(*batch)[0].backward()


def test_peer_keeps_the_other_sides_when_one_fails(tmp_path, monkeypatch, capsys):
  """A side whose child fails (here torch.compile) is recorded with its error and skipped in later repeats; the
  others' numbers are kept in the summary line and the record, and the exit code still says it failed."""
  from benchmarks import peer  # pylint: disable=import-outside-toplevel
  calls = []

  def fake_child(argv, side, tree, hlo=False, timeout_s=0):
    calls.append(side)
    if side == "torch_compile":
      raise peer.SideFailed("the PyTorch torch.compile side failed (exit 1):\nInductorError: boom")
    speed = {"jax": 30.0, "torch": 20.0}[side]
    return {"images_per_s": speed, "params": 1000, "device_kind": "cpu", "compile_s": 1.0, "last_loss": 1.0}

  monkeypatch.setattr(peer, "run_child", fake_child)
  out = tmp_path / "peer.jsonl"
  with pytest.raises(SystemExit, match="1 of 3 sides failed"):
    peer.main(["--method=mixmae", "--size=mu", "--torch_compile", "--repeats=2", f"--json_out={out}"])
  assert calls == ["jax", "torch", "torch_compile", "jax", "torch"]
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["jax_images_per_s"] == 30.0 and summary["torch_images_per_s"] == 20.0
  assert summary["ratio_vs_eager"] == 1.5 and summary["torch_compile_images_per_s"] is None
  assert summary["ratio_vs_compile"] is None
  record = json.loads(out.read_text())
  assert "InductorError: boom" in record["errors"]["torch_compile"]
  assert [r["side"] for r in record["runs"] if "error" in r] == ["torch_compile"]


def test_gpu_suite_cpu_smoke_packs_its_results_into_out_and_imports_them(tmp_path):
  """`gpu_suite.sh --cpu_smoke`, in the shape the device call returns: --out holds only the packed files (the device
  machine sends back at most 8, no folders needed); the cuDNN check fails on the CPU, is recorded with its error and
  the JAX stages fall back to XLA attention; the other stages run; `pack import` appends the section and its plot."""
  results = tmp_path / "RESULTS.md"
  results.write_text("# Benchmark results\n")
  real = os.path.join(REPO, "benchmarks", "RESULTS.md")
  out = tmp_path / "out"
  env = {**os.environ, "PYTHON": sys.executable}
  env.pop("XLA_FLAGS", None)  # one CPU device in the children, as a user's run
  proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_suite.sh"), "--cpu_smoke", f"--out={out}",
                         f"--work={tmp_path / 'work'}", f"--results={results}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert str(out) not in open(real, encoding="utf-8").read()  # nothing appended to the real RESULTS.md
  assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.tar.gz", "peer.jsonl", "section.md", "stages.jsonl"]
  assert proc.stdout.rstrip().splitlines()[-1].startswith("section appended to")
  assert "| stage | status | s | result or error |" in proc.stdout  # the table, printed last

  stages = {s["stage"]: s for s in map(json.loads, (out / "stages.jsonl").read_text().splitlines())}
  assert stages["attention_check"]["status"] == "failed" and "cuDNN" in stages["attention_check"]["error_line"]
  assert {"versions", "peer_mixmae", "step_mixmae_b4_noremat", "step_mixmae_b8_remat", "step_mixmae_b8_accum2",
          "data_w0"} <= set(stages)
  assert {n: s["status"] for n, s in stages.items() if s["status"] != "ok"} == {"attention_check": "failed"}
  assert stages["versions"]["result"]["jax"] == jax.__version__
  assert stages["step_mixmae_b8_accum2"]["result"]["batch_size"] == 8

  with tarfile.open(out / "gpu_suite.tar.gz") as tar:
    files = {name.split("/", 1)[1]: name for name in tar.getnames() if "/" in name}
    suite_log = tar.extractfile(files["suite.log"]).read().decode()
    peer_log = tar.extractfile(files["peer_mixmae.log"]).read().decode()
  assert "--attention=xla" in suite_log and "--config.model.attention=xla" in suite_log  # the fallback switch
  # benchmarks.peer's last line: exactly the JSON keys, equal parameter counts.
  summary = json.loads(peer_log.strip().splitlines()[-1])
  assert list(summary) == ["method", "jax_images_per_s", "torch_images_per_s", "torch_compile_images_per_s",
                           "ratio_vs_eager", "ratio_vs_compile", "params_jax", "params_torch", "device_kind"]
  assert summary["method"] == "mixmae" and summary["params_jax"] == summary["params_torch"] > 0
  assert summary["jax_images_per_s"] > 0 and summary["torch_images_per_s"] > 0
  assert summary["torch_compile_images_per_s"] > 0  # the GPU run's flags: bfloat16 and torch.compile
  assert summary["ratio_vs_compile"] == pytest.approx(
      summary["jax_images_per_s"] / summary["torch_compile_images_per_s"], rel=1e-3)
  record = json.loads((out / "peer.jsonl").read_text().splitlines()[-1])
  assert {r["side"] for r in record["runs"]} == {"jax", "torch", "torch_compile"} and record["batch"] == 2
  assert record["dtype"] == "bfloat16" and record["errors"] == {}
  assert record["torch_compile_backend"] == "aot_eager"  # traced as on the GPU, no C++ kernel builds

  text = results.read_text()
  assert text.startswith("# Benchmark results\n") and "## GPU suite (`benchmarks/gpu_suite.sh`)" in text
  assert "| mixmae | ViT-mu/16px, decoder mux1, b2, bfloat16 |" in text  # the peer row
  assert "| mixmae | config | 8 | accum2 |" in text and "| data_w0 |" in text
  assert "- attention_check: failed (exit 1): failed: `cudnn attention at (8, 64, 12, 64) failed: " in text
  png = re.search(r"!\[mmrs vs PyTorch\]\((.+?)\)", text)
  assert png and (tmp_path / png.group(1)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (tmp_path / "results").is_dir() and len(list((tmp_path / "results").glob("gpu_suite_*.jsonl"))) == 2


def test_gemm_bound_reads_the_dots_of_optimized_hlo_and_replays_them_in_torch():
  """benchmarks.gemm_bound: every dot of a compiled module (batched, transposed operands) is found with its shapes
  and dimension numbers, counted, and its PyTorch replay computes the same product."""
  from benchmarks import gemm_bound  # pylint: disable=import-outside-toplevel

  def fn(a, b, x, w):  # a batched dot with a transposed rhs, then a weight-gradient-like dot twice
    s = jax.numpy.einsum("bhqd,bhkd->bhqk", a, b)
    return s.sum() + (x.T @ w).sum() + (x.T @ (2 * w)).sum()

  args = [np.random.default_rng(i).standard_normal(s, dtype=np.float32)
          for i, s in enumerate([(2, 3, 5, 4), (2, 3, 6, 4), (7, 8), (7, 9)])]
  dots = gemm_bound.parse_dots(jax.jit(fn).lower(*args).compile().as_text())
  assert sum(d["count"] for d in dots) >= 2
  batched = [d for d in dots if d["dims"]["lhs_batch"]]
  assert batched and batched[0]["out"][-2:] in ([5, 6], [6, 5]) and gemm_bound.flops(batched[0]) == 2 * 6 * 30 * 4
  for d in dots:
    rng = np.random.default_rng(0)
    lhs, rhs = rng.standard_normal(d["lhs"], dtype=np.float32), rng.standard_normal(d["rhs"], dtype=np.float32)
    dn = ((tuple(d["dims"]["lhs_contracting"]), tuple(d["dims"]["rhs_contracting"])),
          (tuple(d["dims"]["lhs_batch"]), tuple(d["dims"]["rhs_batch"])))
    want = np.asarray(jax.lax.dot_general(lhs, rhs, dn))
    got = gemm_bound.torch_dot(torch.from_numpy(lhs), torch.from_numpy(rhs), d["dims"]).numpy()
    assert list(got.shape) == d["out"], gemm_bound.describe(d)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
