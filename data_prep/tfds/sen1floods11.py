"""TFDS builder `mmrs_sen1floods11`: Sen1Floods11 hand-labelled 512 px chips with the water mask."""
import tensorflow_datasets as tfds

from data_prep import sen1floods11
from data_prep.tfds import common
from mmrs.data import label_sets


class MmrsSen1floods11(common.ConverterBuilder):
  """Sen1Floods11 (Bonafilia et al. 2020): 512 x 512 px chips, Sentinel-2 L1C (13 bands) and Sentinel-1 (VV, VH dB)
  with the hand-labelled `mask` (0 not water, 1 water, -1 no data). Config s1s2: both modalities (chips whose S1 is
  mostly no-data are counted in metadata['skipped']); config s2: Sentinel-2 only, every chip (the MixMAE paper's
  setting). Splits from the v1.1 split CSVs: train, val, test, bolivia."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (mmrs data_prep.sen1floods11 records)."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="s1s2", description="Sentinel-1 + Sentinel-2"),
                     tfds.core.BuilderConfig(name="s2", description="Sentinel-2 only")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Copy gs://sen1floods11/v1.1 (at least data/flood_events/HandLabeled/{S1Hand,S2Hand,LabelHand} and
  splits/flood_handlabeled/) into manual_dir.
  """
  converter = sen1floods11

  def features_for(self, config):
    s1 = (config.name if config else "s1s2") == "s1s2"
    sets = label_sets.manifest_entry(label_sets.SEN1FLOODS11)
    features = common.image_features(512, common.S2_L1C, s1=s1, mask=True)
    bands = {"s2": common.S2_L1C, **({"s1": common.S1} if s1 else {})}
    return features, bands, sets

  def published_counts(self, report):
    return sen1floods11.published_counts(report)  # s1s2 writes fewer test chips than published: said there
