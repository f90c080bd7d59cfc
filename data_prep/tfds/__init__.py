"""TFDS builders (array_record, no TensorFlow needed) for the downstream datasets, reusing data_prep's converters.

    python -m data_prep.tfds.prepare --dataset=mmrs_bigearthnet_mm --manual_dir=DIR --data_dir=DIR
    # then: --config.data.train.shards=tfds:mmrs_bigearthnet_mm/v1:train@DIR (or /v2 for BigEarthNet v2.0)

Builders (names registered with tfds when their module is imported; a prepared dataset also reads without it):
  mmrs_bigearthnet_mm   (bigearthnet_mm.py)  configs v1 (label_ben19 + label_corine43) and v2 (reBEN, label_ben19,
                                             official splits), detected from manual_dir; S1+S2 pairs, 120 px
  mmrs_eurosat_ms       (eurosat.py)         S2 L1C 13 bands, 64 px, label_eurosat (class)
  mmrs_sen12ms          (sen12ms.py)         configs sen12ms (scene labels + IGBP mask) and dfc2020 (mask), 256 px
  mmrs_sen1floods11     (sen1floods11.py)    configs s1s2 and s2 (S2-only keeps chips whose S1 is mostly no-data)
"""

BUILDERS = {
    "mmrs_bigearthnet_mm": "data_prep.tfds.bigearthnet_mm:MmrsBigearthnetMm",
    "mmrs_eurosat_ms": "data_prep.tfds.eurosat:MmrsEurosatMs",
    "mmrs_sen12ms": "data_prep.tfds.sen12ms:MmrsSen12ms",
    "mmrs_sen1floods11": "data_prep.tfds.sen1floods11:MmrsSen1floods11",
}


def builder_class(name: str):
  import importlib  # pylint: disable=g-import-not-at-top

  if name not in BUILDERS:
    raise ValueError(f"Unknown TFDS builder {name!r}; choose one of {sorted(BUILDERS)}.")
  module, _, cls = BUILDERS[name].partition(":")
  return getattr(importlib.import_module(module), cls)
