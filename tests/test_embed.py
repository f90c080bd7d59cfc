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
  # tile 48 does not divide the 256 px chip: the edge tiles are padded and the grid cropped to 64 x 64 cells.
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
