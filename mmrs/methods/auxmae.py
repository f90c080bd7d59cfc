"""AuxMAE: the S2 MAE plus an auxiliary S2 -> S1 decoder, sharing one encoder, trained one task per step (AGD).

Tasks (alternated by the train loop; the schedule is a pure function of the step):
- `s2_mae` (dataset "s2_only", trains encoder + decoder_s2): the MAE of mmrs/methods/mae.py.
- `s2_to_s1` (dataset "paired", trains encoder + decoder_s1): the full, unmasked S2 image -> encoder ->
  decoder_s1 -> every S1 patch; MSE over all S1 patches.
Params: {"encoder", "decoder_s2", "decoder_s1"}; the encoder has an S2 entry layer only (S1 is never an input).
Config keys: as mae.py, plus bands.s1 and data.paired.image_size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmrs.methods import flops as flops_lib
from mmrs.methods import mae as mae_lib
from mmrs.methods.base import Task
from mmrs.models import vit


class AuxMAE:
  name = "auxmae"

  def __init__(self, config):
    self.config = config
    self.encoder = mae_lib.build_encoder(config, ("s2",))
    self.decoder_s1 = mae_lib.build_decoder(config, "s1")
    self.mae = mae_lib.MaskedAutoencoder(self.encoder, mae_lib.build_decoder(config, "s2"), "s2",
                                         config.mask_ratio, config.norm_pix_loss)
    self.norm_pix_loss = config.norm_pix_loss
    self.patch_size = config.model.patch_size
    self.tasks = (
        Task("s2_mae", "s2_only", ("s2",), self.loss_s2_mae, param_prefixes=("encoder", "decoder_s2"),
             accumulation=lambda k: (self.prepare_s2_mae, self.loss_s2_mae)),
        Task("s2_to_s1", "paired", ("s1", "s2"), self.loss_s2_to_s1, param_prefixes=("encoder", "decoder_s1"),
             accumulation=lambda k: (self.prepare_s2_to_s1, self.loss_s2_to_s1)),
    )

  def init(self, rng, batch):
    mae_rng, aux_rng = jax.random.split(rng)
    enc, dec_s2 = self.mae.init(mae_rng, batch)
    x = mae_lib.example_image(batch, "s2")
    grid = vit.patch_grid(x.shape[1], x.shape[2], self.patch_size)
    latent = jnp.zeros((1, grid[0] * grid[1] + int(self.encoder.use_cls_token), self.encoder.width))
    dec_s1 = self.decoder_s1.init(aux_rng, latent, grid, None, self.encoder.use_cls_token)
    return {"encoder": enc, "decoder_s2": dec_s2, "decoder_s1": dec_s1["params"]}, {}

  def loss_s2_mae(self, params, state, batch, rng, train=True):
    loss = self.mae.loss(params["encoder"], params["decoder_s2"], batch["s2"], rng, train, batch=batch)
    return loss, ({"loss_s2": loss}, state)

  def prepare_s2_mae(self, batch, rng):
    return self.mae.prepare(batch["s2"], rng)

  def prepare_s2_to_s1(self, batch, rng):
    """Gradient accumulation: nothing random to draw (the task is unmasked); the whole batch's count of valid S1
    pixels normalizes every micro-batch's loss (micro-batches differ in S1 no-data and S1-missing samples)."""
    del rng
    s1 = batch["s1"]
    rows, cols = vit.patch_grid(s1.shape[1], s1.shape[2], self.patch_size)
    scored = jnp.ones((s1.shape[0], rows * cols), bool)
    return {"_per_row": mae_lib.row_normalizer(scored, mae_lib.pixel_weights(batch, "s1", self.patch_size))}

  def predict_s1(self, params, s2: jax.Array, rng: jax.Array, train: bool) -> jax.Array:
    """(B, L, p*p*2) S1 patch predictions from the whole S2 image."""
    _, enc_rngs, dec_rngs = mae_lib.split_rng(rng)
    grid = vit.patch_grid(s2.shape[1], s2.shape[2], self.patch_size)
    latent = self.encoder.apply({"params": params["encoder"]}, s2=s2, train=train, rngs=enc_rngs)
    return self.decoder_s1.apply({"params": params["decoder_s1"]}, latent, grid, None,
                                 self.encoder.use_cls_token, train, rngs=dec_rngs)

  def loss_s2_to_s1(self, params, state, batch, rng, train=True):
    if batch["s1"].shape[:3] != batch["s2"].shape[:3]:
      raise ValueError(f"auxmae s2_to_s1: S1 {batch['s1'].shape} and S2 {batch['s2'].shape} must share B, H, W.")
    pred = self.predict_s1(params, batch["s2"], rng, train)
    target = vit.patchify(batch["s1"], self.patch_size)
    ready = mae_lib.prepared(batch, "_per_row")
    loss = mae_lib.patch_mse(pred, target, jnp.ones(target.shape[:2], bool), self.norm_pix_loss,
                             mae_lib.pixel_weights(batch, "s1", self.patch_size),  # S1 no-data left out
                             per_row=ready and ready[0])
    return loss, ({"loss_s1": loss}, state)

  def update_state(self, params, state, step):
    del params, step
    return state

  def flops_per_sample(self, task_name: str) -> float:
    if task_name == "s2_mae":
      return self.mae.flops(self.config.data.s2_only.image_size)
    if task_name != "s2_to_s1":
      raise ValueError(f"Method auxmae has tasks 's2_mae' and 's2_to_s1', not {task_name!r}.")
    p, enc, dec = self.patch_size, self.encoder, self.decoder_s1
    length = (self.config.data.paired.image_size // p) ** 2
    cls = int(enc.use_cls_token)
    entry = flops_lib.patch_embed_flops(length, p, enc.in_channels["s2"], enc.width)
    dec_size = dict(width=dec.width, depth=dec.depth, mlp_dim=dec.mlp_dim)
    forward = (flops_lib.blocks_flops(length + cls, enc.width, enc.depth, enc.mlp_dim)
               + flops_lib.decoder_flops(length, enc.width, length, dec_size, dec.out_dim, bool(cls)))
    return flops_lib.train_flops(forward, entry)

  def reconstruct(self, params, state, batch, rng):
    """S2: the `s2_mae` view (same mask as that loss for the same rng). S1 (when the batch has it): predicted
    from the whole S2 image; its "seen" is all zeros (S1 is never an input)."""
    del state
    out = self.mae.reconstruct(params["encoder"], params["decoder_s2"], batch["s2"], rng)
    result = {k: {"s2": v} for k, v in out.items()}
    if "s1" in batch:
      s1 = batch["s1"]
      target = vit.patchify(s1, self.patch_size)
      pred = self.predict_s1(params, batch["s2"], rng, False)
      recon = mae_lib.paste_prediction(pred, target, jnp.ones(target.shape[:2], bool), self.norm_pix_loss)
      grid = vit.patch_grid(s1.shape[1], s1.shape[2], self.patch_size)
      result["seen"]["s1"] = jnp.zeros_like(s1)
      result["reconstruction"]["s1"] = vit.unpatchify(recon, self.patch_size, grid)
      result["target"]["s1"] = s1
    return result


def build(config) -> AuxMAE:
  return AuxMAE(config)
