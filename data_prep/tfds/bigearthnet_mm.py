"""TFDS builder `mmrs_bigearthnet_mm`: BigEarthNet S1+S2 pairs, v1 (BigEarthNet-MM, 19- and 43-class labels) or
v2.0 (reBEN, 19-class labels, official splits), one config per release."""
import os

from absl import logging
import tensorflow_datasets as tfds

from data_prep import bigearthnet_mm
from data_prep.tfds import common
from mmrs.data import bigearthnet_labels

_EXCLUSION_COUNTS = ("excluded", "excluded_cloud_or_shadow", "excluded_seasonal_snow", "kept_flagged")


class MmrsBigearthnetMm(common.ConverterBuilder):
  """BigEarthNet: 120 x 120 px Sentinel-1 (VV, VH dB) + Sentinel-2 L2A (12 bands) pairs with multi-label land-cover
  classes. Config v1 (BigEarthNet-MM, Sumbul et al. 2021): the CORINE classes (label_corine43) and the 19-class
  nomenclature (label_ben19), splits from the official lists. Config v2 (BigEarthNet v2.0 / reBEN, Clasen et al.
  2025, what bigearth.net ships today): label_ben19 from metadata.parquet, its official train / validation (-> val)
  / test split, S1 partners from its s1_name column. `data_prep.tfds.prepare` picks the config from manual_dir with
  the converter's own layout detection (`data_prep.bigearthnet_mm.detect`). Patches with cloud, shadow or seasonal
  snow are left out by default, as the dataset's authors do (build with keep_cloudy=True to keep them);
  metadata['bigearthnet'] says which release was read and what was excluded, metadata['published'] sets the
  examples written beside the published split sizes. Only S1+S2 pairs are written (an S1 patch without its S2
  partner, or the reverse, is counted in metadata['skipped'])."""
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "First release (mmrs data_prep.bigearthnet_mm records, BigEarthNet v1).",
      "2.0.0": "Configs v1 and v2 (BigEarthNet v2.0 / reBEN); metadata['bigearthnet'] (release read, exclusion) "
               "and metadata['published'] (expected vs found split sizes).",
  }
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="v1", description="BigEarthNet-MM v1: label_ben19 + label_corine43"),
      tfds.core.BuilderConfig(name="v2", description="BigEarthNet v2.0 (reBEN): label_ben19, official splits"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  v2.0 (reBEN, bigearth.net today): extract BigEarthNet-S1.tar.zst and BigEarthNet-S2.tar.zst into manual_dir and
  put metadata.parquet and metadata_for_patches_with_snow_cloud_or_shadow.parquet next to them (giving
  manual_dir/BigEarthNet-S1/<product>/<patch>/..., manual_dir/BigEarthNet-S2/<product>/<patch>/...). Splits and
  the cloud/shadow/snow flags come from the parquet files.
  v1: extract BigEarthNet-S1-v1.0.tar.gz and BigEarthNet-S2-v1.0.tar.gz into manual_dir (giving
  manual_dir/BigEarthNet-S1-v1.0/... and manual_dir/BigEarthNet-v1.0/...). For the official train/val/test split,
  put train.csv, val.csv and test.csv in manual_dir/splits/ (without them, everything goes to split 'train').
  Patches with cloud, shadow or seasonal snow are dropped when the official patches_with_cloud_and_shadow.csv /
  patches_with_seasonal_snow.csv are in manual_dir/exclude_lists/ (without them they are kept, with a warning).
  Build with keep_cloudy=True to keep the flagged patches on purpose (e.g. for pretraining).
  """
  converter = bigearthnet_mm

  def __init__(self, *, keep_cloudy: bool = False, **kwargs):
    self.keep_cloudy = bool(keep_cloudy)
    super().__init__(**kwargs)

  @classmethod
  def config_for_manual_dir(cls, manual_dir: str) -> str:
    return bigearthnet_mm.detect(str(manual_dir)).version  # "v1" | "v2"; a one-line error when neither

  @staticmethod
  def _release(config) -> str:
    return config.name if config else "v1"

  def source_for(self, config) -> str:
    return bigearthnet_mm.SOURCE_V2 if self._release(config) == "v2" else bigearthnet_mm.SOURCE

  def features_for(self, config):
    v2 = self._release(config) == "v2"
    label_sets = bigearthnet_labels.LABEL_SETS_V2 if v2 else bigearthnet_labels.LABEL_SETS
    features = common.image_features(120, common.S2_L2A, s1=True, mask=False)
    features.update(common.label_features(label_sets))
    return features, {"s2": common.S2_L2A, "s1": common.S1}, label_sets

  def list_kwargs(self, config):
    manual, want = self._manual_dir, self._release(config)
    found = bigearthnet_mm.detect(manual).version
    if found != want:
      raise ValueError(f"{manual} holds BigEarthNet {found} but this build is config {want!r}: build config "
                       f"{found!r} (mmrs_bigearthnet_mm/{found}), or run data_prep.tfds.prepare without --config, "
                       "which picks the config from the folder.")
    splits, lists = os.path.join(manual, "splits"), os.path.join(manual, "exclude_lists")
    if want == "v2":
      for d in (splits, lists):
        if os.path.isdir(d):
          logging.warning("%s: ignored for BigEarthNet v2.0, whose official splits and cloud/snow flags are in "
                          "metadata.parquet.", d)
      return {"keep_cloudy": self.keep_cloudy}
    kwargs = {"splits_dir": splits} if os.path.isdir(splits) else {}
    if os.path.isdir(lists) and not self.keep_cloudy:
      kwargs["exclude_lists"] = lists
    return {**kwargs, "keep_cloudy": self.keep_cloudy}

  def listing_metadata(self, report) -> dict:
    splits_dir = os.path.join(self._manual_dir, "splits") if report["version"] == "v1" and os.path.isdir(
        os.path.join(self._manual_dir, "splits")) else None
    info = bigearthnet_mm.describe(report, splits_dir=splits_dir)
    info["counts"] = {k: report["exclusion"][k] for k in _EXCLUSION_COUNTS}
    info["keep_cloudy"] = self.keep_cloudy
    return {"bigearthnet": info, "warnings": report["warnings"]}

  def published_counts(self, report):
    return bigearthnet_mm.published_counts(report)
