"""Per-record host work: decode, band selection, crops, flips, rot90, labels; plus batching helpers.

Everything here is cheap slicing of raw arrays (S2 uint16, S1 float32 dB); normalization is left to the device
(`mmrs.data.normalize`). One `Geometry` is drawn per record and applied to every modality and the mask, so S1, S2
and labels stay aligned. Classes are top-level and picklable: grain ships them to spawned worker processes.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from mmrs import bands as bands_lib
from mmrs.data import records

ON_BAD = ("fail", "skip")


class BadRecord(NamedTuple):
  """Stands in for a record that could not be used (on_bad='skip'); dropped and counted before batching."""
  shard: str
  index: int
  reason: str


class BadRecordError(ValueError):
  """A record failed to read/decode/validate with on_bad='fail'; the message names the shard and record index."""


@dataclasses.dataclass(frozen=True)
class LabelSpec:
  name: str  # label set, e.g. "ben19"; batches carry it as `label_<name>`
  kind: str  # multi_label | class | mask
  num_classes: int


@dataclasses.dataclass(frozen=True)
class Geometry:
  top: int
  left: int
  height: int
  width: int
  flip_lr: bool
  flip_ud: bool
  rot90: int  # number of quarter turns


def sample_geometry(rng: np.random.Generator, h: int, w: int, size: int, *, random_resized_crop: bool = False,
                    flips: bool = True, rot90: bool = True, scale: tuple[float, float] = (0.2, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), augment: bool = True) -> Geometry:
  """Draws the crop box and flips/rotation for one record (`augment=False`: centre crop, nothing else;
  `size=0`: the whole record)."""
  if size <= 0:  # no crop: the whole record (flips / rot90 still apply when asked for)
    random_resized_crop, size = False, 0
  if not augment:
    ch, cw = (min(h, size), min(w, size)) if size else (h, w)
    return Geometry((h - ch) // 2, (w - cw) // 2, ch, cw, False, False, 0)
  if random_resized_crop:
    ch, cw = _rrc_box(rng, h, w, scale, ratio)
  else:
    ch, cw = (size, size) if size else (h, w)
  u = rng.random(5)  # one draw for everything: numpy's per-call overhead dominates at this size
  top = min(int(u[0] * (h - ch + 1)), h - ch)
  left = min(int(u[1] * (w - cw + 1)), w - cw)
  return Geometry(top, left, ch, cw, bool(flips and u[2] < 0.5), bool(flips and u[3] < 0.5),
                  min(int(u[4] * 4), 3) if rot90 else 0)


def _rrc_box(rng, h, w, scale, ratio) -> tuple[int, int]:
  """Inception-style box: area fraction from `scale`, log-uniform aspect ratio; falls back to the full image."""
  area = h * w
  log_r = np.log(ratio)
  for _ in range(10):
    target = area * rng.uniform(*scale)
    ar = np.exp(rng.uniform(*log_r))
    cw = int(round(np.sqrt(target * ar)))
    ch = int(round(np.sqrt(target / ar)))
    if 0 < cw <= w and 0 < ch <= h:
      return ch, cw
  return h, w


def apply_geometry(arr: np.ndarray, g: Geometry, size: int, *, nearest: bool = False) -> np.ndarray:
  """Crop -> resize to (size, size) when the box differs (size 0: never) -> flips -> rot90, on (H, W[, C]).

  Without a resize this returns views (no copy); batching copies once. `nearest` resizing is for label masks.
  """
  out = arr[g.top:g.top + g.height, g.left:g.left + g.width]
  if size and (g.height, g.width) != (size, size):
    out = resize(out, size, nearest=nearest)
  if g.flip_lr:
    out = out[:, ::-1]
  if g.flip_ud:
    out = out[::-1]
  if g.rot90:  # np.rot90(out, g.rot90, axes=(0, 1)) as plain views (np.rot90's own overhead is ~5 µs a call)
    out = _ROT90[g.rot90 % 4](out)
  return out


_ROT90 = (lambda a: a, lambda a: a[:, ::-1].swapaxes(0, 1), lambda a: a[::-1, ::-1],
          lambda a: a.swapaxes(0, 1)[:, ::-1])


_PIXEL_TYPES = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_STRIP = 16  # columns per strip when copying a transposed (rot90 by 1 or 3) view: ~50 KB of source rows, in L2


def _apply_to_pixels(arr: np.ndarray, g: Geometry, size: int) -> np.ndarray:
  """`apply_geometry` on (H, W, C) data: views (no copy) where there is no resize. `stack` copies them once, whole
  pixels at a time (`copy_pixels`), straight into the batch."""
  return apply_geometry(arr, g, size)


def _pixel_view(arr: np.ndarray) -> np.ndarray | None:
  """(H, W) view of an (H, W, C) array whose channels are contiguous, one element per pixel (an unsigned word
  where the pixel fits one, else raw bytes); None when the channels are strided."""
  if arr.ndim != 3 or arr.shape[-1] < 1 or (arr.shape[-1] > 1 and arr.strides[-1] != arr.itemsize):
    return None
  nbytes = arr.shape[-1] * arr.itemsize
  return arr.view(_PIXEL_TYPES.get(nbytes) or np.dtype((np.void, nbytes)))[..., 0]


def copy_pixels(dst: np.ndarray, src: np.ndarray) -> None:
  """dst[...] = src (same shape and dtype; dst C-contiguous), fast for flipped / rotated views of (H, W, C) pixels.

  numpy copies a view with a small contiguous channel axis channel by channel (S2: 13 uint16 per pixel), ~4x
  slower than a plain copy, and a transposed view (rot90 by 1 or 3) walks the source a cache line per pixel. Here
  each pixel moves as one element, and a transposed view is copied in strips of `_STRIP` columns whose source rows
  stay in cache. The bytes are those of `dst[...] = src`."""
  if src.flags.c_contiguous or src.ndim != 3:
    dst[...] = src
    return
  s, d = _pixel_view(src), _pixel_view(dst)
  if s is None:
    dst[...] = src
  elif abs(s.strides[0]) < abs(s.strides[1]):  # transposed: strips of columns
    for j in range(0, s.shape[1], _STRIP):
      d[:, j:j + _STRIP] = s[:, j:j + _STRIP]
  else:
    d[...] = s


def resize(arr: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
  """Resizes the first two axes to (size, size): bilinear (half-pixel centres) or nearest; keeps the dtype."""
  if nearest:
    rows = _nearest_index(arr.shape[0], size)
    cols = _nearest_index(arr.shape[1], size)
    return arr[rows][:, cols]
  out = _lerp_axis(_lerp_axis(arr.astype(np.float32), size, 0), size, 1)
  if np.issubdtype(arr.dtype, np.integer):
    info = np.iinfo(arr.dtype)
    out = np.clip(np.rint(out), info.min, info.max)
  return out.astype(arr.dtype)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _lerp_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
  n_in = x.shape[axis]
  if n_in == n_out:
    return x
  pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
  i0 = np.floor(pos).astype(np.int64)
  i1 = np.minimum(i0 + 1, n_in - 1)
  shape = [1] * x.ndim
  shape[axis] = n_out
  frac = (pos - i0).astype(np.float32).reshape(shape)
  a, b = np.take(x, i0, axis), np.take(x, i1, axis)
  return a + (b - a) * frac


class DecodeAugment:
  """grain random-map transform: (shard, index, bytes | record dict | Exception) -> dict of arrays.

  Output: the selected modalities (`s2` uint16 (S, S, C), `s1` float32 dB clipped to `bands.S1_DB_CLIP`, with
  `s1_valid` (S, S) uint8, 1 = a measured pixel, cropped/flipped/rotated like the pixels; a record whose S1 is
  mostly no-data (`records.MAX_S1_NODATA_FRACTION`) counts as S1-missing; with missing_s1='fill' an S2 record
  without (usable) S1 gets an all-invalid S1 instead: the S2-only fallback for S1+S2 models),
  `label_<set>` per label spec (multi-hot float32 (K,), int32 class id, or int32 (S, S) mask with -1 = ignore),
  then `record_transform(record, rng)` if given (its record also carries `id` and `<modality>_bands`, the
  names of the channels it holds; it must return arrays only). image_size=0 keeps whole records. Bad records
  raise `BadRecordError` (on_bad='fail') or become `BadRecord` (on_bad='skip').
  """

  def __init__(self, *, modalities: Sequence[str], bands: dict[str, Sequence[str]], image_size: int,
               random_resized_crop: bool = False, flips: bool = True, rot90: bool = True, augment: bool = True,
               rrc_scale: tuple[float, float] = (0.2, 1.0), labels: Sequence[LabelSpec] = (),
               on_bad: str = "fail", default_bands: dict[str, Sequence[str]] | None = None,
               record_transform: Callable[[dict, np.random.Generator], dict] | None = None,
               missing_s1: str = "error"):
    if on_bad not in ON_BAD:
      raise ValueError(f"data.on_bad={on_bad!r}: use one of {ON_BAD}.")
    if missing_s1 not in ("error", "fill"):
      raise ValueError(f"data.missing_s1={missing_s1!r}: use 'error' or 'fill'.")
    self.missing_s1 = missing_s1
    self.modalities = tuple(modalities)
    self.bands = {m: tuple(bands[m]) for m in self.modalities}
    self.default_bands = {m: tuple(v) for m, v in (default_bands or {}).items()}
    self.size = int(image_size)
    if self.size <= 0 and random_resized_crop:
      raise ValueError("data.image_size=0 (whole records) cannot be combined with data.random_resized_crop=True.")
    self.rrc = bool(random_resized_crop)
    self.flips, self.rot90, self.augment = bool(flips), bool(rot90), bool(augment)
    self.rrc_scale = tuple(rrc_scale)
    self.labels = tuple(labels)
    self.on_bad = on_bad
    self.record_transform = record_transform
    self._band_cache: dict = {}
    self._ones: dict = {}

  def __call__(self, element: tuple[str, int, Any], rng: np.random.Generator):
    shard, index, payload = element
    try:
      if isinstance(payload, Exception):
        raise records.RecordError(f"unreadable ({type(payload).__name__}: {payload})")
      rec = records.decode(payload) if isinstance(payload, (bytes, bytearray, memoryview)) else payload
      out = self._transform(rec, rng)
      rid = rec.get("id", f"{shard}:{index}")
    except (records.RecordError, ValueError, KeyError, IndexError, TypeError) as e:
      reason = str(e) if isinstance(e, (records.RecordError, ValueError)) else f"{type(e).__name__}: {e}"
      if self.on_bad == "fail":
        raise BadRecordError(
            f"{shard} record {index}: {reason}. Regenerate the shard with data_prep, or set data.on_bad='skip' "
            "to drop bad records (they are counted and logged).") from None
      return BadRecord(shard, index, reason)
    if self.record_transform is not None:
      # The transform also sees the id and the band names of the channels it gets (e.g. BYOL picks bands).
      out.update({f"{m}_bands": self.bands[m] for m in self.modalities}, id=rid)
      out = self.record_transform(out, rng)
    return out

  def _transform(self, rec: dict, rng: np.random.Generator) -> dict:
    rid = rec.get("id", "?")
    arrays = {}
    fill_s1 = (self.missing_s1 == "fill" and "s1" in self.modalities and rec.get("s2") is not None
               and (rec.get("s1") is None or records.s1_nodata_fraction(rec) > records.MAX_S1_NODATA_FRACTION))
    for m in self.modalities:
      if m == "s1" and fill_s1:
        continue
      a = rec.get(m)
      if a is None:
        raise records.RecordError(f"record {rid!r} has no {m.upper()} but the task needs {list(self.modalities)}")
      if a.ndim != 3:
        raise records.RecordError(f"record {rid!r}: {m} must be (H, W, C), got shape {a.shape}")
      arrays[m] = a
    hw = {a.shape[:2] for a in arrays.values()}
    if len(hw) != 1:
      raise records.RecordError(f"record {rid!r}: modalities have different grids {sorted(hw)}")
    if "s1" in arrays and records.s1_nodata_fraction(rec) > records.MAX_S1_NODATA_FRACTION:
      raise records.RecordError(
          f"record {rid!r}: {100 * records.s1_nodata_fraction(rec):.0f}% of its S1 pixels are no-data (more than "
          f"{100 * records.MAX_S1_NODATA_FRACTION:.0f}%), so it counts as S1-missing but the task needs "
          f"{list(self.modalities)}")
    h, w = hw.pop()
    if self.size and not self.rrc and (h < self.size or w < self.size):
      raise records.RecordError(f"record {rid!r} is {h}x{w} px, smaller than data.image_size={self.size}; lower "
                                "data.image_size or set data.random_resized_crop=True")
    g = sample_geometry(rng, h, w, self.size, random_resized_crop=self.rrc, flips=self.flips, rot90=self.rot90,
                        scale=self.rrc_scale, augment=self.augment)
    out = {}
    in_place = dataclasses.replace(g, top=0, left=0)
    for m, a in arrays.items():
      have = rec.get(f"{m}_bands") or self.default_bands.get(m) or bands_lib.MODALITY_BANDS[m]
      # Crop first (a view), then select bands: the copy touches only the cropped pixels.
      crop = a[g.top:g.top + g.height, g.left:g.left + g.width]
      idx = self._band_index(m, tuple(have), a.shape[-1])
      if idx is not None:
        crop = crop[..., idx]
      if m == "s1":
        crop = np.clip(crop, *bands_lib.S1_DB_CLIP)
      out[m] = _apply_to_pixels(crop, in_place, self.size)
    if "s1" in arrays:
      out["s1_valid"] = self._s1_valid(rec, g, (h, w))
    elif fill_s1:  # S2-only fallback: an all-invalid S1 (0 after normalization, left out of every loss)
      shape = (self.size, self.size) if self.size else (g.height, g.width)
      key = ("fill", shape, len(self.bands["s1"]))
      if key not in self._ones:
        self._ones[key] = (np.full((*shape, len(self.bands["s1"])), bands_lib.S1_NODATA_FILL_DB, np.float32),
                           np.zeros(shape, np.uint8))
      out["s1"], out["s1_valid"] = self._ones[key]
    for spec in self.labels:
      out[f"label_{spec.name}"] = self._label(rec, spec, g, (h, w))
    return out

  def _s1_valid(self, rec: dict, g: Geometry, hw: tuple[int, int]) -> np.ndarray:
    """(S, S) uint8 S1 validity with the pixels' crop/flip/rot90. A resized crop counts a pixel valid only when
    every source pixel it blends is valid (bilinear weight of the valid pixels == 1)."""
    valid = rec.get("s1_valid")
    if valid is None:
      shape = (self.size, self.size) if self.size else (g.height, g.width)
      if shape not in self._ones:
        self._ones[shape] = np.ones(shape, np.uint8)
      return self._ones[shape]
    if valid.shape != hw:
      raise records.RecordError(f"record {rec.get('id', '?')!r}: s1_valid shape {valid.shape} differs from the "
                                f"image grid {hw}")
    if self.size and (g.height, g.width) != (self.size, self.size):
      box = valid[g.top:g.top + g.height, g.left:g.left + g.width].astype(np.float32)
      valid = (resize(box, self.size) >= 1.0).astype(np.uint8)
      g = Geometry(0, 0, self.size, self.size, g.flip_lr, g.flip_ud, g.rot90)
    return apply_geometry(valid, g, self.size)

  def _band_index(self, m: str, have: tuple[str, ...], channels: int) -> np.ndarray | None:
    """Channel indices giving the selected bands (None = already in order), cached per stored band list."""
    if channels != len(have):
      raise records.RecordError(f"{m} has {channels} channels but {len(have)} band names {list(have)}")
    key = (m, have)
    if key not in self._band_cache:
      idx = bands_lib.band_indices(have, self.bands[m])
      self._band_cache[key] = None if idx == list(range(len(have))) else np.asarray(idx)
    return self._band_cache[key]

  def _label(self, rec: dict, spec: LabelSpec, g: Geometry, hw: tuple[int, int]) -> np.ndarray:
    rid = rec.get("id", "?")
    if spec.kind == "mask":
      mask = rec.get("mask")
      if mask is None:
        raise records.RecordError(f"record {rid!r} has no mask for label set {spec.name!r}")
      if mask.shape != hw:
        raise records.RecordError(f"record {rid!r}: mask shape {mask.shape} differs from the image grid {hw}")
      return apply_geometry(mask, g, self.size, nearest=True).astype(np.int32)
    labels = rec.get("labels") or {}
    if spec.name not in labels:
      raise records.RecordError(f"record {rid!r} has no labels for set {spec.name!r} (it has {sorted(labels)})")
    value = np.asarray(labels[spec.name], np.int64).reshape(-1)
    if value.size and (value.min() < 0 or value.max() >= spec.num_classes):
      raise records.RecordError(f"record {rid!r}: {spec.name} label(s) {value.tolist()} outside "
                                f"[0, {spec.num_classes})")
    if spec.kind == "multi_label":
      hot = np.zeros(spec.num_classes, np.float32)
      hot[value] = 1.0
      return hot
    if spec.kind == "class":
      if value.size != 1:
        raise records.RecordError(f"record {rid!r}: class label set {spec.name!r} needs one id, got {value.tolist()}")
      return np.int32(value[0])
    raise ValueError(f"Label set {spec.name!r} has unknown kind {spec.kind!r}: use multi_label, class or mask.")


def stack(elements: Sequence[dict]) -> dict:
  """Stacks a list of same-keyed records into a batch dict (arrays with a leading batch axis): np.stack's result;
  pixel arrays of one shape and dtype (views from the crop/flip/rot90) are copied once each with `copy_pixels`."""
  out = {}
  for k in elements[0]:
    values = [e[k] for e in elements]
    first = values[0]
    if (not isinstance(first, np.ndarray) or first.ndim != 3
        or any(not isinstance(v, np.ndarray) or v.shape != first.shape or v.dtype != first.dtype for v in values)):
      out[k] = np.stack(values)
      continue
    out[k] = np.empty((len(values),) + first.shape, first.dtype)
    for i, v in enumerate(values):
      copy_pixels(out[k][i], v)
  return out


class PadToBatch:
  """grain batch_fn for evaluation: stacks, zero-pads a short final batch to `batch_size`, adds `valid` (B,) bool.

  Every batch carries `valid`, so shapes (and jit compilations) stay fixed and metrics can ignore the padding.
  """

  def __init__(self, batch_size: int):
    self.batch_size = int(batch_size)

  def __call__(self, elements: Sequence[dict]) -> dict:
    batch = stack(elements)
    n = len(elements)
    pad = self.batch_size - n
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    batch["valid"] = np.arange(self.batch_size) < n
    return batch
