"""Checkpointable data iterators: a restored iterator yields exactly the batches the uninterrupted one would, with
grain worker processes, through get_state/set_state and through grain's Orbax handler; mismatches are refused."""
import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs.common import dataset_config
from mmrs.data import pipeline as pipeline_lib
from mmrs.data import synthetic

BATCH = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("resume") / "ds")
  synthetic.write_synthetic_dataset(d, n_pairs=18, size=20, num_shards=2, seed=0)
  return d


def make(data_dir, workers, batch=BATCH, **kw):
  cfg = dataset_config(data_dir, image_size=16, workers=workers, label_set="synthetic_ml")
  return pipeline_lib.make_pipeline(cfg, modalities=("s1", "s2"), global_batch_size=batch, seed=7, **kw)


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert set(a) == set(b)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


@pytest.fixture(scope="module")
def reference(data_dir):
  """Uninterrupted run with 2 workers: the state after 3 batches (mid-epoch) and the 6 batches that follow
  (crossing into the next epoch: 18 records = 4.5 batches per epoch)."""
  pipe = make(data_dir, workers=2)
  for _ in range(3):
    next(pipe.iterator)
  state = pipe.iterator.get_state()
  following = [next(pipe.iterator) for _ in range(6)]
  pipe.close()
  return state, following


def test_restored_state_with_workers_yields_the_same_batches(data_dir, reference):
  state, following = reference
  pipe = make(data_dir, workers=2)
  pipe.iterator.set_state(json.loads(json.dumps(state)))  # states are plain JSON (checkpointable)
  assert_same([next(pipe.iterator) for _ in range(6)], following)
  pipe.close()


def test_orbax_checkpoint_handler_round_trip_with_workers(data_dir, tmp_path):
  pipe = make(data_dir, workers=2)
  for _ in range(2):
    next(pipe.iterator)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(pipe.iterator)))
  mngr.wait_until_finished()
  following = [next(pipe.iterator) for _ in range(5)]
  pipe.close()
  mngr.close()

  assert (tmp_path / "ckpt" / "2" / "data" / "process_0-of-1.json").exists()  # grain's per-process file
  fresh = make(data_dir, workers=2)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.iterator)))
  assert_same([next(fresh.iterator) for _ in range(5)], following)
  fresh.close()
  mngr.close()


def test_a_state_restores_with_any_worker_count_and_another_order_is_refused(data_dir, reference):
  """The state is the number of global batches consumed: 0 or 3 workers continue a 2-worker run exactly."""
  state, following = reference
  for workers in (0, 3):
    pipe = make(data_dir, workers=workers)
    pipe.iterator.set_state(state)
    assert_same([next(pipe.iterator) for _ in range(6)], following)
    pipe.close()
  other = make(data_dir, workers=0, batch=2 * BATCH)
  with pytest.raises(ValueError, match="global_batch_size: saved 4, now 8"):
    other.iterator.set_state(state)
  other.close()
  reseeded = pipeline_lib.make_pipeline(dataset_config(data_dir, image_size=16, workers=0, label_set="synthetic_ml"),
                                        modalities=("s1", "s2"), global_batch_size=BATCH, seed=8)
  with pytest.raises(ValueError, match="seed: saved 7, now 8"):
    reseeded.iterator.set_state(state)
  with pytest.raises(ValueError, match="not written by an mmrs pipeline"):
    reseeded.iterator.set_state({"next_index": 3})
  with pytest.raises(ValueError, match="older mmrs pipeline"):  # a per-process grain state of earlier versions
    reseeded.iterator.set_state({"mmrs_pipeline": state["mmrs_pipeline"], "grain": {}})
  reseeded.close()


def test_restore_in_process_matches_and_keeps_the_skip_counter(data_dir):
  pipe = make(data_dir, workers=0)
  next(pipe.iterator)
  state = pipe.iterator.get_state()
  following = [next(pipe.iterator) for _ in range(3)]
  again = make(data_dir, workers=0)
  again.iterator.set_state(state)
  assert_same([next(again.iterator) for _ in range(3)], following)
  assert again.skipped() == 0
  assert pipeline_lib.skipped_in_state({"a": [{"mmrs_skipped": 2}, {"x": {"mmrs_skipped": 3}}]}) == 5
  pipe.close()
  again.close()


def test_a_single_pass_with_workers_reads_every_record_once_in_full_batches(data_dir):
  pipe = make(data_dir, workers=2, repeat=False, shuffle=False, drop_remainder=False)
  batches = list(pipe.iterator)
  assert len(batches) == 5  # ceil(18 / 4): not one short batch per worker
  rows = [b["s2"][i].tobytes() for b in batches for i in np.flatnonzero(b["valid"])]
  assert len(rows) == 18 and len(set(rows)) == 18
  pipe.close()
