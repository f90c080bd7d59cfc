"""TFDS builder `mmrs_sen12ms`: SEN12MS (config sen12ms) and DFC2020 (config dfc2020) 256 px S1+S2 patches."""
import tensorflow_datasets as tfds

from data_prep import sen12ms
from data_prep.tfds import common
from mmrs.data import label_sets


class MmrsSen12ms(common.ConverterBuilder):
  """SEN12MS (Schmitt et al. 2019) / DFC2020 (Yokoya et al.): 256 x 256 px Sentinel-1 (VV, VH dB) + Sentinel-2 L1C
  (13 bands) with a land-cover `mask` in the 10 simplified IGBP classes (-1 = no label).
  Config sen12ms: also label_sen12ms (the patch's majority class) and label_sen12ms_multi (classes covering >= 10%);
  splits from the scene-classification lists in manual_dir ({train,val,test}_list.pkl) when present, else 'train'.
  Config dfc2020: the contest's validation (split 'val') and test (split 'test') patches.
  Patches whose S1 is mostly no-data (dropped by the converter) are counted in metadata['skipped']."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (mmrs data_prep.sen12ms records)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="sen12ms", description="SEN12MS ROIs (scene + IGBP mask)"),
                     tfds.core.BuilderConfig(name="dfc2020", description="DFC2020 validation + test")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  SEN12MS: download the ROIs*.tar.gz archives from https://mediatum.ub.tum.de/1474000 and extract them into
  manual_dir (ROIs1158_spring/s1_<scene>/..., s2_<scene>/..., lc_<scene>/...); optionally add train_list.pkl /
  test_list.pkl. DFC2020: extract ROIs0000_validation and ROIs0000_test (s1_0, s2_0, lc_0, dfc_0 folders).
  """
  converter = sen12ms

  def features_for(self, config):
    name = config.name if config else "sen12ms"
    sets = label_sets.manifest_entry(*sen12ms.DATASETS[name]["label_sets"])
    features = common.image_features(256, common.S2_L1C, s1=True, mask=True)
    features.update(common.label_features(sets))
    return features, {"s2": common.S2_L1C, "s1": common.S1}, sets

  def list_kwargs(self, config):
    return {"dataset": config.name if config else "sen12ms"}
