"""JointMAE: this project's reading of the mask module of Zhang et al., "Joint Multi-Modality SAR and Optical
Representation Learning" (the paper only sketches it; DESIGN.md section 3).

`jointmae`: S1 and S2 go through their own entry layers -> 2L tokens, one per (position, modality); token
t = position + L * group, groups ordered as `MODALITIES` = (s1, s2). Per sample the mask module draws a scenario:
  independent    each modality keeps its own random set of positions (ceil(n/2) S2, floor(n/2) S1 tokens);
  complementary  every position is visible in exactly one modality (L of the 2L tokens: a random ceil(L/2)
                 positions show S2, the others S1) and the other modality's token there is the target: the
                 paper's cross-modal fill-in, whatever the other scenarios' visible fraction;
  drop_s1/drop_s2  one modality wholly masked, n random positions of the other visible.
n = floor(visible_fraction * 2L) tokens for independent and drop; visible_fraction <= max_visible_fraction <= 0.5
(n <= L is what makes drop possible, and the paper's ">= 50% less input"). With the default 0.25 those scenarios
show a quarter of the input pixels (MAE's 75% masking); complementary shows half of them (L tokens), which is
still the paper's "input reduced by at least 50%".

Static shapes with two token counts: the rows of a batch are split into two groups of static size. The first
b_c = round(B * P(complementary)) rows are complementary (L encoder tokens each); the other rows draw independent /
drop_s1 / drop_s2 per sample from the renormalized weights (n tokens each). Each group runs the encoder and decoder
once with its own static length inside the one compiled step. Records arrive in random order, so "the first b_c
rows" is a random set of samples: this is a per-sample draw conditioned on the count (lower variance than a free
draw). Chosen over padding every sample to L tokens with an attention mask, which would run the encoder on L
tokens for every sample (2x the encoder work of the default 1/3 : 1/3 : 1/3 mix) and thread a mask through the
blocks. The FLOP count uses b_c of config.batch_size.
The encoder sees the visible tokens only; one ViT-Lite decoder gets them at their slots (mask tokens elsewhere,
a learned group embedding per modality) and predicts every slot with one head per modality. Loss: per-patch MSE
on the masked tokens of each modality (per-patch normalized targets with `norm_pix_loss`),
loss = lam * loss_s1 + (1 - lam) * loss_s2 (lam = 0.5, as MixMAE).

`jointmae_plain` (the baseline row, the paper's literal input, "concatenated along channel dimension"): a plain
MAE on the 2 + C_s2 concatenated channels (s1 first): one entry layer ("s1s2"), one token per position, random
masking keeping floor(visible_fraction * L) tokens (the same fraction of the input pixels as `jointmae`), one
decoder head for all channels, loss = the MSE over every channel of the masked patches (norm_pix_loss normalizes
each patch over all its channels), so each channel counts equally, as in an MAE on a 15-band image (no lam).
The per-modality terms are reported as metrics only.

Ablation controls (configs/jointmae.py): the plain loss weights S1 by its channel share (2 of 2 + C_s2: 2/15 with
L1C) where JointMAE weights it lam = 0.5, and complementary rows show L of 2L tokens (half the input) where the
other scenarios show n (a quarter by default). `plain_loss="lam"` gives the plain baseline JointMAE's loss
(lam * L_S1 + (1 - lam) * L_S2, each term the MSE of that modality's masked patches, norm_pix per modality);
`complementary_visible="matched"` makes complementary rows show n tokens at n distinct positions (ceil(n/2) S2,
floor(n/2) S1; the rest hidden in both), so every scenario shows the same share of the input.

Masks are drawn on device from the step's rng (static shapes: argsort of uniform noise, as scenic's MAE).
Params: {"encoder": ViTEncoder, "decoder": ViTLiteDecoder}; no state.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmrs.methods import flops as flops_lib
from mmrs.methods import mae as mae_lib
from mmrs.methods import masking
from mmrs.methods.base import Task
from mmrs.methods.base import micro_batch_rows
from mmrs.models import vit

MODALITIES = ("s1", "s2")  # token blocks / decoder groups, in this order
SCENARIOS = ("independent", "complementary", "drop_s1", "drop_s2")
COMPLEMENTARY_VISIBLE = ("all", "matched")  # config.complementary_visible: L tokens | n, as the other scenarios
PLAIN_LOSSES = ("channels", "lam")  # config.plain_loss of jointmae_plain: every channel equal | lam-weighted terms
_PARAMS = ("encoder", "decoder")


# --- the mask module --------------------------------------------------------------------------------------------

def scenario_probabilities(config) -> np.ndarray:
  """P(independent), P(complementary), P(drop_s1), P(drop_s2) from the config's weights (normalized)."""
  raw = np.asarray([config.p_independent, config.p_complementary, config.p_drop], np.float64)
  if (raw < 0).any() or raw.sum() <= 0:
    raise ValueError(f"config.p_independent/p_complementary/p_drop = {raw.tolist()}: give non-negative weights, "
                     "at least one positive.")
  if not 0.0 <= config.drop_s1_prob <= 1.0:
    raise ValueError(f"config.drop_s1_prob={config.drop_s1_prob} must be in [0, 1].")
  p = raw / raw.sum()
  return np.asarray([p[0], p[1], p[2] * config.drop_s1_prob, p[2] * (1.0 - config.drop_s1_prob)])


def num_visible(config, num_tokens: int) -> int:
  """Visible tokens out of `num_tokens` (2L for jointmae, L for the plain variant), checked against the limit."""
  frac, limit = float(config.visible_fraction), float(config.max_visible_fraction)
  if not 0.0 < limit <= 0.5:
    raise ValueError(f"config.max_visible_fraction={limit} must be in (0, 0.5] (at most half the input tokens).")
  if not 0.0 < frac <= limit:
    raise ValueError(f"config.visible_fraction={frac} must be in (0, config.max_visible_fraction={limit}].")
  n = int(np.floor(frac * num_tokens + 1e-9))  # floor: never above the limit
  if n < 1:
    raise ValueError(f"config.visible_fraction={frac} keeps no token of {num_tokens}; raise it or use larger "
                     "images (data.paired.image_size) or a smaller model.patch_size.")
  return n


def _ranks(rng: jax.Array, batch_size: int, length: int) -> jax.Array:
  """Per sample a uniformly random permutation, as ranks (B, L) in [0, L)."""
  return jnp.argsort(jnp.argsort(jax.random.uniform(rng, (batch_size, length)), axis=1), axis=1)


def num_complementary(batch_size: int, probs) -> int:
  """Rows of a batch of `batch_size` that are complementary (the first ones): round(B * P(complementary))."""
  return int(round(batch_size * float(probs[1])))


def mask_module(rng: jax.Array, batch_size: int, length: int, n_visible: int, probs,
                matched: bool = False) -> tuple[jax.Array, jax.Array]:
  """Draws one scenario per sample and its visibility mask over the 2L tokens.

  Returns (visible (B, 2L) bool, token t = position + L * group with groups `MODALITIES`; scenario (B,) int32 index
  into `SCENARIOS`). The first `num_complementary(B, probs)` rows are complementary: exactly `length` True, each
  position in exactly one modality (`matched`: `n_visible` True at n_visible distinct positions, ceil(n/2) S2 and
  floor(n/2) S1, the other positions hidden in both, so every scenario shows the same number of tokens). The other
  rows draw independent / drop_s1 / drop_s2 (weights renormalized) and have exactly `n_visible` True. Requires
  n_visible <= length.
  """
  if not 0 < n_visible <= length:
    raise ValueError(f"mask_module: n_visible={n_visible} must be in [1, L={length}].")
  probs = np.asarray(probs, np.float64)
  b_c = num_complementary(batch_size, probs)
  rest = probs * np.asarray([1.0, 0.0, 1.0, 1.0])
  rest = rest / rest.sum() if rest.sum() > 0 else np.asarray([1.0, 0.0, 0.0, 0.0])  # unused: every row complementary
  k_scn, k_a, k_b = jax.random.split(rng, 3)
  drawn = jax.random.categorical(k_scn, jnp.log(jnp.asarray(rest, jnp.float32)), shape=(batch_size,))
  scenario = jnp.where(jnp.arange(batch_size) < b_c, 1, drawn)
  n_s2, n_s1 = (n_visible + 1) // 2, n_visible // 2
  r_a, r_b = _ranks(k_a, batch_size, length), _ranks(k_b, batch_size, length)
  none = jnp.zeros((batch_size, length), bool)
  half = (length + 1) // 2
  # complementary: one permutation split in two, covering every position once (matched: its first n_visible)
  complementary = (((r_a >= n_s2) & (r_a < n_visible), r_a < n_s2) if matched else (r_a >= half, r_a < half))
  # (s1 visible, s2 visible) per scenario, in SCENARIOS order.
  options = (
      (r_a < n_s1, r_b < n_s2),  # independent: two unrelated permutations
      complementary,
      (none, r_a < n_visible),  # drop_s1
      (r_a < n_visible, none),  # drop_s2
  )
  pick = lambda i: jnp.select([scenario[:, None] == s for s in range(len(SCENARIOS))],  # noqa: E731
                              [opt[i] for opt in options], default=False)
  visible = jnp.concatenate([pick(0), pick(1)], axis=1)
  return visible, scenario.astype(jnp.int32)


# --- the method -------------------------------------------------------------------------------------------------

class JointMAE:
  """config.method = "jointmae" | "jointmae_plain": one task of that name on dataset "paired";
  params {"encoder", "decoder"}, no state."""

  def __init__(self, config):
    self.config = config
    self.name = config.method
    self.plain = self.name == "jointmae_plain"
    self.patch_size = int(config.model.patch_size)
    self.norm_pix_loss = bool(config.norm_pix_loss)
    self.lam = float(config.lam)
    if not 0.0 <= self.lam <= 1.0:
      raise ValueError(f"config.lam={self.lam} must be in [0, 1] (loss = lam * L_S1 + (1 - lam) * L_S2).")
    self.channels = {m: len(mae_lib.band_names(config, m)) for m in MODALITIES}
    self.probs = scenario_probabilities(config)
    self.matched = config.get("complementary_visible", "all") == "matched"
    if config.get("complementary_visible", "all") not in COMPLEMENTARY_VISIBLE:
      raise ValueError(f"config.complementary_visible={config.complementary_visible!r}: choose one of "
                       f"{COMPLEMENTARY_VISIBLE}.")
    self.plain_loss = config.get("plain_loss", "channels")
    if self.plain_loss not in PLAIN_LOSSES:
      raise ValueError(f"config.plain_loss={self.plain_loss!r}: choose one of {PLAIN_LOSSES}.")
    p2 = self.patch_size ** 2
    if self.plain:
      self.groups = ("s1s2",)
      dtype = jnp.dtype(config.compute_dtype)
      self.encoder = vit.ViTEncoder(
          **mae_lib.encoder_size(config), patch_size=self.patch_size,
          in_channels={"s1s2": self.channels["s1"] + self.channels["s2"]}, use_cls_token=config.model.use_cls_token,
          dtype=dtype, dropout_rate=config.model.get("dropout_rate", 0.0),
          attention=config.model.get("attention", "auto"))
      out_dim = p2 * (self.channels["s1"] + self.channels["s2"])
    else:
      self.groups = MODALITIES
      self.encoder = mae_lib.build_encoder(config, MODALITIES)
      out_dim = tuple(p2 * self.channels[m] for m in MODALITIES)
    self.decoder = vit.ViTLiteDecoder(**mae_lib.decoder_size(config), out_dim=out_dim,
                                      dtype=jnp.dtype(config.compute_dtype),
                                      dropout_rate=config.model.get("dropout_rate", 0.0),
                                      attention=config.model.get("attention", "auto"),
                                      **vit.stack_options(config.model))
    self.tasks = (Task(self.name, "paired", ("s1", "s2"), self.loss, param_prefixes=_PARAMS,
                       accumulation=lambda k: (self.prepare, functools.partial(self.loss, micro_batches=k))),)

  # --- shapes and masks ---------------------------------------------------------------------------------------
  def _grid(self, batch) -> tuple[int, int]:
    s1, s2 = batch["s1"], batch["s2"]
    if s1.shape[:3] != s2.shape[:3]:
      raise ValueError(f"{self.name}: S1 {s1.shape} and S2 {s2.shape} must share batch and spatial size.")
    for m in MODALITIES:
      if batch[m].shape[-1] != self.channels[m]:
        raise ValueError(f"{self.name}: batch {m!r} has {batch[m].shape[-1]} channels but config.bands.{m} names "
                         f"{self.channels[m]} bands; make config.bands match the data (data.*.s2_bands).")
    return vit.patch_grid(s2.shape[1], s2.shape[2], self.patch_size)

  def _images(self, batch) -> dict[str, jax.Array]:
    if self.plain:  # channels: S1 first, then S2
      return {"s1s2": jnp.concatenate([batch["s1"], batch["s2"]], axis=-1)}
    return {m: batch[m] for m in MODALITIES}

  def num_visible(self, length: int) -> int:
    """Encoder tokens per sample of the independent / drop scenarios (all samples of the plain variant) for a
    grid of `length` positions; complementary samples show `length`."""
    return num_visible(self.config, length * len(self.groups))

  def row_groups(self, batch_size: int, length: int) -> list[tuple[int, int, int]]:
    """[(first row, end row, encoder tokens per row)] of the batch's static groups (see the module docstring)."""
    n = self.num_visible(length)
    if self.plain:
      return [(0, batch_size, n)]
    b_c = num_complementary(batch_size, self.probs)
    groups = [(0, b_c, self.complementary_tokens(length)), (b_c, batch_size, n)]
    return [g for g in groups if g[1] > g[0]]

  def complementary_tokens(self, length: int) -> int:
    """Encoder tokens of a complementary row: L, or n with config.complementary_visible="matched"."""
    return self.num_visible(length) if self.matched else length

  def micro_group_sizes(self, rows: int, k: int) -> tuple[int, int]:
    """Gradient accumulation: (complementary, other) row capacities of one micro-batch of `rows` rows out of k.

    The whole batch of rows * k has its first `num_complementary` rows complementary; the strided split
    (`micro_batch_rows`) gives micro-batch j some of them, a count that may differ by one between micro-batches
    (3 complementary rows of 8 over 2 micro-batches: 2 and 1). Shapes inside the accumulation scan are static, so
    each group gets the largest count any micro-batch needs; a micro-batch with fewer fills the spare slots with
    rows of the other kind whose outputs are discarded (at most one row per group: that is the price of exact
    accumulation with two encoder lengths)."""
    table = micro_batch_rows(rows * k, k)
    comp = (table < num_complementary(rows * k, self.probs)).sum(axis=1)
    return int(comp.max()), int(rows - comp.min())

  def masks(self, rng: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """(visible (B, G*L) bool, scenario (B,) int32); the plain variant: MAE random masking, scenario all 0."""
    n = self.num_visible(length)
    if self.plain:
      keep_ids, _ = masking.random_split(rng, batch_size, length, n)
      return masking.ids_to_mask(keep_ids, length), jnp.zeros((batch_size,), jnp.int32)
    return mask_module(rng, batch_size, length, n, self.probs, self.matched)

  # --- contract -----------------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch):
    grid = self._grid(batch)
    n = self.num_visible(grid[0] * grid[1])
    enc_rng, dec_rng = jax.random.split(rng)
    images = {k: jnp.zeros((1,) + v.shape[1:]) for k, v in self._images(batch).items()}
    # Every entry layer, then the blocks (ViTEncoder.__call__ knows only s2=/s1=, not the plain "s1s2").
    enc = self.encoder.init(enc_rng, images, method=lambda mod, x: mod.encode(sum(mod.embed(x).values())))
    latent = jnp.zeros((1, n + int(self.encoder.use_cls_token), self.encoder.width))
    dec = self.decoder.init(dec_rng, latent, grid, jnp.zeros((1, n), jnp.int32), self.encoder.use_cls_token)
    return {"encoder": enc["params"], "decoder": dec["params"]}, {}

  def update_state(self, params, state, step):
    del params, step
    return state

  def prepare(self, batch, rng) -> dict[str, jax.Array]:
    """Gradient accumulation (Task.accumulation): the whole batch's masks and scenarios, the normalizer of each loss
    term (scenarios mask different numbers of tokens, so micro-batches differ in their counts) and the scenario
    counts (metrics)."""
    grid = self._grid(batch)
    length = grid[0] * grid[1]
    visible, scenario = self.masks(mae_lib.split_rng(rng)[0], batch["s2"].shape[0], length)
    out = {"_visible": visible, "_scenario": scenario}
    if self.plain:
      weights = self._plain_pixel_weights(batch)
      out["_per_row"] = mae_lib.row_normalizer(~visible, weights)
      out["_per_row_masked"] = mae_lib.row_normalizer(~visible)
      for m in MODALITIES:  # plain_loss="lam": the per-modality terms' normalizers
        out[f"_per_row_{m}"] = mae_lib.row_normalizer(~visible, mae_lib.pixel_weights(batch, m, self.patch_size))
      return out
    for g, m in enumerate(MODALITIES):
      out[f"_per_row_{m}"] = mae_lib.row_normalizer(~visible[:, g * length:(g + 1) * length],
                                                    mae_lib.pixel_weights(batch, m, self.patch_size))
    for i, name in enumerate(SCENARIOS):
      out[f"_scenario_{name}"] = jnp.sum(scenario == i).astype(jnp.float32)
    return out

  def forward(self, params, batch, rng, train: bool, micro_batches: int = 1):
    """-> (predictions {modality: (B, L, p*p*C)}, visible {modality: (B, L) bool}, scenario (B,) int32).
    The plain variant adds "s1s2": the prediction of all channels. The mask depends only on `rng` (the same for
    `loss` and `reconstruct`), unless the batch carries `prepare`'s draws: then `batch` is one of `micro_batches`
    micro-batches of the batch they were drawn for (gradient accumulation)."""
    grid = self._grid(batch)
    length = grid[0] * grid[1]
    b = batch["s2"].shape[0]
    mask_rng, enc_rngs, dec_rngs = mae_lib.split_rng(rng)
    ready = mae_lib.prepared(batch, "_visible", "_scenario")
    visible, scenario = ready if ready else self.masks(mask_rng, b, length)
    enc = {"params": params["encoder"]}
    tokens = self.encoder.apply(enc, self._images(batch), method="embed")
    all_tokens = jnp.concatenate([tokens[g] for g in self.groups], axis=1)  # (B, G*L, D), token = pos + L*g
    if ready and not self.plain:
      # Which rows are complementary is drawn, not positional, in a micro-batch: gather each group's rows (the
      # complementary ones first), sized for the micro-batch that needs most (`micro_group_sizes`).
      cap_c, cap_r = self.micro_group_sizes(b, micro_batches)
      order = jnp.argsort(scenario != 1, stable=True).astype(jnp.int32)
      groups = [(order[:cap_c], self.complementary_tokens(length)), (order[b - cap_r:], self.num_visible(length))]
      groups = [(rows, count) for rows, count in groups if rows.shape[0]]
    else:
      groups = [(slice(lo, hi), count) for lo, hi, count in self.row_groups(b, length)]
    outs = []
    for i, (rows, count) in enumerate(groups):  # static groups: one encoder length each
      ids = masking.mask_to_ids(visible[rows], count)
      fold = lambda r: {k: jax.random.fold_in(v, i) for k, v in r.items()}  # noqa: E731
      latent = self.encoder.apply(enc, masking.gather_tokens(all_tokens[rows], ids), train, method="encode",
                                  rngs=fold(enc_rngs))
      out = self.decoder.apply({"params": params["decoder"]}, latent, grid, ids, self.encoder.use_cls_token, train,
                               rngs=fold(dec_rngs))
      outs.append(out if self.plain else tuple(out))
    if ready and not self.plain:  # back to row order: each row's prediction from the group of its kind
      comp = scenario == 1
      per_group = [tuple(jnp.zeros((b,) + o.shape[1:], o.dtype).at[rows].set(o) for o in out)
                   for (rows, _), out in zip(groups, outs)]
      if len(per_group) == 1:
        preds = dict(zip(MODALITIES, per_group[0]))
      else:
        preds = {m: jnp.where(comp[:, None, None], per_group[0][g], per_group[1][g])
                 for g, m in enumerate(MODALITIES)}
      shown = {m: visible[:, g * length:(g + 1) * length] for g, m in enumerate(MODALITIES)}
      return preds, shown, scenario
    if self.plain:
      out = jnp.concatenate(outs, axis=0)
      c1 = self.channels["s1"]
      pixels = out.reshape(b, length, self.patch_size ** 2, -1)  # patchify order: (py, px, c)
      preds = {"s1": pixels[..., :c1].reshape(b, length, -1), "s2": pixels[..., c1:].reshape(b, length, -1),
               "s1s2": out}
      shown = {"s1": visible, "s2": visible}
    else:
      preds = {m: jnp.concatenate([o[g] for o in outs], axis=0) for g, m in enumerate(MODALITIES)}
      shown = {m: visible[:, g * length:(g + 1) * length] for g, m in enumerate(MODALITIES)}
    return preds, shown, scenario

  def _plain_pixel_weights(self, batch) -> jax.Array | None:
    """The plain variant's (B, L, p*p*(C1+C2)) pixel weights: S1 no-data pixels (the pipeline's s1_valid) leave the
    loss; S2 channels always count. None when the batch has no s1_valid."""
    if "s1_valid" not in batch:
      return None
    image = self._images(batch)["s1s2"]
    c1 = self.channels["s1"]
    valid = jnp.broadcast_to(batch["s1_valid"][..., None].astype(jnp.float32), image.shape[:3] + (c1,))
    return vit.patchify(jnp.concatenate([valid, jnp.ones(image.shape[:3] + (image.shape[-1] - c1,))], -1),
                        self.patch_size)

  def loss_from(self, preds, batch, visible) -> tuple[jax.Array, dict]:
    """Loss on the masked tokens only (targets from `batch`), and the per-modality terms. Normalized by the whole
    batch's counts when the batch carries `prepare`'s `_per_row*` entries (a micro-batch)."""
    p = self.patch_size
    if self.plain and self.plain_loss == "lam":  # JointMAE's loss on the plain encoder's per-modality predictions
      terms = {m: mae_lib.patch_mse(preds[m], vit.patchify(batch[m], p), ~visible[m], self.norm_pix_loss,
                                    mae_lib.pixel_weights(batch, m, p), per_row=batch.get(f"_per_row_{m}"))
               for m in MODALITIES}
      return self.lam * terms["s1"] + (1.0 - self.lam) * terms["s2"], {f"loss_{m}": v for m, v in terms.items()}
    if self.plain:  # a plain MAE on the concatenated channels: every channel of a masked patch counts equally
      image = self._images(batch)["s1s2"]
      target = vit.patchify(image, p).astype(jnp.float32)
      loss = mae_lib.patch_mse(preds["s1s2"], target, ~visible["s1"], self.norm_pix_loss,
                               self._plain_pixel_weights(batch), per_row=batch.get("_per_row"))
      if self.norm_pix_loss:
        target = mae_lib.normalize_patches(target)[0]
      sq = jnp.square(preds["s1s2"].astype(jnp.float32) - target)  # the per-modality terms: metrics only
      b, length = sq.shape[:2]
      sq = sq.reshape(b, length, p * p, -1)
      c1 = self.channels["s1"]
      masked = ~visible["s1"]
      per_row = batch.get("_per_row_masked")
      mean = (masking.masked_mean if per_row is None else
              lambda v, w: (v * w.astype(v.dtype)).sum() / (per_row * v.shape[0]))
      terms = {"s1": mean(sq[..., :c1].mean(axis=(2, 3)), masked), "s2": mean(sq[..., c1:].mean(axis=(2, 3)), masked)}
      return loss, {f"loss_{m}": v for m, v in terms.items()}
    terms = {m: mae_lib.patch_mse(preds[m], vit.patchify(batch[m], p), ~visible[m], self.norm_pix_loss,
                                  mae_lib.pixel_weights(batch, m, p), per_row=batch.get(f"_per_row_{m}"))
             for m in MODALITIES}
    loss = self.lam * terms["s1"] + (1.0 - self.lam) * terms["s2"]
    return loss, {f"loss_{m}": v for m, v in terms.items()}

  def loss(self, params, state, batch, rng, train: bool = True, micro_batches: int = 1):
    """`micro_batches`: under gradient accumulation, how many micro-batches the batch's `prepare` entries were
    split into (Task.accumulation); the scenario counts are then the whole batch's, as without accumulation."""
    preds, visible, scenario = self.forward(params, batch, rng, train, micro_batches)
    loss, metrics = self.loss_from(preds, batch, visible)
    if not self.plain:
      for i, name in enumerate(SCENARIOS):
        metrics[f"scenario_{name}"] = batch.get(f"_scenario_{name}", jnp.sum(scenario == i).astype(jnp.float32))
      shown = jnp.concatenate([visible[m] for m in MODALITIES], axis=1)
    else:
      shown = visible["s1"]
    metrics["visible_fraction"] = jnp.mean(shown.astype(jnp.float32))
    return loss, (metrics, state)

  def reconstruct(self, params, state, batch, rng) -> dict[str, dict[str, jax.Array]]:
    """Same mask as the loss for the same rng. Per modality: "seen" = the tokens the encoder saw (others zeroed),
    "reconstruction" = prediction at the masked tokens, input elsewhere, "target" = the input."""
    del state
    p = self.patch_size
    preds, visible, _ = self.forward(params, batch, rng, False)
    grid = self._grid(batch)
    out = {"seen": {}, "reconstruction": {}, "target": {}}
    whole = self.plain and self.plain_loss == "channels"
    if whole:  # undo norm_pix with the statistics of the whole (all-channel) patch, as the loss used
      target = vit.patchify(self._images(batch)["s1s2"], p)
      full = mae_lib.paste_prediction(preds["s1s2"], target, ~visible["s1"], self.norm_pix_loss)
      both = vit.unpatchify(full, p, grid)
      c1 = self.channels["s1"]
      pasted = {"s1": both[..., :c1], "s2": both[..., c1:]}
    for m in MODALITIES:
      target = vit.patchify(batch[m], p)
      out["seen"][m] = vit.unpatchify(jnp.where(visible[m][..., None], target, 0.0), p, grid)
      out["reconstruction"][m] = pasted[m] if whole else vit.unpatchify(
          mae_lib.paste_prediction(preds[m], target, ~visible[m], self.norm_pix_loss), p, grid)
      out["target"][m] = batch[m]
    return out

  def flops_per_sample(self, task_name: str) -> float:
    """Training FLOPs of one sample: entry layers on all patches, encoder on the visible tokens (+ CLS), decoder
    on all G*L slots (matmuls only; see mmrs/methods/flops.py). The encoder's token count is the average over a
    batch of config.batch_size rows (complementary rows show L tokens, the others n)."""
    if task_name != self.name:
      raise ValueError(f"Method {self.name} has one task {self.name!r}, not {task_name!r}.")
    p, enc, dec = self.patch_size, self.encoder, self.decoder
    length = (self.config.data.paired.image_size // p) ** 2
    cls = int(enc.use_cls_token)
    batch_size = max(int(self.config.get("batch_size", 1)), 1)
    entry = sum(flops_lib.patch_embed_flops(length, p, c, enc.width) for c in enc.in_channels.values())
    dec_size = dict(width=dec.width, depth=dec.depth, mlp_dim=dec.mlp_dim)
    forward = 0.0
    for lo, hi, n in self.row_groups(batch_size, length):
      share = (hi - lo) / batch_size
      forward += share * (flops_lib.blocks_flops(n + cls, enc.width, enc.depth, enc.mlp_dim)
                          + flops_lib.decoder_flops(n, enc.width, length, dec_size, dec.out_dim, bool(cls)))
    return flops_lib.train_flops(forward, entry)


def build(config) -> JointMAE:
  return JointMAE(config)
