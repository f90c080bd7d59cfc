"""Pretraining checkpoint -> encoder-only checkpoint for finetuning, export and `mmrs.load_encoder`.

A converted encoder is a directory with
  encoder.safetensors  the variables, flattened: "params/blocks_0/attn/qkv/kernel", ... (+ "batch_stats/..." for a
                       ResNet); float32
  encoder.json         {"format", "architecture", "modalities", "bands", "normalization", "image_size",
                        "patch_size", "pooling" (ViT: mean | cls), "token_layout" (ViT: concat | sum),
                        "source": {checkpoint, step, method, config_digest}, "conversion": {...}}
"normalization" and "pooling" are the conventions every user of the encoder follows (mmrs/finetune/encoder_api.py).
"token_layout" is how S1 and S2 met in the encoder's training, what finetune.fusion defaults to: "sum" for the
plain JointMAE baseline (one token per position from the concatenated channels, which the split entry layers
reproduce as a per-position sum), "concat" for every encoder with per-modality entry layers (JointMAE's 2L tokens,
MixMAE's per-position S1-or-S2 tokens); a converted finetune run records its finetune.fusion.

What conversion does (ViT encoders of the MAE family; RS-BYOL's ResNet backbone):
- keeps the encoder only: decoders, BYOL projector/predictor and the EMA target are dropped;
- keeps the entry layers (`patch_embed_<m>`, `modality_embed_<m>`) of the requested modalities only;
- selects / reorders S2 (and S1) bands by name by slicing the entry layer's input channels: an L1C-pretrained
  model finetuned on L2A drops B10's weights. The result equals the original model fed that band at its mean
  (normalized value 0). A band or modality the model never saw is an error;
- patch-size change: the entry kernel is resampled with FlexiViT's pseudo-inverse resize (Beyer et al. 2023):
  for the bilinear resize matrix B (old p x p patch -> new patch), w_new = pinv(B^T) w_old, so that
  <resize(x), w_new> = <x, w_old> for every old-size patch x when upsampling (exact), and in the least-squares
  sense when downsampling;
- position embeddings: the encoder's are fixed 2D sin-cos, recomputed for whatever grid the images give, so
  nothing is stored; a learned `pos_embed` param (not used by mmrs' ViT, kept for imported models) is resampled
  to the new grid bicubically, as MAE's `interpolate_pos_embed` and timm's `resample_abs_pos_embed` do
  (`interpolate_pos_embed`: PyTorch's bicubic, a = -0.75, align_corners=False, no antialiasing; any grid shape).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from mmrs import atomic_io
from mmrs import bands as bands_lib
from mmrs.models import layout
from mmrs.train import checkpoint as ckpt_lib

FORMAT = "mmrs-encoder-v1"
WEIGHTS_FILE = "encoder.safetensors"
META_FILE = "encoder.json"
MODALITIES = ("s2", "s1")
VIT_LAYER_NORM_EPS = 1e-6  # mmrs/models/vit.py's LayerNorm epsilon
_BLOCK = re.compile(r"blocks_(\d+)$")


class ConversionError(ValueError):
  """A conversion request the checkpoint cannot satisfy; the message says what the checkpoint has."""


# --- tree helpers ------------------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      out.update(flatten(v, key))
    else:
      out[key] = np.asarray(v)
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  out: dict = {}
  for key, v in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return out


def _plain(tree):
  """Unboxes flax partitioning metadata and moves arrays to host numpy float32 (ints kept)."""
  from flax import linen as nn  # lazily: converting needs no jax compile

  tree = nn.meta.unbox(tree)
  def to_np(x):
    a = np.asarray(x)
    return a.astype(np.float32) if a.dtype.kind == "f" else a
  return _map(to_np, tree)


def _map(fn, tree):
  if isinstance(tree, Mapping):
    return {k: _map(fn, v) for k, v in tree.items()}
  return fn(tree)


# --- locating the encoder in a method's params ---------------------------------------------------------------------

def extract_encoder(params: Mapping[str, Any], state: Mapping[str, Any] | None) -> tuple[str, dict, dict]:
  """(kind, encoder params, encoder batch_stats) from a pretraining method's params/state.

  kind "vit": params["encoder"] (MAE, AuxMAE, MixMAE, JointMAE) or a finetune run's params["encoder"];
  kind "resnet": RS-BYOL's params["online"]["backbone"] with state["batch_stats"]["backbone"] (the online network:
  the EMA target is not what the paper finetunes).
  """
  params = layout.unstack_blocks(_plain(params))  # scan_layers checkpoints stack the blocks
  state = _plain(state or {})
  if "encoder" in params:
    enc = params["encoder"]
    stats = (state.get("batch_stats") or {}).get("encoder", {})
    return ("vit" if _is_vit(enc) else "resnet"), enc, stats
  online = params.get("online")
  if isinstance(online, Mapping) and "backbone" in online:
    backbone = online["backbone"]
    stats = (state.get("batch_stats") or {}).get("backbone", {})
    if _is_vit(backbone):
      return "vit", backbone, {}
    if "vit" in backbone:
      raise ConversionError("This RS-BYOL checkpoint has a ViT backbone whose entry layers are per view, not per "
                            "modality; converting it is not supported (use the ResNet backbone or a MAE-family "
                            "method).")
    return "resnet", backbone, stats
  raise ConversionError(f"Cannot find an encoder in the checkpoint params (top-level keys {sorted(params)}); "
                        "expected 'encoder' (MAE family, finetune runs) or 'online/backbone' (RS-BYOL).")


def _is_vit(tree: Mapping[str, Any]) -> bool:
  return any(k.startswith("patch_embed_") for k in tree)


def vit_architecture(enc: Mapping[str, Any], bands: Mapping[str, Sequence[str]]) -> dict:
  """Reads width / depth / mlp_dim / heads / patch size off the parameter shapes (robust to config key names)."""
  mods = [k[len("patch_embed_"):] for k in enc if k.startswith("patch_embed_")]
  m = mods[0]
  if m not in bands:
    raise ConversionError(f"The checkpoint has an entry layer for {m!r} but its metadata names no {m} bands "
                          f"(it names {sorted(bands)}).")
  kin, width = enc[f"patch_embed_{m}"]["kernel"].shape
  p2 = kin // len(bands[m])
  patch = int(round(p2 ** 0.5))
  if patch * patch * len(bands[m]) != kin:
    raise ConversionError(f"patch_embed_{m} kernel has {kin} inputs, which is not p*p*{len(bands[m])} for the "
                          f"{len(bands[m])} {m} bands {list(bands[m])} of the checkpoint metadata.")
  depth = sum(1 for k in enc if _BLOCK.match(k))
  block = enc["blocks_0"]
  qkv = block["attn"]["qkv"]["kernel"]  # (D, 3, heads, head_dim)
  return dict(kind="vit", width=int(width), depth=int(depth), mlp_dim=int(block["mlp"]["fc1"]["kernel"].shape[1]),
              num_heads=int(qkv.shape[2]), patch_size=patch, use_cls_token="cls" in enc,
              layer_norm_eps=VIT_LAYER_NORM_EPS, hidden_act="gelu_exact", position_embedding="sincos2d_no_cls")


def resnet_architecture(enc: Mapping[str, Any]) -> dict:
  from mmrs.models import resnet  # pylint: disable=g-import-not-at-top

  stages = []
  for i in range(1, 5):
    stages.append(sum(1 for k in enc if re.fullmatch(rf"layer{i}_\d+", k)))
  bottleneck = "conv3" in enc["layer1_0"]
  kind = "bottleneck" if bottleneck else "basic"
  size = next((n for n, (k, s) in resnet.RESNET_SIZES.items() if k == kind and tuple(s) == tuple(stages)), None)
  if size is None:
    raise ConversionError(f"ResNet with {kind} blocks {stages} matches no size in mmrs/models/resnet.py.")
  in_channels = int(enc["conv1"]["kernel"].shape[2])
  return dict(kind="resnet", size=size, in_channels=in_channels)


# --- entry-layer surgery -------------------------------------------------------------------------------------------

def select_entry_channels(kernel: np.ndarray, patch: int, have: Sequence[str], want: Sequence[str],
                          modality: str) -> np.ndarray:
  """(p*p*C_have, D) entry kernel -> (p*p*C_want, D) with the input channels of `want`, in that order."""
  unknown = [b for b in want if b not in have]
  if unknown:
    raise ConversionError(f"--bands asks for {modality} band(s) {unknown} that the pretrained model never saw; it "
                          f"was trained on {list(have)}. Choose among those.")
  idx = bands_lib.band_indices(have, want)
  k = kernel.reshape(patch, patch, len(have), -1)[:, :, idx, :]
  return k.reshape(patch * patch * len(want), -1)


def resize_matrix(old: int, new: int) -> np.ndarray:
  """(new*new, old*old) matrix B of the bilinear resize of an old x old patch to new x new (B x = resize(x))."""
  import jax  # pylint: disable=g-import-not-at-top

  eye = np.eye(old * old, dtype=np.float32).reshape(old * old, old, old)  # one basis patch per row
  cols = np.asarray(jax.image.resize(eye, (old * old, new, new), "bilinear", antialias=False), np.float64)
  return cols.reshape(old * old, new * new).T


def resize_patch_kernel(kernel: np.ndarray, old: int, new: int, channels: int) -> np.ndarray:
  """FlexiViT pseudo-inverse resize of a (p*p*C, D) entry kernel (pixel order (py, px, c)) to patch size `new`."""
  if old == new:
    return kernel
  b = resize_matrix(old, new)  # (new^2, old^2)
  pinv = np.linalg.pinv(b.T)  # (new^2, old^2)
  d = kernel.shape[-1]
  w = np.asarray(kernel, np.float64).reshape(old * old, channels * d)
  return (pinv @ w).astype(np.float32).reshape(new * new * channels, d)


def bicubic_matrix(old: int, new: int, a: float = -0.75) -> np.ndarray:
  """(new, old) matrix of PyTorch's 1-D bicubic resampling (`F.interpolate(mode="bicubic", align_corners=False)`
  without antialiasing): output i samples the input at x = (i + 0.5) * old / new - 0.5 with Keys' cubic kernel
  (a = -0.75, PyTorch's choice; jax.image.resize's "cubic" uses a = -0.5 and renormalizes at the borders, so it is
  not what MAE/timm checkpoints were resampled with), reading beyond the border as the edge value."""
  def kernel(t):
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  x = (np.arange(new, dtype=np.float64) + 0.5) * (old / new) - 0.5
  base = np.floor(x)
  frac = x - base
  out = np.zeros((new, old), np.float64)
  rows = np.arange(new)
  for k in range(-1, 3):
    np.add.at(out, (rows, np.clip(base.astype(int) + k, 0, old - 1)), kernel(frac - k))
  return out


def interpolate_pos_embed(pos: np.ndarray, old_grid: tuple[int, int], new_grid: tuple[int, int],
                          num_prefix: int = 1) -> np.ndarray:
  """Learned (1, prefix + gh*gw, D) position embeddings (row-major grid) -> (1, prefix + new_h*new_w, D), resampled
  bicubically per axis as MAE/timm do (`bicubic_matrix`); prefix (CLS) tokens are kept. Grids may be non-square."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  (oh, ow), (nh, nw) = tuple(old_grid), tuple(new_grid)
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  d = grid.shape[-1]
  if grid.shape[1] != oh * ow:
    raise ConversionError(f"pos_embed has {grid.shape[1]} grid tokens, not {oh}x{ow} (+{num_prefix} prefix).")
  grid = np.asarray(grid, np.float64).reshape(oh, ow, d)
  new = np.einsum("ih,jw,hwd->ijd", bicubic_matrix(oh, nh), bicubic_matrix(ow, nw), grid)
  return np.concatenate([prefix, new.reshape(1, nh * nw, d).astype(pos.dtype)], axis=1)


# --- the conversion ------------------------------------------------------------------------------------------------

def parse_modalities(spec: str | Sequence[str]) -> tuple[str, ...]:
  # "s1,s2" or "s1+s2" (the "+" form fits inside a config argument, where commas separate keys).
  mods = tuple(s.strip() for s in spec.replace("+", ",").split(",") if s.strip()) if isinstance(spec, str) else tuple(
      spec)
  bad = [m for m in mods if m not in MODALITIES]
  if not mods or bad:
    raise ConversionError(f"--modalities={spec!r}: use s2, s1 or s1,s2 (or s1+s2).")
  return tuple(m for m in MODALITIES if m in mods)  # canonical order s2, s1


def split_bands(spec: str | Sequence[str] | None, modalities: Sequence[str],
                trained: Mapping[str, Sequence[str]]) -> dict[str, tuple[str, ...]]:
  """--bands (S2 and/or S1 names, any mix) -> modality -> bands; a modality not named keeps its trained bands."""
  names = bands_lib.parse_band_list(spec) or ()
  out = {}
  for m in modalities:
    reg = bands_lib.MODALITY_BANDS[m]
    mine = tuple(b for b in names if b in reg)
    out[m] = mine or tuple(trained[m])
  stray = [b for b in names if not any(b in bands_lib.MODALITY_BANDS[m] for m in modalities)]
  if stray:
    raise ConversionError(f"--bands names {stray}, which belong to none of the requested modalities "
                          f"{list(modalities)}.")
  return out


def split_plain_entry(enc: Mapping[str, Any], trained_bands: Mapping[str, Sequence[str]],
                      modalities: Sequence[str]) -> dict:
  """JointMAE's plain baseline (`jointmae_plain`) has one entry layer `patch_embed_s1s2` over the S1 and S2 channels
  concatenated (S1 first; patch pixels in (py, px, c) order). Splits it into per-modality entry layers that compute
  exactly the plain encoder's token: W_s1 x_s1 + W_s2 x_s2 + bias + modality_embed_s1s2 (+ position). The bias and
  the modality embedding go to S2 (to S1 when S1 is the only modality requested), the other modality gets zeros,
  so S1+S2 input with finetune.fusion=sum is the plain encoder itself, and one modality alone is the plain encoder
  with the other modality at its normalized mean (0)."""
  if "patch_embed_s1s2" not in enc:
    return dict(enc)
  for m in ("s1", "s2"):
    if m not in trained_bands:
      raise ConversionError(f"A jointmae_plain checkpoint needs {m} bands in its metadata (it names "
                            f"{sorted(trained_bands)}).")
  c1, c2 = len(trained_bands["s1"]), len(trained_bands["s2"])
  kernel, bias = np.asarray(enc["patch_embed_s1s2"]["kernel"]), np.asarray(enc["patch_embed_s1s2"]["bias"])
  kin, width = kernel.shape
  if kin % (c1 + c2):
    raise ConversionError(f"patch_embed_s1s2 kernel has {kin} inputs, not p*p*{c1 + c2} for the checkpoint's S1 "
                          f"and S2 bands.")
  k = kernel.reshape(kin // (c1 + c2), c1 + c2, width)
  carrier = "s1" if tuple(modalities) == ("s1",) else "s2"
  zeros = np.zeros_like(bias)
  out = {key: v for key, v in enc.items() if key not in ("patch_embed_s1s2", "modality_embed_s1s2")}
  for m, part in (("s1", k[:, :c1]), ("s2", k[:, c1:])):
    out[f"patch_embed_{m}"] = {"kernel": part.reshape(-1, width), "bias": bias if m == carrier else zeros}
    out[f"modality_embed_{m}"] = (np.asarray(enc["modality_embed_s1s2"]) if m == carrier else
                                  np.zeros_like(np.asarray(enc["modality_embed_s1s2"])))
  return out


def convert_vit(enc: Mapping[str, Any], trained_bands: Mapping[str, Sequence[str]], modalities: Sequence[str],
                bands: Mapping[str, Sequence[str]], image_size: int,
                patch_size: int | None = None) -> tuple[dict, dict]:
  """Returns (converted encoder params, architecture dict)."""
  enc = split_plain_entry(enc, trained_bands, modalities)
  arch = vit_architecture(enc, trained_bands)
  have_mods = sorted(k[len("patch_embed_"):] for k in enc if k.startswith("patch_embed_"))
  missing = [m for m in modalities if m not in have_mods]
  if missing:
    raise ConversionError(f"--modalities asks for {missing}, but the pretrained encoder has entry layers only for "
                          f"{have_mods}; it never saw {missing}.")
  old_p = arch["patch_size"]
  new_p = patch_size or old_p
  out = {k: v for k, v in enc.items() if not k.startswith(("patch_embed_", "modality_embed_"))}
  for m in modalities:
    kernel = select_entry_channels(enc[f"patch_embed_{m}"]["kernel"], old_p, trained_bands[m], bands[m], m)
    kernel = resize_patch_kernel(kernel, old_p, new_p, len(bands[m]))
    out[f"patch_embed_{m}"] = {"kernel": kernel, "bias": enc[f"patch_embed_{m}"]["bias"]}
    out[f"modality_embed_{m}"] = enc[f"modality_embed_{m}"]
  if image_size % new_p:
    raise ConversionError(f"--image_size={image_size} is not a multiple of the patch size {new_p}.")
  if "pos_embed" in out:  # learned (1, prefix + g*g, D), square grid: interpolate to the new grid
    prefix = 1 if arch["use_cls_token"] else 0
    old_g = int(round((out["pos_embed"].shape[1] - prefix) ** 0.5))
    g = image_size // new_p
    out["pos_embed"] = interpolate_pos_embed(out["pos_embed"], (old_g, old_g), (g, g), prefix)
  arch = dict(arch, patch_size=new_p)
  return out, arch


def convert_resnet(enc: Mapping[str, Any], trained_bands: Mapping[str, Sequence[str]], modalities: Sequence[str],
                   bands: Mapping[str, Sequence[str]]) -> dict:
  """RS-BYOL's backbone is band-agnostic (any band of its pool, C input channels): checks the request."""
  arch = resnet_architecture(enc)
  if len(modalities) != 1:
    raise ConversionError("A ResNet (RS-BYOL) backbone takes one modality at a time: use --modalities=s2 or s1.")
  m = modalities[0]
  pool = trained_bands.get(m)
  if not pool:
    raise ConversionError(f"The RS-BYOL checkpoint saw no {m} bands (it saw {sorted(trained_bands)}).")
  unknown = [b for b in bands[m] if b not in pool]
  if unknown:
    raise ConversionError(f"--bands asks for {m} band(s) {unknown} that the pretrained model never saw; its view "
                          f"pool was {list(pool)}.")
  c = arch["in_channels"]
  if len(bands[m]) != c:
    raise ConversionError(f"The ResNet backbone takes {c} channel(s); give --bands with exactly {c} {m} band(s) "
                          f"from {list(pool)} (e.g. --bands={','.join(pool[:c])}).")
  return arch


def config_digest(config: Any) -> str:
  text = config.to_json_best_effort(sort_keys=True) if hasattr(config, "to_json_best_effort") else json.dumps(
      config, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def convert(params, state, *, trained_bands: Mapping[str, Sequence[str]], normalization: Mapping[str, Any],
            modalities: str | Sequence[str], image_size: int, bands: str | Sequence[str] | None = None,
            patch_size: int | None = None, source: Mapping[str, Any] | None = None) -> tuple[dict, dict]:
  """In-memory conversion: (variables {"params"[, "batch_stats"]}, encoder.json dict).

  trained_bands: modality -> bands the model was pretrained on (the checkpoint's band metadata);
  normalization: the pretraining normalizer's JSON ({modality: {bands, mean, std}, "source"}).
  """
  kind, enc, stats = extract_encoder(params, state)
  modalities = parse_modalities(modalities)
  unknown = [m for m in modalities if m not in trained_bands]
  if unknown:
    raise ConversionError(f"--modalities asks for {unknown}, but the checkpoint was pretrained on "
                          f"{sorted(trained_bands)} only.")
  want = split_bands(bands, modalities, trained_bands)
  if kind == "vit":
    layout = "sum" if "patch_embed_s1s2" in enc else "concat"  # one channel-concatenated entry layer: the plain one
    new_params, arch = convert_vit(enc, trained_bands, modalities, want, image_size, patch_size)
    variables = {"params": new_params}
    patch = arch["patch_size"]
  else:
    if patch_size:
      raise ConversionError("--patch_size applies to ViT encoders only; this checkpoint has a ResNet backbone.")
    arch = convert_resnet(enc, trained_bands, modalities, want)
    variables = {"params": enc, "batch_stats": stats}
    patch = None
  norm = {"source": normalization.get("source", "")}
  for m in modalities:
    entry = normalization.get(m)
    if not entry:
      raise ConversionError(f"The checkpoint's normalization metadata has no {m} statistics.")
    idx = bands_lib.band_indices(entry["bands"], want[m])
    norm[m] = {"bands": list(want[m]), "mean": [float(entry["mean"][i]) for i in idx],
               "std": [float(entry["std"][i]) for i in idx]}
  meta = dict(format=FORMAT, architecture=arch, modalities=list(modalities),
              bands={m: list(want[m]) for m in modalities}, normalization=norm, image_size=int(image_size),
              patch_size=patch, source=dict(source or {}),
              conversion=dict(trained_bands={m: list(b) for m, b in trained_bands.items()},
                              patch_resize="flexivit_pinv_bilinear" if kind == "vit" else None,
                              position_embedding="sincos2d recomputed for the image grid" if kind == "vit" else None))
  if kind == "vit":
    meta["token_layout"] = layout
  return variables, meta


# --- files ---------------------------------------------------------------------------------------------------------

def save(out_dir: str, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  atomic_io.makedirs(out_dir)
  flat = {k: np.ascontiguousarray(v) for k, v in flatten(variables).items()}
  atomic_io.write_with(os.path.join(out_dir, WEIGHTS_FILE),
                       lambda tmp: save_file(flat, tmp, metadata={"format": FORMAT}))
  atomic_io.write_json(os.path.join(out_dir, META_FILE), meta)


def load(path: str) -> tuple[dict, dict]:
  """(variables, meta) of a converted encoder directory."""
  from safetensors.numpy import load as load_bytes  # pylint: disable=g-import-not-at-top

  wpath, mpath = os.path.join(path, WEIGHTS_FILE), os.path.join(path, META_FILE)
  try:  # read, not tested for existence first: one round trip fewer on gs://
    meta, weights = json.loads(atomic_io.read_text(mpath)), atomic_io.read_bytes(wpath)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path} is not a converted encoder (needs {WEIGHTS_FILE} and {META_FILE}); create one "
                            "with `python -m launch.convert_checkpoint --checkpoint=WORKDIR --out=DIR ...`.") from None
  if meta.get("format") != FORMAT:
    raise ValueError(f"{mpath} has format {meta.get('format')!r}, expected {FORMAT!r}.")
  return layout.unstack_blocks(unflatten(load_bytes(weights))), meta  # either block layout (mmrs/models/layout.py)


# --- reading a pretraining checkpoint (mmrs/train/checkpoint.py layout) -------------------------------------------

def find_step_dir(path: str) -> str:
  """A workdir, its checkpoints/ folder, or one step folder -> the step folder (the newest complete step)."""
  from etils import epath  # pylint: disable=g-import-not-at-top

  p = epath.Path(path)
  if (p / "state").exists() and (p / "meta").exists():
    return str(p)
  root = p / "checkpoints" if (p / "checkpoints").exists() else p
  steps = sorted((int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / "meta").exists()),
                 reverse=True) if root.exists() else []
  if not steps:
    raise FileNotFoundError(f"--checkpoint={path}: no checkpoint found (expected WORKDIR/checkpoints/<step>/"
                            "{state,meta}, or a step folder). Train first, or point at the run's workdir.")
  return str(root / str(steps[0]))


def read_checkpoint(path: str) -> tuple[dict, dict, dict]:
  """(params, method_state, meta) of a checkpoint as host numpy arrays; the optimizer state is not read."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  step_dir = ckpt_lib.absolute(find_step_dir(path))
  meta = json.loads((step_dir / "meta" / "metadata").read_text())
  ckptr = ocp.PyTreeCheckpointer()
  md = ckptr.metadata(step_dir / "state")
  tree = getattr(md, "item_metadata", md)
  tree = getattr(tree, "tree", tree)
  want = {k: tree[k] for k in ("params", "method_state") if k in tree and tree[k]}
  if "params" not in want:
    raise ConversionError(f"{step_dir}/state holds no 'params' (it has {sorted(tree)}).")
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want)
  state = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
      item=want, restore_args=restore_args, partial_restore=True))
  meta.setdefault("step", int(step_dir.name) if step_dir.name.isdigit() else None)
  meta["checkpoint_dir"] = str(step_dir)
  return state["params"], state.get("method_state") or {}, meta


def pretraining_bands(meta: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
  """Modality -> the bands the encoder was trained on, from the checkpoint metadata.

  MAE family: config.bands.{s2,s1}; RS-BYOL: its view-1 band pool (config.views.s2_bands, default the 10 bands at
  10/20 m) and VV, VH; otherwise the bands the tasks' pipelines delivered (meta["bands"][task]).
  """
  config = meta.get("config") or {}
  out: dict[str, tuple[str, ...]] = {}
  for task_bands in (meta.get("bands") or {}).values():
    for m, names in (task_bands or {}).items():
      out.setdefault(m, tuple(names))
  cfg_bands = config.get("bands") or {}
  for m in MODALITIES:
    if cfg_bands.get(m):
      out[m] = bands_lib.parse_band_list(cfg_bands[m])
  if config.get("method") == "rsbyol":
    pool = bands_lib.parse_band_list((config.get("views") or {}).get("s2_bands", "")) or bands_lib.S2_10_20M_BANDS
    out["s2"], out["s1"] = tuple(pool), bands_lib.S1_BANDS
  if not out:
    raise ConversionError(f"The checkpoint metadata ({meta.get('checkpoint_dir')}) names no bands.")
  return out


def pretraining_normalization(meta: Mapping[str, Any], bands: Mapping[str, Sequence[str]]) -> dict:
  """The normalizer the pretraining used, as JSON, for `bands` (from the tasks' stats.json in the metadata)."""
  from mmrs.data import normalize as normalize_lib  # pylint: disable=g-import-not-at-top

  out: dict[str, Any] = {}
  sources = []
  for m, names in bands.items():
    stats = next((s for s in (meta.get("stats") or {}).values() if s and (s.get(m) or {}).get("bands")), None)
    if stats is None:
      norm = normalize_lib.Normalizer.from_published({m: names})
    else:
      norm = normalize_lib.Normalizer.from_stats(stats, {m: names}, source="pretraining stats.json")
    out[m] = norm.to_json()[m]
    sources.append(norm.source)
  out["source"] = "; ".join(sorted(set(sources)))
  return out


def convert_checkpoint(checkpoint: str, out: str, *, modalities: str | Sequence[str], image_size: int,
                       bands: str | Sequence[str] | None = None, patch_size: int | None = None) -> dict:
  """Reads a pretraining checkpoint, converts its encoder, writes `out`; returns the encoder.json dict."""
  params, method_state, meta = read_checkpoint(checkpoint)
  trained = pretraining_bands(meta)
  norm = pretraining_normalization(meta, trained)
  config = meta.get("config") or {}
  data = {k: v.get("shards") for k, v in (config.get("data") or {}).items() if isinstance(v, dict) and v.get("shards")}
  source = dict(checkpoint=os.path.abspath(meta["checkpoint_dir"]), step=meta.get("step"),
                method=config.get("method"), config_digest=config_digest(config), data=data)
  variables, enc_meta = convert(params, method_state, trained_bands=trained, normalization=norm,
                                modalities=modalities, image_size=image_size, bands=bands, patch_size=patch_size,
                                source=source)
  if enc_meta["architecture"]["kind"] == "vit":  # the pooling mmrs used: a finetune run's finetune.pool, else mean
    enc_meta["pooling"] = (config.get("finetune") or {}).get("pool", "mean") or "mean"
    fusion = (config.get("finetune") or {}).get("fusion")  # a finetune run: the layout it finetuned with
    if fusion:
      enc_meta["token_layout"] = fusion
  save(out, variables, enc_meta)
  return enc_meta
