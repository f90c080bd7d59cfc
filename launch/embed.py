"""Embedding viewer: one GeoTIFF scene through a converted encoder -> a PCA picture and a GeoTIFF of embeddings.

    python -m launch.embed --encoder=ENCODER_DIR --s2=SCENE_S2.tif [--s1=SCENE_S1.tif] --out=DIR \
        [--tile=N] [--batch_size=16] [--s2_bands=B01,B02,...] [--s1_bands=VV,VH]

- Bands are matched by name: the encoder's bands (encoder.json, in its order) are picked from the file by its band
  descriptions (GDAL band names, e.g. "B04"), or by --s2_bands / --s1_bands naming the file's bands in file order.
  A band the encoder needs and the file lacks is an error naming it; extra file bands are ignored (a 13-band L1C
  file feeds a 12-band L2A encoder by dropping B10). To use an encoder on fewer bands than it was trained on,
  convert it again with `launch.convert_checkpoint --bands=...` (the missing bands then count as their mean).
- Raw values as distributed (S2 reflectance x 1e4, S1 backscatter in dB; --s1 must lie on the S2 grid) are
  standardized with the encoder's own statistics (mmrs.load_encoder's `normalize`: the convention of
  mmrs/finetune/encoder_api.py).
- The scene, of any size, is cut into tiles of --tile pixels (default: the encoder's image size; a multiple of its
  patch size), one row of tiles at a time. The last tile of a row / column is moved back inside the scene (on the
  cell grid) rather than padded, and only its cells past the previous tile are kept: a ViT token depends on its whole
  tile, and a tile that is one third padding made visibly different embeddings. Only a scene smaller than a tile (or
  the last few pixels past the cell grid) is padded, with the band means (normalized 0). Each tile's patch tokens
  (CLS dropped; a ResNet gives one vector per tile) become one cell of the embedding grid.
Outputs in --out:
  embeddings.tif  float32 GeoTIFF, one band per embedding dimension, one pixel per patch (patch_size x the scene's
                  pixel size), with the scene's CRS and a transform scaled from its own (georeferenced like the scene)
  embed.png       the scene's RGB (S2 B04/B03/B02; S1 VV/VH/VV-VH without S2) beside a false colour of the first three
                  principal components of the patch tokens (PCA over up to 200,000 sampled cells)
  embed.json      what was done: encoder, bands, tile, grid, PCA explained variance
"""
from __future__ import annotations

import os

from absl import flags
from absl import logging

from launch import cli

from mmrs import atomic_io

flags.DEFINE_string("encoder", None, "A converted encoder directory (launch.convert_checkpoint).")
flags.DEFINE_string("s2", None, "Sentinel-2 GeoTIFF (reflectance x 1e4).")
flags.DEFINE_string("s1", None, "Sentinel-1 GeoTIFF (dB), on the same grid as --s2 (or alone).")
flags.DEFINE_string("out", None, "Output directory.")
flags.DEFINE_integer("tile", 0, "Tile size in pixels (0 = the encoder's image size).")
flags.DEFINE_integer("batch_size", 16, "Tiles per encoder call.")
flags.DEFINE_string("s2_bands", "", "The --s2 file's band names in file order (default: its band descriptions).")
flags.DEFINE_string("s1_bands", "", "The --s1 file's band names in file order (default: descriptions, else VV,VH).")
flags.mark_flags_as_required(["encoder", "out"])
FLAGS = flags.FLAGS

PCA_SAMPLE = 200_000
MAX_PICTURE = 1024  # the picture's longer side, pixels (per panel)


def file_bands(path: str, count: int, descriptions, given: str, modality: str) -> tuple[str, ...]:
  """The file's band names in file order: --<m>_bands, else the band descriptions, else the full standard set."""
  from mmrs import bands as bands_lib  # pylint: disable=g-import-not-at-top

  flag = f"--{modality}_bands"
  if given:
    names = bands_lib.parse_band_list(given)
    if len(names) != count:
      raise ValueError(f"{flag} names {len(names)} bands but {path} has {count}.")
    return names
  if descriptions and all(descriptions):
    return tuple(str(d).strip() for d in descriptions)
  full = bands_lib.MODALITY_BANDS[modality]
  if modality == "s2" and count == len(bands_lib.S2_L2A_BANDS):
    full = bands_lib.S2_L2A_BANDS
  if count == len(full):
    logging.warning("%s has no band descriptions: assuming the standard %s order %s (name the file's bands with "
                    "%s=... if they are in another order).", path, modality.upper(), ",".join(full), flag)
    return tuple(full)
  raise ValueError(f"{path} has {count} bands without descriptions: name them in file order with {flag}=....")


def match_bands(path: str, have, want, modality: str) -> list[int]:
  """Indices into the file's bands of the encoder's bands `want` (error naming the missing ones)."""
  missing = [b for b in want if b not in have]
  if missing:
    raise ValueError(f"{path} lacks {modality} band(s) {missing} that the encoder takes ({list(want)}); the file has "
                     f"{list(have)}. Name the file's bands with --{modality}_bands if its descriptions are wrong, or "
                     f"convert the encoder for the bands you have (launch.convert_checkpoint --bands=...).")
  return [list(have).index(b) for b in want]


class Scene:
  """One or two co-registered GeoTIFFs, read a window at a time, with the encoder's bands picked by name."""

  def __init__(self, enc, s2: str | None, s1: str | None, s2_bands: str = "", s1_bands: str = ""):
    import rasterio  # pylint: disable=g-import-not-at-top

    self.files, self.index = {}, {}
    for m, path, given in (("s2", s2, s2_bands), ("s1", s1, s1_bands)):
      if not path:
        continue
      if m not in enc.bands:
        raise ValueError(f"--{m}={path}: the encoder was converted for {list(enc.modalities)} and has no {m} entry "
                         "layer; convert it again with --modalities including it.")
      src = rasterio.open(path)
      have = file_bands(path, src.count, src.descriptions, given, m)
      self.index[m] = [i + 1 for i in match_bands(path, have, enc.bands[m], m)]  # rasterio counts from 1
      self.files[m] = src
    if not self.files:
      raise ValueError("Give --s2 and/or --s1.")
    if enc.architecture["kind"] == "resnet" and len(self.files) != 1:
      raise ValueError("A ResNet encoder takes one modality: give --s2 or --s1.")
    first = next(iter(self.files.values()))
    for m, src in self.files.items():
      if (src.height, src.width, src.transform, src.crs) != (first.height, first.width, first.transform, first.crs):
        raise ValueError(f"--s1 and --s2 must share one grid (size, transform, CRS); {src.name} differs from "
                         f"{first.name}. Resample one onto the other first.")
    self.height, self.width = first.height, first.width
    self.transform, self.crs = first.transform, first.crs

  def read(self, row: int, col: int, height: int, width: int) -> dict:
    """Raw float32 (h, w, C) per modality for the window clipped to the scene."""
    from rasterio.windows import Window  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    h, w = min(height, self.height - row), min(width, self.width - col)
    return {m: np.moveaxis(src.read(self.index[m], window=Window(col, row, w, h)), 0, -1).astype(np.float32)
            for m, src in self.files.items()}

  def preview(self, shape: tuple[int, int]) -> dict:
    """All the encoder's bands of each modality at `shape` (h, w), averaged down, for the picture."""
    from rasterio.enums import Resampling  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    return {m: np.moveaxis(src.read(self.index[m], out_shape=(len(self.index[m]), *shape),
                                    resampling=Resampling.average), 0, -1).astype(np.float32)
            for m, src in self.files.items()}

  def close(self):
    for src in self.files.values():
      src.close()


def embed_scene(encoder_dir: str, out: str, s2: str | None = None, s1: str | None = None, tile: int = 0,
                batch_size: int = 16, s2_bands: str = "", s1_bands: str = "") -> dict:
  """Writes embeddings.tif, embed.png and embed.json into `out`; returns the embed.json dict."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import rasterio  # pylint: disable=g-import-not-at-top
  from rasterio.transform import Affine  # pylint: disable=g-import-not-at-top

  import mmrs  # pylint: disable=g-import-not-at-top

  enc = mmrs.load_encoder(encoder_dir)
  scene = Scene(enc, s2, s1, s2_bands, s1_bands)
  try:
    vit = enc.architecture["kind"] == "vit"
    tile = tile or enc.image_size
    cell = enc.patch_size if vit else tile  # pixels per embedding
    if tile % cell:
      raise ValueError(f"--tile={tile} is not a multiple of the encoder's patch size {cell}.")
    per_tile = tile // cell
    grid_h, grid_w = -(-scene.height // cell), -(-scene.width // cell)
    tiles_x = -(-scene.width // tile)

    def origin(i: int, size: int) -> int:
      """Pixel offset where tile i starts: i * tile, but the last one ends at the scene's edge (rounded up to the
      cell grid) where the scene is longer than a tile."""
      start = i * tile
      if start + tile > size and size > tile:
        start = -(-(size - tile) // cell) * cell
      return start
    os.makedirs(out, exist_ok=True)
    tif, tmp_tif = os.path.join(out, "embeddings.tif"), os.path.join(out, "embeddings.tif.tmp")
    rng = np.random.default_rng(0)
    keep = min(1.0, PCA_SAMPLE / (grid_h * grid_w))
    sample, dim = [], None
    profile = None

    def run(batch):  # pads the batch to batch_size: one compile for the whole scene
      n = len(batch)
      stacked = {m: np.stack([b[m] for b in batch] + [np.zeros_like(batch[0][m])] * (batch_size - n))
                 for m in batch[0]}
      feats = np.asarray(enc.embed(**stacked))[:n]
      return feats[:, int(bool(enc.architecture.get("use_cls_token"))):] if vit else feats[:, None]

    dst = None
    for ty in range(-(-scene.height // tile)):
      tiles = []
      y_start = origin(ty, scene.height)
      for tx in range(tiles_x):
        raw = scene.read(y_start, origin(tx, scene.width), tile, tile)
        normed = {m: x[0] for m, x in enc.normalize(**{m: x[None] for m, x in raw.items()}).items()}
        tiles.append({m: np.pad(x, ((0, tile - x.shape[0]), (0, tile - x.shape[1]), (0, 0))) for m, x in
                      normed.items()})  # padding = normalized 0 = the band mean
      row = []
      for i in range(0, len(tiles), batch_size):
        row.append(run(tiles[i:i + batch_size]))
      feats = np.concatenate(row)  # (tiles_x, per_tile^2, D)
      dim = feats.shape[-1]
      feats = feats.reshape(tiles_x, per_tile, per_tile, dim)[:, (ty * tile - y_start) // cell:]  # cells not yet written
      block = np.concatenate([f[:, (tx * tile - origin(tx, scene.width)) // cell:] for tx, f in enumerate(feats)], 1)
      y0 = ty * per_tile
      block = block[:min(len(block), grid_h - y0), :grid_w]
      if dst is None:
        profile = dict(driver="GTiff", dtype="float32", count=dim, height=grid_h, width=grid_w, crs=scene.crs,
                       transform=scene.transform @ Affine.scale(cell), compress="deflate", predictor=3)
        dst = rasterio.open(tmp_tif, "w", **profile)
      dst.write(np.moveaxis(block, -1, 0), window=rasterio.windows.Window(0, y0, grid_w, block.shape[0]))
      flat = block.reshape(-1, dim)
      sample.append(flat[rng.random(len(flat)) < keep] if keep < 1.0 else flat)
    dst.close()
    os.replace(tmp_tif, tif)
    with rasterio.open(tif, "r+") as f:
      f.descriptions = tuple(f"embedding_{i:04d}" for i in range(dim))

    # PCA of the sampled cells; the picture shows the whole grid projected on the first three components.
    sample = np.concatenate(sample).astype(np.float64)
    mean = sample.mean(0)
    _, s, vt = np.linalg.svd(sample - mean, full_matrices=False)
    comps = vt[:3]
    explained = (s[:3] ** 2 / max((s ** 2).sum(), 1e-12)).tolist()
    with rasterio.open(tif) as f:
      pca = np.concatenate([np.tensordot(np.moveaxis(f.read(window=rasterio.windows.Window(0, y, grid_w,
                                                                                             min(256, grid_h - y))),
                                                     0, -1) - mean, comps.T, 1)
                            for y in range(0, grid_h, 256)])
    if pca.shape[-1] < 3:
      pca = np.concatenate([pca, np.zeros((*pca.shape[:2], 3 - pca.shape[-1]))], -1)
    picture = os.path.join(out, "embed.png")
    shape = _picture_shape(scene.height, scene.width)
    _write_picture(picture, _rgb_view(scene.preview(shape), enc.bands), _stretch(pca), shape)
    summary = dict(encoder=os.path.abspath(encoder_dir), inputs={m: os.path.abspath(p) for m, p in
                                                                (("s2", s2), ("s1", s1)) if p},
                   bands={m: list(enc.bands[m]) for m in scene.files}, tile=tile, cell_pixels=cell,
                   grid=[grid_h, grid_w], dim=dim, crs=str(scene.crs), pca_explained_variance=explained,
                   files=["embeddings.tif", "embed.png", "embed.json"])
    atomic_io.write_json(os.path.join(out, "embed.json"), summary, sort_keys=False)
    return summary
  finally:
    scene.close()


def _picture_shape(h: int, w: int) -> tuple[int, int]:
  scale = min(1.0, MAX_PICTURE / max(h, w))
  return max(1, round(h * scale)), max(1, round(w * scale))


def _stretch(x):
  """Per channel 2-98 percentile stretch to uint8."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  flat = x.reshape(-1, x.shape[-1])
  lo, hi = np.percentile(flat, 2, axis=0), np.percentile(flat, 98, axis=0)
  return (np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 255).round().astype(np.uint8)


def _rgb_view(preview: dict, bands: dict):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mmrs import bands as bands_lib  # pylint: disable=g-import-not-at-top

  if "s2" in preview and all(b in bands["s2"] for b in bands_lib.S2_RGB_BANDS):
    return _stretch(preview["s2"][..., [list(bands["s2"]).index(b) for b in bands_lib.S2_RGB_BANDS]])
  m = next(iter(preview))
  x = preview[m]
  if m == "s1" and x.shape[-1] >= 2:
    return _stretch(np.stack([x[..., 0], x[..., 1], x[..., 0] - x[..., 1]], -1))
  return _stretch(np.repeat(x[..., :1], 3, -1))


def _write_picture(path: str, rgb, pca, shape) -> None:
  """RGB | PCA side by side under titles, written atomically."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  from mmrs.methods import visualize  # pylint: disable=g-import-not-at-top

  h, w = shape
  pad, top = 4, visualize.LINE_HEIGHT + 4
  canvas = Image.new("RGB", (2 * w + 3 * pad, h + top + pad), (255, 255, 255))
  canvas.paste(Image.fromarray(rgb), (pad, top))
  canvas.paste(Image.fromarray(np.asarray(pca)).resize((w, h), Image.NEAREST), (2 * pad + w, top))
  draw, font = ImageDraw.Draw(canvas), visualize._font()  # pylint: disable=protected-access
  for x, text in ((pad, "RGB"), (2 * pad + w, "PCA 1-3 of patch embeddings")):
    draw.text((x, 2), text, fill=(0, 0, 0), font=font)
  atomic_io.write_with(path, lambda tmp: canvas.save(tmp, format="PNG"))


def main(argv):
  del argv
  try:
    summary = embed_scene(FLAGS.encoder, FLAGS.out, s2=FLAGS.s2, s1=FLAGS.s1, tile=FLAGS.tile,
                          batch_size=FLAGS.batch_size, s2_bands=FLAGS.s2_bands, s1_bands=FLAGS.s1_bands)
  except (OSError, ValueError) as e:  # rasterio's RasterioIOError is an OSError
    cli.fail(f"embed: {e}")
  print(f"Wrote {', '.join(summary['files'])} to {FLAGS.out}: grid {summary['grid'][0]}x{summary['grid'][1]} of "
        f"{summary['dim']}-d embeddings ({summary['cell_pixels']} px cells), bands {summary['bands']}.")


if __name__ == "__main__":
  cli.run(main)
