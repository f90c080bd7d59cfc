"""Export a converted encoder to Hugging Face `transformers.ViTModel` or timm state-dict naming (safetensors).

ViT (both formats): the per-modality entry layers are folded into ONE strided-conv patch embedding over the
concatenated input channels, in the order [S2 bands..., S1 bands...] (written in the sidecar JSON):
  conv weight (D, C_s2 + C_s1, p, p) = the entry kernels side by side, bias = sum of entry biases + modality
  embeddings. Position embeddings: the sin-cos table once (mmrs's finetune.fusion=sum adds it once per position),
  as a learned table for the converted grid with a zero CLS slot (mmrs gives the CLS token no position). Hence exact
  for an S2-only export, an S1-only export, and an S1+S2 export fed both modalities, which represents fusion=SUM
  (one token per position); finetune.fusion=concat (2L tokens) has no single-conv ViT form and is not exported.
  To use one modality of a two-modality encoder, export with `modalities=("s2",)`.
  LayerNorm eps 1e-6 and exact GELU are written into config.json (HF defaults are 1e-12 and gelu).
  Fusion: an S1+S2 export therefore represents mmrs' `sum` fusion (S1 and S2 tokens added per position), the one
  `mmrs.load_encoder(...).embed(s2=..., s1=...)` computes; a per-modality token concatenation (2L tokens) is not a
  single patch embedding and cannot be exported this way. A single-modality export is exact for that modality.
HF: a directory with config.json + model.safetensors (classic ViT names, `encoder.layer.N.attention.attention.query`,
which transformers 4.x loads as is and 5.x renames on load) + preprocessor_config.json (ViTImageProcessor with the
per-band mean/std, no resize / rescale) + README.md (model card) + mmrs.json. The pooler is the identity (+ tanh) on
CLS, i.e. NOT mmrs' pooling: config.json "pooling" says what mmrs used (mean = last_hidden_state[:, 1:].mean(1)).
timm: `VisionTransformer` names (`patch_embed.proj`, `blocks.N.attn.qkv`, `pos_embed`, ...); ResNet: torchvision /
timm names (`conv1.weight`, `bn1.running_mean`, `layer1.0.conv1.weight`, `layer1.0.downsample.0.weight`, ...).
A directory export holds model.safetensors + config.json in timm's hub layout ({"architecture", "model_args",
"pretrained_cfg": mean/std per band, input_size, ...}) + README.md + mmrs.json; `timm.create_model(architecture,
pretrained=True, pretrained_cfg_overlay=dict(pretrained_cfg, file=...), **model_args)` builds and loads it, with
global_pool="avg" and fc_norm=False for mmrs' mean pooling. A `.safetensors` file export carries the same in its
sidecar JSON ("timm").
The bands / normalization / pooling JSON travels in the safetensors metadata ("mmrs") and a sidecar JSON, and
follows the conventions of mmrs/finetune/encoder_api.py (the encoder.json statistics; its pooling).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mmrs import atomic_io
from mmrs.finetune import convert
from mmrs.finetune import encoder_api
from mmrs.finetune import model_card

FORMATS = ("hf", "timm")
# timm architecture whose defaults match a ViT width (model_args override every size field anyway).
TIMM_VIT_NAMES = {192: "vit_tiny_patch16_224", 384: "vit_small_patch16_224", 768: "vit_base_patch16_224",
                  1024: "vit_large_patch16_224", 1280: "vit_huge_patch14_224"}


def _conv_weight(kernel: np.ndarray, patch: int, channels: int) -> np.ndarray:
  """Dense entry kernel (p*p*C, D), pixel order (py, px, c) -> torch conv weight (D, C, p, p)."""
  return kernel.reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)


def fold_entry_layers(params: Mapping[str, Any], meta: Mapping[str, Any], modalities: Sequence[str]):
  """(conv weight (D, C, p, p), conv bias (D,), position table (1 + N, D)) for the given modalities."""
  from mmrs.models import vit  # pylint: disable=g-import-not-at-top

  arch = meta["architecture"]
  p, d = arch["patch_size"], arch["width"]
  weights, bias = [], np.zeros(d, np.float64)
  for m in modalities:
    weights.append(_conv_weight(np.asarray(params[f"patch_embed_{m}"]["kernel"]), p, len(meta["bands"][m])))
    bias += np.asarray(params[f"patch_embed_{m}"]["bias"], np.float64)
    bias += np.asarray(params[f"modality_embed_{m}"], np.float64)
  g = meta["image_size"] // p
  pos = vit.sincos_2d(g, g, d)  # once: mmrs's fusion=sum keeps one position embedding per position
  pos = np.concatenate([np.zeros((1, d), np.float32), pos], axis=0)
  return np.concatenate(weights, axis=1), bias.astype(np.float32), pos.astype(np.float32)


def _check_modalities(meta, modalities):
  modalities = tuple(modalities or meta["modalities"])
  bad = [m for m in modalities if m not in meta["modalities"]]
  if bad:
    raise ValueError(f"Export asks for {bad} but the converted encoder has {meta['modalities']}.")
  return tuple(m for m in convert.MODALITIES if m in modalities)


def fusion(meta: Mapping[str, Any], modalities: Sequence[str]) -> str:
  if meta["architecture"]["kind"] == "resnet" or len(modalities) == 1:
    return "none: single-modality input"
  return ("sum: the S1 and S2 patch tokens at a position are added (each with its entry layer, modality embedding "
          "and position embedding), folded here into one patch embedding over the concatenated channels")


def timm_config(meta: Mapping[str, Any], info: Mapping[str, Any]) -> dict:
  """timm hub config.json: architecture, model_args (the encoder's shape and mmrs' pooling), pretrained_cfg."""
  arch = meta["architecture"]
  channels, size = len(info["channel_order"]), int(meta["image_size"])
  if arch["kind"] == "resnet":
    name, features = arch["size"], 512 if arch["size"] in ("resnet18", "resnet34") else 2048
    model_args = dict(in_chans=channels, num_classes=0, global_pool="avg")
    first_conv, classifier, fixed = "conv1", "fc", False
  else:
    d, pool = arch["width"], info["pooling"]
    name, features = TIMM_VIT_NAMES.get(d, "vit_base_patch16_224"), d
    model_args = dict(img_size=size, patch_size=arch["patch_size"], in_chans=channels, embed_dim=d,
                      depth=arch["depth"], num_heads=arch["num_heads"], mlp_ratio=arch["mlp_dim"] / d, qkv_bias=True,
                      class_token=bool(arch["use_cls_token"]), global_pool="avg" if pool == "mean" else "token",
                      fc_norm=False, num_classes=0)
    first_conv, classifier, fixed = "patch_embed.proj", "head", True
  pretrained_cfg = dict(architecture=name, input_size=[channels, size, size], fixed_input_size=fixed,
                        mean=list(info["mean"]), std=list(info["std"]), num_classes=0, crop_pct=1.0,
                        crop_mode="center", interpolation="bilinear", first_conv=first_conv, classifier=classifier,
                        license=info.get("license", ""),  # only PretrainedCfg fields: timm rejects others
                        description="mmrs encoder; input channels " + ",".join(info["channel_order"]) +
                        f"; pooling {info['pooling']}")
  return dict(architecture=name, num_classes=0, num_features=features, global_pool=model_args["global_pool"],
              model_args=model_args, pretrained_cfg=pretrained_cfg)


def sidecar(meta: Mapping[str, Any], modalities: Sequence[str], fmt: str, license: str = "apache-2.0") -> dict:
  """Bands, channel order, normalization, pooling and fusion, for whoever loads the exported weights."""
  channels = [b for m in modalities for b in meta["bands"][m]]
  norm = encoder_api.encoder_normalizer(meta).to_json()
  info = dict(format=f"mmrs-export-{fmt}", modalities=list(modalities), channel_order=channels,
              bands={m: meta["bands"][m] for m in modalities},
              mean=[v for m in modalities for v in norm[m]["mean"]], std=[v for m in modalities for v in norm[m]["std"]],
              normalization_source=norm.get("source", ""), s1_db_clip=[-50.0, 30.0],
              image_size=meta["image_size"], patch_size=meta.get("patch_size"), architecture=meta["architecture"],
              pooling=encoder_api.pooling(meta), fusion=fusion(meta, modalities), license=license,
              trained_bands=(meta.get("conversion") or {}).get("trained_bands", {}), source=meta.get("source", {}),
              note="Inputs: raw values (S2 reflectance x 1e4, S1 dB clipped to s1_db_clip) minus mean, divided by std, "
                   "channels in channel_order, NCHW. Features: pool the tokens as `pooling` says.")
  info["timm"] = timm_config(meta, info)
  return info


def preprocessor_config(info: Mapping[str, Any]) -> dict:
  """transformers ViTImageProcessor settings: per-band standardization only (inputs are raw sensor values, already at
  the model's size: no resize, no 1/255 rescale)."""
  size = int(info["image_size"])
  return dict(image_processor_type="ViTImageProcessor", do_resize=False, do_rescale=False, do_normalize=True,
              image_mean=list(info["mean"]), image_std=list(info["std"]), size={"height": size, "width": size},
              num_channels=len(info["channel_order"]), channel_order=list(info["channel_order"]))


def vit_to_hf(params, meta, modalities) -> tuple[dict, dict]:
  """(state dict, config.json dict) for transformers.ViTModel."""
  arch = meta["architecture"]
  d, heads = arch["width"], arch["num_heads"]
  if not arch["use_cls_token"]:
    raise ValueError("transformers.ViTModel always has a CLS token; this encoder has none: use --format=timm.")
  w, b, pos = fold_entry_layers(params, meta, modalities)
  sd = {"embeddings.cls_token": params["cls"], "embeddings.position_embeddings": pos[None],
        "embeddings.patch_embeddings.projection.weight": w, "embeddings.patch_embeddings.projection.bias": b,
        "layernorm.weight": params["norm"]["scale"], "layernorm.bias": params["norm"]["bias"],
        "pooler.dense.weight": np.eye(d, dtype=np.float32), "pooler.dense.bias": np.zeros(d, np.float32)}
  for i in range(arch["depth"]):
    blk, pre = params[f"blocks_{i}"], f"encoder.layer.{i}."
    qkv_k, qkv_b = np.asarray(blk["attn"]["qkv"]["kernel"]), np.asarray(blk["attn"]["qkv"]["bias"])
    for j, name in enumerate(("query", "key", "value")):
      sd[pre + f"attention.attention.{name}.weight"] = qkv_k[:, j].reshape(d, d).T
      sd[pre + f"attention.attention.{name}.bias"] = qkv_b[j].reshape(d)
    sd[pre + "attention.output.dense.weight"] = np.asarray(blk["attn"]["out"]["kernel"]).reshape(d, d).T
    sd[pre + "attention.output.dense.bias"] = blk["attn"]["out"]["bias"]
    sd[pre + "intermediate.dense.weight"] = np.asarray(blk["mlp"]["fc1"]["kernel"]).T
    sd[pre + "intermediate.dense.bias"] = blk["mlp"]["fc1"]["bias"]
    sd[pre + "output.dense.weight"] = np.asarray(blk["mlp"]["fc2"]["kernel"]).T
    sd[pre + "output.dense.bias"] = blk["mlp"]["fc2"]["bias"]
    sd[pre + "layernorm_before.weight"], sd[pre + "layernorm_before.bias"] = blk["norm1"]["scale"], blk["norm1"]["bias"]
    sd[pre + "layernorm_after.weight"], sd[pre + "layernorm_after.bias"] = blk["norm2"]["scale"], blk["norm2"]["bias"]
  config = {
      "architectures": ["ViTModel"], "model_type": "vit", "hidden_size": d, "num_hidden_layers": arch["depth"],
      "num_attention_heads": heads, "intermediate_size": arch["mlp_dim"],
      "hidden_act": "gelu" if arch.get("hidden_act", "gelu_exact") == "gelu_exact" else "gelu_pytorch_tanh",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
      "layer_norm_eps": arch.get("layer_norm_eps", convert.VIT_LAYER_NORM_EPS), "image_size": meta["image_size"],
      "patch_size": arch["patch_size"], "num_channels": int(w.shape[1]), "qkv_bias": True,
      "encoder_stride": arch["patch_size"], "pooler_act": "tanh", "pooling": encoder_api.pooling(meta),
      "fusion": fusion(meta, modalities)}
  return _np32(sd), config


def vit_to_timm(params, meta, modalities) -> dict:
  """State dict in timm `VisionTransformer` naming (class_token=True, global_pool='token', fc_norm=False)."""
  arch = meta["architecture"]
  d = arch["width"]
  w, b, pos = fold_entry_layers(params, meta, modalities)
  sd = {"patch_embed.proj.weight": w, "patch_embed.proj.bias": b,
        "norm.weight": params["norm"]["scale"], "norm.bias": params["norm"]["bias"]}
  if arch["use_cls_token"]:
    sd["cls_token"], sd["pos_embed"] = params["cls"], pos[None]
  else:
    sd["pos_embed"] = pos[None, 1:]
  for i in range(arch["depth"]):
    blk, pre = params[f"blocks_{i}"], f"blocks.{i}."
    sd[pre + "attn.qkv.weight"] = np.asarray(blk["attn"]["qkv"]["kernel"]).reshape(d, 3 * d).T
    sd[pre + "attn.qkv.bias"] = np.asarray(blk["attn"]["qkv"]["bias"]).reshape(3 * d)
    sd[pre + "attn.proj.weight"] = np.asarray(blk["attn"]["out"]["kernel"]).reshape(d, d).T
    sd[pre + "attn.proj.bias"] = blk["attn"]["out"]["bias"]
    for n in ("fc1", "fc2"):
      sd[pre + f"mlp.{n}.weight"] = np.asarray(blk["mlp"][n]["kernel"]).T
      sd[pre + f"mlp.{n}.bias"] = blk["mlp"][n]["bias"]
    for n in ("norm1", "norm2"):
      sd[pre + f"{n}.weight"], sd[pre + f"{n}.bias"] = blk[n]["scale"], blk[n]["bias"]
  return _np32(sd)


def resnet_to_torchvision(params, batch_stats) -> dict:
  """Flax ResNet (mmrs/models/resnet.py names) -> torchvision / timm ResNet state dict (no `fc`)."""
  sd = {}

  def module_name(path: str) -> str:  # layer1_0/downsample_1 -> layer1.0.downsample.1
    path = re.sub(r"layer(\d+)_(\d+)", r"layer\1.\2", path)
    return path.replace("downsample_", "downsample.").replace("/", ".")

  flat_p, flat_s = convert.flatten(params), convert.flatten(batch_stats)
  for key, v in flat_p.items():
    mod, leaf = key.rsplit("/", 1)
    name = module_name(mod)
    if leaf == "kernel":  # conv (kh, kw, in, out) -> (out, in, kh, kw)
      sd[f"{name}.weight"] = np.asarray(v).transpose(3, 2, 0, 1)
    elif leaf == "scale":
      sd[f"{name}.weight"] = v
    elif leaf == "bias":
      sd[f"{name}.bias"] = v
    else:
      raise ValueError(f"Unexpected ResNet parameter {key!r}.")
  for key, v in flat_s.items():
    mod, leaf = key.rsplit("/", 1)
    name = module_name(mod)
    sd[f"{name}.running_{'mean' if leaf == 'mean' else 'var'}"] = v
    sd[f"{name}.num_batches_tracked"] = np.zeros((), np.int64)
  return _np32(sd)


def _np32(sd):
  return {k: np.ascontiguousarray(np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v))
          for k, v in sd.items()}


def _save_weights(sd, path, metadata):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  atomic_io.write_with(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


def export(encoder_dir: str, fmt: str, out: str, modalities: Sequence[str] | None = None,
           license: str = "apache-2.0") -> list[str]:
  """Writes the export; returns the files written. `license`: the model card's licence (mind the pretraining
  data's terms)."""
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r}: use one of {FORMATS}.")
  variables, meta = convert.load(encoder_dir)
  params = variables["params"]
  kind = meta["architecture"]["kind"]
  modalities = _check_modalities(meta, modalities)
  info = sidecar(meta, modalities, fmt, license)
  st_meta = {"mmrs": json.dumps(info, sort_keys=True), "format": "pt"}
  if kind == "resnet":
    if fmt == "hf":
      raise ValueError("A ResNet (RS-BYOL) encoder exports with --format=timm (torchvision/timm ResNet names); "
                       "transformers.ViTModel is for ViT encoders.")
    sd = resnet_to_torchvision(params, variables.get("batch_stats", {}))
  elif fmt == "hf":
    sd, config = vit_to_hf(params, meta, modalities)
    atomic_io.makedirs(out)
    config["mmrs"] = info
    files = {"model.safetensors": None, "config.json": config, "preprocessor_config.json": preprocessor_config(info),
             "mmrs.json": info}
    _save_weights(sd, os.path.join(out, "model.safetensors"), st_meta)
    for name, obj in files.items():
      if obj is not None:
        atomic_io.write_json(os.path.join(out, name), obj)
    atomic_io.write_text(os.path.join(out, "README.md"), model_card.render(info, "hf"))
    return [os.path.join(out, n) for n in (*files, "README.md")]
  else:
    sd = vit_to_timm(params, meta, modalities)
  if out.endswith(".safetensors"):
    atomic_io.makedirs(os.path.dirname(out) or ".")
    weights, side = out, out[:-len(".safetensors")] + ".json"
    _save_weights(sd, weights, st_meta)
    atomic_io.write_json(side, info)
    return [weights, side]
  atomic_io.makedirs(out)
  names = ("model.safetensors", "config.json", "mmrs.json", "README.md")
  weights, config, side, card = (os.path.join(out, n) for n in names)
  _save_weights(sd, weights, st_meta)
  atomic_io.write_json(config, info["timm"])
  atomic_io.write_json(side, info)
  atomic_io.write_text(card, model_card.render(info, "timm"))
  return [weights, config, side, card]
