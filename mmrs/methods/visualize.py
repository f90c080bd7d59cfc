"""Reconstruction PNGs: for each sample (one row) and modality, what the model saw, its reconstruction, the target.

Input: a method's `reconstruct(...)` output {"seen", "reconstruction", "target"}, each {modality: (B, H, W, C)}
normalized arrays (jax or numpy). Colours: S2 as RGB (B04, B03, B02 found by band name), S1 as false colour
(R = VV, G = VH, B = VV - VH, i.e. the ratio in dB; computed on the normalized values, so a standardized proxy),
other modalities as grey from their first channel. Each sample's channels are stretched between the 2nd and 98th
percentile of its target, and that one stretch is applied to all three tiles so they compare. Pixels the model
did not see (all channels exactly 0 in "seen") are drawn black.

Layout: tiles of H x W (times `scale`; default: the smallest integer making tiles at least 96 px high), `pad`
pixels of white around each; columns = for each modality in the order of `bands` (present in the data): seen,
reconstruction, target. With `titles` (the default) a header names them: the modality over its three columns
("S2 (B04, B03, B02)", "S1 (VV, VH, VV-VH)") and "input seen" / "reconstruction" / "target" over each column.
Image size:
  width  = n_cols * W * scale + (n_cols + 1) * pad,
  height = n_rows * H * scale + (n_rows + 1) * pad  (+ HEADER_HEIGHT with titles)
with n_rows = min(B, max_images), n_cols = 3 * modalities.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmrs import atomic_io
from mmrs import bands as bands_lib

COLUMNS = ("seen", "reconstruction", "target")
TITLES = {"seen": "input seen", "reconstruction": "reconstruction", "target": "target"}
MIN_TILE = 96  # default upscaling target (pixels) so that 32 px test crops stay readable
LINE_HEIGHT = 14  # one header line (11 px font)
HEADER_HEIGHT = 2 * LINE_HEIGHT  # modality line + column line


def _modality_title(modality: str, names: Sequence[str]) -> str:
  names = list(names)
  if modality == "s2" and all(b in names for b in bands_lib.S2_RGB_BANDS):
    return "S2 (" + ", ".join(bands_lib.S2_RGB_BANDS) + ")"
  if modality == "s1" and all(b in names for b in ("VV", "VH")):
    return "S1 (VV, VH, VV-VH)"
  return f"{modality.upper()} ({names[0] if names else 'channel 0'})"


def _font():
  try:
    return ImageFont.load_default(size=11)
  except TypeError:  # Pillow built without FreeType: the fixed bitmap font
    return ImageFont.load_default()


def _draw_header(canvas: np.ndarray, spans: Sequence[tuple[int, int, str, int]]) -> np.ndarray:
  """Draws centred text; spans = (x0, x1, text, line) with line 0 or 1 of the header."""
  image = Image.fromarray(canvas)
  draw, font = ImageDraw.Draw(image), _font()
  for x0, x1, text, line in spans:
    width = draw.textlength(text, font=font)
    draw.text((x0 + max(0, (x1 - x0 - width) / 2), line * LINE_HEIGHT + 1), text, fill=(0, 0, 0), font=font)
  return np.asarray(image)


def _colour_channels(modality: str, names: Sequence[str], image: np.ndarray) -> np.ndarray:
  """(H, W, C) normalized -> (H, W, 3) float channels to stretch."""
  names = list(names)
  if modality == "s2" and all(b in names for b in bands_lib.S2_RGB_BANDS):
    return image[..., bands_lib.band_indices(names, bands_lib.S2_RGB_BANDS)]
  if modality == "s1" and all(b in names for b in ("VV", "VH")):
    vv, vh = image[..., names.index("VV")], image[..., names.index("VH")]
    return np.stack([vv, vh, vv - vh], axis=-1)
  return np.repeat(image[..., :1], 3, axis=-1)


def _stretch(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
  """Per channel: maps the [2, 98] percentiles of `ref` to [0, 255]."""
  flat = ref.reshape(-1, ref.shape[-1])
  lo, hi = np.percentile(flat, 2, axis=0), np.percentile(flat, 98, axis=0)
  scaled = (x - lo) / np.maximum(hi - lo, 1e-6)
  return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def render_grid(recon: Mapping[str, Mapping[str, np.ndarray]], bands: Mapping[str, Sequence[str] | str],
                max_images: int = 4, scale: int | None = None, pad: int = 2, titles: bool = True) -> np.ndarray:
  """The PNG grid as a (height, width, 3) uint8 array (see the module docstring for the layout)."""
  missing = [k for k in COLUMNS if k not in recon]
  if missing:
    raise ValueError(f"Reconstruction dict lacks {missing}; a method's reconstruct() returns {list(COLUMNS)}.")
  target = recon["target"]
  modalities = [m for m in bands if m in target]
  if not modalities:
    raise ValueError(f"No modality of bands={list(bands)} is in the reconstruction ({sorted(target)}).")
  arrays = {k: {m: np.asarray(recon[k][m], np.float32) for m in modalities} for k in COLUMNS}
  b, h, w, _ = arrays["target"][modalities[0]].shape
  rows, cols = min(b, max_images), 3 * len(modalities)
  scale = scale or max(1, -(-MIN_TILE // h))
  th, tw = h * scale, w * scale
  top = HEADER_HEIGHT if titles else 0
  canvas = np.full((top + rows * th + (rows + 1) * pad, cols * tw + (cols + 1) * pad, 3), 255, np.uint8)
  spans = []
  for m_i, m in enumerate(modalities):
    names = bands_lib.parse_band_list(bands[m]) or ()
    x_m = pad + 3 * m_i * (tw + pad)
    spans.append((x_m, x_m + 3 * tw + 2 * pad, _modality_title(m, names), 0))
    spans += [(x_m + c_i * (tw + pad), x_m + c_i * (tw + pad) + tw, TITLES[key], 1) for c_i, key in enumerate(COLUMNS)]
    for r in range(rows):
      ref = _colour_channels(m, names, arrays["target"][m][r])
      for c_i, key in enumerate(COLUMNS):
        image = arrays[key][m][r]
        tile = _stretch(_colour_channels(m, names, image), ref)
        if key == "seen":
          tile[np.all(image == 0, axis=-1)] = 0
        tile = tile.repeat(scale, axis=0).repeat(scale, axis=1)
        y = top + pad + r * (th + pad)
        x = pad + (3 * m_i + c_i) * (tw + pad)
        canvas[y:y + th, x:x + tw] = tile
  return _draw_header(canvas, spans) if titles else canvas


def save_reconstruction_png(recon: Mapping[str, Mapping[str, np.ndarray]], bands: Mapping[str, Sequence[str] | str],
                            path: str, max_images: int = 4, scale: int | None = None, titles: bool = True) -> str:
  """Writes the grid to `path` atomically (temporary file + rename); returns `path` (TensorBoard: write_image).

  bands: modality -> band names of the channels, as a tuple or a comma-separated string (config.bands.s2), e.g.
  {"s2": bands.S2_L2A_BANDS, "s1": ("VV", "VH")}.
  """
  canvas = render_grid(recon, bands, max_images=max_images, scale=scale, titles=titles)
  return atomic_io.write_with(path, lambda tmp: Image.fromarray(canvas).save(tmp, format="PNG"))
