"""Export to Hugging Face transformers / timm naming: the exported models compute the same features as `embed`.

The parity tests need torch, transformers and timm (the `[export]` extra: torch==2.14.1 torchvision==0.29.1
transformers==5.23.0 timm==1.0.31, pinned in pyproject.toml). requirements.txt, and so CI, does not install them:
that torch is a CUDA build of ~5.5 GB, too big for CI's install. They are skipped there, with the reason; the
names/shapes/card tests run everywhere. Run them with e.g.
  python3.11 -m venv /tmp/venv_export && /tmp/venv_export/bin/pip install -r requirements.txt ".[export]"
"""
import importlib.util
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mmrs
from mmrs import bands as B
from mmrs.finetune import convert, export
from mmrs.models import resnet, vit

import tiny_encoder

REPO = pathlib.Path(__file__).resolve().parents[1]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
HAVE_HF = HAVE_TORCH and importlib.util.find_spec("transformers") is not None
NOT_IN_CI = ("not in requirements.txt (CI installs them from requirements-ci.txt); pip install \"mmrs[export]\" "
             "(torch==2.14.1 torchvision==0.29.1 transformers==5.23.0 timm==1.0.31)")
needs_hf = pytest.mark.skipif(not HAVE_HF, reason="torch/transformers not installed; " + NOT_IN_CI)


def _timm_unavailable() -> str:
  """Why timm cannot be imported here ("" if it can). timm imports torchvision, whose compiled ops must match the
  installed torch: PyPI's torchvision 0.28.0 beside the local CPU-only torch 2.13.0 wheel fails with "operator
  torchvision::nms does not exist"; the `[export]` pair torch 2.14.1 + torchvision 0.29.1 imports."""
  missing = [m for m in ("torch", "transformers", "timm") if importlib.util.find_spec(m) is None]
  if missing:
    return f"{'/'.join(missing)} not installed; " + NOT_IN_CI
  try:
    import timm  # pylint: disable=import-outside-toplevel,unused-import
  except Exception as e:  # pylint: disable=broad-except  (ImportError, or torchvision's RuntimeError)
    return (f"timm does not import here ({type(e).__name__}: {e}); it needs torchvision built for this torch: "
            "pip install torch==2.14.1 torchvision==0.29.1")
  return ""


needs_timm = pytest.mark.skipif(bool(_timm_unavailable()), reason=_timm_unavailable() or "timm imports")
P, SIZE, WIDTH, DEPTH = 4, 8, 32, 2
random_params = tiny_encoder.random_params  # one definition for every test that needs well-scaled random params
NORM = {"source": "test", "s2": {"bands": list(B.S2_L1C_BANDS), "mean": [1000.0] * 13, "std": [500.0] * 13},
        "s1": {"bands": ["VV", "VH"], "mean": [-12.0, -19.0], "std": [5.0, 6.0]}}


@pytest.fixture(scope="module")
def vit_params():
  module = vit.ViTEncoder(WIDTH, DEPTH, 64, 2, patch_size=P, in_channels={"s2": 13, "s1": 2})
  return random_params(module, 1, s2=jnp.zeros((1, SIZE, SIZE, 13)), s1=jnp.zeros((1, SIZE, SIZE, 2)))["params"]


def _converted(params, tmp_path, modalities):
  variables, meta = convert.convert({"encoder": params}, {}, trained_bands={"s2": B.S2_L1C_BANDS, "s1": B.S1_BANDS},
                                    normalization=NORM, modalities=modalities, image_size=SIZE)
  out = tmp_path / f"enc_{modalities.replace(',', '_')}"
  convert.save(str(out), variables, meta)
  return str(out)


def _inputs(enc, seed=0):
  rng = np.random.default_rng(seed)
  return {m: rng.normal(size=(2, SIZE, SIZE, len(enc.bands[m]))).astype(np.float32) for m in enc.modalities}


@needs_hf
@pytest.mark.parametrize("modalities", ["s2", "s1", "s1,s2"])
def test_hf_vit_matches_embed(vit_params, tmp_path, modalities):
  import torch
  import transformers

  enc_dir = _converted(vit_params, tmp_path, modalities)
  enc = mmrs.load_encoder(enc_dir)
  out = tmp_path / "hf"
  export.export(enc_dir, "hf", str(out))
  config = json.loads((out / "config.json").read_text())
  assert config["layer_norm_eps"] == 1e-6 and config["hidden_act"] == "gelu"
  model, info = transformers.ViTModel.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  x = _inputs(enc)
  channels_first = np.concatenate([x[m] for m in ("s2", "s1") if m in x], axis=-1).transpose(0, 3, 1, 2)
  with torch.no_grad():
    hf = model(pixel_values=torch.from_numpy(channels_first)).last_hidden_state.numpy()
  np.testing.assert_allclose(hf, np.asarray(enc.embed(**x)), atol=1e-4)
  assert config["mmrs"]["channel_order"] == [b for m in ("s2", "s1") if m in x for b in enc.bands[m]]


def test_timm_names_shapes_and_sidecar(vit_params, tmp_path):
  from safetensors import safe_open
  from safetensors.numpy import load_file

  enc_dir = _converted(vit_params, tmp_path, "s1,s2")
  path = tmp_path / "vit.safetensors"
  export.export(enc_dir, "timm", str(path))
  sd = load_file(str(path))
  n = (SIZE // P) ** 2
  want = {"cls_token": (1, 1, WIDTH), "pos_embed": (1, 1 + n, WIDTH), "patch_embed.proj.weight": (WIDTH, 15, P, P),
          "patch_embed.proj.bias": (WIDTH,), "norm.weight": (WIDTH,), "norm.bias": (WIDTH,)}
  for i in range(DEPTH):
    want.update({f"blocks.{i}.norm1.weight": (WIDTH,), f"blocks.{i}.norm1.bias": (WIDTH,),
                 f"blocks.{i}.attn.qkv.weight": (3 * WIDTH, WIDTH), f"blocks.{i}.attn.qkv.bias": (3 * WIDTH,),
                 f"blocks.{i}.attn.proj.weight": (WIDTH, WIDTH), f"blocks.{i}.attn.proj.bias": (WIDTH,),
                 f"blocks.{i}.norm2.weight": (WIDTH,), f"blocks.{i}.norm2.bias": (WIDTH,),
                 f"blocks.{i}.mlp.fc1.weight": (64, WIDTH), f"blocks.{i}.mlp.fc1.bias": (64,),
                 f"blocks.{i}.mlp.fc2.weight": (WIDTH, 64), f"blocks.{i}.mlp.fc2.bias": (WIDTH,)})
  assert {k: v.shape for k, v in sd.items()} == want
  # Values: q/k/v rows in timm's (3, heads, head_dim) order; the CLS slot of pos_embed is zero, the rest is twice
  # the sin-cos table (one per summed modality).
  qkv = vit_params["blocks_0"]["attn"]["qkv"]["kernel"]  # (D, 3, heads, head_dim)
  np.testing.assert_array_equal(sd["blocks.0.attn.qkv.weight"][WIDTH:2 * WIDTH], qkv[:, 1].reshape(WIDTH, WIDTH).T)
  np.testing.assert_allclose(sd["pos_embed"][0, 0], 0.0)
  np.testing.assert_allclose(sd["pos_embed"][0, 1:], vit.sincos_2d(2, 2, WIDTH), atol=1e-6)  # once (fusion=sum)
  side = json.loads((tmp_path / "vit.json").read_text())
  with safe_open(str(path), "np") as f:
    assert json.loads(f.metadata()["mmrs"]) == side
  assert side["channel_order"] == list(B.S2_L1C_BANDS) + ["VV", "VH"]
  assert side["mean"][-2:] == [-12.0, -19.0]


def test_export_errors_name_the_problem(vit_params, tmp_path):
  enc_dir = _converted(vit_params, tmp_path, "s2")
  with pytest.raises(ValueError, match="converted encoder has"):
    export.export(enc_dir, "timm", str(tmp_path / "x.safetensors"), modalities=["s1"])
  with pytest.raises(FileNotFoundError, match="launch.convert_checkpoint"):
    export.export(str(tmp_path), "hf", str(tmp_path / "y"))


# --- ResNet (RS-BYOL backbone): torchvision / timm names --------------------------------------------------------

def _torch_resnet18(in_channels: int):
  """A minimal pure-torch ResNet-18 with torchvision's module names (torchvision itself does not load here)."""
  import torch.nn as tnn

  class Block(tnn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = tnn.BatchNorm2d(cout)
      self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = tnn.BatchNorm2d(cout)
      self.relu = tnn.ReLU()
      self.downsample = (tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else None)

    def forward(self, x):
      out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
      return self.relu(out + (x if self.downsample is None else self.downsample(x)))

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = tnn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
      self.bn1 = tnn.BatchNorm2d(64)
      self.relu, self.maxpool = tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)
      cin = 64
      for i, width in enumerate((64, 128, 256, 512)):
        setattr(self, f"layer{i + 1}", tnn.Sequential(Block(cin, width, 1 if i == 0 else 2), Block(width, width, 1)))
        cin = width

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      for i in range(4):
        x = getattr(self, f"layer{i + 1}")(x)
      return x.mean(dim=(2, 3))

  return Net()


def test_resnet_exports_in_torchvision_naming(tmp_path):
  from safetensors.numpy import load_file

  v = random_params(resnet.ResNet("resnet18"), 2, jnp.zeros((1, 32, 32, 1)), train=False)
  params, stats = v["params"], v["batch_stats"]
  enc_dir = tmp_path / "enc"
  variables, meta = convert.convert(
      {"online": {"backbone": params, "projector": {}}}, {"batch_stats": {"backbone": stats}},
      trained_bands={"s2": B.S2_10_20M_BANDS}, normalization=NORM, modalities="s2", image_size=32, bands="B04")
  convert.save(str(enc_dir), variables, meta)
  export.export(str(enc_dir), "timm", str(tmp_path / "r.safetensors"))
  sd = load_file(str(tmp_path / "r.safetensors"))
  assert sd["conv1.weight"].shape == (64, 1, 7, 7) and sd["bn1.running_var"].shape == (64,)
  assert "layer2.0.downsample.0.weight" in sd and "layer2.0.downsample.1.running_mean" in sd
  assert "layer1.0.downsample.0.weight" not in sd and not any(k.startswith("fc.") for k in sd)
  np.testing.assert_array_equal(sd["layer3.1.conv2.weight"], params["layer3_1"]["conv2"]["kernel"].transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(sd["layer4.0.bn1.running_mean"], stats["layer4_0"]["bn1"]["mean"])
  if not HAVE_TORCH:
    pytest.skip("torch is not installed: names/values checked, forward parity skipped; " + NOT_IN_CI)
  import torch
  net = _torch_resnet18(1).eval()
  net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, strict=True)
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
  enc = mmrs.load_encoder(str(enc_dir))
  with torch.no_grad():
    want = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(np.asarray(enc.embed(s2=x)), want, atol=1e-4, rtol=1e-4)


# --- hub-ready exports: model card, preprocessor, pooling, timm config ------------------------------------------

def front_matter(text: str) -> dict:
  """The YAML front matter of a model card (flat keys and lists: all a card needs)."""
  assert text.startswith("---\n"), text[:80]
  out, key = {}, None
  for line in text[4:text.index("\n---\n", 4)].splitlines():
    if line.startswith("- "):
      out[key].append(json.loads(line[2:]))
    else:
      key, _, value = line.partition(":")
      out[key] = value.strip() or []
  return out


def test_hf_export_has_model_card_and_preprocessor(vit_params, tmp_path):
  enc_dir = _converted(vit_params, tmp_path, "s1,s2")
  out = tmp_path / "hf"
  files = export.export(enc_dir, "hf", str(out), license="cdla-permissive-1.0")
  assert {p.split("/")[-1] for p in files} == {"config.json", "model.safetensors", "preprocessor_config.json",
                                               "README.md", "mmrs.json"}
  card = (out / "README.md").read_text()
  fm = front_matter(card)
  assert fm["license"] == "cdla-permissive-1.0" and fm["library_name"] == "transformers"
  assert {"sentinel-2", "sentinel-1", "remote-sensing"} <= set(fm["tags"])
  # every input band in channel order, with its GSD, processing level and the encoder.json mean/std
  rows = [l for l in card.splitlines() if l.startswith("| ") and l[2].isdigit()]
  assert [r.split(" | ")[1] for r in rows] == list(B.S2_L1C_BANDS) + ["VV", "VH"]
  assert rows[0].split(" | ")[2] == "60" and rows[1].split(" | ")[2] == "10"  # B01 60 m, B02 10 m
  assert "L1C" in rows[0] and "dB" in rows[-1]
  assert [c.strip(" |") for c in rows[-1].split(" | ")][4:6] == ["-19", "6"]  # VH mean / std
  assert "pooling: **mean**" in card and "sum" in card and "last_hidden_state[:, 1:].mean(1)" in card
  config = json.loads((out / "config.json").read_text())
  assert config["pooling"] == "mean" and config["fusion"].startswith("sum")
  pre = json.loads((out / "preprocessor_config.json").read_text())
  assert pre["image_mean"] == NORM["s2"]["mean"] + NORM["s1"]["mean"] and not pre["do_resize"]
  assert not pre["do_rescale"]


@needs_hf
def test_hf_export_pools_and_preprocesses_like_mmrs(vit_params, tmp_path):
  import torch
  import transformers

  enc_dir = _converted(vit_params, tmp_path, "s2")
  enc = mmrs.load_encoder(enc_dir)
  out = tmp_path / "hf"
  export.export(enc_dir, "hf", str(out))
  model = transformers.ViTModel.from_pretrained(str(out)).eval()
  assert model.config.pooling == "mean"
  processor = transformers.ViTImageProcessor.from_pretrained(str(out))
  raw = np.random.default_rng(3).uniform(0, 4000, size=(2, SIZE, SIZE, 13)).astype(np.float32)
  pixels = processor(images=list(raw), input_data_format="channels_last", return_tensors="pt")["pixel_values"]
  np.testing.assert_allclose(pixels.numpy(), enc.normalize(s2=raw)["s2"].transpose(0, 3, 1, 2), rtol=1e-5,
                             atol=1e-5)
  with torch.no_grad():
    tokens = model(pixel_values=pixels).last_hidden_state
  want = np.asarray(enc.pool(enc.embed(s2=enc.normalize(s2=raw)["s2"])))
  np.testing.assert_allclose(tokens[:, 1:].mean(1).numpy(), want, atol=1e-4)


def test_timm_directory_export_carries_pretrained_cfg(vit_params, tmp_path):
  enc_dir = _converted(vit_params, tmp_path, "s2")
  out = tmp_path / "timm"
  export.export(enc_dir, "timm", str(out))
  cfg = json.loads((out / "config.json").read_text())
  pc, args = cfg["pretrained_cfg"], cfg["model_args"]
  assert pc["mean"] == NORM["s2"]["mean"] and pc["std"] == NORM["s2"]["std"]
  assert pc["input_size"] == [13, SIZE, SIZE] and pc["num_classes"] == 0
  assert args["in_chans"] == 13 and args["global_pool"] == "avg" and args["fc_norm"] is False
  assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"]) == (WIDTH, DEPTH, 2, P)
  assert front_matter((out / "README.md").read_text())["library_name"] == "timm"
  side = json.loads((out / "mmrs.json").read_text())
  assert side["timm"] == cfg and side["pooling"] == "mean" and side["fusion"].startswith("none")


@needs_timm
def test_timm_export_loads_with_pretrained_cfg_overlay(vit_params, tmp_path):
  import timm
  import torch

  enc_dir = _converted(vit_params, tmp_path, "s1,s2")
  enc = mmrs.load_encoder(enc_dir)
  out = tmp_path / "timm"
  export.export(enc_dir, "timm", str(out))
  cfg = json.loads((out / "config.json").read_text())
  model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                            pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
  model.eval()
  assert tuple(model.pretrained_cfg["mean"]) == tuple(cfg["pretrained_cfg"]["mean"])
  x = _inputs(enc)
  with torch.no_grad():
    got = model(torch.from_numpy(np.concatenate([x["s2"], x["s1"]], -1).transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, np.asarray(enc.pool(enc.embed(**x))), atol=1e-4)


@needs_timm
def test_resnet_timm_export_loads_in_timm(tmp_path):
  import timm
  import torch

  v = random_params(resnet.ResNet("resnet18"), 2, jnp.zeros((1, 32, 32, 2)), train=False)
  variables, meta = convert.convert(
      {"online": {"backbone": v["params"], "projector": {}}}, {"batch_stats": {"backbone": v["batch_stats"]}},
      trained_bands={"s2": B.S2_10_20M_BANDS}, normalization=NORM, modalities="s2", image_size=32, bands="B04,B08")
  enc_dir = tmp_path / "enc"
  convert.save(str(enc_dir), variables, meta)
  out = tmp_path / "timm"
  export.export(str(enc_dir), "timm", str(out))
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["architecture"] == "resnet18" and cfg["pretrained_cfg"]["input_size"] == [2, 32, 32]
  model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                            pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 2)).astype(np.float32)
  enc = mmrs.load_encoder(str(enc_dir))
  with torch.no_grad():
    got = model.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, np.asarray(enc.pool(enc.embed(s2=x))), atol=1e-4, rtol=1e-4)


def _python_blocks(markdown: str) -> list[str]:
  return re.findall(r"```python\n(.*?)```", markdown, re.S)


@needs_timm
def test_readme_and_model_card_loading_code_runs_and_matches_mmrs(tmp_path, monkeypatch):
  """README's transformers/timm block, run as written (on tiny exports in runs/), and the cards' load snippets give
  mmrs' pooled features of the bundled chip."""
  import torch

  # 12 L2A bands from the 13-band L1C chip, like the demo encoder the README exports
  enc_dir = tiny_encoder.write_encoder(tmp_path / "enc", tiny_encoder.vit_params(patch=4, size=8), image_size=16,
                                       bands=B.S2_L2A_BANDS)
  export.export(enc_dir, "hf", str(tmp_path / "runs" / "hf_vit"))
  export.export(enc_dir, "timm", str(tmp_path / "runs" / "timm_vit"))
  (tmp_path / "data_prep").symlink_to(REPO / "data_prep")
  monkeypatch.chdir(tmp_path)
  [block] = [b for b in _python_blocks((REPO / "README.md").read_text()) if "timm.create_model" in b]
  ns = {}
  exec(compile(block, "README.md", "exec"), ns)  # pylint: disable=exec-used
  enc = mmrs.load_encoder(enc_dir)
  raw = ns["raw_nhwc"]
  import rasterio
  with rasterio.open(REPO / "data_prep" / "samples" / "sentinel2_l1c" / "s2_l1c_chip0_r240_c240.tif") as src:
    chip = np.moveaxis(src.read(window=((0, 16), (0, 16))), 0, -1).astype(np.float32)
  np.testing.assert_array_equal(raw[0], chip[..., B.band_indices(B.S2_L1C_BANDS, B.S2_L2A_BANDS)])
  want = np.asarray(enc.pool(enc.embed(**enc.normalize(s2=raw))))
  np.testing.assert_allclose(ns["hf_features"].numpy(), want, atol=1e-4)
  np.testing.assert_allclose(ns["timm_features"].numpy(), want, atol=1e-4)
  # The cards' "Load in ..." code, with PATH and raw given (the card leaves `raw = ...` to the reader).
  for fmt in ("hf_vit", "timm_vit"):
    card = (tmp_path / "runs" / fmt / "README.md").read_text()
    [code] = [b for b in _python_blocks(card) if "PATH" in b and "mmrs" not in b]
    code = "\n".join(l for l in code.splitlines() if not l.startswith("raw = ..."))
    ns = {"PATH": str(tmp_path / "runs" / fmt), "raw": raw}
    exec(compile(code, f"{fmt}/README.md", "exec"), ns)  # pylint: disable=exec-used
    np.testing.assert_allclose(torch.as_tensor(ns["features"]).numpy(), want, atol=1e-4, err_msg=fmt)
