"""MixMAE: one sequence of tokens mixed from S1 and S2, reconstructed into both images.

S1 and S2 go through their own entry layers (-> two sequences of L tokens, each with position and modality
embedding). Per sample, a random set of k = round(k_fraction * L) positions takes the S2 token and the other
L - k take the S1 token (on device, from the step rng). The encoder runs on the full mixed sequence (+ CLS);
decoder_s2 predicts S2 at every position and is scored at the positions that showed S1; decoder_s1 predicts S1
and is scored at the positions that showed S2. Loss = lam * L_S1 + (1 - lam) * L_S2 (lam = 0.5). A position is
never scored for the modality it showed.

Task `mixmae` (dataset "paired"); params {"encoder", "decoder_s2", "decoder_s1"}.
Config keys: as mae.py, plus bands.s1, k_fraction, lam, data.paired.image_size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmrs.methods import flops as flops_lib
from mmrs.methods import mae as mae_lib
from mmrs.methods import masking
from mmrs.methods.base import Task
from mmrs.models import vit

_PARAMS = ("encoder", "decoder_s2", "decoder_s1")


class MixMAE:
  name = "mixmae"

  def __init__(self, config):
    self.config = config
    self.encoder = mae_lib.build_encoder(config, ("s2", "s1"))
    self.decoders = {"s2": mae_lib.build_decoder(config, "s2"), "s1": mae_lib.build_decoder(config, "s1")}
    self.k_fraction, self.lam = config.k_fraction, config.lam
    if not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"config.lam={self.lam} must be in [0, 1] (loss = lam * L_S1 + (1 - lam) * L_S2).")
    self.norm_pix_loss = config.norm_pix_loss
    self.patch_size = config.model.patch_size
    self.tasks = (Task("mixmae", "paired", ("s1", "s2"), self.loss, param_prefixes=_PARAMS,
                       accumulation=lambda k: (self.prepare, self.loss)),)

  def num_s2(self, length: int) -> int:
    """k: positions per sample that show S2 (the other length - k show S1)."""
    # num_kept(length, 1 - k_fraction) = round(k_fraction * length), with 0 < k < length enforced.
    return masking.num_kept(length, 1.0 - self.k_fraction, what="k_fraction")

  def init(self, rng, batch):
    x = mae_lib.example_image(batch, "s2")
    grid = vit.patch_grid(x.shape[1], x.shape[2], self.patch_size)
    enc_rng, s2_rng, s1_rng = jax.random.split(rng, 3)
    enc = self.encoder.init(enc_rng, **{m: jnp.zeros(x.shape[:3] + (c,)) for m, c in self.encoder.in_channels.items()})
    latent = jnp.zeros((1, grid[0] * grid[1] + int(self.encoder.use_cls_token), self.encoder.width))
    params = {"encoder": enc["params"]}
    for m, r in (("s2", s2_rng), ("s1", s1_rng)):
      params[f"decoder_{m}"] = self.decoders[m].init(r, latent, grid, None, self.encoder.use_cls_token)["params"]
    return params, {}

  def draw(self, rng, batch) -> jax.Array:
    """The mixing of `batch` for `rng`: take_s2 (B, L) bool, True where the encoder sees S2."""
    s2, s1 = batch["s2"], batch["s1"]
    if s1.shape[:3] != s2.shape[:3]:
      raise ValueError(f"mixmae: S1 {s1.shape} and S2 {s2.shape} must share batch and spatial size.")
    grid = vit.patch_grid(s2.shape[1], s2.shape[2], self.patch_size)
    length = grid[0] * grid[1]
    return masking.complementary_masks(mae_lib.split_rng(rng)[0], s2.shape[0], length, self.num_s2(length))[0]

  def prepare(self, batch, rng):
    """Gradient accumulation (Task.accumulation): the whole batch's mixing and the normalizer of each loss term."""
    take_s2 = self.draw(rng, batch)
    p = self.patch_size
    return {"_take_s2": take_s2,
            "_per_row_s2": mae_lib.row_normalizer(~take_s2, mae_lib.pixel_weights(batch, "s2", p)),
            "_per_row_s1": mae_lib.row_normalizer(take_s2, mae_lib.pixel_weights(batch, "s1", p))}

  def forward(self, params, batch, rng, train):
    """Returns ({modality: pred (B, L, p*p*C)}, take_s2 (B, L) bool: True where the encoder saw S2)."""
    s2, s1 = batch["s2"], batch["s1"]
    ready = mae_lib.prepared(batch, "_take_s2")
    take_s2 = ready[0] if ready else self.draw(rng, batch)
    grid = vit.patch_grid(s2.shape[1], s2.shape[2], self.patch_size)
    _, enc_rngs, dec_rngs = mae_lib.split_rng(rng)
    tokens = self.encoder.apply({"params": params["encoder"]}, {"s2": s2, "s1": s1}, method="embed")
    mixed = masking.mix_tokens(tokens["s2"], tokens["s1"], take_s2)
    latent = self.encoder.apply({"params": params["encoder"]}, mixed, train, method="encode", rngs=enc_rngs)
    preds = {}
    for i, m in enumerate(("s2", "s1")):
      rngs = {"dropout": jax.random.fold_in(dec_rngs["dropout"], i)}
      preds[m] = self.decoders[m].apply({"params": params[f"decoder_{m}"]}, latent, grid, None,
                                        self.encoder.use_cls_token, train, rngs=rngs)
    return preds, take_s2

  def loss(self, params, state, batch, rng, train=True):
    preds, take_s2 = self.forward(params, batch, rng, train)
    scored = {"s2": ~take_s2, "s1": take_s2}
    losses = {m: mae_lib.patch_mse(preds[m], vit.patchify(batch[m], self.patch_size), scored[m], self.norm_pix_loss,
                                   mae_lib.pixel_weights(batch, m, self.patch_size),  # S1 no-data left out
                                   per_row=batch.get(f"_per_row_{m}"))  # gradient accumulation: whole-batch count
              for m in ("s2", "s1")}
    loss = self.lam * losses["s1"] + (1.0 - self.lam) * losses["s2"]
    return loss, ({"loss_s1": losses["s1"], "loss_s2": losses["s2"]}, state)

  def update_state(self, params, state, step):
    del params, step
    return state

  def flops_per_sample(self, task_name: str) -> float:
    if task_name != "mixmae":
      raise ValueError(f"Method mixmae has one task 'mixmae', not {task_name!r}.")
    p, enc = self.patch_size, self.encoder
    length = (self.config.data.paired.image_size // p) ** 2
    cls = int(enc.use_cls_token)
    entry = sum(flops_lib.patch_embed_flops(length, p, c, enc.width) for c in enc.in_channels.values())
    forward = flops_lib.blocks_flops(length + cls, enc.width, enc.depth, enc.mlp_dim)
    for dec in self.decoders.values():
      dec_size = dict(width=dec.width, depth=dec.depth, mlp_dim=dec.mlp_dim)
      forward += flops_lib.decoder_flops(length, enc.width, length, dec_size, dec.out_dim, bool(cls))
    return flops_lib.train_flops(forward, entry)

  def reconstruct(self, params, state, batch, rng):
    """Same mixing as the loss for the same rng. Per modality: "seen" = the positions that showed it (others
    zeroed), "reconstruction" = prediction at the scored positions, input elsewhere."""
    del state
    p = self.patch_size
    preds, take_s2 = self.forward(params, batch, rng, False)
    grid = vit.patch_grid(batch["s2"].shape[1], batch["s2"].shape[2], p)
    out = {"seen": {}, "reconstruction": {}, "target": {}}
    for m, shown in (("s2", take_s2), ("s1", ~take_s2)):
      target = vit.patchify(batch[m], p)
      out["seen"][m] = vit.unpatchify(jnp.where(shown[..., None], target, 0.0), p, grid)
      out["reconstruction"][m] = vit.unpatchify(
          mae_lib.paste_prediction(preds[m], target, ~shown, self.norm_pix_loss), p, grid)
      out["target"][m] = batch[m]
    return out


def build(config) -> MixMAE:
  return MixMAE(config)
