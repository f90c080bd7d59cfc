"""launch.embed on a bundled Sentinel-2 L1C chip with a tiny random encoder converted through the normal path."""
import json
import os

import numpy as np
import pytest
import rasterio
from PIL import Image

import mmrs
from mmrs import bands as B
from launch import embed
import tiny_encoder

CHIP = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "sentinel2_l1c",
                    "s2_l1c_chip0_r240_c240.tif")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
  root = tmp_path_factory.mktemp("enc")
  params = tiny_encoder.vit_params(patch=4, size=8)
  return {"l2a": tiny_encoder.write_encoder(root / "l2a", params, image_size=32, bands=B.S2_L2A_BANDS),
          "l1c": tiny_encoder.write_encoder(root / "l1c", params, image_size=32)}


def test_embed_scene_writes_georeferenced_embeddings_and_picture(encoders, tmp_path):
  out = tmp_path / "out"
  # A 12-band L2A encoder on the 13-band L1C chip: bands picked by the file's descriptions (B10 left out).
  # tile 48 does not divide the 256 px chip: the last tile of each row / column is moved back to end at the edge.
  summary = embed.embed_scene(encoders["l2a"], str(out), s2=CHIP, tile=48, batch_size=8)
  assert summary["grid"] == [64, 64] and summary["dim"] == 32 and summary["bands"]["s2"] == list(B.S2_L2A_BANDS)
  with rasterio.open(CHIP) as src, rasterio.open(out / "embeddings.tif") as f:
    assert (f.count, f.height, f.width, f.dtypes[0]) == (32, 64, 64, "float32")
    assert f.crs == src.crs and f.transform == src.transform @ src.transform.scale(4)  # 40 m cells, same origin
    got = np.moveaxis(f.read(), 0, -1)
    raw = np.moveaxis(src.read(), 0, -1).astype(np.float32)
  # the first tile's patch tokens, computed directly, are the grid's top-left 12 x 12 cells
  enc = mmrs.load_encoder(encoders["l2a"])
  x = enc.normalize(s2=raw[None, :48, :48, B.band_indices(B.S2_L1C_BANDS, B.S2_L2A_BANDS)])
  want = np.asarray(enc.embed(**x))[0, 1:].reshape(12, 12, 32)
  np.testing.assert_allclose(got[:12, :12], want, rtol=1e-4, atol=1e-4)
  # a tile of the second row and third column lands at cells (12:24, 24:36) (rows and columns not swapped); the last
  # tile of the first row is read at px 208:256 (not 240:288, two thirds padding) and gives its last 4 cells, 60:64
  idx = B.band_indices(B.S2_L1C_BANDS, B.S2_L2A_BANDS)
  x = enc.normalize(s2=np.stack([raw[48:96, 96:144, idx], raw[:48, 208:, idx]]))
  want = np.asarray(enc.embed(**x))[:, 1:].reshape(2, 12, 12, 32)
  np.testing.assert_allclose(got[12:24, 24:36], want[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[:12, 60:64], want[1, :, 8:], rtol=1e-4, atol=1e-4)
  # the last cells (edge tile, padded) are real embeddings too, and every cell differs from its neighbour somewhere
  assert np.isfinite(got).all() and np.abs(np.diff(got, axis=1)).max() > 0
  picture = Image.open(out / "embed.png")
  assert picture.width > 2 * 256 and picture.height > 256  # RGB | PCA, 256 px each, under titles
  pca_panel = np.asarray(picture)[-200:, -200:]
  assert pca_panel.std() > 10  # not a flat colour
  meta = json.loads((out / "embed.json").read_text())
  assert len(meta["pca_explained_variance"]) == 3 and sorted(os.listdir(out)) == [
      "embed.json", "embed.png", "embeddings.tif"]


def test_embed_names_missing_bands(encoders, tmp_path):
  l2a_file = tmp_path / "l2a.tif"  # the chip without B10, as an L2A product would come
  with rasterio.open(CHIP) as src:
    profile = dict(src.profile, count=12)
    keep = [i + 1 for i, b in enumerate(B.S2_L1C_BANDS) if b != "B10"]
    with rasterio.open(l2a_file, "w", **profile) as dst:
      dst.write(src.read(keep))
      dst.descriptions = B.S2_L2A_BANDS
  with pytest.raises(ValueError, match=r"lacks s2 band\(s\) \['B10'\]"):
    embed.embed_scene(encoders["l1c"], str(tmp_path / "out"), s2=str(l2a_file))
  with pytest.raises(ValueError, match="--s2_bands names 3 bands but"):
    embed.embed_scene(encoders["l1c"], str(tmp_path / "out"), s2=CHIP, s2_bands="B02,B03,B04")
  assert not (tmp_path / "out" / "embeddings.tif").exists()


def _write(path, src, data, window, descriptions=None):
  """`data` (C, h, w) as a GeoTIFF on `src`'s grid cut to `window` (row, col offsets), optionally with band names."""
  profile = dict(src.profile, count=len(data), height=data.shape[1], width=data.shape[2], dtype=str(data.dtype),
                 transform=src.transform @ rasterio.Affine.translation(window[1], window[0]))
  with rasterio.open(path, "w", **profile) as dst:
    dst.write(data)
    if descriptions:
      dst.descriptions = tuple(descriptions)
  return str(path)


def test_embed_matches_bands_by_name_not_position(encoders, tmp_path):
  # The chip's 40 x 40 corner with its 13 bands reversed: by its descriptions, or (no descriptions) by --s2_bands
  # naming them in file order, the encoder gets the same inputs as from the chip itself, so the same embeddings.
  with rasterio.open(CHIP) as src:
    data = src.read(window=rasterio.windows.Window(0, 0, 40, 40))
    plain = _write(tmp_path / "plain.tif", src, data, (0, 0), B.S2_L1C_BANDS)
    named = _write(tmp_path / "reversed.tif", src, data[::-1], (0, 0), B.S2_L1C_BANDS[::-1])
    bare = _write(tmp_path / "bare.tif", src, data[::-1], (0, 0))
  grids = []
  for name, path, flag in (("plain", plain, ""), ("named", named, ""), ("bare", bare, ",".join(B.S2_L1C_BANDS[::-1]))):
    embed.embed_scene(encoders["l1c"], str(tmp_path / name), s2=path, batch_size=4, s2_bands=flag)
    with rasterio.open(tmp_path / name / "embeddings.tif") as f:
      grids.append(f.read())
  assert grids[0].shape == (32, 10, 10)  # 2 x 2 tiles of 32 px, 10 x 10 cells of 4 px
  np.testing.assert_allclose(grids[1], grids[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grids[2], grids[0], rtol=1e-5, atol=1e-5)
  # without descriptions or flag, a 13-band file is taken as the standard L1C order, which is wrong here: different
  embed.embed_scene(encoders["l1c"], str(tmp_path / "guess"), s2=bare, batch_size=4)
  with rasterio.open(tmp_path / "guess" / "embeddings.tif") as f:
    assert np.abs(f.read() - grids[0]).max() > 1e-2


def test_a_file_without_band_descriptions_logs_the_order_assumed(caplog):
  with caplog.at_level("WARNING"):
    names = embed.file_bands("bare.tif", 13, (None,) * 13, "", "s2")
  assert names == B.S2_L1C_BANDS
  assert "bare.tif has no band descriptions: assuming the standard S2 order " + ",".join(B.S2_L1C_BANDS) in caplog.text
  assert "--s2_bands" in caplog.text


def test_embed_s1_with_s2_on_one_grid(tmp_path):
  enc_dir = tiny_encoder.write_encoder(tmp_path / "enc", tiny_encoder.vit_params(patch=4, size=8), image_size=16,
                                       modalities="s1,s2")
  rng = np.random.default_rng(0)
  with rasterio.open(CHIP) as src:  # 16 x 14 px: narrower than the 16 px tile, so padded (with the band means)
    s2 = src.read(window=rasterio.windows.Window(8, 4, 14, 16))
    s1 = rng.normal([[[-12.0]], [[-19.0]]], 3.0, size=(2, 16, 14)).astype(np.float32)
    s2_path = _write(tmp_path / "s2.tif", src, s2, (4, 8), B.S2_L1C_BANDS)
    s1_path = _write(tmp_path / "s1.tif", src, s1, (4, 8), ("VH", "VV"))  # VH first: matched by name
    shifted = _write(tmp_path / "s1_shifted.tif", src, s1, (4, 9), ("VH", "VV"))
  summary = embed.embed_scene(enc_dir, str(tmp_path / "out"), s2=s2_path, s1=s1_path, batch_size=1)
  assert summary["bands"] == {"s2": list(B.S2_L1C_BANDS), "s1": ["VV", "VH"]} and summary["grid"] == [4, 4]
  enc = mmrs.load_encoder(enc_dir)
  x = enc.normalize(s2=np.moveaxis(s2, 0, -1)[None].astype(np.float32), s1=np.moveaxis(s1[::-1], 0, -1)[None])
  x = {m: np.pad(v, ((0, 0), (0, 0), (0, 2), (0, 0))) for m, v in x.items()}  # normalized 0 = the band mean
  want = np.asarray(enc.embed(**x))[0, 1:].reshape(4, 4, 32)
  with rasterio.open(tmp_path / "out" / "embeddings.tif") as f, rasterio.open(s2_path) as src:
    assert f.crs == src.crs and f.transform == src.transform @ src.transform.scale(4)
    np.testing.assert_allclose(np.moveaxis(f.read(), 0, -1), want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="must share one grid"):
    embed.embed_scene(enc_dir, str(tmp_path / "bad"), s2=s2_path, s1=shifted)
