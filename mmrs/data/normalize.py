"""Per-band standardization from a dataset's `stats.json`: on device inside the jit step (fast path) or on the host.

`normalize_batch` is written with array methods and operators only, so the same code runs on numpy arrays (host)
and on jax arrays inside `jax.jit` (device); this module does not import jax, so grain workers stay light.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from mmrs import bands as bands_lib

MODALITIES = ("s2", "s1")


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """Per-modality float32 mean/std for the selected bands, in the order the batches carry them."""
  bands: dict[str, tuple[str, ...]]
  mean: dict[str, np.ndarray]
  std: dict[str, np.ndarray]
  source: str = ""

  @classmethod
  def from_stats(cls, stats: Mapping[str, Any], bands: Mapping[str, Sequence[str]],
                 source: str = "stats.json") -> "Normalizer":
    """`stats` as in a dataset's stats.json ({modality: {"bands", "mean", "std", ...}}); `bands`: modality -> names.

    `source` names the file in error messages. A zero std (a constant band) is replaced by 1 with a warning, so a
    constant band maps to 0 instead of inf.
    """
    mean, std = {}, {}
    for m, names in bands.items():
      entry = stats.get(m)
      if not entry:
        raise ValueError(f"{source} has no statistics for modality {m!r} (it has {sorted(stats)}); regenerate it "
                         "with data_prep (the shards' stats.json) or choose modalities the dataset has.")
      have = list(entry.get("bands", ()))
      missing = [b for b in names if b not in have]
      if missing:
        raise ValueError(f"{source}: {m} statistics cover bands {have} but the pipeline selects {list(names)} "
                         f"(missing {missing}). The stats do not match the shards' bands: regenerate stats.json "
                         "for this dataset or fix data.s2_bands.")
      idx = bands_lib.band_indices(have, names)
      mu = np.asarray(entry["mean"], np.float64)[idx]
      sd = np.asarray(entry["std"], np.float64)[idx]
      if not (np.isfinite(mu).all() and np.isfinite(sd).all()):
        raise ValueError(f"{source}: {m} mean/std contain NaN/inf for bands {list(names)}; regenerate stats.json.")
      if (sd <= 0).any():
        logging.warning("%s: %s bands %s have zero std; using std=1 for them.", source, m,
                        [n for n, s in zip(names, sd) if s <= 0])
        sd = np.where(sd > 0, sd, 1.0)
      mean[m], std[m] = mu.astype(np.float32), sd.astype(np.float32)
    return cls({m: tuple(b) for m, b in bands.items()}, mean, std, source)

  @classmethod
  def from_published(cls, bands: Mapping[str, Sequence[str]], *, s2_level: str | None = None,
                     family: str = "ssl4eo") -> "Normalizer":
    """Published constants from `mmrs.bands.PUBLISHED`, for data without a stats.json.

    S2 statistics depend on the processing level: top-of-atmosphere L1C and surface-reflectance L2A differ by
    hundreds of DN in the visible bands, so `s2_level` ("L1C" | "L2A") picks the set; without it the level is
    read from the selected bands (B10 means L1C, else L2A; pass the level when selecting a subset of L1C bands).
    `family`: "ssl4eo" (global, default), "bigearthnet" (v1) or "bigearthnet_v2" (reBEN; L2A only).
    """
    stats, sources = {}, []
    for m, names in bands.items():
      level = None
      if m == "s2":
        level = (s2_level or bands_lib.s2_level_of(names)).upper()
        if level not in ("L1C", "L2A"):
          raise ValueError(f"s2_level={s2_level!r}: use 'L1C' or 'L2A'.")
      st = bands_lib.PUBLISHED.get((family, m, level))
      if st is None:
        have = sorted({k for k in bands_lib.PUBLISHED if k[1] == m})
        raise ValueError(f"No published {m} statistics for family {family!r}" + (f" at level {level}" if level else "")
                         + f" (published: {have}); give the dataset a stats.json.")
      if not set(names) <= set(st.bands):
        raise ValueError(f"{st.source} covers {m} bands {list(st.bands)}, not {list(names)}; give the dataset a "
                         "stats.json.")
      stats[m] = {"bands": list(st.bands), "mean": list(st.mean), "std": list(st.std)}
      sources.append(st.source)
    return cls.from_stats(stats, bands, source="published: " + "; ".join(sources))

  def to_json(self) -> dict:
    """Plain JSON (for checkpoint metadata, so a finetune normalizes exactly like the pretraining)."""
    return {"source": self.source, **{m: {"bands": list(self.bands[m]), "mean": self.mean[m].tolist(),
                                          "std": self.std[m].tolist()} for m in self.bands}}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Normalizer":
    mods = {m: tuple(v["bands"]) for m, v in d.items() if m != "source"}
    return cls.from_stats({m: d[m] for m in mods}, mods, source=d.get("source", "checkpoint"))


def normalize_batch(batch: Mapping[str, Any], normalizer: Normalizer) -> dict[str, Any]:
  """(x - mean) / std in float32 for every modality the normalizer knows; other keys pass through unchanged.

  Works on numpy arrays and on jax arrays (inside jit the constants are folded in). S1 is clipped to
  `bands.S1_DB_CLIP` first (idempotent: the host transforms already clip). Pixels flagged 0 in `<modality>_valid`
  (S1 no-data) are set to 0 after standardization, so the filled -50 dB (about -7 sigma) never reaches a model.
  """
  out = dict(batch)
  for m, mean in normalizer.mean.items():
    x = batch.get(m)
    if x is None:
      continue
    if x.shape[-1] != mean.shape[0]:
      raise ValueError(f"Batch {m!r} has {x.shape[-1]} channels but the normalizer has {mean.shape[0]} bands "
                       f"{list(normalizer.bands[m])} (from {normalizer.source}).")
    inv_std = np.float32(1.0) / normalizer.std[m]
    valid = batch.get(f"{m}_valid")  # (..., H, W) 1 = measured; no-data pixels become 0 (the band mean)
    if isinstance(x, np.ndarray):  # host: two passes, no temporaries (this runs per batch in the data workers)
      y = np.clip(x, *bands_lib.S1_DB_CLIP, dtype=np.float32) if m == "s1" else x
      y = np.subtract(y, mean, dtype=np.float32, out=y if y is not x else None)
      out[m] = np.multiply(y, inv_std, out=y)
      if valid is not None:
        np.multiply(y, np.asarray(valid)[..., None], out=y)
      continue
    x = x.astype(np.float32)
    if m == "s1":
      x = x.clip(*bands_lib.S1_DB_CLIP)
    y = (x - mean) * inv_std
    out[m] = y if valid is None else y * valid[..., None].astype(np.float32)
  return out


def denormalize_batch(batch: Mapping[str, Any], normalizer: Normalizer) -> dict[str, Any]:
  """Inverse of `normalize_batch` (float32 raw units), e.g. for reconstruction images."""
  out = dict(batch)
  for m, mean in normalizer.mean.items():
    if batch.get(m) is not None:
      out[m] = batch[m].astype(np.float32) * normalizer.std[m] + mean
  return out
