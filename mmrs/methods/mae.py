"""MAE on Sentinel-2 (the papers' baseline), plus the pieces AuxMAE and MixMAE reuse.

Task `s2_mae`: a random `mask_ratio` (75%) of the S2 patches of each sample is masked (on device, from the step
rng); the encoder sees only the visible tokens; the decoder gets them back at their positions plus a learned mask
token elsewhere and predicts every patch's pixels; the loss is the MSE over the masked patches only
(per-patch normalized targets with `norm_pix_loss`). Params: {"encoder", "decoder"}.

Gradient accumulation (mmrs/methods/base.py `Task.accumulation`, used by the whole MAE family): a task's `prepare`
draws the mask of the WHOLE batch (the draw its loss makes from the same rng) and each loss term's normalizer
(`row_normalizer`) before the step splits the batch; the loss takes them from the batch (`prepared`), so k
micro-batches compute the one-batch loss and gradients.

Config keys read here: model.{encoder, decoder, decoder_depth, patch_size, use_cls_token, dropout_rate, attention,
scan_layers, remat_policy},
compute_dtype, bands.s2, mask_ratio, norm_pix_loss, data.s2_only.image_size (FLOP count); see configs/mae_s2.py.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mmrs import bands as bands_lib
from mmrs.methods import flops as flops_lib
from mmrs.methods import masking
from mmrs.methods.base import Task
from mmrs.models import sizes
from mmrs.models import vit

# ---------------------------------------------------------------------------------------------------------------
# Shared by the MAE family (auxmae.py, mixmae.py).


def band_names(config, modality: str) -> tuple[str, ...]:
  """The bands the model expects for `modality`, from config.bands.<modality> (S1 defaults to VV, VH)."""
  spec = config.bands.get(modality) if "bands" in config else None
  names = bands_lib.parse_band_list(spec)
  if names is None:
    if modality == "s1":
      return bands_lib.S1_BANDS
    raise ValueError(f"config.bands.{modality} is empty: name the bands the model expects, e.g. "
                     f"'{','.join(bands_lib.S2_L2A_BANDS)}'.")
  return names


def encoder_size(config) -> dict:
  return sizes.vit_size(config.model.encoder)


def decoder_size(config) -> dict:
  size = sizes.vit_size(config.model.decoder)
  if config.model.get("decoder_depth", 0):
    size["depth"] = config.model.decoder_depth
  return size


def build_encoder(config, modalities) -> vit.ViTEncoder:
  """The ViT encoder with one entry layer per modality in `modalities`."""
  return vit.ViTEncoder(
      **encoder_size(config), patch_size=config.model.patch_size,
      in_channels={m: len(band_names(config, m)) for m in modalities},
      use_cls_token=config.model.use_cls_token, dtype=jnp.dtype(config.compute_dtype),
      dropout_rate=config.model.get("dropout_rate", 0.0), attention=config.model.get("attention", "auto"),
      **vit.stack_options(config.model))


def build_decoder(config, modality: str) -> vit.ViTLiteDecoder:
  """A decoder predicting the pixels of every patch of `modality`."""
  p = config.model.patch_size
  return vit.ViTLiteDecoder(**decoder_size(config), out_dim=p * p * len(band_names(config, modality)),
                            dtype=jnp.dtype(config.compute_dtype), dropout_rate=config.model.get("dropout_rate", 0.0),
                            attention=config.model.get("attention", "auto"), **vit.stack_options(config.model))


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-patch standardization of (B, L, P) pixels (MAE's norm_pix_loss): (normalized, mean, std)."""
  mean = target.mean(axis=-1, keepdims=True)
  std = jnp.sqrt(target.var(axis=-1, keepdims=True) + eps)
  return (target - mean) / std, mean, std


def patch_mse(pred: jax.Array, target: jax.Array, weights: jax.Array, norm_pix: bool,
              pixel_weights: jax.Array | None = None, per_row: jax.Array | None = None) -> jax.Array:
  """Mean over weighted patches of the per-patch pixel MSE. pred/target (B, L, P), weights (B, L) bool/0-1.

  `pixel_weights` (B, L, P) 0/1 (`pixel_weights(batch, modality, p)`: S1 no-data = 0) leaves pixels out: the loss
  is then the mean squared error over the valid pixels of the weighted patches (with all pixels valid this equals
  the mean of per-patch means), and norm_pix statistics come from the valid pixels only.
  `per_row` (gradient accumulation): the WHOLE batch's `row_normalizer` of this term; the sum here is then divided
  by per_row * B (B: this micro-batch's rows) instead of its own count, so the mean of the k micro-batch losses is
  the whole batch's loss even where micro-batches score different numbers of patches or pixels (S1 no-data,
  S1-missing samples, JointMAE's scenarios).
  """
  target = target.astype(jnp.float32)
  if pixel_weights is None:
    if norm_pix:
      target = normalize_patches(target)[0]
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    if per_row is None:
      return masking.masked_mean(per_patch, weights)
    return (per_patch * weights.astype(jnp.float32)).sum() / (per_row * pred.shape[0])
  w = pixel_weights.astype(jnp.float32)
  if norm_pix:
    n = jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    mean = (target * w).sum(-1, keepdims=True) / n
    var = (jnp.square(target - mean) * w).sum(-1, keepdims=True) / n
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  w = w * weights.astype(jnp.float32)[..., None]
  den = jnp.maximum(w.sum(), 1.0) if per_row is None else per_row * pred.shape[0]
  return (jnp.square(pred.astype(jnp.float32) - target) * w).sum() / den


def row_normalizer(weights: jax.Array, pixel_weights: jax.Array | None = None) -> jax.Array:
  """patch_mse's denominator for the whole batch (weighted patches, or weighted valid pixels; at least 1) divided by
  its rows: the 0-d `per_row` a task's `prepare` hands every micro-batch (see patch_mse)."""
  if pixel_weights is None:
    count = weights.astype(jnp.float32).sum()
  else:
    count = (pixel_weights.astype(jnp.float32) * weights.astype(jnp.float32)[..., None]).sum()
  return jnp.maximum(count, 1.0) / weights.shape[0]


def prepared(batch: Mapping[str, jax.Array], *names: str) -> tuple[jax.Array, ...] | None:
  """The entries a task's `prepare` added to `batch` under gradient accumulation (mmrs/methods/base.py Task), or
  None when the batch has none (k = 1, `reconstruct`, evaluation: the loss draws from its rng)."""
  if names[0] not in batch:
    return None
  return tuple(batch[n] for n in names)


def pixel_weights(batch: Mapping[str, jax.Array], modality: str, patch_size: int) -> jax.Array | None:
  """(B, L, p*p*C) 0/1 weights in `patchify` order from the batch's `<modality>_valid` (B, H, W) (the pipeline's S1
  no-data mask), or None when the batch has none (every pixel counts)."""
  valid = batch.get(f"{modality}_valid")
  if valid is None or modality not in batch:
    return None
  x = batch[modality]
  return vit.patchify(jnp.broadcast_to(valid[..., None].astype(jnp.float32), x.shape), patch_size)


def paste_prediction(pred: jax.Array, target: jax.Array, scored: jax.Array, norm_pix: bool) -> jax.Array:
  """Reconstruction patches: the prediction where `scored` (B, L), the target elsewhere; undoes norm_pix with
  each target patch's own mean/std (as MAE's visualizations)."""
  if norm_pix:
    _, mean, std = normalize_patches(target)
    pred = pred * std + mean
  return jnp.where(scored[..., None], pred, target)


def example_image(batch: Mapping[str, jax.Array], modality: str) -> jax.Array:
  if modality not in batch:
    raise ValueError(f"init needs an example batch with {modality!r} images, got keys {sorted(batch)}.")
  return jnp.zeros((1,) + tuple(batch[modality].shape[1:]), jnp.float32)


def split_rng(rng: jax.Array) -> tuple[jax.Array, dict, dict]:
  """(mask rng, encoder rngs, decoder rngs): the mask depends only on the first, so `reconstruct` and the loss
  draw the same mask from the same rng."""
  mask_rng, enc_rng, dec_rng = jax.random.split(rng, 3)
  return mask_rng, {"dropout": enc_rng}, {"dropout": dec_rng}


class MaskedAutoencoder:
  """One modality's MAE on an encoder/decoder pair; params are passed in, so tasks can share the encoder."""

  def __init__(self, encoder: vit.ViTEncoder, decoder: vit.ViTLiteDecoder, modality: str, mask_ratio: float,
               norm_pix_loss: bool):
    self.encoder, self.decoder, self.modality = encoder, decoder, modality
    self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
    self.patch_size = encoder.patch_size

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]):
    """(encoder params, decoder params), boxed."""
    x = example_image(batch, self.modality)
    grid = vit.patch_grid(x.shape[1], x.shape[2], self.patch_size)
    keep = masking.num_kept(grid[0] * grid[1], self.mask_ratio)
    enc_rng, dec_rng = jax.random.split(rng)
    enc = self.encoder.init(enc_rng, **{m: jnp.zeros(x.shape[:3] + (c,)) for m, c in self.encoder.in_channels.items()})
    latent = jnp.zeros((1, keep + int(self.encoder.use_cls_token), self.encoder.width))
    dec = self.decoder.init(dec_rng, latent, grid, jnp.zeros((1, keep), jnp.int32), self.encoder.use_cls_token)
    return enc["params"], dec["params"]

  def draw(self, rng: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mask of the images x (B, H, W, C) for `rng`: (keep_ids (B, kept), mask (B, L) True = masked)."""
    grid = vit.patch_grid(x.shape[1], x.shape[2], self.patch_size)
    length = grid[0] * grid[1]
    keep_ids, _, mask = masking.random_mask(split_rng(rng)[0], x.shape[0], length,
                                            masking.num_kept(length, self.mask_ratio))
    return keep_ids, mask

  def prepare(self, x: jax.Array, rng: jax.Array, pixel_weights: jax.Array | None = None) -> dict[str, jax.Array]:
    """Gradient accumulation: the whole batch's mask and loss normalizer (Task.accumulation), for `loss(prepared=)`."""
    keep_ids, mask = self.draw(rng, x)
    return {"_keep_ids": keep_ids, "_mask": mask, "_per_row": row_normalizer(mask, pixel_weights)}

  def forward(self, enc_params, dec_params, x: jax.Array, rng: jax.Array, train: bool, drawn=None):
    """Returns (pred (B, L, p*p*C) float32, mask (B, L) True = masked, i.e. scored). `drawn`: (keep_ids, mask)
    drawn beforehand (gradient accumulation), else drawn from `rng`."""
    grid = vit.patch_grid(x.shape[1], x.shape[2], self.patch_size)
    _, enc_rngs, dec_rngs = split_rng(rng)
    keep_ids, mask = drawn if drawn is not None else self.draw(rng, x)
    tokens = self.encoder.apply({"params": enc_params}, {self.modality: x}, method="embed")[self.modality]
    latent = self.encoder.apply({"params": enc_params}, masking.gather_tokens(tokens, keep_ids), train,
                                method="encode", rngs=enc_rngs)
    pred = self.decoder.apply({"params": dec_params}, latent, grid, keep_ids, self.encoder.use_cls_token, train,
                              rngs=dec_rngs)
    return pred, mask

  def loss(self, enc_params, dec_params, x: jax.Array, rng: jax.Array, train: bool,
           pixel_weights: jax.Array | None = None, batch: Mapping[str, jax.Array] | None = None) -> jax.Array:
    """`batch`: the task's batch, read for `prepare`'s entries (gradient accumulation) when it has them."""
    ready = prepared(batch or {}, "_keep_ids", "_mask", "_per_row")
    pred, mask = self.forward(enc_params, dec_params, x, rng, train, drawn=ready and ready[:2])
    return patch_mse(pred, vit.patchify(x, self.patch_size), mask, self.norm_pix_loss, pixel_weights,
                     per_row=ready and ready[2])

  def reconstruct(self, enc_params, dec_params, x: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
    """{"seen", "reconstruction", "target"} images of this modality (masked patches of "seen" zeroed)."""
    p = self.patch_size
    grid = vit.patch_grid(x.shape[1], x.shape[2], p)
    pred, mask = self.forward(enc_params, dec_params, x, rng, False)
    target = vit.patchify(x, p)
    seen = jnp.where(mask[..., None], 0.0, target)
    recon = paste_prediction(pred, target, mask, self.norm_pix_loss)
    return {"seen": vit.unpatchify(seen, p, grid), "reconstruction": vit.unpatchify(recon, p, grid), "target": x}

  def flops(self, image_size: int) -> float:
    """Analytic training FLOPs of one sample (see mmrs/methods/flops.py)."""
    p, enc = self.patch_size, self.encoder
    length = (image_size // p) ** 2
    keep = masking.num_kept(length, self.mask_ratio)
    cls = int(enc.use_cls_token)
    channels = enc.in_channels[self.modality]
    entry = flops_lib.patch_embed_flops(length, p, channels, enc.width)
    dec_size = dict(width=self.decoder.width, depth=self.decoder.depth, mlp_dim=self.decoder.mlp_dim)
    forward = (flops_lib.blocks_flops(keep + cls, enc.width, enc.depth, enc.mlp_dim)
               + flops_lib.decoder_flops(keep, enc.width, length, dec_size, self.decoder.out_dim, bool(cls)))
    return flops_lib.train_flops(forward, entry)


# ---------------------------------------------------------------------------------------------------------------
# The S2 MAE baseline method.


class MAE:
  """config.method = "mae_s2": one task `s2_mae` on dataset "s2_only"; params {"encoder", "decoder"}."""
  name = "mae_s2"

  def __init__(self, config):
    self.config = config
    self.mae = MaskedAutoencoder(build_encoder(config, ("s2",)), build_decoder(config, "s2"), "s2",
                                 config.mask_ratio, config.norm_pix_loss)
    self.tasks = (Task("s2_mae", "s2_only", ("s2",), self.loss, param_prefixes=("encoder", "decoder"),
                       accumulation=lambda k: (self.prepare, self.loss)),)

  def prepare(self, batch, rng):
    return self.mae.prepare(batch["s2"], rng)

  def init(self, rng, batch):
    enc, dec = self.mae.init(rng, batch)
    return {"encoder": enc, "decoder": dec}, {}

  def loss(self, params, state, batch, rng, train=True):
    loss = self.mae.loss(params["encoder"], params["decoder"], batch["s2"], rng, train, batch=batch)
    return loss, ({"loss_s2": loss}, state)

  def update_state(self, params, state, step):
    del params, step
    return state

  def flops_per_sample(self, task_name: str) -> float:
    if task_name != "s2_mae":
      raise ValueError(f"Method mae_s2 has one task 's2_mae', not {task_name!r}.")
    return self.mae.flops(self.config.data.s2_only.image_size)

  def reconstruct(self, params, state, batch, rng):
    """Same mask as the loss for the same rng. "reconstruction" = prediction on masked patches, input elsewhere."""
    del state
    out = self.mae.reconstruct(params["encoder"], params["decoder"], batch["s2"], rng)
    return {k: {"s2": v} for k, v in out.items()}


def build(config) -> MAE:
  return MAE(config)
