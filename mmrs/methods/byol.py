"""RS-BYOL (Jain et al.): BYOL whose two views are a Sentinel-2 band (or three) and a Sentinel-1 polarisation.

Online network  = backbone -> projector -> predictor;  target network = backbone -> projector, an EMA of the
online one (xi <- tau*xi + (1-tau)*theta, tau = 0.9 in the paper, optionally cosine-scheduled to 1 as in BYOL).
Loss (per sample, symmetric): 2 - 2cos(q(z_online(v1)), z_target(v2)) + 2 - 2cos(q(z_online(v2)), z_target(v1)),
with stop-gradient on the target. Projector and predictor are the paper's 2-layer MLPs (Dense(hidden) -> BN ->
ReLU -> Dense(out)); the paper gives hidden 256 (BYOL used 4096), config keys `model.mlp_hidden_dim`/`proj_dim`.

One backbone serves both views, as in the paper (student and teacher have "identical encoders"; in every paper
variant both views have the same channel count: 1/1, 3/3, RGB/3). For the mixed combinations this code also
allows (e.g. one band + VV,VH,copy) the view with fewer channels is repeated to the larger count, the usual way
to feed a single band to a 3-channel network (the paper does so for its ImageNet baselines).

Layout: params = {"online": {"backbone", "projector", "predictor"}};
state  = {"batch_stats": online BN stats, "target": {"params": {"backbone", "projector"}, "batch_stats": ...}}.
As in the BYOL code the paper builds on (yaox12/BYOL-PyTorch), both views go through each network as one batch
of 2B (BatchNorm statistics over both views; one pass instead of two), and the target runs in training mode, so
its BatchNorm uses batch statistics and keeps its own running averages; only its params follow the EMA.
Views arrive normalized from `mmrs.data.byol_views.ViewSampler` (batch keys `view1`, `view2`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmrs.data import byol_views
from mmrs.methods import flops
from mmrs.methods.base import Task
from mmrs.models import resnet, sizes, vit


class MLP(nn.Module):
  """BYOL's projector / predictor: Dense(hidden) -> BN -> ReLU -> Dense(out)."""
  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    dense = lambda n, axes, name: nn.Dense(  # noqa: E731
        n, dtype=self.dtype, name=name, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), axes), bias_init=nn.with_logical_partitioning(
                nn.initializers.zeros, axes[1:]))
    x = dense(self.hidden_dim, ("embed", "mlp"), "dense1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn",
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))(x)
    x = dense(self.out_dim, ("mlp", "embed"), "dense2")(nn.relu(x))
    return x.astype(jnp.float32)


class ViTBackbone(nn.Module):
  """A ViT encoder as BYOL backbone: one entry layer shared by both views (modality "view"), all patches
  encoded (no masking), then the CLS token (`model.vit.pool = "cls"`) or the mean patch token ("mean")."""
  model: Any  # config.model; model.vit = {size, patch_size, pool}
  in_channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    v = self.model.vit
    use_cls = v.pool == "cls"
    if v.pool not in ("cls", "mean"):
      raise ValueError(f"config.model.vit.pool={v.pool!r} is unknown; use 'cls' or 'mean'.")
    encoder = vit.ViTEncoder(**sizes.vit_size(v.size), patch_size=v.patch_size,
                             in_channels={"view": self.in_channels}, use_cls_token=use_cls, dtype=self.dtype,
                             attention=v.get("attention", "auto"), name="vit")
    tokens = encoder.encode(encoder.embed({"view": x})["view"], train)
    pooled = tokens[:, 0] if use_cls else jnp.mean(tokens, axis=1)
    return pooled.astype(jnp.float32)


def backbone_flops(model, image_size: int, in_channels: int) -> tuple[float, float]:
  """(entry-layer, rest) forward FLOPs of the backbone on one view. The entry layer (ResNet conv1, ViT patch
  embedding) needs no input gradient, so training counts it 2x instead of 3x (see mmrs/methods/flops.py)."""
  if model.backbone == "vit":
    v = model.vit
    size = sizes.vit_size(v.size)
    length = (image_size // v.patch_size) ** 2
    entry = flops.patch_embed_flops(length, v.patch_size, in_channels, size["width"])
    return entry, flops.encoder_flops(length + (1 if v.pool == "cls" else 0), size)
  total = resnet.forward_flops(model.backbone, image_size, in_channels)
  h = (image_size + 6 - 7) // 2 + 1
  entry = 2.0 * h * h * 7 * 7 * in_channels * 64
  return entry, total - entry


def backbone_features(model) -> int:
  if model.backbone == "vit":
    return sizes.vit_size(model.vit.size)["width"]
  return resnet.ResNet(model.backbone).num_features


class BYOLNet(nn.Module):
  """backbone -> projector (-> predictor). `project` is the target network; `__call__` the online one."""
  model: Any  # config.model (ml_collections)
  in_channels: int
  dtype: Any = jnp.float32

  def setup(self):
    name = self.model.backbone
    if name == "vit":
      self.backbone = ViTBackbone(self.model, self.in_channels, self.dtype)
    else:
      self.backbone = resnet.ResNet(name, self.model.zero_init_residual, self.dtype)
    self.projector = MLP(self.model.mlp_hidden_dim, self.model.proj_dim, self.dtype)
    self.predictor = MLP(self.model.mlp_hidden_dim, self.model.proj_dim, self.dtype)

  def project(self, x, train: bool):
    return self.projector(self.backbone(x, train), train)

  def __call__(self, x, train: bool):
    z = self.project(x, train)
    return z, self.predictor(z, train)


def regression_loss(p: jax.Array, z: jax.Array) -> jax.Array:
  """BYOL's per-sample 2 - 2cos(p, z) (= squared distance of the l2-normalized vectors)."""
  p = p / jnp.maximum(jnp.linalg.norm(p, axis=-1, keepdims=True), 1e-6)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  return 2.0 - 2.0 * jnp.sum(p * z, axis=-1)


def embedding_std(z: jax.Array) -> jax.Array:
  """Std over the batch of the l2-normalized embeddings, averaged over dimensions: ~1/sqrt(d) when healthy,
  -> 0 when the embedding collapses to a constant."""
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-6)
  return jnp.mean(jnp.std(z, axis=0))


def ema_tau(byol_cfg, step: jax.Array, total_steps: int) -> jax.Array:
  """tau(step): constant, or BYOL's cosine schedule 1 - (1 - tau)(cos(pi k / K) + 1) / 2 rising to 1."""
  if byol_cfg.tau_schedule == "constant":
    return jnp.asarray(byol_cfg.tau, jnp.float32)
  if byol_cfg.tau_schedule == "cosine":
    frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
    return 1.0 - (1.0 - byol_cfg.tau) * (jnp.cos(math.pi * frac) + 1.0) / 2.0
  raise ValueError(f"config.byol.tau_schedule={byol_cfg.tau_schedule!r} is unknown; use 'constant' or 'cosine'.")


def ema_update(target: Any, online: Any, tau: jax.Array) -> Any:
  """xi <- tau * xi + (1 - tau) * theta, leaf by leaf."""
  return jax.tree.map(lambda xi, theta: tau * xi + (1.0 - tau) * theta, target, online)


class RSBYOL:
  """config.method = "rsbyol": one task `byol` on dataset "paired" (batch_kind "byol_views")."""
  name = "rsbyol"

  def __init__(self, config):
    self.config = c = config
    self.channels = byol_views.view_channels(c.views)
    self.in_channels = max(self.channels)
    self.net = BYOLNet(c.model, self.in_channels, jnp.dtype(c.compute_dtype))
    self.tasks = (Task("byol", "paired", ("s1", "s2"), self.loss_fn, batch_kind="byol_views",
                       param_prefixes=("online",)),)

  # --- views -----------------------------------------------------------------------------------------
  def _fit_channels(self, view: jax.Array, key: str) -> jax.Array:
    c = view.shape[-1]
    if c == self.in_channels:
      return view
    if self.in_channels % c:
      raise ValueError(f"Batch {key!r} has {c} channels; the backbone takes {self.in_channels} "
                       f"(config.views.view1/view2={self.config.views.view1}/{self.config.views.view2}).")
    return jnp.tile(view, (1, 1, 1, self.in_channels // c))

  def _views(self, batch):
    return self._fit_channels(batch["view1"], "view1"), self._fit_channels(batch["view2"], "view2")

  def record_transform(self, task: Task, stats: Mapping[str, Any] | None = None) -> byol_views.ViewSampler:
    """The host-side view sampler for `task`'s records, a grain random map `sampler(record, rng) -> views`.

    stats: modality -> {"bands", "mean", "std"} (a stats.json); None takes them from the dataset
    (`mmrs.data.pipeline.describe`: its stats.json, else the published statistics). The pipeline must hand the
    sampler whole records (config.data.paired.image_size = 0, no flips/rot90): it crops and augments itself.
    """
    if stats is None:
      from mmrs.data import pipeline  # pylint: disable=g-import-not-at-top  (grain; only where data is read)
      normalizer = pipeline.describe(self.config.data[task.dataset], task.modalities).normalizer
      stats = {m: {"bands": normalizer.bands[m], "mean": normalizer.mean[m], "std": normalizer.std[m]}
               for m in normalizer.bands}
    return byol_views.ViewSampler(self.config.views, stats)

  # --- contract ----------------------------------------------------------------------------------------
  def init(self, rng: jax.Array, batch):
    v1, _ = self._views(batch)
    variables = self.net.init(rng, v1[:1], train=False)
    params, stats = variables["params"], variables.get("batch_stats", {})
    unboxed = nn.meta.unbox(params)
    target = {"params": {k: jax.tree.map(jnp.copy, unboxed[k]) for k in ("backbone", "projector")},
              "batch_stats": {k: jax.tree.map(jnp.copy, stats[k]) for k in ("backbone", "projector") if k in stats}}
    return {"online": params}, {"batch_stats": stats, "target": target}

  def _online(self, params, batch_stats, x, train):
    if not train:
      return self.net.apply({"params": params, "batch_stats": batch_stats}, x, train=False), batch_stats
    out, updates = self.net.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    return out, updates["batch_stats"]

  def _target(self, target, x, train):
    variables = {"params": target["params"], "batch_stats": target["batch_stats"]}
    if not train:
      return self.net.apply(variables, x, train=False, method=BYOLNet.project), target["batch_stats"]
    z, updates = self.net.apply(variables, x, train=True, method=BYOLNet.project, mutable=["batch_stats"])
    return z, updates["batch_stats"]

  def loss_fn(self, params, state, batch, rng, train: bool):
    del rng  # views are drawn on the host; nothing random on device
    v1, v2 = self._views(batch)
    b = v1.shape[0]
    x = jnp.concatenate([v1, v2], axis=0)  # both views in one pass (BN statistics over both, as the reference)
    (z, q), stats = self._online(params["online"], state["batch_stats"], x, train)
    target = jax.lax.stop_gradient(state["target"])
    t, t_stats = self._target(target, x, train)
    t = jax.lax.stop_gradient(t)
    q1, q2, t1, t2 = q[:b], q[b:], t[:b], t[b:]
    per_sample = regression_loss(q1, t2) + regression_loss(q2, t1)
    loss = jnp.mean(per_sample)
    metrics = {  # 'loss' itself is added by the train loop
        "cos_sim": 1.0 - loss / 4.0,  # mean cos(q(online view a), target view b) over both directions
        "embed_std": 0.5 * (embedding_std(z[:b]) + embedding_std(z[b:])),
        "embed_std_target": 0.5 * (embedding_std(t1) + embedding_std(t2)),
    }
    new_state = {"batch_stats": stats, "target": {"params": state["target"]["params"], "batch_stats": t_stats}}
    return loss, (metrics, new_state)

  def update_state(self, params, state, step):
    tau = ema_tau(self.config.byol, step, self.config.total_steps)
    online = nn.meta.unbox(params["online"])
    target_params = {k: ema_update(state["target"]["params"][k], online[k], tau) for k in ("backbone", "projector")}
    return {**state, "target": {**state["target"], "params": target_params}}

  def flops_per_sample(self, task_name: str) -> float:
    """Per sample and view: online forward + backward, target forward (matmuls/convs only)."""
    if task_name != "byol":
      raise ValueError(f"RS-BYOL has one task 'byol', not {task_name!r}.")
    m = self.config.model
    entry, rest = backbone_flops(m, self.config.views.image_size, self.in_channels)
    mlp = lambda d_in: 2.0 * (d_in * m.mlp_hidden_dim + m.mlp_hidden_dim * m.proj_dim)  # noqa: E731
    projector, predictor = mlp(backbone_features(m)), mlp(m.proj_dim)
    online = flops.train_flops(rest + projector + predictor, entry)
    target = entry + rest + projector
    return 2 * (online + target)


def build(config) -> RSBYOL:
  return RSBYOL(config)
