"""Input stresses for robustness evaluation, applied on the device to RAW batches (before normalization).

Every stress is a pure jax function `apply(images, severity, keys, ctx) -> (images, present)`:
  images    {"s2": float32 (B, H, W, C) reflectance x 1e4, "s1": float32 (B, H, W, 2) dB} as the pipeline delivers
            them with normalize="none" (S2 cast to float32; no other change), so a cloud is bright in reflectance
            and speckle is multiplicative in linear power; the runner normalizes afterwards with the run's training
            statistics, exactly like `mmrs.finetune.evaluate`.
  severity  a scalar (traced: all severities of a stress share one compiled program); its unit is `Stress.unit`.
  keys      (B,) per-sample PRNG keys, derived from (seed, stress, sample position) only: the same sample gets the
            same random field at every severity (coverage grows inside one cloud field, speckle realisations are
            one draw per look count), whatever the batch size.
  ctx       `Context`: band names, the missing-modality ranks, geometry settings.
  present   {modality: bool (B,)}: False where the stress removed that modality from the sample (missing_*); the
            runner then evaluates those samples through the encoder's missing-modality path.
At severity 0 every stress returns its input unchanged (bit for bit; tested).

The stresses:
  clouds      thick clouds + their shadows on S2, S1 untouched. Severity = % of the image under cloud.
  missing_s2  S2 absent for a fraction of the samples (%), missing_s1 likewise for S1.
  shift       S1 translated against S2 by exactly k pixels (S2 fixed), severity = k; the pixels that enter the
              crop come from the uncropped record where it has them (Context.margin), else edge replication.
  speckle     extra multiplicative Gamma speckle on S1 in linear power, severity = number of looks (0 = none).
  time_gap    S1 from another acquisition of the same place (host side, see mmrs/finetune/robustness.py).

Cloud model (`clouds`):
  * Shape: a smooth random field per sample, Gaussian white noise low-pass filtered in the Fourier domain (a
    Gaussian filter of `cloud_scale` x image size, plus 25 % of a 4x finer one for ragged edges). The cloud is the
    `severity` % of in-frame pixels where the field is highest (ranked, so the coverage is exact), with a soft
    edge: opacity rises from 0.5 at the cloud border to 1 over `cloud_edge` field standard deviations. Coverage
    grows monotonically with severity inside the same field; at 100 % every pixel is under cloud.
  * Spectrum: flat and bright, `CLOUD_REFLECTANCE` (top-of-atmosphere reflectance of an optically thick water
    cloud: ~0.4 from 443 to 865 nm, lower in the water-vapour band B09, near 0 in the 1375 nm cirrus band B10 where
    the atmosphere above a low cloud absorbs, and lower SWIR (B11 0.32, B12 0.18) because droplets absorb there),
    scaled per sample by a brightness in [0.9, 1.3]. These values are our choice, not measurements; they are
    checked against the decision tree of Hollstein et al. 2016, "Ready-to-Use Methods for the Detection of Clouds,
    Cirrus, Snow, Shadow, Water and Clear Sky Pixels in Sentinel-2 MSI Images", Remote Sensing 8(8):666,
    doi:10.3390/rs8080666 (Fig. 8; trained on manually labelled Sentinel-2A TOA spectra): at every brightness the
    spectrum is classified CLOUD, not cirrus, snow or clear (tests/test_robustness.py). The same TOA spectrum is
    used for L2A data (bottom-of-atmosphere over a thick cloud is close to TOA), a simplification.
  * Shadows: the cloud field displaced by the sun-angle shadow vector, d = cloud_height * tan(sun_zenith) towards
    the anti-solar azimuth, converted to pixels with `gsd_m` (defaults: 1 km cloud base, zenith 40 deg, azimuth
    150 deg = a mid-latitude Sentinel-2 morning overpass, 10 m pixels: 84 px to the north-north-west). The field
    is synthesised on a canvas larger than the image by the displacement, so clouds just outside the frame cast
    shadows into it. In a shadow the ground receives only diffuse skylight: its surface-reflected signal is
    darkened to `shadow_factor` in [0.25, 0.45] (with the cloud's soft edge), not the whole value. L2A (surface
    reflectance) is all surface signal, so the value scales. L1C is top-of-atmosphere: the atmosphere's own path
    reflectance (`PATH_REFLECTANCE`, a clear continental atmosphere at a 40 deg sun, our choice, not a
    measurement; at most the pixel's value) stays, and the atmospheric bands B01 (aerosol), B09 (water vapour)
    and B10 (cirrus), whose signal comes mostly or wholly from the atmosphere, are left as they are. The level is
    L1C when the bands include B10 (`Context.s2_level` overrides).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

# TOA reflectance (0..1) of the synthetic thick cloud per Sentinel-2 band (see the module docstring).
CLOUD_REFLECTANCE = {"B01": 0.45, "B02": 0.42, "B03": 0.40, "B04": 0.39, "B05": 0.40, "B06": 0.40, "B07": 0.42,
                     "B08": 0.42, "B8A": 0.42, "B09": 0.25, "B10": 0.02, "B11": 0.32, "B12": 0.18}
CLOUD_BRIGHTNESS = (0.9, 1.3)
# L1C shadows: TOA path reflectance (0..1) kept in a shadow; None = an atmospheric band, left unchanged.
PATH_REFLECTANCE = {"B01": None, "B02": 0.05, "B03": 0.03, "B04": 0.02, "B05": 0.015, "B06": 0.012, "B07": 0.01,
                    "B08": 0.008, "B8A": 0.007, "B09": None, "B10": None, "B11": 0.002, "B12": 0.001}
SHADOW_FACTOR = (0.25, 0.45)
REFLECTANCE_SCALE = 1e4  # records store S2 as reflectance x 1e4 (mmrs/data/records.py)


@dataclasses.dataclass(frozen=True)
class Context:
  """What the stresses need besides the images (static: part of the compiled program)."""
  s2_bands: tuple[str, ...] = ()
  num_samples: int = 1  # size of the evaluation split (missing_*: the exact fraction is of this many samples)
  cloud_scale: float = 0.15  # Gaussian filter width of the cloud field, as a fraction of the image size
  cloud_edge: float = 0.5  # opacity ramp at the cloud border, in field standard deviations
  cloud_height_m: float = 1000.0
  sun_zenith_deg: float = 40.0
  sun_azimuth_deg: float = 150.0  # clockwise from north
  gsd_m: float = 10.0  # ground size of a pixel
  s2_level: str = ""  # "L1C" | "L2A" (shadows keep L1C's path reflectance); "" = L1C when s2_bands has B10
  margin: int = 0  # shift: the batch carries this many real record pixels around the evaluated crop (cropped off)

  def toa(self) -> bool:
    if self.s2_level not in ("", "L1C", "L2A"):
      raise ValueError(f"Context.s2_level={self.s2_level!r}: use L1C, L2A or '' (from the bands).")
    return self.s2_level == "L1C" or (not self.s2_level and "B10" in self.s2_bands)

  def shadow_offset(self) -> tuple[int, int]:
    """(rows, cols) from a cloud to its shadow; rows grow southwards, cols eastwards."""
    d = self.cloud_height_m * math.tan(math.radians(self.sun_zenith_deg)) / self.gsd_m
    az = math.radians(self.sun_azimuth_deg + 180.0)  # the shadow lies on the anti-solar side
    return int(round(-math.cos(az) * d)), int(round(math.sin(az) * d))


@dataclasses.dataclass(frozen=True)
class Stress:
  name: str
  needs: tuple[str, ...]  # modalities the run must take for the stress to apply
  severities: tuple[float, ...]  # default severities, the first is 0 (clean)
  unit: str  # x-axis label
  apply: Callable | None  # None: applied on the host (time_gap)
  drops: str | None = None  # the modality whose absence this stress simulates


def _where_b(cond, a, b):
  """jnp.where with a per-sample (B,) condition broadcast over the image axes."""
  return jnp.where(cond.reshape(cond.shape + (1,) * (a.ndim - 1)), a, b)


# --- clouds -----------------------------------------------------------------------------------------------------

def _lowpass(noise, sigma_px: float):
  """Gaussian low-pass of a 2-D field via the FFT, standardized to zero mean and unit std."""
  h, w = noise.shape
  fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
  gain = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (fy ** 2 + fx ** 2)).astype(np.float32)
  out = jnp.fft.irfft2(jnp.fft.rfft2(noise) * gain, s=(h, w))
  return (out - out.mean()) / (out.std() + 1e-6)


def cloud_fields(key, height: int, width: int, ctx: Context):
  """(field on the canvas (H + |dy|, W + |dx|), frame origin (r0, c0)); the frame is canvas[r0:r0+H, c0:c0+W]."""
  dy, dx = ctx.shadow_offset()
  ch, cw = height + abs(dy), width + abs(dx)
  k1, k2 = jax.random.split(key)
  sigma = ctx.cloud_scale * max(height, width)
  field = (_lowpass(jax.random.normal(k1, (ch, cw)), sigma)
           + 0.25 * _lowpass(jax.random.normal(k2, (ch, cw)), sigma / 4))
  # A shadow at frame pixel p comes from the cloud at p - (dy, dx): place the frame so that point is on the canvas.
  return field, (max(dy, 0), max(dx, 0))


def cloud_masks(key, height: int, width: int, coverage, ctx: Context):
  """(cloud opacity, shadow opacity), each (H, W) in [0, 1]; exactly round(coverage % * H * W) pixels have cloud
  opacity > 0 (and >= 0.5); shadow only outside the cloud."""
  field, (r0, c0) = cloud_fields(key, height, width, ctx)
  dy, dx = ctx.shadow_offset()
  frame = jax.lax.dynamic_slice(field, (r0, c0), (height, width)).reshape(-1)
  n = height * width
  n_cloud = jnp.round(jnp.clip(coverage, 0.0, 100.0) / 100.0 * n).astype(jnp.int32)
  order = jnp.sort(frame)
  # Threshold between the (n - n_cloud)-th and the next value: exactly n_cloud frame pixels lie above it.
  lo = jnp.where(n_cloud >= n, -jnp.inf, order[jnp.clip(n - n_cloud - 1, 0, n - 1)])
  ranks = jnp.argsort(jnp.argsort(frame))
  in_cloud_frame = ranks >= n - n_cloud

  def opacity(f, inside):
    return jnp.where(inside, jnp.clip(0.5 + (f - lo) / ctx.cloud_edge, 0.5, 1.0), 0.0)

  cloud = opacity(frame, in_cloud_frame).reshape(height, width)
  shadow_src = jax.lax.dynamic_slice(field, (r0 - dy, c0 - dx), (height, width))
  shadow = opacity(shadow_src, (shadow_src > lo) & (n_cloud > 0))
  shadow = jnp.where(cloud > 0, 0.0, shadow)
  return cloud, shadow


def cloud_spectrum(bands) -> np.ndarray:
  missing = [b for b in bands if b not in CLOUD_REFLECTANCE]
  if missing:
    raise ValueError(f"The clouds stress has no cloud reflectance for S2 bands {missing} (it knows "
                     f"{sorted(CLOUD_REFLECTANCE)}); the run's config.bands.s2 names bands it cannot cloud.")
  return np.asarray([CLOUD_REFLECTANCE[b] * REFLECTANCE_SCALE for b in bands], np.float32)


def shadow_floor(bands, toa: bool) -> np.ndarray:
  """Per band, the reflectance x 1e4 a shadow does not darken: 0 for L2A; L1C: the path reflectance, inf for the
  atmospheric bands (nothing darkens)."""
  if not toa:
    return np.zeros(len(bands), np.float32)
  return np.asarray([np.inf if PATH_REFLECTANCE.get(b) is None else PATH_REFLECTANCE[b] * REFLECTANCE_SCALE
                     for b in bands], np.float32)


def clouds(images, severity, keys, ctx: Context):
  x = images["s2"]
  spectrum = jnp.asarray(cloud_spectrum(ctx.s2_bands))
  floor = jnp.asarray(shadow_floor(ctx.s2_bands, ctx.toa()))
  _, h, w, _ = x.shape

  def one(img, key):
    k_field, k_bright, k_shadow = jax.random.split(key, 3)
    cloud, shadow = cloud_masks(k_field, h, w, severity, ctx)
    bright = jax.random.uniform(k_bright, (), minval=CLOUD_BRIGHTNESS[0], maxval=CLOUD_BRIGHTNESS[1])
    dark = jax.random.uniform(k_shadow, (), minval=SHADOW_FACTOR[0], maxval=SHADOW_FACTOR[1])
    surface = jnp.maximum(img - jnp.minimum(img, floor), 0.0)  # the surface-reflected part (L2A: all of it)
    shaded = img - (1.0 - dark) * shadow[..., None] * surface
    clouded = shaded * (1.0 - cloud[..., None]) + bright * spectrum * cloud[..., None]
    return jnp.where((cloud + shadow)[..., None] > 0, clouded, img)

  return dict(images, s2=jax.vmap(one)(x, keys)), {}


# --- missing modality -------------------------------------------------------------------------------------------

def _missing(modality):
  def apply(images, severity, keys, ctx: Context):
    del keys
    # `_rank`: the sample's place in a seeded permutation of the split; the lowest round(f * N) ranks lose the
    # modality, so a fraction f of the split is affected exactly, nested across fractions.
    n_off = jnp.round(jnp.clip(severity, 0.0, 100.0) / 100.0 * ctx.num_samples)
    return images, {modality: images["_rank"] >= n_off}
  return apply


# --- S1/S2 misregistration --------------------------------------------------------------------------------------

DIRECTIONS = np.asarray([(0, 1), (1, 0), (0, -1), (-1, 0)], np.int32)  # (rows, cols): E, S, W, N


def translate(img, drow, dcol):
  """img (H, W, C) moved by (drow, dcol) whole pixels: out[r, c] = img[r - drow, c - dcol]; the pixels that enter
  the frame repeat the nearest edge row/column of the input (edge replication; no wrap-around, no zeros)."""
  h, w = img.shape[:2]
  rows = jnp.clip(jnp.arange(h) - drow, 0, h - 1)
  cols = jnp.clip(jnp.arange(w) - dcol, 0, w - 1)
  return img[rows][:, cols]


def shift(images, severity, keys, ctx: Context):
  """S1 moved by exactly k = severity pixels along one of the four axis directions (seeded per sample), S2 fixed.

  With ctx.margin = m the images are the evaluated crop plus m real pixels of the record on every side (the
  runner reads them so): S1 is moved on that larger frame and both modalities are cropped back to the centre, so
  up to m pixels the pixels entering the crop are the record's own, and edge replication only covers the rest."""
  k = jnp.round(severity).astype(jnp.int32)
  m = int(ctx.margin)

  def one(img, key):
    d = jnp.asarray(DIRECTIONS)[jax.random.randint(key, (), 0, 4)]
    return translate(img, d[0] * k, d[1] * k)

  out = dict(images, s1=jax.vmap(one)(images["s1"], keys))
  if m:
    for mod in ("s1", "s2"):
      if mod in out:
        out[mod] = out[mod][:, m:out[mod].shape[1] - m, m:out[mod].shape[2] - m]
  return out, {}


def shift_direction(key) -> np.ndarray:
  """The (rows, cols) unit direction `shift` uses for a sample key (for tests and pictures)."""
  return DIRECTIONS[int(jax.random.randint(key, (), 0, 4))]


# --- speckle ----------------------------------------------------------------------------------------------------

def speckle(images, severity, keys, ctx: Context):
  """S1 dB -> linear power, times Gamma(L, 1/L) noise (mean 1, variance 1/L: L-look speckle), -> dB. The data are
  already multilooked GRD (ENL ~4-5); this adds speckle of L looks on top. Severity L = 0: unchanged."""
  del ctx
  x = images["s1"]
  looks = jnp.maximum(severity, 1.0)

  def one(img, key):
    g = jax.random.gamma(key, looks, img.shape) / looks
    power = jnp.power(10.0, img / 10.0) * g
    return 10.0 * jnp.log10(jnp.maximum(power, 1e-10))

  noisy = jax.vmap(one)(x, keys)
  return dict(images, s1=jnp.where(severity > 0, noisy, x)), {}


STRESSES: dict[str, Stress] = {s.name: s for s in (
    Stress("clouds", ("s2",), tuple(float(v) for v in range(0, 101, 10)), "cloud cover (%)", clouds),
    Stress("missing_s2", ("s1", "s2"), (0.0, 25.0, 50.0, 75.0, 100.0), "samples without S2 (%)", _missing("s2"),
           drops="s2"),
    Stress("missing_s1", ("s1", "s2"), (0.0, 25.0, 50.0, 75.0, 100.0), "samples without S1 (%)", _missing("s1"),
           drops="s1"),
    Stress("shift", ("s1", "s2"), (0.0, 1.0, 2.0, 4.0, 8.0), "S1 shift against S2 (pixels)", shift),
    Stress("time_gap", ("s1", "s2"), (0.0, 30.0, 90.0, 180.0), "S1 acquired this many days from S2 (at least)",
           None),
    Stress("speckle", ("s1",), (0.0, 16.0, 8.0, 4.0, 2.0, 1.0), "added speckle (looks; 0 = none)", speckle),
)}


def sample_keys(seed: int, stress: str, sample_ids) -> jax.Array:
  """(B,) PRNG keys of (seed, stress, sample position): independent of batch size and severity."""
  base = jax.random.fold_in(jax.random.key(seed), list(STRESSES).index(stress))
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(sample_ids, jnp.uint32))


def apply(name: str, images: Mapping[str, jax.Array], severity, seed: int, ctx: Context):
  """(stressed images, present) for a batch carrying `_id` (and `_rank` for missing_*); see the module doc."""
  stress = STRESSES[name]
  images = dict(images)
  images["s2"] = images["s2"].astype(jnp.float32) if "s2" in images else None
  images = {k: v for k, v in images.items() if v is not None}
  keys = sample_keys(seed, name, images["_id"])
  return stress.apply(images, jnp.asarray(severity, jnp.float32), keys, ctx)
