"""data_prep.ssl4eo on a tiny SSL4EO-S12 tree in the real layout (s1/, s2c/, s2a/ per location and season)."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from data_prep import convert, ssl4eo
from mmrs import bands

from shard_reader import read_split

G = 12  # 10 m grid; 20 m bands are 6 px, 60 m bands 2 px
RES = {b.name: b.resolution_m for b in bands.BANDS.values()}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tif(path, arr, dtype):
  arr = np.asarray(arr)
  arr = arr[None] if arr.ndim == 2 else arr
  c, h, w = arr.shape
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=c, dtype=dtype, crs="EPSG:32633",
                     transform=rasterio.Affine(10 * G / w, 0, 500000, 0, -10 * G / w, 5000000)) as f:
    f.write(arr.astype(dtype))


def write_s2(root, level_dir, loc, product, season, names):
  for name in names:
    short = f"B{int(name[1:])}" if name[1:].isdigit() else name
    n = G * 10 // RES[name]
    arr = 1000 + 100 * bands.S2_L1C_BANDS.index(name) + 10 * loc + season + np.arange(n * n).reshape(n, n) % 7
    write_tif(os.path.join(root, level_dir, f"{loc:07d}", product, f"{short}.tif"), arr, "uint16")


def write_s1(root, loc, product, vv=-10.0, vh=-17.0, nan_pixels=0):
  d = os.path.join(root, "s1", f"{loc:07d}", product)
  for pol, v in (("VV", vv), ("VH", vh)):
    arr = np.full((G, G), v + loc, np.float32)
    arr.reshape(-1)[:nan_pixels] = np.nan
    write_tif(os.path.join(d, f"{pol}.tif"), arr, "float32")


def s2_product(date):
  return f"{date}T100000_{date}T100500_T33UUP"


def s1_product(date):
  return f"S1A_IW_GRDH_1SDV_{date}T050000_{date}T050025_037000_045A1B_ABCD"


def make_tree(root):
  l2a = [b for b in bands.S2_L1C_BANDS if b != "B10"]
  plan = {0: (["20210325", "20210630"], ["20210327", "20210702"]),  # two pairs, 2 days apart
          1: (["20210401", "20210901"], ["20210403"]),  # one pair + one S2-only
          2: ([], ["20210510"]),  # S1 only: not written, counted
          3: (["20210101"], ["20210102"])}  # S1 mostly NaN: dropped, S2-only
  for loc, (s2_dates, s1_dates) in plan.items():
    for season, d in enumerate(s2_dates):
      write_s2(root, "s2c", loc, s2_product(d), season, bands.S2_L1C_BANDS)
      write_s2(root, "s2a", loc, s2_product(d), season, l2a)
    for d in s1_dates:
      nan = G * G - 5 if loc == 3 else (3 if (loc, d) == (0, "20210327") else 0)
      write_s1(root, loc, s1_product(d), nan_pixels=nan)
  return root




@pytest.fixture(scope="module")
def src(tmp_path_factory):
  return make_tree(str(tmp_path_factory.mktemp("ssl4eo")))


@pytest.fixture(scope="module")
def converted(src, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("out") / "ds")
  return out, ssl4eo.convert(src, out, num_shards=2, grid=G)


def test_counts_and_pairing(converted):
  _, m = converted
  assert m["counts"]["pairs"] == 3 and m["counts"]["s2_only"] == 2 and m["counts"]["s1_only"] == 0
  assert m["counts"]["s1_dropped"] == 1 and m["counts"]["skipped"] == 0
  p = m["pairing"]
  assert (p["locations"], p["s2_acquisitions"], p["s1_acquisitions"], p["matched"]) == (4, 5, 5, 4)
  assert (p["s2_unmatched"], p["s1_unmatched"], p["s1_only_locations"]) == (1, 1, 1)
  assert p["published_locations"] == 251_079  # beside `locations`: the full dataset's (void ids make it fewer)
  assert m["licence"] == "CC-BY-4.0" and "SSL4EO-S12" in m["source"]
  assert m["bands"]["s2"] == list(bands.S2_L1C_BANDS)


def test_records_resampled_and_paired(converted):
  out, _ = converted
  recs = read_split(out)
  assert sorted(recs) == ["0000000_0", "0000000_1", "0000001_0", "0000001_1", "0000003_0"]
  r = recs["0000000_1"]
  assert r["s2"].shape == (G, G, 13) and r["s2"].dtype == np.uint16 and r["s1"].shape == (G, G, 2)
  # B8A (20 m, 6x6) repeated 2x2 onto the 10 m grid, in mmrs band order (9th band).
  i = bands.S2_L1C_BANDS.index("B8A")
  src20 = 1000 + 100 * i + 1 + np.arange(36).reshape(6, 6) % 7
  np.testing.assert_array_equal(r["s2"][..., i], np.repeat(np.repeat(src20, 2, 0), 2, 1))
  assert int(r["s2"][0, 0, bands.S2_L1C_BANDS.index("B10")]) == 1000 + 100 * 10 + 1  # 60 m band, season 1
  np.testing.assert_allclose(r["s1"][..., 0], -10.0)
  meta = r["meta"]
  assert meta["location"] == "0000000" and meta["season"] == 1
  assert meta["s2_time"].startswith("2021-06-30") and meta["s1_time"].startswith("2021-07-02")
  assert meta["pair_gap_days"] == pytest.approx(2 - 5 / 24, abs=1e-3)
  assert 14 < meta["lon"] < 16 and 44 < meta["lat"] < 46  # UTM 33N near (15E, 45N)


def test_s1_nan_cleaned_and_mostly_nodata_dropped(converted):
  out, _ = converted
  recs = read_split(out)
  r = recs["0000000_0"]
  assert r["s1_valid"].sum() == G * G - 3 and np.isfinite(r["s1"]).all()
  assert r["s1"].reshape(-1, 2)[0, 0] == bands.S1_NODATA_FILL_DB
  d = recs["0000003_0"]
  assert "s1" not in d and "% of the Sentinel-1 pixels are no-data" in d["meta"]["s1_dropped"]
  assert "s1" not in recs["0000001_1"] and "s1_dropped" not in recs["0000001_1"]["meta"]


def test_l2a_and_max_days(src, tmp_path):
  m = ssl4eo.convert(src, str(tmp_path / "l2a"), s2_level="L2A", max_days=1.0, num_shards=1, grid=G)
  assert m["bands"]["s2"] == list(bands.S2_L2A_BANDS)
  assert m["counts"]["pairs"] == 0 and m["counts"]["s2_only"] == 5  # every gap is ~2 days > 1
  r = read_split(str(tmp_path / "l2a"))["0000000_0"]
  assert r["s2"].shape == (G, G, 12)


def test_hash_split_keeps_a_location_together(src, tmp_path):
  m = ssl4eo.convert(src, str(tmp_path / "h"), split="hash:0.5,0.5", num_shards=1, grid=G)
  seen = {}
  for split in m["splits"]:
    for rid in read_split(str(tmp_path / "h"), split):
      seen.setdefault(rid.split("_")[0], set()).add(split)
  assert set(m["splits"]) <= {"train", "val"} and all(len(s) == 1 for s in seen.values())
  assert sorted(seen) == ["0000000", "0000001", "0000003"]


def test_missing_band_file_fail_and_skip(src, tmp_path):
  bad = str(tmp_path / "bad")
  shutil.copytree(src, bad)
  missing = os.path.join(bad, "s2c", "0000001", s2_product("20210401"), "B8A.tif")
  os.remove(missing)
  with pytest.raises(convert.ConversionError, match="B8A.tif"):
    ssl4eo.convert(bad, str(tmp_path / "o1"), num_shards=1, grid=G)
  assert not os.path.exists(tmp_path / "o1")
  m = ssl4eo.convert(bad, str(tmp_path / "o2"), num_shards=1, on_bad="skip", grid=G)
  assert m["counts"]["skipped"] == 1 and m["counts"]["records"] == 4
  assert m["skipped_items"][0]["item"] == "0000001/season0" and "B8A.tif" in m["skipped_items"][0]["reason"]


def test_workers_give_identical_shards(src, converted, tmp_path):
  out0, m0 = converted
  out2 = str(tmp_path / "w2")
  m2 = ssl4eo.convert(src, out2, num_shards=2, workers=2, grid=G)
  assert m2["records_per_shard"] == m0["records_per_shard"]
  for f in m0["records_per_shard"]:
    assert open(os.path.join(out0, f), "rb").read() == open(os.path.join(out2, f), "rb").read()


def test_cli(src, tmp_path):
  out = str(tmp_path / "cli")
  ok = subprocess.run([sys.executable, "-m", "data_prep.ssl4eo", f"--src={src}", f"--out={out}", "--workers=0",
                       "--num_shards=1", "--s2_level=L2A", f"--grid={G}"], cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr
  assert os.path.exists(os.path.join(out, "manifest.json"))
  bad = subprocess.run([sys.executable, "-m", "data_prep.ssl4eo", f"--src={tmp_path}/nowhere", f"--out={out}2"],
                       cwd=REPO, capture_output=True, text=True)
  assert bad.returncode != 0 and "SSL4EO-S12 root" in bad.stderr


def test_pairing_nearest_first_one_to_one():
  s2 = [s2_product("20210101"), s2_product("20210111")]
  s1 = [s1_product("20210110")]
  assert ssl4eo.pair(s2, s1, max_days=92) == {1: (0, pytest.approx(1 + 5 / 24, abs=1e-3))}
  assert ssl4eo.pair(s2, s1, max_days=0.5) == {}
  assert ssl4eo.pair(["a", "b"], ["x"], max_days=1) == {0: (0, None)}  # no times: by rank


def write_real_chip(folder, names, sizes, lon=11.57, lat=48.14, dtype="uint16", value=None, seed=0):
  """One product folder as SSL4EO-S12's downloader (zhu-xlab/SSL4EO-S12 src/download_data/ssl4eo_s12_downloader.py,
  save_patch/save_geotiff) writes it: a GeoTIFF per band named B1..B12/B8A (or VV/VH), `+proj=latlong` CRS with the
  transform from the footprint corners and each file's own width/height, no compression, and a metadata.json of
  Earth Engine image properties. Nominal sizes 264/132/44 px (10/20/60 m) as in the released archives and torchgeo's
  SSL4EO-S12 generator (tests/data/ssl4eo/s12/data.py); `sizes` may override a band's (h, w) to mimic the one-pixel
  deviations of Earth Engine's sampleRectangle."""
  import json as json_lib
  rng = np.random.default_rng(seed)
  half = 0.0166  # ~1.3 km at 48 deg N: a 2.64 km chip
  corners = [[lon - half, lat + half * 0.67], [lon + half, lat - half * 0.67]]
  os.makedirs(folder, exist_ok=True)
  for name in names:
    short = f"B{int(name[1:])}" if name[1:].isdigit() else name
    h, w = sizes.get(name) or (264 * 10 // RES[name],) * 2
    arr = (np.full((h, w), value, dtype) if value is not None else
           rng.integers(100, 4000, (h, w)).astype(dtype))
    xres, yres = (corners[1][0] - corners[0][0]) / w, (corners[0][1] - corners[1][1]) / h
    transform = rasterio.Affine.translation(corners[0][0] - xres / 2, corners[0][1] + yres / 2) @ \
        rasterio.Affine.scale(xres, -yres)
    with rasterio.open(os.path.join(folder, f"{short}.tif"), "w", driver="GTiff", width=w, height=h, count=1,
                       crs="+proj=latlong", transform=transform, dtype=dtype, compress="None") as f:
      f.write(arr, 1)
  with open(os.path.join(folder, "metadata.json"), "w") as f:
    json_lib.dump({"type": "Image", "properties": {"system:index": os.path.basename(folder),
                                                    "CLOUDY_PIXEL_PERCENTAGE": 3.2}}, f)


def test_real_sizes_latlong_crs_and_off_size_chips_are_resampled_and_counted(tmp_path):
  root = str(tmp_path / "ssl4eo")
  ok, off = s2_product("20210325"), s2_product("20210630")
  write_real_chip(os.path.join(root, "s2c", "0000042", ok), bands.S2_L1C_BANDS, {})
  # Earth Engine returned one pixel more across the 10 m bands and one less at 60 m for this acquisition.
  odd = {b: ((265, 264) if RES[b] == 10 else (43, 44) if RES[b] == 60 else (132, 132)) for b in bands.S2_L1C_BANDS}
  write_real_chip(os.path.join(root, "s2c", "0000042", off), bands.S2_L1C_BANDS, odd, seed=1)
  write_real_chip(os.path.join(root, "s1", "0000042", s1_product("20210326")), bands.S1_BANDS, {}, dtype="float32",
                  value=-12.0)
  write_real_chip(os.path.join(root, "s1", "0000042", s1_product("20210701")), bands.S1_BANDS,
                  {"VV": (264, 263), "VH": (264, 263)}, dtype="float32", value=-15.0)
  out = str(tmp_path / "out")
  m = ssl4eo.convert(root, out, num_shards=1)
  assert (m["counts"]["pairs"], m["counts"]["resampled_chips"], m["counts"]["skipped"]) == (2, 1, 0)
  recs = read_split(out)
  a, b = recs["0000042_0"], recs["0000042_1"]
  assert a["s2"].shape == b["s2"].shape == (264, 264, 13) and b["s1"].shape == (264, 264, 2)
  assert "resampled" not in a["meta"]
  assert set(b["meta"]["resampled"]) == {n for n in bands.S2_L1C_BANDS if RES[n] != 20} | {"VV", "VH"}
  with rasterio.open(os.path.join(root, "s2c", "0000042", ok, "B5.tif")) as f:  # nominal: exact repetition
    np.testing.assert_array_equal(a["s2"][..., bands.S2_L1C_BANDS.index("B05")],
                                  np.repeat(np.repeat(f.read(1), 2, 0), 2, 1))
  np.testing.assert_allclose(b["s1"], -15.0)
  assert a["meta"]["crs"] and abs(a["meta"]["lon"] - 11.57) < 0.01 and abs(a["meta"]["lat"] - 48.14) < 0.01


def test_shard_groups_are_recorded_and_an_unsuitable_shard_count_is_refused_before_converting(src, tmp_path):
  """Issue 19: G in the manifest (the pipeline's default G); a shard count G does not divide fails up front."""
  m = ssl4eo.convert(src, str(tmp_path / "g"), num_shards=2, shard_groups=2, grid=G)
  assert m["shard_groups"] == 2 and all(len(v) == 2 for v in m["splits"]["train"].values())
  with pytest.raises(ValueError, match=r"3 shard file\(s\), which 2 shard groups cannot split evenly"):
    ssl4eo.convert(src, str(tmp_path / "bad"), num_shards=3, shard_groups=2, grid=G)
  assert not (tmp_path / "bad").exists()
