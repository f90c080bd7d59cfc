"""Shared by the end-to-end tests: the bundled real BigEarthNet-MM sample converted once per test module, and
tiny configs that train 3 steps."""
import importlib
import os

import pytest

from data_prep import bigearthnet_mm

SAMPLE = os.path.join(os.path.dirname(__file__), "..", "data_prep", "samples", "bigearthnet_mm")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("data") / "ben")
  manifest = bigearthnet_mm.convert_dataset(SAMPLE, out, num_shards=1)
  assert (manifest["counts"]["pairs"], manifest["counts"]["s1_only"], manifest["counts"]["s2_only"]) == (6, 3, 8)
  return out


def tiny_config(module, shards, extra=""):
  config = importlib.import_module(f"configs.{module}").get_config(f"tiny,shards={shards}{extra}")
  config.total_steps, config.log_every_steps, config.checkpoint_every_steps = 3, 1, 3
  config.visualize_every_steps = 3
  config.xla_compiler_options = {"xla_backend_optimization_level": 0}  # halves CPU compile time
  return config
