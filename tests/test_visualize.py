"""Reconstruction PNGs: expected size, colours from band names, masked areas black, atomic write."""
import os

import numpy as np
from PIL import Image

from mmrs import bands
from mmrs.methods import visualize


def _recon(b, h, w, rng=0):
  r = np.random.default_rng(rng)
  target = {"s2": r.normal(size=(b, h, w, 12)).astype(np.float32), "s1": r.normal(size=(b, h, w, 2)).astype(np.float32)}
  seen = {m: x.copy() for m, x in target.items()}
  seen["s2"][:, :h // 2] = 0.0  # top half masked
  recon = {m: x + 0.1 for m, x in target.items()}
  return {"seen": seen, "reconstruction": recon, "target": target}


def test_visualize_writes_png_of_expected_size(tmp_path):
  path = str(tmp_path / "sub" / "recon.png")
  out = visualize.save_reconstruction_png(_recon(5, 16, 24), {"s2": bands.S2_L2A_BANDS, "s1": "VV,VH"}, path,
                                          max_images=3, scale=2, titles=False)
  assert out == path
  image = Image.open(path)
  rows, cols, pad = 3, 6, 2
  assert image.size == (cols * 24 * 2 + (cols + 1) * pad, rows * 16 * 2 + (rows + 1) * pad)
  assert image.mode == "RGB"
  assert os.listdir(tmp_path / "sub") == ["recon.png"]  # no temporary file left behind
  pixels = np.asarray(image)
  # First row, first tile (S2 seen): masked top half black, visible bottom half not.
  tile = pixels[pad:pad + 32, pad:pad + 48]
  assert (tile[:16] == 0).all() and tile[16:].any()


def test_visualize_s2_rgb_follows_band_names():
  recon = _recon(1, 8, 8)
  names = bands.S2_L2A_BANDS
  grid_a = visualize.render_grid(recon, {"s2": names}, scale=1, pad=0, titles=False)
  # Swapping the data of B04 with B01 and the names with it draws the same picture.
  swapped = list(names)
  i, j = names.index("B04"), names.index("B01")
  swapped[i], swapped[j] = swapped[j], swapped[i]
  recon_b = {k: {"s2": v["s2"][..., [names.index(n) for n in swapped]]} for k, v in recon.items()}
  grid_b = visualize.render_grid(recon_b, {"s2": tuple(swapped)}, scale=1, pad=0, titles=False)
  np.testing.assert_array_equal(grid_a, grid_b)
  assert grid_a.shape == (8, 24, 3)


def test_visualize_default_scale_makes_small_tiles_readable():
  grid = visualize.render_grid(_recon(2, 32, 32), {"s2": bands.S2_L2A_BANDS, "s1": bands.S1_BANDS}, pad=0,
                               titles=False)
  assert grid.shape == (2 * 96, 6 * 96, 3)  # 32 px tiles drawn 3x


def test_visualize_titles_name_modalities_and_columns():
  recon = _recon(2, 32, 32)
  names = {"s2": bands.S2_L2A_BANDS, "s1": bands.S1_BANDS}
  plain = visualize.render_grid(recon, names, pad=2, titles=False)
  titled = visualize.render_grid(recon, names, pad=2)
  top = visualize.HEADER_HEIGHT
  assert titled.shape == (plain.shape[0] + top, plain.shape[1], 3)
  np.testing.assert_array_equal(titled[top:], plain)  # the tiles are unchanged, below the header
  header = titled[:top]
  tile_w = 96 + 2
  for col in range(6):  # dark text above every column, on both lines (modality line spans three columns)
    xs = slice(2 + col * tile_w, 2 + col * tile_w + 96)
    assert (header[visualize.LINE_HEIGHT:, xs] < 128).any(), f"column {col} has no title"
  for m in range(2):
    assert (header[:visualize.LINE_HEIGHT, 2 + 3 * m * tile_w: 2 + 3 * (m + 1) * tile_w] < 128).any()
