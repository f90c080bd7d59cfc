"""TFDS builder `mmrs_bigearthnet_mm`: BigEarthNet-MM v1 S1+S2 pairs with the 19- and 43-class labels."""
import tensorflow_datasets as tfds

from data_prep import bigearthnet_mm
from data_prep.tfds import common
from mmrs.data import bigearthnet_labels


class MmrsBigearthnetMm(common.ConverterBuilder):
  """BigEarthNet-MM (Sumbul et al. 2021): 120 x 120 px Sentinel-1 (VV, VH dB) + Sentinel-2 L2A (12 bands) pairs,
  multi-label CORINE classes (label_corine43) and the 19-class nomenclature (label_ben19). Only S1+S2 pairs are
  written (an S1 patch without its S2 partner, or the reverse, is counted in metadata['skipped'])."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (mmrs data_prep.bigearthnet_mm records)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download BigEarthNet-S1-v1.0.tar.gz and BigEarthNet-S2-v1.0.tar.gz from https://bigearth.net and extract both
  into manual_dir (giving manual_dir/BigEarthNet-S1-v1.0/... and manual_dir/BigEarthNet-v1.0/...). For the
  official train/val/test split, put train.csv, val.csv and test.csv in manual_dir/splits/ (without them,
  everything goes to split 'train'). Patches with cloud, shadow or seasonal snow are dropped when the official
  patches_with_cloud_and_shadow.csv / patches_with_seasonal_snow.csv are in manual_dir/exclude_lists/ (without them
  they are kept, with a warning); build with keep_cloudy=True to keep them on purpose.
  """
  converter = bigearthnet_mm

  def __init__(self, *, keep_cloudy: bool = False, **kwargs):
    self.keep_cloudy = bool(keep_cloudy)
    super().__init__(**kwargs)

  def features_for(self, config):
    label_sets = bigearthnet_labels.LABEL_SETS
    features = common.image_features(120, common.S2_L2A, s1=True, mask=False)
    features.update(common.label_features(label_sets))
    return features, {"s2": common.S2_L2A, "s1": common.S1}, label_sets

  def list_kwargs(self, config):
    import os  # pylint: disable=g-import-not-at-top
    if bigearthnet_mm.detect(str(self._manual_dir)).version != "v1":
      raise ValueError(f"{self._manual_dir} holds BigEarthNet v2.0 (reBEN); this TFDS builder has the v1 features "
                       "(43 + 19 classes). Convert v2.0 with `python -m data_prep.bigearthnet_mm --src=...`.")
    splits = os.path.join(str(self._manual_dir), "splits")
    lists = os.path.join(str(self._manual_dir), "exclude_lists")
    kwargs = {"splits_dir": splits} if os.path.isdir(splits) else {}
    if os.path.isdir(lists) and not self.keep_cloudy:
      kwargs["exclude_lists"] = lists
    return {**kwargs, "keep_cloudy": self.keep_cloudy}

  def _split_generators(self, dl_manager):
    self._manual_dir = dl_manager.manual_dir
    return super()._split_generators(dl_manager)
