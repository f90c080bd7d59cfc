"""Model cards (README.md with YAML front matter, as the Hugging Face Hub reads them) for exported encoders.

The card says what a user needs to feed the weights correctly: the input bands in channel order with their ground
sample distance and processing level, the per-band normalization (the encoder.json statistics: the convention of
mmrs/finetune/encoder_api.py), image and patch size, the pooling mmrs used, how S1+S2 inputs are fused, how to load
the files in transformers and timm, and where the weights came from (method, checkpoint step, pretraining data).
Everything is read from the sidecar dict that `export.sidecar` builds, so the card and the JSON never disagree.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from mmrs import bands as bands_lib

METHOD_NAMES = {"mae_s2": "MAE (Sentinel-2 only)", "auxmae": "AuxMAE (Linial et al.)", "mixmae": "MixMAE (Linial et al.)",
                "jointmae": "JointMAE (Zhang et al.)", "jointmae_plain": "plain MAE on concatenated S1+S2 channels",
                "rsbyol": "RS-BYOL (Jain et al.)", "finetune": "mmrs finetuning"}


def processing_level(info: Mapping[str, Any], modality: str) -> str:
  if modality == "s1":
    return "Sentinel-1 GRD, backscatter in dB (clipped to [-50, 30])"
  trained = (info.get("trained_bands") or {}).get("s2") or info["bands"].get("s2", ())
  # L2A products carry no B10 (cirrus): pretrained with B10 means L1C top-of-atmosphere data; the 12 other bands
  # are the L2A set; a smaller pool (RS-BYOL's 10 bands) does not tell.
  if "B10" in trained:
    return "Sentinel-2 L1C (top of atmosphere), reflectance x 1e4"
  if set(trained) == set(bands_lib.S2_L2A_BANDS):
    return "Sentinel-2 L2A (bottom of atmosphere), reflectance x 1e4"
  return "Sentinel-2 (L1C or L2A: not recorded), reflectance x 1e4"


def _yaml_list(items) -> str:
  return "".join(f"- {json.dumps(str(i))}\n" for i in items)


def render(info: Mapping[str, Any], fmt: str) -> str:
  """The README.md text for an export directory (`fmt` hf | timm)."""
  arch, source = info["architecture"], info.get("source") or {}
  method = source.get("method") or "unknown"
  mods = info["modalities"]
  vit = arch["kind"] == "vit"
  tags = ["remote-sensing", "earth-observation", "satellite-imagery", "mmrs"]
  tags += [{"s2": "sentinel-2", "s1": "sentinel-1"}[m] for m in mods]
  tags += ["multispectral"] if "s2" in mods else []
  tags += ["sar"] if "s1" in mods else []
  tags += [method.replace("_", "-")] if method != "unknown" else []
  tags += ["vision-transformer" if vit else "resnet"]
  library = "transformers" if fmt == "hf" else "timm"
  lines = ["---", f"license: {info.get('license', 'apache-2.0')}", f"library_name: {library}",
           "pipeline_tag: image-feature-extraction", "tags:", _yaml_list(tags).rstrip("\n")]
  data = source.get("data") or {}  # local paths, not Hub dataset ids: named in the body, not as `datasets:`
  lines.append("---")
  name = " ".join(w for w in ("mmrs", method if method != "unknown" else "", "ViT" if vit else arch.get("size", "ResNet"),
                               f"encoder ({'+'.join(m.upper() for m in mods)})") if w)
  lines += ["", f"# {name}", ""]
  lines += [f"An encoder pretrained with **{METHOD_NAMES.get(method, method)}** in "
            "mmrs (JAX/Flax multi-modal Sentinel-1 + Sentinel-2 pretraining), exported to "
            f"{'Hugging Face `transformers.ViTModel`' if fmt == 'hf' else 'timm'} naming. It computes the same "
            "features as `mmrs.load_encoder(...).embed(...)` (tested to 1e-4).", ""]
  lines += ["## Provenance", "",
            f"- pretraining method: `{method}`; checkpoint step {source.get('step', 'not recorded')}; config "
            f"digest `{source.get('config_digest') or 'not recorded'}`",
            f"- pretraining data: {', '.join(f'`{k}`: `{v}`' for k, v in sorted(data.items())) or 'not recorded'}",
            f"- normalization statistics: {info.get('normalization_source') or 'not recorded'}",
            "- produced by `python -m launch.convert_checkpoint` (encoder only, bands selected by name) then "
            f"`python -m launch.export --format={fmt}`", ""]
  lines += ["## Inputs", "",
            f"{len(info['channel_order'])} channels, NCHW, in this order (image size {info['image_size']} x "
            f"{info['image_size']} px" + (f", patch size {info['patch_size']}" if vit else "") + "):", "",
            "| channel | band | GSD (m) | processing level | mean | std |", "|---|---|---|---|---|---|"]
  i = 0
  for m in mods:
    for b in info["bands"][m]:
      band = bands_lib.BANDS.get(b)
      lines.append(f"| {i} | {b} | {band.resolution_m if band else '?'} | {processing_level(info, m)} | "
                   f"{info['mean'][i]:.6g} | {info['std'][i]:.6g} |")
      i += 1
  lines += ["", "Normalization: `x = (raw - mean) / std` per channel, with raw S2 reflectance x 1e4 (uint16 as "
            "distributed) and S1 dB clipped to [-50, 30] first. These are the encoder's own statistics (recorded at "
            "conversion), the ones mmrs uses wherever the encoder is used; 20 m / 60 m bands are resampled to the "
            "10 m grid (nearest neighbour) as in pretraining.", ""]
  fusion = info.get("fusion", "")
  lines += ["## Pooling and fusion", "",
            f"- pooling: **{info['pooling']}** — " + {
                "mean": "mmrs' heads average the patch tokens (CLS excluded) after the final LayerNorm. In "
                        "transformers use `last_hidden_state[:, 1:].mean(1)` (`pooler_output` is tanh(dense(CLS)) "
                        "and is not what mmrs uses); in timm the model args set `global_pool='avg', fc_norm=False`.",
                "cls": "mmrs' heads take the CLS token after the final LayerNorm: `last_hidden_state[:, 0]` in "
                       "transformers, `global_pool='token'` in timm.",
                "avg": "the ResNet's global average pool (timm/torchvision `global_pool='avg'`)."}[info["pooling"]],
            f"- fusion: {fusion}", ""]
  if fmt == "hf":
    lines += ["## Load in transformers", "", "```python", "import numpy as np, torch",
              "from transformers import ViTImageProcessor, ViTModel", "",
              "model = ViTModel.from_pretrained(PATH).eval()",
              "processor = ViTImageProcessor.from_pretrained(PATH)   # per-band mean/std, no resize or rescale",
              f"raw = ...  # (B, {info['image_size']}, {info['image_size']}, {len(info['channel_order'])}) float32, "
              "channels as in the table (S1 dB already clipped)",
              "x = processor(images=list(raw), input_data_format='channels_last', return_tensors='pt')",
              "with torch.no_grad():", "  tokens = model(**x).last_hidden_state",
              "features = tokens[:, 1:].mean(1)" if info["pooling"] == "mean" else "features = tokens[:, 0]",
              "```", ""]
  if fmt == "timm":
    lines += ["## Load in timm", "", "```python", "import json, timm, torch", "",
              "cfg = json.load(open(f\"{PATH}/config.json\"))   # architecture, model_args, pretrained_cfg",
              "model = timm.create_model(cfg['architecture'], pretrained=True, **cfg['model_args'],",
              "                          pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], "
              "file=f\"{PATH}/model.safetensors\")).eval()",
              f"raw = ...  # (B, {info['image_size']}, {info['image_size']}, {len(info['channel_order'])}) float32 numpy, "
              "channels as in the table (S1 dB already clipped)",
              "mean, std = (torch.tensor(model.pretrained_cfg[k])[:, None, None] for k in ('mean', 'std'))",
              "with torch.no_grad():",
              "  features = model((torch.from_numpy(raw).permute(0, 3, 1, 2) - mean) / std)   # pooled (B, D)",
              "```", "", "For transformers, export the same encoder with `python -m launch.export --format=hf`.", ""]
  else:
    lines += ["## Load in timm", "", "These files use transformers' names. For timm, export the same encoder with "
              "`python -m launch.export --format=timm --out=DIR`: DIR/config.json then holds the timm "
              "`architecture`, `model_args` (global_pool, fc_norm) and `pretrained_cfg` (mean/std per band, "
              "input size, channels) for `timm.create_model(..., pretrained_cfg_overlay=...)`.", ""]
  lines += ["## Load in mmrs", "", "```python", "import mmrs",
            "enc = mmrs.load_encoder(ENCODER_DIR)   # the launch.convert_checkpoint directory this export came from",
            "features = enc.pool(enc.embed(**enc.normalize(s2=raw_s2)))", "```", ""]
  return "\n".join(lines)
