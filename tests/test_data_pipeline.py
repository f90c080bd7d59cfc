"""Data pipeline behaviour: shapes/dtypes, band selection, one geometry for all modalities and the mask, labels,
the global sample order (the same global batches for any process/worker count), evaluation passes, bad records and
damaged shards, normalization modes, TFDS sources."""
import json
import shutil

from array_record.python import array_record_module
import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.common import dataset_config
from mmrs.data.writer import DatasetWriter
from mmrs import bands as bands_lib
from mmrs.data import normalize as normalize_lib
from mmrs.data import pipeline as pipeline_lib
from mmrs.data import sources, transforms

SIZE = 24  # record grid
CROP = 16
N_PAIRS, N_S2_ONLY = 20, 6
S2_BANDS = ("B02", "B03", "B04", "B08")
LABEL_SETS = {"ml": {"kind": "multi_label", "names": list("abcd")}, "cls": {"kind": "class", "names": list("abcd")},
              "seg": {"kind": "mask", "names": list("0123456")}}


def probe_record(i: int, s1: bool = True, s2: bool = True) -> dict:
  """A record whose pixels say where they came from: band 0 = 1 + row*SIZE + col, band 1 = record number."""
  coord = 1 + np.arange(SIZE * SIZE).reshape(SIZE, SIZE)
  rec = {"id": f"probe-{i}", "labels": {"ml": [i % 3, 3], "cls": i % 4}, "mask": ((coord - 1) % 7).astype(np.int16)}
  if s2:
    rec["s2"] = np.stack([coord, np.full_like(coord, i), np.full_like(coord, 1000 + 10 * i), coord % 5 + 7],
                         -1).astype(np.uint16)
    rec["s2_bands"] = S2_BANDS
  if s1:
    rec["s1"] = np.stack([coord, np.full_like(coord, i)], -1).astype(np.float32) * np.float32(0.01) - 20
    rec["s1_bands"] = bands_lib.S1_BANDS
  return rec


def write_probe(out_dir, num_shards=2):
  with DatasetWriter(str(out_dir), num_shards=num_shards, source="probe", licence="test", created_by="test",
                     label_sets=LABEL_SETS) as w:
    for i in range(N_PAIRS):
      w.add(probe_record(i))
    for i in range(N_PAIRS, N_PAIRS + N_S2_ONLY):
      w.add(probe_record(i, s1=False))
    return w.close()


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("probe") / "ds"
  write_probe(d)
  return str(d)


def cfg(shards, **kw):
  kw.setdefault("image_size", CROP)
  return dataset_config(shards, **kw)


def make(shards, modalities=("s1", "s2"), batch=4, seed=0, cfg_kw=None, **kw):
  return pipeline_lib.make_pipeline(cfg(shards, **(cfg_kw or {})), modalities=modalities, global_batch_size=batch,
                                    seed=seed, **kw)


def take(pipe, n):
  return [next(pipe.iterator) for _ in range(n)]


def drain(pipe):
  """All batches of a finite pipeline, and the record numbers of the valid rows."""
  batches = list(pipe.iterator)
  ids = [int(i) for b in batches for i, v in zip(b["s2"][:, 0, 0, 1], b["valid"]) if v]
  return batches, ids


def test_batch_shapes_dtypes_and_metadata(probe_dir):
  pipe = make(probe_dir, cfg_kw=dict(label_set="ml,cls,seg"))
  b = next(pipe.iterator)
  assert b["s2"].shape == (4, CROP, CROP, 4) and b["s2"].dtype == np.uint16
  assert b["s1"].shape == (4, CROP, CROP, 2) and b["s1"].dtype == np.float32
  assert b["label_ml"].shape == (4, 4) and b["label_ml"].dtype == np.float32
  assert b["label_cls"].shape == (4,) and b["label_cls"].dtype == np.int32
  assert b["label_seg"].shape == (4, CROP, CROP) and b["label_seg"].dtype == np.int32
  assert pipe.bands == {"s1": ("VV", "VH"), "s2": S2_BANDS}
  assert pipe.num_records == N_PAIRS and pipe.batch_size == 4
  assert pipe.manifest["source"] == "probe" and set(pipe.stats) == {"s1", "s2"}
  assert pipe.normalizer.mean["s2"].shape == (4,)
  pipe.close()


def test_one_geometry_for_every_modality_mask_and_labels(probe_dir):
  pipe = make(probe_dir, batch=8, cfg_kw=dict(label_set="ml,cls,seg"))
  orientations = set()
  for b in take(pipe, 6):
    for j in range(8):
      coord = b["s2"][j, ..., 0].astype(np.int64)
      np.testing.assert_allclose(b["s1"][j, ..., 0], coord * np.float32(0.01) - 20, atol=1e-4)
      np.testing.assert_array_equal(b["label_seg"][j], (coord - 1) % 7)
      rows, cols = np.divmod(coord - 1, SIZE)
      # A rigid crop: a CROP x CROP block of the record, possibly flipped / rotated.
      assert rows.max() - rows.min() == CROP - 1 and cols.max() - cols.min() == CROP - 1
      assert len(np.unique(coord)) == CROP * CROP
      orientations.add((int(np.sign(rows[1, 0] - rows[0, 0])), int(np.sign(cols[0, 1] - cols[0, 0]))))
      i = int(b["s2"][j, 0, 0, 1])
      assert (b["s1"][j, ..., 1] == np.float32(i) * np.float32(0.01) - 20).all()
      np.testing.assert_array_equal(b["label_ml"][j], np.isin(np.arange(4), [i % 3, 3]).astype(np.float32))
      assert b["label_cls"][j] == i % 4
  assert len(orientations) > 2, "flips / rot90 should produce several orientations"
  pipe.close()


def test_no_augmentation_gives_centre_crops(probe_dir):
  pipe = make(probe_dir, augment=False)
  b = next(pipe.iterator)
  off = (SIZE - CROP) // 2
  expected = 1 + (np.arange(CROP)[:, None] + off) * SIZE + np.arange(CROP)[None, :] + off
  for j in range(4):
    np.testing.assert_array_equal(b["s2"][j, ..., 0], expected)
  pipe.close()


def test_band_selection_by_name(probe_dir):
  full = make(probe_dir, modalities=("s2",), augment=False)
  sub = make(probe_dir, modalities=("s2",), augment=False, cfg_kw=dict(s2_bands="B08,B02"))
  a, b = next(full.iterator), next(sub.iterator)
  np.testing.assert_array_equal(b["s2"], a["s2"][..., [3, 0]])
  assert sub.bands["s2"] == ("B08", "B02")
  np.testing.assert_array_equal(sub.normalizer.mean["s2"], full.normalizer.mean["s2"][[3, 0]])
  with pytest.raises(ValueError, match="B11"):
    make(probe_dir, modalities=("s2",), cfg_kw=dict(s2_bands="B02,B11"))
  full.close()
  sub.close()


def test_groups_follow_modalities(probe_dir):
  s2 = make(probe_dir, modalities=("s2",), shuffle=False, repeat=False, drop_remainder=False)
  _, ids = drain(s2)
  assert sorted(ids) == list(range(N_PAIRS + N_S2_ONLY))  # paired + s2_only
  paired = make(probe_dir, shuffle=False, repeat=False, drop_remainder=False)
  batches, ids = drain(paired)
  assert sorted(ids) == list(range(N_PAIRS)) and "s1" in batches[0]
  assert sum(int(b["valid"].sum()) for b in batches) == N_PAIRS
  assert all(b["s2"].shape[0] == 4 for b in batches)  # the last batch is padded, shapes stay fixed


def test_processes_see_disjoint_records_whose_union_is_the_set(probe_dir):
  seen = []
  for p in range(2):
    pipe = make(probe_dir, modalities=("s2",), batch=4, process_index=p, process_count=2, repeat=False,
                drop_remainder=False)
    assert pipe.batch_size == 2
    seen.append(drain(pipe)[1])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(N_PAIRS + N_S2_ONLY))
  with pytest.raises(ValueError, match="not divisible"):
    make(probe_dir, batch=5, process_count=2)


def test_seeded_order_is_reproducible_and_epochs_differ(probe_dir):
  def order(seed, n=10):
    pipe = make(probe_dir, modalities=("s2",), batch=N_PAIRS + N_S2_ONLY, seed=seed, augment=False)
    out = [b["s2"][:, 0, 0, 1].tolist() for b in take(pipe, 2)]
    pipe.close()
    return out
  a, b, c = order(0), order(0), order(1)
  assert a == b and a != c
  assert sorted(a[0]) == sorted(a[1]) == list(range(N_PAIRS + N_S2_ONLY)) and a[0] != a[1]


def test_random_resized_crop_keeps_modalities_aligned(probe_dir):
  pipe = make(probe_dir, cfg_kw=dict(image_size=32, random_resized_crop=True, label_set="seg"))
  b = next(pipe.iterator)
  assert b["s2"].shape == (4, 32, 32, 4) and b["label_seg"].shape == (4, 32, 32)
  # S1 (float) and S2 (uint16, rounded) are resampled with the same box: same coordinates up to rounding.
  np.testing.assert_allclose((b["s1"][..., 0] + 20) / 0.01, b["s2"][..., 0], atol=0.6)
  assert set(np.unique(b["label_seg"])) <= set(range(7))
  pipe.close()


def test_record_transform_gets_the_augmented_record_and_an_rng(probe_dir):
  def views(rec, rng):
    assert rec["s2_bands"] == ("B08", "B02") and rec["s1_bands"] == ("VV", "VH")
    assert rec["id"].startswith("probe-")
    return {"view1": rec["s2"][..., :1].astype(np.float32), "view2": rec["s1"][..., :1] + rng.normal()}
  pipe = make(probe_dir, record_transform=views, cfg_kw=dict(s2_bands="B08,B02"))
  b = next(pipe.iterator)
  assert set(b) == {"view1", "view2", "record_key"} and b["view1"].shape == (4, CROP, CROP, 1)
  pipe.close()
  whole = make(probe_dir, record_transform=views, cfg_kw=dict(s2_bands="B08,B02", image_size=0))
  assert next(whole.iterator)["view1"].shape == (4, SIZE, SIZE, 1)  # image_size=0: whole records
  whole.close()


def test_host_normalization_equals_device_normalization(probe_dir):
  raw = make(probe_dir, normalize="device", seed=3)
  host = make(probe_dir, normalize="host", seed=3)
  a, h = next(raw.iterator), next(host.iterator)
  assert h["s2"].dtype == np.float32 and a["s2"].dtype == np.uint16
  n = normalize_lib.normalize_batch(a, raw.normalizer)
  for k in ("s1", "s2"):
    np.testing.assert_allclose(h[k], n[k], rtol=1e-6)
  raw.close()
  host.close()
  with pytest.raises(ValueError, match="normalize="):
    make(probe_dir, normalize="gpu")


def test_stats_that_do_not_match_the_bands_are_a_clear_error(probe_dir, tmp_path):
  d = tmp_path / "ds"
  shutil.copytree(probe_dir, d)
  stats = json.loads((d / "stats.json").read_text())
  stats["s2"]["bands"] = ["B02", "B03", "B04", "B8A"]
  (d / "stats.json").write_text(json.dumps(stats))
  with pytest.raises(ValueError, match=r"stats\.json.*B08"):
    make(str(d))


def test_unknown_label_set_split_and_missing_dir_are_clear_errors(probe_dir, tmp_path):
  with pytest.raises(ValueError, match="label_set='ben19'.*'cls'"):
    make(probe_dir, cfg_kw=dict(label_set="ben19"))
  with pytest.raises(sources.ShardError, match="no split 'val'"):
    make(probe_dir, split="val")
  with pytest.raises(sources.ShardError, match="does not exist"):
    make(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="smaller than data.image_size=32"):
    next(make(probe_dir, cfg_kw=dict(image_size=32)).iterator)


def _corrupt_record(shard_path, index):
  reader = grain.sources.ArrayRecordDataSource([str(shard_path)])
  data = [reader[i] for i in range(len(reader))]
  data[index] = b"MMRS\x01garbage"
  writer = array_record_module.ArrayRecordWriter(str(shard_path), "group_size:1")
  for x in data:
    writer.write(x)
  writer.close()


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad") / "ds"
  manifest = write_probe(d, num_shards=1)
  shard = manifest["splits"]["train"]["paired"][0]
  _corrupt_record(d / shard, 5)
  return str(d), shard


def test_bad_record_fails_naming_shard_and_index(bad_dir):
  d, shard = bad_dir
  pipe = make(d, shuffle=False, repeat=False)
  with pytest.raises(transforms.BadRecordError, match=rf"{shard} record 5: .*on_bad='skip'"):
    list(pipe.iterator)


def test_bad_record_is_skipped_and_counted(bad_dir):
  d, _ = bad_dir
  pipe = make(d, shuffle=False, repeat=False, drop_remainder=False, cfg_kw=dict(on_bad="skip"))
  batches, ids = drain(pipe)
  assert sorted(ids) == [i for i in range(N_PAIRS) if i != 5]
  assert pipe.skipped() == 1


def test_damaged_shard_file_is_named(probe_dir, tmp_path):
  d = tmp_path / "ds"
  shutil.copytree(probe_dir, d)
  shard = d / json.loads((d / "manifest.json").read_text())["splits"]["train"]["paired"][1]
  shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
  with pytest.raises(sources.ShardError, match=rf"{shard.name}.*truncated or corrupted"):
    make(str(d))


class MmrsTfdsProbe(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tiny TFDS dataset in array_record format with the record keys as features."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "s2": tfds.features.Tensor(shape=(SIZE, SIZE, 4), dtype=np.uint16),
            "s1": tfds.features.Tensor(shape=(SIZE, SIZE, 2), dtype=np.float32),
            "label_ml": tfds.features.Sequence(tfds.features.ClassLabel(names=list("abcd"))),
            "label_cls": tfds.features.ClassLabel(names=list("abcd")),
        }),
        metadata=tfds.core.MetadataDict(bands={"s2": list(S2_BANDS), "s1": ["VV", "VH"]}),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(range(10)), "test": self._generate_examples(range(10, 14))}

  def _generate_examples(self, numbers):
    for i in numbers:
      r = probe_record(i)
      yield r["id"], {"id": r["id"], "s2": r["s2"], "s1": r["s1"], "label_ml": r["labels"]["ml"],
                      "label_cls": r["labels"]["cls"]}


def test_tfds_source(tmp_path):
  data_dir = str(tmp_path / "tfds")
  MmrsTfdsProbe(data_dir=data_dir, file_format="array_record").download_and_prepare()
  pipe = make(f"tfds:mmrs_tfds_probe:test@{data_dir}", batch=2, repeat=False, shuffle=False,
              cfg_kw=dict(label_set="ml,cls"))
  batches = list(pipe.iterator)
  assert len(batches) == 2 and pipe.num_records == 4
  ids = sorted(int(i) for b in batches for i in b["s2"][:, 0, 0, 1])
  assert ids == [10, 11, 12, 13]
  for b in batches:
    for j in range(2):
      i = int(b["s2"][j, 0, 0, 1])
      np.testing.assert_array_equal(b["label_ml"][j], np.isin(np.arange(4), [i % 3, 3]).astype(np.float32))
      assert b["label_cls"][j] == i % 4
  assert pipe.bands["s2"] == S2_BANDS
  assert "published" in pipe.normalizer.source  # no stats in the TFDS dataset: published constants
  assert sources.parse_tfds_spec("tfds:a/b:train[:10%]@gs://x/y") == ("a/b", "train[:10%]", "gs://x/y")


def _assemble(parts, global_batch):
  """Global batch from (rows, local batch) parts: row r of the global batch is wherever a process put it."""
  out = {}
  for rows, local in parts:
    for k, v in local.items():
      dtype = object if v.dtype.kind == "U" else v.dtype  # strings of any width
      out.setdefault(k, np.zeros((global_batch,) + v.shape[1:], dtype))[rows] = v
  return out


def test_global_batches_do_not_depend_on_process_or_worker_count(probe_dir):
  """Global batch k holds the same records, identically augmented, read by 1, 2 (one with a grain worker) or 4
  processes with interleaved rows; across an epoch boundary (26 records, 4 batches of 8)."""
  kw = dict(modalities=("s2",), batch=8, seed=5, cfg_kw=dict(random_resized_crop=True, image_size=12))
  whole = make(probe_dir, **kw)
  want = take(whole, 4)
  whole.close()
  ids = [b["s2"][:, 0, 0, 1].tolist() for b in want]
  assert sorted(ids[0] + ids[1] + ids[2] + ids[3][:2]) == list(range(N_PAIRS + N_S2_ONLY))  # one epoch, then the next
  assert all(len(set(k)) == 8 and all(k) for k in (b["record_key"] for b in want))
  layouts = {2: [np.arange(0, 4), np.arange(4, 8)], 4: [np.arange(p, 8, 4) for p in range(4)]}
  for count, all_rows in layouts.items():
    pipes = [make(probe_dir, rows=rows, cfg_kw=dict(kw["cfg_kw"], workers=1 if count == 2 and p == 1 else 0),
                  **{k: v for k, v in kw.items() if k != "cfg_kw"}) for p, rows in enumerate(all_rows)]
    assert [p.batch_size for p in pipes] == [8 // count] * count
    got = [_assemble([(rows, next(p.iterator)) for rows, p in zip(all_rows, pipes)], 8) for _ in range(4)]
    for g, w in zip(got, want):
      assert set(g) == set(w)
      for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=f"{count} processes, key {k}")
    for p in pipes:
      p.close()
  with pytest.raises(ValueError, match="sorted distinct row indices"):
    make(probe_dir, batch=4, rows=[2, 1])


def test_a_bad_record_is_replaced_the_same_way_for_any_process_count(bad_dir):
  """on_bad='skip' in a repeated pass: the slot of bad record 5 takes the next record of the global order."""
  d, shard = bad_dir
  kw = dict(shuffle=False, augment=False, batch=4, cfg_kw=dict(on_bad="skip"))
  one = make(d, **kw)
  batches = take(one, 2)
  assert batches[1]["s2"][:, 0, 0, 1].tolist() == [4, 6, 6, 7]
  assert batches[1]["record_key"].tolist()[1] == f"{shard}:6" and one.skipped() == 1
  one.close()
  two = [make(d, process_index=p, process_count=2, **kw) for p in range(2)]
  got = [_assemble([(np.arange(2 * p, 2 * p + 2), next(t.iterator)) for p, t in enumerate(two)], 4)
         for _ in range(2)]
  np.testing.assert_array_equal(got[1]["s2"], batches[1]["s2"])
  assert [t.skipped() for t in two] == [1, 0]  # the slot is process 0's; the counters sum to the global count
  for t in two:
    t.close()
