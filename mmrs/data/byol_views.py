"""RS-BYOL's two views of one place, drawn on the host per record (pure numpy; runs inside grain workers).

View 1 comes from Sentinel-2, view 2 from Sentinel-1 (Jain et al., RS-BYOL):
  view1: "one_band"    one random band of the pool (default: the 10 bands at 10/20 m)      -> 1 channel
         "three_bands" three distinct random bands of the pool, random order              -> 3 channels
         "rgb"         B04, B03, B02 (the paper's RGB-S1S2 variant)                        -> 3 channels
  view2: "one_pol"     VV or VH at random                                                  -> 1 channel
         "vv_vh_copy"  VV, VH and a random copy of one of them as third channel           -> 3 channels
         "pol_two_ms"  one random polarisation + two random non-RGB bands of the pool
                       (the RGB-S1S2 variant's second view)                                 -> 3 channels
Each view then gets its own augmentation, in the paper's list (BYOL's pipeline without colour jitter, plus
random erasing): bicubic random resized crop, random flips, random 90-degree rotation, Gaussian blur, random
grayscale (3-channel views only), random erasing. Each channel is standardized with its band's mean/std
(S1 dB values are clipped to `bands.S1_DB_CLIP` first), so erased pixels (value 0) sit at the band mean.

Crop, resize and blur are one separable linear map per axis (a small matrix product per channel), computed on the
raw pixels under the crop box only; normalization is applied after it (the maps preserve constants).
"""
from __future__ import annotations

import math
import types
from typing import Any, Mapping

import ml_collections
import numpy as np

try:  # installed with scikit-learn; without it BLAS keeps its default thread count
  import threadpoolctl
except ImportError:  # pragma: no cover
  threadpoolctl = None

from mmrs import bands as bands_lib

VIEW1_KINDS = ("one_band", "three_bands", "rgb")
VIEW2_KINDS = ("one_pol", "vv_vh_copy", "pol_two_ms")


def default_views_config() -> ml_collections.ConfigDict:
  """`config.views`: which bands make each view and how they are augmented (BYOL's values unless noted)."""
  return ml_collections.ConfigDict(dict(
      view1="one_band", view2="one_pol",
      s2_bands="",  # comma-separated band pool for view 1; empty = the 10 bands at 10/20 m
      image_size=96,  # output size of both views (pixels)
      crop_scale_min=0.08, crop_scale_max=1.0,  # area fraction of the random resized crop
      crop_ratio_min=3 / 4, crop_ratio_max=4 / 3,  # aspect ratio range (log-uniform)
      flip_prob=0.5,  # each of horizontal and vertical
      rot90=True,  # a random multiple of 90 degrees (exact on the pixel grid; no interpolation)
      blur_prob1=1.0, blur_prob2=0.1,  # BYOL's asymmetric blur probabilities (view 1, view 2)
      blur_sigma_min=0.1, blur_sigma_max=2.0,  # pixels of the output view
      grayscale_prob=0.2,  # 3-channel views only: every channel becomes the channel mean
      erase_prob=0.5, erase_scale_min=0.02, erase_scale_max=0.33,  # torchvision RandomErasing defaults
      erase_ratio_min=0.3, erase_ratio_max=3.3,
  ))


def view_channels(cfg) -> tuple[int, int]:
  """(channels of view 1, channels of view 2) for a `config.views`."""
  _check_kinds(cfg)
  return (1 if cfg.view1 == "one_band" else 3), (1 if cfg.view2 == "one_pol" else 3)


def _check_kinds(cfg):
  if cfg.view1 not in VIEW1_KINDS:
    raise ValueError(f"config.views.view1={cfg.view1!r} is unknown; choose one of {VIEW1_KINDS}.")
  if cfg.view2 not in VIEW2_KINDS:
    raise ValueError(f"config.views.view2={cfg.view2!r} is unknown; choose one of {VIEW2_KINDS}.")


def _stats_arrays(stats: Any) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
  """Accepts a `bands.Stats` or a mapping with 'bands', 'mean', 'std' (a stats.json entry)."""
  if isinstance(stats, Mapping):
    names, mean, std = stats["bands"], stats["mean"], stats["std"]
  else:
    names, mean, std = stats.bands, stats.mean, stats.std
  return tuple(names), np.asarray(mean, np.float32), np.asarray(std, np.float32)


class ViewSampler:
  """`ViewSampler(cfg, stats)(record, rng) -> {"view1": (S,S,C1), "view2": (S,S,C2)}` float32, normalized.

  cfg: a `config.views` (see `default_views_config`). stats: modality -> `bands.Stats` or a mapping with
  'bands'/'mean'/'std' (from the shards' stats.json); missing modalities fall back to the published SSL4EO-S12
  statistics. Picklable (plain attributes only), so grain workers can run it; also usable as
  `grain.MapDataset.random_map(sampler)`.
  """

  def __init__(self, cfg, stats: Mapping[str, Any] | None = None):
    _check_kinds(cfg)
    # A plain namespace: picklable and fast to read per record (ConfigDict lookups are not).
    self.cfg = types.SimpleNamespace(**(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)))
    self.pool = bands_lib.parse_band_list(cfg.s2_bands) or bands_lib.S2_10_20M_BANDS
    if len(self.pool) < 3 and (cfg.view1 == "three_bands" or cfg.view2 == "pol_two_ms"):
      raise ValueError(f"config.views.s2_bands={cfg.s2_bands!r} has {len(self.pool)} band(s); views "
                       f"{cfg.view1!r}/{cfg.view2!r} draw 3 (or 2 non-RGB) bands: give more bands.")
    self.non_rgb_pool = tuple(b for b in self.pool if b not in bands_lib.S2_RGB_BANDS)
    if cfg.view2 == "pol_two_ms" and len(self.non_rgb_pool) < 2:
      raise ValueError(f"config.views.view2='pol_two_ms' needs 2 non-RGB bands in s2_bands={cfg.s2_bands!r}.")
    stats = dict(stats or {})
    s2_names, s2_mean, s2_std = _stats_arrays(stats.get("s2", bands_lib.SSL4EO_S2_L1C))
    s1_names, s1_mean, s1_std = _stats_arrays(stats.get("s1", bands_lib.SSL4EO_S1))
    needed_s2 = set(self.pool) | set(bands_lib.S2_RGB_BANDS if cfg.view1 == "rgb" else ())
    missing = sorted(needed_s2 - set(s2_names)) + sorted(set(bands_lib.S1_BANDS) - set(s1_names))
    if missing:
      raise ValueError(f"Normalization stats lack band(s) {missing} needed by config.views; "
                       "recompute stats.json for these bands or choose others in config.views.s2_bands.")
    # band name -> (mean, std), looked up per drawn channel.
    self.norm = {n: (float(m), float(s)) for n, m, s in zip(s2_names, s2_mean, s2_std)}
    self.norm.update({n: (float(m), float(s)) for n, m, s in zip(s1_names, s1_mean, s1_std)})

  # grain's RandomMapTransform interface.
  def random_map(self, record, rng: np.random.Generator):
    return self(record, rng)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_blas"}  # the controller is per process

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    # The matrix products are small: one BLAS thread is several times faster than a pool of threads that
    # competes with the other grain workers and the trainer for the cores.
    if threadpoolctl is None:
      return self._views(record, rng)
    if getattr(self, "_blas", None) is None:
      self._blas = threadpoolctl.ThreadpoolController()
    with self._blas.limit(limits=1, user_api="blas"):
      return self._views(record, rng)

  def _views(self, record, rng) -> dict[str, np.ndarray]:
    if record.get("s2") is None or record.get("s1") is None:
      raise ValueError(f"Record {record.get('id', '?')}: RS-BYOL needs both S1 and S2 (a paired dataset); "
                       "point config.data.paired.shards at paired shards.")
    channels1 = self._channels_view1(rng)
    channels2 = self._channels_view2(rng)
    view1 = self._augment(record, channels1, rng, self.cfg.blur_prob1, rgb=self.cfg.view1 == "rgb")
    view2 = self._augment(record, channels2, rng, self.cfg.blur_prob2, rgb=False)
    return {"view1": view1, "view2": view2}

  def _channels_view1(self, rng) -> list[tuple[str, str]]:
    kind = self.cfg.view1
    if kind == "one_band":
      names = [self.pool[rng.integers(len(self.pool))]]
    elif kind == "three_bands":
      names = [self.pool[i] for i in rng.choice(len(self.pool), 3, replace=False)]
    else:
      names = list(bands_lib.S2_RGB_BANDS)
    return [("s2", n) for n in names]

  def _channels_view2(self, rng) -> list[tuple[str, str]]:
    kind = self.cfg.view2
    pols = bands_lib.S1_BANDS
    if kind == "one_pol":
      return [("s1", pols[rng.integers(2)])]
    if kind == "vv_vh_copy":
      return [("s1", "VV"), ("s1", "VH"), ("s1", pols[rng.integers(2)])]
    ms = [self.non_rgb_pool[i] for i in rng.choice(len(self.non_rgb_pool), 2, replace=False)]
    return [("s1", pols[rng.integers(2)])] + [("s2", n) for n in ms]

  def _augment(self, record, channels, rng, blur_prob: float, rgb: bool) -> np.ndarray:
    cfg = self.cfg
    size = int(cfg.image_size)
    height, width = record["s2"].shape[:2]
    top, left, h, w = _random_resized_crop_box(rng, height, width, cfg)
    sigma = rng.uniform(cfg.blur_sigma_min, cfg.blur_sigma_max) if rng.random() < blur_prob else 0.0
    y0, y1, my = _resize_matrix(height, top, h, size, sigma)
    x0, x1, mx = _resize_matrix(width, left, w, size, sigma)
    raw = np.stack([self._raw_channel(record, mod, name, y0, y1, x0, x1) for mod, name in channels], axis=-1)
    view = _separable(raw, my, mx)
    mean = np.asarray([self.norm[n][0] for _, n in channels], np.float32)
    std = np.asarray([self.norm[n][1] for _, n in channels], np.float32)
    view = ((view - mean) / std).astype(np.float32)
    if cfg.rot90:
      view = np.rot90(view, k=int(rng.integers(4)))
    if rng.random() < cfg.flip_prob:
      view = view[:, ::-1]
    if rng.random() < cfg.flip_prob:
      view = view[::-1]
    view = np.ascontiguousarray(view)
    if view.shape[-1] == 3 and rng.random() < cfg.grayscale_prob:
      # Luminance weights for a true RGB view; an unweighted mean for arbitrary band triples.
      weights = np.asarray([0.299, 0.587, 0.114], np.float32) if rgb else np.full(3, 1 / 3, np.float32)
      view[:] = (view @ weights)[..., None]
    if rng.random() < cfg.erase_prob:
      _random_erase(view, rng, cfg)
    return view

  @staticmethod
  def _raw_channel(record, modality, name, y0, y1, x0, x1) -> np.ndarray:
    names = record[f"{modality}_bands"] if record.get(f"{modality}_bands") is not None else (
        bands_lib.S1_BANDS if modality == "s1" else None)
    if names is None:
      raise ValueError(f"Record {record.get('id', '?')}: 's2_bands' is missing; cannot find band {name}.")
    index = bands_lib.band_indices(names, [name])[0]
    values = record[modality][y0:y1, x0:x1, index].astype(np.float32)
    if modality == "s1":
      values = np.clip(values, *bands_lib.S1_DB_CLIP)
    return values


def _random_resized_crop_box(rng, height: int, width: int, cfg) -> tuple[float, float, float, float]:
  """torchvision RandomResizedCrop.get_params: area fraction and log-uniform aspect ratio, 10 tries, else center."""
  area = height * width
  log_ratio = (math.log(cfg.crop_ratio_min), math.log(cfg.crop_ratio_max))
  for _ in range(10):
    target = area * rng.uniform(cfg.crop_scale_min, cfg.crop_scale_max)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * ratio))
    h = round(math.sqrt(target / ratio))
    if 0 < w <= width and 0 < h <= height:
      return float(rng.integers(height - h + 1)), float(rng.integers(width - w + 1)), float(h), float(w)
  ratio = width / height
  if ratio < cfg.crop_ratio_min:
    w, h = width, round(width / cfg.crop_ratio_min)
  elif ratio > cfg.crop_ratio_max:
    h, w = height, round(height * cfg.crop_ratio_max)
  else:
    h, w = height, width
  return float((height - h) // 2), float((width - w) // 2), float(h), float(w)


def _separable(raw: np.ndarray, my: np.ndarray, mx: np.ndarray) -> np.ndarray:
  """(h, w, C) -> (S, S', C): rows mapped by `my` (S, h), columns by `mx` (S', w), as two plain 2D GEMMs."""
  h, w, c = raw.shape
  rows = (my @ raw.reshape(h, w * c)).reshape(my.shape[0], w, c)
  cols = np.ascontiguousarray(rows.transpose(1, 0, 2)).reshape(w, my.shape[0] * c)
  return (mx @ cols).reshape(mx.shape[0], my.shape[0], c).transpose(1, 0, 2)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
  """Keys' cubic convolution kernel (a = -0.5, as PIL's BICUBIC)."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = (((x - 5) * x + 8) * x - 4) * a
  return np.where(x < 1, near, np.where(x < 2, far, np.float32(0)))


def _resize_matrix(n: int, start: float, length: float, out: int, sigma: float = 0.0):
  """(lo, hi, M): M (out, hi-lo) maps source pixels [lo, hi) to `out` pixels covering [start, start+length).

  Bicubic with PIL's antialiasing when shrinking (the kernel widens by the scale); out-of-image taps are dropped
  and the rest renormalized (PIL's border rule). With sigma > 0 a Gaussian blur (sigma in output pixels,
  reflected at the border) is folded in. Rows sum to 1, so constants (and the normalization) pass through.
  """
  scale = length / out
  support = 2.0 * max(scale, 1.0)
  lo = max(int(math.floor(start - support)), 0)
  hi = min(int(math.ceil(start + length + support)), n)
  centers = start + (np.arange(out, dtype=np.float32) + 0.5) * scale
  src = np.arange(lo, hi, dtype=np.float32) + 0.5
  weights = _cubic((src[None, :] - centers[:, None]) * np.float32(1.0 / max(scale, 1.0)))
  weights /= weights.sum(axis=1, keepdims=True)
  if sigma > 0:
    weights = _blur_matrix(out, sigma) @ weights
  return lo, hi, weights


def _blur_matrix(n: int, sigma: float) -> np.ndarray:
  """(n, n) Gaussian blur with 'reflect' borders (dcb|abcd|dcb), radius 3 sigma."""
  radius = max(1, min(int(math.ceil(3 * sigma)), n - 1))
  offsets = np.arange(-radius, radius + 1)
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2).astype(np.float32)
  kernel /= kernel.sum()
  idx = np.arange(n)[:, None] + offsets[None, :]
  idx = np.where(idx < 0, -idx, idx)
  idx = np.where(idx >= n, 2 * (n - 1) - idx, idx)
  m = np.zeros((n, n), np.float32)
  np.add.at(m, (np.repeat(np.arange(n), len(offsets)), idx.ravel()), np.tile(kernel, n))
  return m


def _random_erase(view: np.ndarray, rng, cfg) -> None:
  """torchvision RandomErasing (value 0 = the band mean after normalization), in place; 10 tries."""
  height, width = view.shape[:2]
  area = height * width
  log_ratio = (math.log(cfg.erase_ratio_min), math.log(cfg.erase_ratio_max))
  for _ in range(10):
    target = area * rng.uniform(cfg.erase_scale_min, cfg.erase_scale_max)
    ratio = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target * ratio)))
    w = int(round(math.sqrt(target / ratio)))
    if 0 < h < height and 0 < w < width:
      top, left = int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1))
      view[top:top + h, left:left + w] = 0.0
      return
