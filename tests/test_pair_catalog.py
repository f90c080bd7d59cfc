"""Pairing S1/S2 chips of a catalog by place and time: the 7-day boundary, nearest in time, S2-only leftovers,
grids, bad rows and chips, and the real L1C sample chips with synthetic S1 partners."""
import datetime as dt
import glob
import json
import os

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from data_prep import inspect, pair_catalog
from data_prep.convert import ConversionError
from data_prep.pair_catalog import CatalogError
from mmrs import bands
from timeouts import HANG_GUARD_S

CRS = "EPSG:32633"
T0 = dt.datetime(2022, 6, 1, 10, 30, tzinfo=dt.timezone.utc)
HERE = (400000.0, 5000000.0, 400160.0, 5000160.0)  # a 16 px chip at 10 m
SAMPLE_L1C = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "sentinel2_l1c")


def write_tif(path, data, bounds=HERE, crs=CRS, descriptions=None):
  count, h, w = data.shape
  transform = Affine((bounds[2] - bounds[0]) / w, 0, bounds[0], 0, -(bounds[3] - bounds[1]) / h, bounds[3])
  with rasterio.open(path, "w", driver="GTiff", height=h, width=w, count=count, dtype=data.dtype.name, crs=crs,
                     transform=transform) as f:
    f.write(data)
    for i, d in enumerate(descriptions or ()):
      f.set_band_description(i + 1, d)
  return path


def s2_data(seed=0, n=13, size=16):
  return np.random.default_rng(seed).integers(1, 5000, (n, size, size)).astype(np.uint16)


def s1_data(seed=0, size=16):
  return np.random.default_rng(seed).normal(-12, 3, (2, size, size)).astype(np.float32)


def iso(t):
  return t.isoformat().replace("+00:00", "Z")


def row(path, modality, t, bounds=HERE, crs=CRS):
  return {"path": os.path.basename(path), "modality": modality, "time": iso(t), "minx": bounds[0],
          "miny": bounds[1], "maxx": bounds[2], "maxy": bounds[3], "crs": crs}


def write_catalog(d, rows, fmt="json"):
  path = os.path.join(d, f"catalog.{fmt}")
  if fmt == "json":
    with open(path, "w") as f:
      json.dump(rows, f)
  else:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w") as f:
      f.write(",".join(keys) + "\n")
      for r in rows:
        f.write(",".join(str(r.get(k, "")) for k in keys) + "\n")
  return path


def convert(tmp_path, rows, **kw):
  out = str(tmp_path / "out")
  m = pair_catalog.convert_catalog(write_catalog(str(tmp_path), rows), out, num_shards=1, **kw)
  recs = {rec["id"]: rec for _, _, rec in inspect.iter_records(out, m)}
  return m, recs


@pytest.fixture
def chips(tmp_path):
  """A writer of small chips into tmp_path: chips('s2', name, seed=..., bounds=..., size=...) -> path."""
  def make(modality, name, seed=0, bounds=HERE, size=16, **kw):
    data = s2_data(seed, size=size) if modality == "s2" else s1_data(seed, size=size)
    return write_tif(str(tmp_path / f"{name}.tif"), data, bounds, **kw)
  return make


# ---------------------------------------------------------------- time

@pytest.mark.parametrize("offset, paired", [
    (dt.timedelta(days=7), True), (dt.timedelta(days=-7), True),
    (dt.timedelta(days=7, seconds=1), False), (dt.timedelta(days=-7, seconds=-1), False)])
def test_seven_day_boundary_is_inclusive(tmp_path, chips, offset, paired):
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1"), "s1", T0 + offset)]
  m, recs = convert(tmp_path, rows)
  assert (m["counts"]["pairs"], m["counts"]["s2_only"], m["counts"]["unmatched_s1"]) == \
      ((1, 0, 0) if paired else (0, 1, 1))
  if not paired:
    assert m["pairing"]["s2_unpaired"] == {"no_s1_within_max_days": 1}
    assert recs["s2"].get("s1") is None


def test_nearest_in_time_wins_and_ties_go_to_the_earlier_s1(tmp_path, chips):
  rows = [row(chips("s2", "s2"), "s2", T0)]
  for name, days in [("s1_far", -3), ("s1_near", 1.5), ("s1_mid", 2)]:
    rows.append(row(chips("s1", name, seed=len(rows)), "s1", T0 + dt.timedelta(days=days)))
  m, recs = convert(tmp_path, rows)
  assert recs["s2"]["meta"]["s1_id"] == "s1_near" and recs["s2"]["meta"]["dt_days"] == 1.5
  np.testing.assert_array_equal(recs["s2"]["s1"], np.moveaxis(s1_data(2), 0, -1))
  assert m["counts"]["unmatched_s1"] == 2 and m["pairing"]["dt_days"] == {"max": 1.5, "mean": 1.5}

  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "a_later", 1), "s1", T0 + dt.timedelta(hours=5)),
          row(chips("s1", "z_earlier", 2), "s1", T0 - dt.timedelta(hours=5))]
  _, recs = convert(tmp_path, rows)
  assert recs["s2"]["meta"]["s1_id"] == "z_earlier"  # time, not the path order, breaks the tie


def test_naive_times_are_utc_and_zones_are_converted(tmp_path, chips):
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1"), "s1", T0)]
  rows[0]["time"] = "2022-06-01T10:30:00"  # no zone: UTC
  rows[1]["time"] = "2022-06-08T12:30:00+02:00"  # = 10:30 UTC, exactly 7 days later
  m, recs = convert(tmp_path, rows)
  assert m["counts"]["pairs"] == 1 and recs["s2"]["meta"]["s1_time"] == "2022-06-08T10:30:00Z"


# ---------------------------------------------------------------- place and grid

def test_other_places_do_not_pair_and_s2_goes_to_s2_only(tmp_path, chips):
  moved = (HERE[0] + 100, HERE[1], HERE[2] + 100, HERE[3])
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1", bounds=moved), "s1", T0, bounds=moved),
          row(chips("s2", "s2_lonely", 3), "s2", T0)]
  rows[2]["minx"], rows[2]["maxx"] = 500000.0, 500160.0
  m, recs = convert(tmp_path, rows)
  assert (m["counts"]["pairs"], m["counts"]["s2_only"], m["counts"]["unmatched_s1"]) == (0, 2, 1)
  assert m["pairing"]["s2_unpaired"] == {"no_s1_at_place": 2}
  assert set(recs) == {"s2", "s2_lonely"} and recs["s2_lonely"]["s2"].shape == (16, 16, 13)


def test_footprints_within_tolerance_pair(tmp_path, chips):
  near = (HERE[0] + 5, HERE[1] - 5, HERE[2] + 5, HERE[3] - 5)
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1", bounds=near), "s1", T0, bounds=near)]
  assert convert(tmp_path, rows)[0]["counts"]["pairs"] == 1
  assert convert(tmp_path, rows, place_tol_m=4)[0]["counts"]["pairs"] == 0


def test_lonlat_places(tmp_path, chips):
  lon, lat = 13.5, 45.0
  east_5m, east_50m = lon + 5 / (111_320 * np.cos(np.radians(lat))), lon + 50 / (111_320 * np.cos(np.radians(lat)))
  rows = [{"path": "s2.tif", "modality": "s2", "time": iso(T0), "lon": lon, "lat": lat},
          {"path": "near.tif", "modality": "s1", "time": iso(T0 + dt.timedelta(days=2)), "lon": east_5m, "lat": lat},
          {"path": "far.tif", "modality": "s1", "time": iso(T0), "lon": east_50m, "lat": lat}]
  chips("s2", "s2"), chips("s1", "near"), chips("s1", "far")
  m, recs = convert(tmp_path, rows)
  assert recs["s2"]["meta"]["s1_id"] == "near" and m["counts"]["unmatched_s1"] == 1


def test_different_grid_is_rejected_and_the_next_candidate_used(tmp_path, chips):
  rows = [row(chips("s2", "s2"), "s2", T0),
          row(chips("s1", "coarse", size=8), "s1", T0),  # same footprint, 20 m pixels
          row(chips("s1", "fine", 1), "s1", T0 + dt.timedelta(days=3))]
  m, recs = convert(tmp_path, rows)
  assert recs["s2"]["meta"]["s1_id"] == "fine"
  assert m["pairing"]["rejected_candidates"] == {"different_grid": 1} and m["counts"]["unmatched_s1"] == 1
  m, _ = convert(tmp_path, rows[:2])
  assert m["pairing"]["s2_unpaired"] == {"s1_grid_differs": 1} and m["counts"]["s2_only"] == 1


def test_shared_s1_by_default_exclusive_on_request(tmp_path, chips):
  rows = [row(chips("s2", "a"), "s2", T0), row(chips("s2", "b", 1), "s2", T0 + dt.timedelta(days=2)),
          row(chips("s1", "s1"), "s1", T0 + dt.timedelta(hours=36))]
  m, recs = convert(tmp_path, rows)
  assert m["counts"]["pairs"] == 2 and m["pairing"]["s1_used_by_several_s2"] == 1
  m, recs = convert(tmp_path, rows, exclusive_s1=True)
  assert (m["counts"]["pairs"], m["counts"]["s2_only"]) == (1, 1)
  assert recs["b"]["meta"]["s1_id"] == "s1" and recs["a"].get("s1") is None  # b is 12 h nearer
  assert m["pairing"]["s2_unpaired"] == {"s1_already_used": 1}


def test_unmatched_s1_written_only_on_request(tmp_path, chips):
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1"), "s1", T0 + dt.timedelta(days=9))]
  m, recs = convert(tmp_path, rows, write_s1_only=True)
  assert (m["counts"]["s1_only"], m["counts"]["s2_only"], m["counts"]["unmatched_s1"]) == (1, 1, 1)
  assert recs["s1"]["s1"].shape == (16, 16, 2) and recs["s1"].get("s2") is None


# ---------------------------------------------------------------- bad rows and bad chips

GOOD = {"path": "a.tif", "modality": "s2", "time": "2022-06-01T10:30:00Z", "lon": "13.5", "lat": "45.0"}
BAD_ROWS = {
    "no_time": ({**GOOD, "time": ""}, "'time' field is missing"),
    "bad_time": ({**GOOD, "time": "June 1st"}, "not ISO 8601"),
    "bad_modality": ({**GOOD, "modality": "s3"}, "modality 's3'"),
    "no_place": ({**GOOD, "lon": "", "lat": ""}, "no place"),
    "half_lonlat": ({**GOOD, "lat": ""}, "both lon and lat"),
    "lat_out_of_range": ({**GOOD, "lat": "95"}, "outside WGS84"),
    "not_a_number": ({**GOOD, "lon": "east"}, "lon='east' is not a number"),
    "partial_footprint": ({**GOOD, "minx": "1", "miny": "2", "maxx": "3"}, r"missing \['crs', 'maxy'\]"),
    "bad_crs": ({**GOOD, "minx": "1", "miny": "2", "maxx": "3", "maxy": "4", "crs": "EPSG:999999"},
                "not a known CRS"),
    "empty_footprint": ({**GOOD, "minx": "3", "miny": "2", "maxx": "1", "maxy": "4", "crs": CRS}, "minx < maxx"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_the_row(tmp_path, case):
  bad, message = BAD_ROWS[case]
  good2 = {**GOOD, "path": "b.tif"}
  path = write_catalog(str(tmp_path), [good2, bad], fmt="csv")
  with pytest.raises(CatalogError, match=f"catalog.csv line 3: .*{message}"):
    pair_catalog.read_catalog(path)


def test_duplicate_paths_and_json_entries_are_named(tmp_path):
  with pytest.raises(CatalogError, match="line 3: path .* is already used by catalog.csv line 2"):
    pair_catalog.read_catalog(write_catalog(str(tmp_path), [GOOD, GOOD], fmt="csv"))
  with pytest.raises(CatalogError, match="catalog.json entry 2: the 'modality' field"):
    pair_catalog.read_catalog(write_catalog(str(tmp_path), [GOOD, {"path": "x.tif", "time": "2022-01-01"}]))


def test_unreadable_or_wrong_chips_fail_or_are_counted(tmp_path, chips):
  (tmp_path / "broken.tif").write_bytes(b"not a tiff at all")
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1"), "s1", T0),
          row(str(tmp_path / "broken.tif"), "s1", T0), row(str(tmp_path / "gone.tif"), "s2", T0),
          row(write_tif(str(tmp_path / "three.tif"), s1_data(1)[[0, 1, 1]]), "s1", T0)]
  with pytest.raises(ConversionError, match="unreadable: .*broken.tif"):
    convert(tmp_path, rows)
  assert not os.path.exists(tmp_path / "out")
  m, recs = convert(tmp_path, rows, on_bad="skip")
  assert m["counts"]["pairs"] == 1 and m["counts"]["skipped"] == 3
  assert m["pairing"]["rejected_chips"] == {"bad_bands": 1, "missing_file": 1, "unreadable": 1}
  assert {s["item"] for s in m["skipped_items"]} == {"broken.tif", "gone.tif", "three.tif"}


def test_all_zero_s2_is_bad_input(tmp_path, chips):
  rows = [row(write_tif(str(tmp_path / "zero.tif"), np.zeros((13, 16, 16), np.uint16)), "s2", T0)]
  with pytest.raises(ConversionError, match="zero.tif: S2 chip is all zero"):
    convert(tmp_path, rows)


def test_band_names_from_descriptions_or_count(tmp_path, chips):
  l2a = s2_data(4, n=12)
  rows = [row(write_tif(str(tmp_path / "l2a.tif"), l2a), "s2", T0),
          row(write_tif(str(tmp_path / "vhvv.tif"), s1_data(5)[::-1].copy(), descriptions=["VH", "VV"]), "s1", T0)]
  m, recs = convert(tmp_path, rows)
  assert m["bands"]["s2"] == list(bands.S2_L2A_BANDS)
  np.testing.assert_array_equal(recs["l2a"]["s2"], np.moveaxis(l2a, 0, -1))
  np.testing.assert_array_equal(recs["l2a"]["s1"], np.moveaxis(s1_data(5), 0, -1))  # reordered to VV, VH


# ---------------------------------------------------------------- the real L1C sample

def test_real_l1c_chips_with_synthetic_s1_at_their_bounds(tmp_path):
  rows = []
  for k, path in enumerate(sorted(glob.glob(os.path.join(SAMPLE_L1C, "*.tif")))):
    with rasterio.open(path) as f:
      b, crs, h, w = f.bounds, f.crs.to_string(), f.height, f.width
    s1 = write_tif(str(tmp_path / f"s1_{k}.tif"), s1_data(k, size=h), tuple(b), crs)
    rows.append({**row(path, "s2", T0, tuple(b), crs), "path": os.path.abspath(path)})
    rows.append(row(s1, "s1", T0 + dt.timedelta(days=2 * k + 2), tuple(b), crs))  # 2, 4, 6, 8 days: last unpaired
  m, recs = convert(tmp_path, rows, split="hash:0.5,0.5")
  assert (m["counts"]["pairs"], m["counts"]["s2_only"], m["counts"]["unmatched_s1"]) == (3, 1, 1)
  assert m["bands"]["s2"] == list(bands.S2_L1C_BANDS)
  r = recs["s2_l1c_chip0_r240_c240"]
  with rasterio.open(os.path.join(SAMPLE_L1C, "s2_l1c_chip0_r240_c240.tif")) as f:
    np.testing.assert_array_equal(r["s2"], np.moveaxis(f.read(), 0, -1))
  assert r["s1"].shape == (256, 256, 2) and r["meta"]["crs"] == "EPSG:32618"
  assert r["meta"]["lon"] == pytest.approx(-75.6876, abs=1e-3) and r["meta"]["lat"] == pytest.approx(37.7273, abs=1e-3)
  assert set(m["splits"]) <= {"train", "val"}


def test_command_line(tmp_path, chips):
  import subprocess
  import sys
  rows = [row(chips("s2", "s2"), "s2", T0), row(chips("s1", "s1"), "s1", T0 + dt.timedelta(days=8))]
  cat = write_catalog(str(tmp_path), rows, fmt="csv")
  res = subprocess.run([sys.executable, "-m", "data_prep.pair_catalog", f"--catalog={cat}",
                        f"--out={tmp_path / 'cli'}", "--max_days=8", "--workers=0", "--licence=CC-BY-4.0"],
                       cwd=os.path.join(SAMPLE_L1C, "..", "..", ".."), capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr
  m = inspect.load_manifest(str(tmp_path / "cli"))
  assert m["counts"]["pairs"] == 1 and m["licence"] == "CC-BY-4.0" and m["pairing"]["max_days"] == 8


# ---------------------------------------------------------------- processing baseline 04.00 offset

def test_baseline_04_offset_is_removed_from_catalog_column_or_product_name(tmp_path):
  data = s2_data(3)
  data[:, 0, 0] = 0  # no-data stays 0
  data[:, 0, 1] = 600  # darker than the offset: stays a measured pixel (1), never no-data
  t = dt.datetime(2022, 6, 1, tzinfo=dt.timezone.utc)
  names = {"col": "col.tif", "offcol": "offcol.tif", "old": "old.tif", "nocol": "nocol.tif",
           "name": "S2B_MSIL2A_20220601T103629_N0400_R008_T33UUP_20220601T140722.tif",
           "oldname": "S2B_MSIL2A_20210601T103629_N0300_R008_T33UUP_20210601T140722.tif"}
  for n in names.values():
    write_tif(str(tmp_path / n), data)
  rows = [dict(row(str(tmp_path / names["col"]), "s2", t), processing_baseline="04.00"),
          dict(row(str(tmp_path / names["offcol"]), "s2", t), add_offset=-1000),
          dict(row(str(tmp_path / names["old"]), "s2", t), processing_baseline="N0301"),
          row(str(tmp_path / names["nocol"]), "s2", t),
          row(str(tmp_path / names["name"]), "s2", t), row(str(tmp_path / names["oldname"]), "s2", t)]
  m, recs = convert(tmp_path, rows)
  want = np.where(data == 0, 0, np.maximum(data.astype(np.int32) - 1000, 1)).transpose(1, 2, 0)
  for key in ("col", "offcol", "name"):
    r = recs[os.path.splitext(names[key])[0]]
    np.testing.assert_array_equal(r["s2"], want, err_msg=key)
    assert r["meta"]["s2_offset_removed"] == 1000
  for key in ("old", "nocol", "oldname"):
    r = recs[os.path.splitext(names[key])[0]]
    np.testing.assert_array_equal(r["s2"], data.transpose(1, 2, 0), err_msg=key)
    assert "s2_offset_removed" not in r["meta"]
  h = m["pairing"]["harmonization"]
  assert h["catalog processing_baseline: offset removed"] == 1 and h["product name: unchanged"] == 1
  assert h["unknown: unchanged"] == 1 and h["unknown baseline after 2022-01-25"] == 1
  m2 = pair_catalog.convert_catalog(write_catalog(str(tmp_path), rows[3:4]), str(tmp_path / "date"), num_shards=1,
                                    harmonize="date")
  r = next(rec for _, _, rec in inspect.iter_records(str(tmp_path / "date"), m2))
  np.testing.assert_array_equal(r["s2"], want)
  assert m2["pairing"]["harmonization"] == {"mode": "date", "acquisition date: offset removed": 1}
