"""The downstream model as a `Method` (mmrs/methods/base.py), so the pretraining train loop trains it unchanged.

params = {"encoder": ViT (or ResNet) params, "head": head params}; state = {"batch_stats": {"encoder"?, "head"?}}
(BatchNorm statistics of a ResNet encoder / MLP head; {} when there are none). One task "finetune" reads dataset
"train" with `finetune.modalities` and the label batch key `label_<finetune.label_set>`.

Scenarios: finetune (all params train) and frozen (`finetune.frozen=True`: the task trains only "head", and the
encoder features pass through `jax.lax.stop_gradient`, so no encoder backward pass is even built; a ResNet
encoder keeps its BatchNorm running statistics, as a linear probe should). A linear probe of a frozen ViT puts an
affine-free BatchNorm before its Dense (MAE's linear-probe protocol; `finetune.probe_batchnorm` auto | on | off,
mmrs/finetune/heads.py).
Modality dropout (`finetune.modality_dropout` p, S1+S2 ViT runs; default 0): in training each sample loses S1 or S2
with probability p/2 each and goes through the encoder's missing-modality path (the encoder given one modality),
so the robustness runner's missing_s1 / missing_s2 stresses measure a trained ability, not a zero-shot one.
Encoder weights: `init_from` = a converted encoder directory (launch.convert_checkpoint), or "" for a random init
from config.model / config.bands (the from-scratch baseline). `prepare_config(config)` (called by `build`) copies
the converted encoder's bands into config.bands (the data pipelines follow them) and fills the label-fraction
subset into config.data.train.indices.
S1+S2 input (`finetune.fusion`, default "": the converted encoder's encoder.json token_layout, i.e. the layout it
was pretrained with; an explicit contradicting choice is an error; "concat" for a random init): "concat" feeds the
encoder 2L tokens, each with its modality embedding
and one position embedding, as JointMAE's encoder saw them (MixMAE's per-position S1-or-S2 tokens are the L-token
special case); classification heads mean-pool all 2L tokens, segmentation heads get the mean of each position's two
tokens. "sum" adds the two modalities' tokens per position (one position embedding): the plain JointMAE baseline's
layout (its channel-concatenation entry layer, split by conversion, is exactly this sum).
The MAE finetune recipe (He et al. 2022, as BEiT): layer-wise lr decay (`finetune.layer_decay` d < 1: block i of
L trains at lr * d^(L - i), the entry layers at lr * d^(L + 1), final norm and head at lr; prepare_config hands it to
the optimizer as optimizer.layer_decay, mmrs/train/optimizers.py) and drop path (`model.drop_path_rate`: stochastic
depth rising linearly over the blocks, in training only, mmrs/models/vit.py). Both act on a trained ViT encoder:
with a frozen encoder they change nothing, and a ResNet encoder has neither (an error unless frozen).
`model.scan_layers` / `model.remat_policy` apply to the finetuned encoder as in pretraining (the converted encoder's
per-block weights are stacked on load).
ResNet encoders (RS-BYOL): one modality; classification on the pooled features, segmentation with head=aspp
(DeepLabV3: the backbone at output stride 8, its last two stages dilated instead of strided, and the ASPP head,
mmrs/finetune/heads.py), frozen or finetuned.
Losses: multilabel = sigmoid cross-entropy (mean over classes), class = softmax cross-entropy, segmentation =
per-pixel softmax cross-entropy over labelled pixels (-1 = ignore).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmrs import atomic_io
from mmrs import bands as bands_lib
from mmrs.finetune import convert
from mmrs.finetune import encoder_api
from mmrs.finetune import heads as heads_lib
from mmrs.methods import flops as flops_lib
from mmrs.methods.base import Task
from mmrs.models import layout
from mmrs.models import sizes

TASKS = ("multilabel", "class", "segmentation")
FUSIONS = ("concat", "sum")  # S1+S2 input: 2L tokens (as JointMAE/MixMAE pretrained) | one summed token per position
PROBE_BATCHNORM = ("auto", "on", "off")  # finetune.probe_batchnorm (mmrs/finetune/heads.py ClassifierHead)


def parse_modalities(spec: str) -> tuple[str, ...]:
  try:
    return convert.parse_modalities(spec)
  except convert.ConversionError:
    raise ValueError(f"finetune.modalities={spec!r}: use s2, s1 or s1,s2 (s1+s2 in a config argument).") from None


def encoder_meta(config) -> dict | None:
  """The converted encoder's encoder.json when `init_from` is set, else None."""
  path = config.get("init_from", "")
  if not path:
    return None
  try:  # a gs:// encoder too
    return json.loads(atomic_io.read_text(os.path.join(path, convert.META_FILE)))
  except FileNotFoundError:
    raise FileNotFoundError(f"init_from={path!r} has no {convert.META_FILE}: point it at a directory written by "
                            "`python -m launch.convert_checkpoint`, or set init_from='' for a random init.") from None


def pretrained_layout(meta: Mapping[str, Any] | None) -> str | None:
  """How S1 and S2 met in the encoder's training (encoder.json token_layout; encoders converted before it was
  recorded: "sum" for the plain JointMAE baseline), None for a random init or a ResNet."""
  if meta is None or meta["architecture"]["kind"] != "vit":
    return None
  if meta.get("token_layout"):
    return meta["token_layout"]
  return "sum" if (meta.get("source") or {}).get("method") == "jointmae_plain" else "concat"


def resolve_fusion(fusion: str, modalities, meta: Mapping[str, Any] | None, init_from: str | None) -> str:
  """finetune.fusion: "" = the encoder's pretraining token layout (concat for a random init); an explicit choice
  that contradicts the layout the encoder was pretrained with is refused for S1+S2 input."""
  if fusion and fusion not in FUSIONS:
    raise ValueError(f"finetune.fusion={fusion!r} is unknown; choose one of {FUSIONS} or '' (the encoder's).")
  layout = pretrained_layout(meta)
  if not fusion:
    return layout or "concat"
  if layout and fusion != layout and len(modalities) > 1:
    raise ValueError(f"finetune.fusion={fusion!r}, but the encoder in init_from={init_from!r} was pretrained with "
                     f"the {layout!r} token layout (encoder.json token_layout; method "
                     f"{(meta.get('source') or {}).get('method')!r}): finetuning it on another layout would compare "
                     f"it on inputs it never saw. Leave fusion unset (fusion='') or set fusion={layout}.")
  return fusion


def prepare_config(config) -> None:
  """Fills derived keys in place (idempotent): config.bands from the converted encoder, the label-fraction subset."""
  meta = encoder_meta(config)
  mods = parse_modalities(config.finetune.modalities)
  if meta is not None:
    missing = [m for m in mods if m not in meta["modalities"]]
    if missing:
      raise ValueError(f"finetune.modalities={config.finetune.modalities!r} needs {missing}, but the encoder in "
                       f"init_from={config.init_from!r} was converted for {meta['modalities']}; convert it again "
                       "with --modalities=s1,s2.")
    if "s1" in mods and tuple(meta["bands"]["s1"]) != bands_lib.S1_BANDS:
      raise ValueError(f"The encoder in init_from={config.init_from!r} takes S1 bands {meta['bands']['s1']}, but the "
                       "data pipeline always delivers VV, VH: convert it again without an S1 band subset.")
    if meta["architecture"]["kind"] == "vit":  # config_check tests image sizes against model.patch_size
      config.model.patch_size = int(meta["patch_size"])
    for m in meta["modalities"]:
      want = ",".join(meta["bands"][m])
      if config.bands.get(m) != want:
        logging.info("config.bands.%s <- %s (from %s)", m, want, config.init_from)
        config.bands[m] = want
  decay = float(config.finetune.get("layer_decay", 1.0))
  if not 0.0 < decay <= 1.0:
    raise ValueError(f"finetune.layer_decay={decay} must be in (0, 1]: 1.0 = off, MAE finetunes ViT-B with 0.65.")
  rate = float(config.model.get("drop_path_rate", 0.0))
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"model.drop_path_rate={rate} must be in [0, 1): 0 = off, MAE finetunes ViT-B with 0.1.")
  config.optimizer.layer_decay = decay  # the optimizer's copy (mmrs/train/optimizers.py reads config.optimizer)
  config.optimizer.layer_decay_groups = ("encoder",)
  fraction = float(config.finetune.label_fraction)
  train = config.data.train
  if fraction < 1.0 and not train.get("indices"):
    from mmrs.finetune import subsets  # pylint: disable=g-import-not-at-top
    train.indices = tuple(int(i) for i in subsets.training_indices(config, mods))


class Finetune:
  """config.method = "finetune"."""
  name = "finetune"

  def __init__(self, config):
    ft = config.finetune
    if ft.task not in TASKS:
      raise ValueError(f"finetune.task={ft.task!r} is unknown; choose one of {TASKS}.")
    self.config, self.task = config, ft.task
    self.modalities = parse_modalities(ft.modalities)
    self.frozen = bool(ft.frozen)
    self.label_key = f"label_{ft.label_set}"
    self.num_classes = int(ft.num_classes)
    self.dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    self.meta = encoder_meta(config)
    self.fusion = resolve_fusion(ft.get("fusion", ""), self.modalities, self.meta, config.get("init_from"))
    self.pretrained = None
    if self.meta is not None:
      variables, _ = convert.load(config.init_from)
      self.pretrained = variables
      meta = dict(self.meta, bands={m: self.meta["bands"][m] for m in self.modalities})
      self.encoder = encoder_api.build_module(meta, self.dtype, config.model.get("dropout_rate", 0.0))
      if self.meta["architecture"]["kind"] == "vit":  # run-time options of this run, not of the checkpoint
        from mmrs.models import vit  # pylint: disable=g-import-not-at-top
        self.encoder = self.encoder.clone(attention=config.model.get("attention", "auto"),
                                          drop_path_rate=float(config.model.get("drop_path_rate", 0.0)),
                                          **vit.stack_options(config.model))
      self.kind = self.meta["architecture"]["kind"]
    else:
      self.kind = "resnet" if config.model.get("backbone", "vit").startswith("resnet") else "vit"
      self.encoder = self._random_encoder(config)
    if self.kind == "resnet" and len(self.modalities) != 1:
      raise ValueError("A ResNet encoder takes one modality (finetune.modalities=s2 or s1).")
    if self.task == "segmentation" and (self.kind == "resnet") != (ft.head == "aspp"):
      raise ValueError(f"finetune.head={ft.head!r} with a {self.kind} encoder: a ResNet encoder segments with "
                       "head=aspp (DeepLabV3, the RS-BYOL paper's DFC2020 model), a ViT with linear or vitlite.")
    if self.kind == "resnet" and self.task == "segmentation":
      self.encoder = self.encoder.clone(output_stride=8)  # DeepLabV3's dilated backbone (same weights)
    if self.kind == "resnet" and not self.frozen:
      recipe = {"finetune.layer_decay": (float(ft.get("layer_decay", 1.0)), 1.0),
                "model.drop_path_rate": (float(config.model.get("drop_path_rate", 0.0)), 0.0)}
      bad = {k: v for k, (v, off) in recipe.items() if v != off}
      if bad:
        raise ValueError(f"{bad}: layer-wise lr decay and drop path are the ViT finetune recipe; a ResNet encoder "
                         "has no transformer blocks. Set finetune.layer_decay=1.0 and model.drop_path_rate=0 "
                         "(config argument layer_decay=1,drop_path=0).")
    self.has_cls = self.kind == "vit" and bool(self.encoder.use_cls_token)
    self.probe_batchnorm = self._probe_batchnorm(ft)
    self.modality_dropout = float(ft.get("modality_dropout", 0.0))
    if not 0.0 <= self.modality_dropout <= 1.0:
      raise ValueError(f"finetune.modality_dropout={self.modality_dropout} must be in [0, 1] (0 = off).")
    if self.modality_dropout and (self.kind != "vit" or len(self.modalities) != 2):
      raise ValueError(f"finetune.modality_dropout={self.modality_dropout} needs S1+S2 input to a ViT encoder "
                       f"(this run: {'+'.join(self.modalities)}, {self.kind}); set it to 0.")
    self.head = self._head(config)
    prefixes = ("head",) if self.frozen else ("encoder", "head")
    self.tasks = (Task("finetune", "train", self.modalities, self.loss_fn, param_prefixes=prefixes),)

  def input_normalizer(self, data_normalizer):
    """The encoder's encoder.json statistics unless finetune.normalization="dataset" (encoder_api conventions)."""
    return encoder_api.input_normalizer(self.meta, self.config.finetune.get("normalization", "encoder"),
                                        data_normalizer)

  def training_normalizer(self):
    """The normalizer training used (input_normalizer of config.data.train's): evaluation and robustness use this
    one too, so a pretrained encoder is never evaluated under other statistics than it was finetuned with."""
    from mmrs.data import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
    return self.input_normalizer(pipeline_lib.describe(self.config.data.train, self.modalities).normalizer)

  # --- construction ------------------------------------------------------------------------------------------
  def _random_encoder(self, config):
    if self.kind == "resnet":
      from mmrs.models import resnet  # pylint: disable=g-import-not-at-top
      return resnet.ResNet(config.model.backbone, dtype=self.dtype)
    from mmrs.models import vit  # pylint: disable=g-import-not-at-top
    in_channels = {}
    for m in self.modalities:
      names = bands_lib.parse_band_list(config.bands.get(m)) or (bands_lib.S1_BANDS if m == "s1" else None)
      if not names:
        raise ValueError(f"config.bands.{m} is empty: name the bands of the data (init_from='' builds the encoder "
                         "from config.model and config.bands).")
      in_channels[m] = len(names)
    return vit.ViTEncoder(**sizes.vit_size(config.model.encoder), patch_size=config.model.patch_size,
                          in_channels=in_channels, use_cls_token=config.model.use_cls_token, dtype=self.dtype,
                          dropout_rate=config.model.get("dropout_rate", 0.0),
                          drop_path_rate=float(config.model.get("drop_path_rate", 0.0)),
                          attention=config.model.get("attention", "auto"), **vit.stack_options(config.model))

  def _head(self, config):
    ft = config.finetune
    if self.task == "segmentation" and self.kind == "resnet":
      return heads_lib.ASPPHead(self.num_classes, dtype=self.dtype)
    if self.task == "segmentation":
      size = sizes.vit_size(ft.get("decoder", "lite"))
      if ft.get("decoder_depth", 0):
        size["depth"] = ft.decoder_depth
      return heads_lib.SegmentationHead(self.num_classes, self.encoder.patch_size, ft.head, self.has_cls, size,
                                        self.dtype, config.model.get("attention", "auto"))
    return heads_lib.ClassifierHead(self.num_classes, ft.head, ft.get("pool", "mean"), self.has_cls,
                                    ft.get("mlp_hidden_dim", 128), self.dtype, self.probe_batchnorm)

  def _probe_batchnorm(self, ft) -> bool:
    """finetune.probe_batchnorm: auto (on for a linear probe of a frozen ViT, MAE's protocol) | on | off."""
    mode = str(ft.get("probe_batchnorm", "auto"))
    if mode not in PROBE_BATCHNORM:
      raise ValueError(f"finetune.probe_batchnorm={mode!r} is unknown; choose one of {PROBE_BATCHNORM}.")
    if mode == "auto":
      return self.frozen and self.kind == "vit" and ft.head == "linear" and self.task != "segmentation"
    if mode == "on" and (ft.head != "linear" or self.task == "segmentation"):
      raise ValueError(f"finetune.probe_batchnorm='on' is for the linear classification head, not "
                       f"head={ft.head!r} ({self.task}); the mlp head has its own BatchNorm.")
    return mode == "on"

  def _images(self, batch) -> dict:
    missing = [m for m in self.modalities if m not in batch]
    if missing:
      raise ValueError(f"The finetune batch has no {missing} images (keys {sorted(batch)}).")
    return {m: batch[m] for m in self.modalities}

  # --- contract ----------------------------------------------------------------------------------------------
  def init(self, rng, batch):
    enc_rng, head_rng = jax.random.split(rng)
    images = {m: jnp.zeros((1,) + tuple(x.shape[1:]), jnp.float32) for m, x in self._images(batch).items()}
    if self.kind == "vit":
      enc_vars = self.encoder.init(enc_rng, **images)
    else:
      enc_vars = self.encoder.init(enc_rng, next(iter(images.values())), train=False,
                                   feature_map=self.task == "segmentation")
    enc_params, enc_stats = enc_vars["params"], enc_vars.get("batch_stats", {})
    if self.pretrained is not None:
      loaded = self.pretrained["params"]
      if self.kind == "vit" and self.encoder.scan_layers:  # converted encoders hold per-block weights
        loaded = layout.stack_blocks(loaded)
      enc_params = _load_into(enc_params, loaded, "params", self.config.init_from)
      if enc_stats:
        enc_stats = _load_into(enc_stats, self.pretrained.get("batch_stats", {}), "batch_stats",
                               self.config.init_from)
    features = self._encode_apply({"params": nn.meta.unbox(enc_params), "batch_stats": enc_stats}, images, False)[0]
    head_vars = self._head_init(head_rng, features, images)
    state = {}
    stats = {k: v for k, v in (("encoder", enc_stats), ("head", head_vars.get("batch_stats", {}))) if v}
    if stats:
      state["batch_stats"] = stats
    return {"encoder": enc_params, "head": head_vars["params"]}, state

  def _head_init(self, rng, features, images):
    if self.task == "segmentation":
      return self.head.init(rng, features, self._grid(images), False)
    return self.head.init(rng, features, False)

  def _grid(self, images) -> tuple[int, int]:
    """A segmentation head's spatial argument: the patch grid (ViT), the image size (ResNet's ASPP head)."""
    x = next(iter(images.values()))
    if self.kind == "resnet":
      return x.shape[1], x.shape[2]
    p = self.encoder.patch_size
    return x.shape[1] // p, x.shape[2] // p

  def _drop_modalities(self, params, images, features, train, enc_rng, drop_rng):
    """finetune.modality_dropout p: each sample loses S1 (probability p/2) or S2 (p/2) and its features are the
    encoder's missing-modality path, i.e. the encoder given the other modality only (as launch.robustness's
    missing_s1 / missing_s2 stresses evaluate). Static shapes: both one-modality passes run for the whole batch
    and each sample picks its own. With fusion=concat a classification head's 2L tokens are matched by repeating
    the L one-modality tokens twice, which leaves mean (and CLS) pooling exactly that of the L tokens."""
    variables = {"params": params["encoder"]}
    u = jax.random.uniform(drop_rng, (features.shape[0],))
    p = self.modality_dropout
    out = features
    for m, lost in (("s1", u < p / 2), ("s2", (u >= p / 2) & (u < p))):
      alone, _ = self._encode_apply(variables, {k: v for k, v in images.items() if k != m}, train, enc_rng)
      if alone.shape != features.shape:  # concat classification: (1 +) L tokens -> (1 +) 2L
        cls = int(self.has_cls)
        alone = jnp.concatenate([alone[:, :cls], alone[:, cls:], alone[:, cls:]], axis=1)
      out = jnp.where(lost.reshape((-1,) + (1,) * (out.ndim - 1)), alone.astype(out.dtype), out)
    return out

  def _encode_apply(self, variables, images, train, rng=None):
    """(features, new encoder batch_stats)."""
    if self.kind == "vit":
      rngs = {"dropout": rng} if (train and rng is not None) else {}
      out = self.encoder.apply({"params": variables["params"]}, **images, train=train, fusion=self.fusion, rngs=rngs)
      if len(images) == 2 and self.fusion == "concat" and self.task == "segmentation":
        # Per-pixel heads read one token per position: average the position's S1 and S2 tokens.
        cls = int(self.has_cls)
        s1, s2 = jnp.split(out[:, cls:], 2, axis=1)
        out = jnp.concatenate([out[:, :cls], 0.5 * (s1 + s2)], axis=1)
      return out, {}
    x = next(iter(images.values()))
    stats = variables.get("batch_stats", {})
    fmap = self.task == "segmentation"  # the (B, H/8, W/8, C) feature map for the ASPP head
    if not train:
      return (self.encoder.apply({"params": variables["params"], "batch_stats": stats}, x, train=False,
                                 feature_map=fmap), stats)
    out, upd = self.encoder.apply({"params": variables["params"], "batch_stats": stats}, x, train=True,
                                  feature_map=fmap, mutable=["batch_stats"])
    return out, upd["batch_stats"]

  def forward(self, params, state, batch, rng, train: bool):
    """(outputs: logits (B, C) or (B, H, W, C), new state)."""
    images = self._images(batch)
    stats = state.get("batch_stats", {})
    enc_rng, head_rng = jax.random.split(rng) if rng is not None else (None, None)
    enc_train = train and not self.frozen
    features, enc_stats = self._encode_apply({"params": params["encoder"], "batch_stats": stats.get("encoder", {})},
                                             images, enc_train, enc_rng)
    if train and self.modality_dropout > 0 and rng is not None:
      features = self._drop_modalities(params, images, features, enc_train, enc_rng, jax.random.fold_in(rng, 7))
    if self.frozen:
      features = jax.lax.stop_gradient(features)
    head_vars = {"params": params["head"]}
    if "head" in stats:
      head_vars["batch_stats"] = stats["head"]
    args = (features, self._grid(images)) if self.task == "segmentation" else (features,)
    rngs = {"dropout": head_rng} if (train and head_rng is not None) else {}
    if train and "head" in stats:
      out, upd = self.head.apply(head_vars, *args, train=True, mutable=["batch_stats"], rngs=rngs)
      head_stats = upd["batch_stats"]
    else:
      out = self.head.apply(head_vars, *args, train=train, rngs=rngs)
      head_stats = stats.get("head")
    new_stats = {k: v for k, v in (("encoder", enc_stats), ("head", head_stats)) if v}
    return out, ({"batch_stats": new_stats} if new_stats else {})

  def loss_fn(self, params, state, batch, rng, train: bool = True):
    if self.label_key not in batch:
      raise ValueError(f"The batch has no {self.label_key!r} (keys {sorted(batch)}): set data.train.label_set to "
                       "finetune.label_set.")
    out, new_state = self.forward(params, state, batch, rng, train)
    loss, metrics = task_loss(self.task, out, batch[self.label_key])
    return loss, (metrics, new_state)

  def predict(self, params, state, batch):
    """Evaluation outputs: logits (B, C) or per-pixel logits (B, H, W, C)."""
    return self.forward(params, state, batch, None, False)[0]

  def update_state(self, params, state, step):
    del params, step
    return state

  def flops_per_sample(self, task_name: str) -> float:
    if task_name != "finetune":
      raise ValueError(f"Method finetune has one task 'finetune', not {task_name!r}.")
    size = int(self.config.data.train.image_size)
    if self.kind == "resnet":
      from mmrs.models import resnet  # pylint: disable=g-import-not-at-top
      (m,) = self.modalities
      channels = len(bands_lib.parse_band_list(self.config.bands.get(m)) or bands_lib.S1_BANDS)
      enc = resnet.forward_flops(self.encoder.size, size, channels, self.encoder.output_stride)
      head = 0.0
      if self.task == "segmentation":  # ASPP at output stride 8 (convolutions only)
        c, hw, w = self.encoder.num_features, (size // 8) ** 2, 256
        head = 2.0 * hw * w * (c + 3 * 9 * c + 5 * w + 9 * w + self.num_classes)
      return (1.0 if self.frozen else 3.0) * enc + 3.0 * head
    channels = sum(self.encoder.in_channels.values())
    p, e = self.encoder.patch_size, self.encoder
    length = (size // p) ** 2
    entry = flops_lib.patch_embed_flops(length, p, channels, e.width)
    tokens = length * (len(self.modalities) if self.fusion == "concat" else 1)
    enc = flops_lib.blocks_flops(tokens + int(self.has_cls), e.width, e.depth, e.mlp_dim)
    head = 2.0 * e.width * self.num_classes
    if self.task == "segmentation" and self.head.kind == "vitlite":
      d = self.head.decoder_size
      head = flops_lib.decoder_flops(length, e.width, length, d, p * p * self.num_classes, self.has_cls)
    elif self.task == "segmentation":
      head = 2.0 * length * e.width * p * p * self.num_classes
    if self.frozen:
      return entry + enc + 3.0 * head
    return flops_lib.train_flops(enc + head, entry)


def task_loss(task: str, out, labels) -> tuple[jax.Array, dict]:
  """(mean loss, metrics) for logits `out` and the batch's labels."""
  if task == "multilabel":
    labels = labels.astype(jnp.float32)
    loss = optax.sigmoid_binary_cross_entropy(out, labels).mean()
    acc = ((out > 0) == (labels > 0.5)).mean()
    return loss, {"loss": loss, "label_accuracy": acc}
  if task == "class":
    labels = labels.astype(jnp.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    return loss, {"loss": loss, "accuracy": (out.argmax(-1) == labels).mean()}
  labels = labels.astype(jnp.int32)
  valid = labels >= 0
  per_pixel = optax.softmax_cross_entropy_with_integer_labels(out, jnp.where(valid, labels, 0))
  n = jnp.maximum(valid.sum(), 1)
  loss = jnp.where(valid, per_pixel, 0.0).sum() / n
  acc = jnp.where(valid, out.argmax(-1) == labels, False).sum() / n
  return loss, {"loss": loss, "pixel_accuracy": acc}


def _path_key(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _load_into(boxed, loaded: Mapping[str, Any], what: str, source: str):
  """Puts the converted encoder's arrays into the freshly initialized (boxed) tree; shapes must match."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  leaves = jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0]
  want = {_path_key(p): tuple((x.unbox(apply_constraint=False) if is_box(x) else x).shape) for p, x in leaves}
  have = convert.flatten(loaded)
  missing = sorted(set(want) - set(have))
  wrong = sorted(k for k in set(want) & set(have) if tuple(have[k].shape) != want[k])
  if missing or wrong:
    raise ValueError(f"init_from={source!r}: the converted encoder does not fit the finetune encoder ({what}: "
                     f"missing {missing[:5]}, other shapes {[(k, have[k].shape, want[k]) for k in wrong[:5]]}). "
                     "Convert with the bands/modalities/patch size the finetune config uses.")

  def put(path, leaf):
    arr = jnp.asarray(have[_path_key(path)], jnp.float32)
    return leaf.replace_boxed(arr) if is_box(leaf) else arr

  return jax.tree_util.tree_map_with_path(put, boxed, is_leaf=is_box)


def build(config) -> Finetune:
  prepare_config(config)
  return Finetune(config)
