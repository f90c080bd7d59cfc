"""data.read='crop' (issue 19 item 2): reading only the rows a crop needs gives exactly the batches of the whole-
record path for the same seed (crop positions, flips, rot90, band selection, labels, masks, S1 validity), moves a
fraction of the bytes, and shards it cannot read (compressed) fall back to ArrayRecord."""
import numpy as np
import pytest

from configs.common import dataset_config
from mmrs.data import crop_read
from mmrs.data import pipeline as pipeline_lib
from mmrs.data import records
from mmrs.data import sources
from mmrs.data import synthetic
from mmrs.data.writer import DatasetWriter


def _write(out, n, size, compression="uncompressed", num_shards=3):
  """Synthetic S1+S2 records (labels, mask); every third has S1 no-data pixels (an s1_valid array)."""
  rng = np.random.default_rng(0)
  with DatasetWriter(str(out), num_shards=num_shards, label_sets=synthetic.LABEL_SETS,
                     compression=compression) as w:
    for i in range(n):
      rec = synthetic.synthetic_record(rng, size, record_id=f"r{i}")
      if i % 3 == 0:
        s1 = rec["s1"].copy()
        s1[rng.random(s1.shape[:2]) < 0.2] = np.nan
        rec["s1"], rec["s1_valid"] = records.clean_s1(s1)
      w.add(rec)
    w.close()
  return str(out)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  # 150 px records: rows span 64 KiB block boundaries (a row of S2 is 3.9 KB, a record ~0.8 MB).
  return _write(tmp_path_factory.mktemp("crop") / "ds", 40, 150)


def _batches(d, read, n, **kw):
  cfg = dataset_config(d, read=read, **{"image_size": 64, "label_set": "synthetic_ml,synthetic_mask", **kw})
  pipe = pipeline_lib.make_pipeline(cfg, modalities=("s1", "s2"), global_batch_size=10, seed=11)
  out = [next(pipe.iterator) for _ in range(n)]
  pipe.close()
  return out


@pytest.mark.parametrize("kw", [{}, {"random_resized_crop": True}, {"image_size": 0, "s2_bands": "B04,B03,B02"}],
                         ids=["crop_flip_rot90", "random_resized_crop", "whole_record_band_subset"])
def test_same_values_as_whole_records_for_the_same_seed(data_dir, kw):
  """10 batches of 10 = 100 records per setting, 300 in all, across 2.5 epochs of 40 records."""
  want, got = _batches(data_dir, "record", 10, **kw), _batches(data_dir, "crop", 10, **kw)
  for k, (a, b) in enumerate(zip(want, got)):
    assert set(a) == set(b) and "s1_valid" in a
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {k} {key}")


def test_a_crop_reads_about_its_rows_only(data_dir):
  info = sources.open_directory(data_dir, "train", ("paired",), read="crop")
  assert isinstance(info.source, crop_read.CropReadShards)
  rec = info.source[0][2]
  s2 = rec["s2"]
  assert isinstance(s2, crop_read.LazyArray) and s2.shape == (150, 150, 13)
  whole = records.decode(sources.open_directory(data_dir, "train", ("paired",), read="record").source[0][2])
  moved = []
  original = crop_read.os.preadv

  def counting(fd, buffers, offset):
    moved.append(sum(len(b) for b in buffers))
    return original(fd, buffers, offset)

  crop_read.os.preadv = counting
  try:
    crop = s2[40:104, 30:94]
  finally:
    crop_read.os.preadv = original
  np.testing.assert_array_equal(crop, whole["s2"][40:104, 30:94])
  # 64 of 150 rows (plus the block headers in between, < 1 %): 43 % of the array, not all of it.
  assert 64 * 150 * 13 * 2 <= sum(moved) <= 1.01 * 64 * 150 * 13 * 2


def test_compressed_shards_fall_back_to_arrayrecord(tmp_path):
  d = _write(tmp_path / "zstd", 6, 40, compression="zstd", num_shards=1)
  info = sources.open_directory(d, "train", ("paired",), read="crop")
  assert isinstance(info.source, sources.ArrayRecordShards)
  with pytest.raises(crop_read.NotCropReadable, match="compressed chunks"):
    crop_read.ShardIndex(info.source.paths[0], 6)


@pytest.mark.parametrize("dtype,channels", [(np.uint16, 13), (np.float32, 2), (np.uint8, 3), (np.int32, 1)])
def test_stack_copies_flipped_and_rotated_pixels_exactly(dtype, channels):
  """transforms.stack's pixel copies (whole pixels; transposed views in column strips) give np.stack's bytes for
  every flip/rot90 combination, odd sizes, strided channels and band subsets; NaN payloads survive."""
  from mmrs.data import transforms  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  rows = rng.integers(0, 60000, (37, 70, channels)).astype(dtype)
  if dtype == np.float32:
    rows[3, 4, 0] = np.nan
  elements = []
  for k in range(4):
    for lr in (False, True):
      for ud in (False, True):
        g = transforms.Geometry(0, 11, 37, 37, lr, ud, k)
        elements.append({"x": transforms.apply_geometry(rows, g, 37), "y": transforms.apply_geometry(rows[..., 0], g, 37)})
  for sub in (slice(None), slice(None, None, 2), [0]):
    views = [{"x": e["x"][..., sub], "y": e["y"]} for e in elements]
    got, want = transforms.stack(views), {k: np.stack([e[k] for e in views]) for k in views[0]}
    for key in want:
      assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
      np.testing.assert_array_equal(got[key].view(np.uint8), want[key].view(np.uint8))
