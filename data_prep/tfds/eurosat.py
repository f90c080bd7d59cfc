"""TFDS builder `mmrs_eurosat_ms`: EuroSAT-MS, 13-band Sentinel-2 L1C 64 px images, 10 classes."""
import tensorflow_datasets as tfds

from data_prep import eurosat
from data_prep.tfds import common
from mmrs.data import label_sets


class MmrsEurosatMs(common.ConverterBuilder):
  """EuroSAT-MS (Helber et al. 2019): 64 x 64 px Sentinel-2 L1C (13 bands, mmrs band order), label_eurosat (class).
  Splits: the Neumann et al. train/val/test lists when manual_dir has them (eurosat-{train,val,test}.txt), else
  everything is 'train'."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release (mmrs data_prep.eurosat records)."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download EuroSATallBands.zip (https://github.com/phelber/EuroSAT) and extract it into manual_dir (the class
  folders AnnualCrop/ ... SeaLake/ may sit at manual_dir or under ds/images/remote_sensing/otherDatasets/
  sentinel_2/tif/). Optionally add eurosat-train.txt, eurosat-val.txt, eurosat-test.txt (torchgeo's lists).
  """
  converter = eurosat

  def features_for(self, config):
    sets = label_sets.manifest_entry(label_sets.EUROSAT)
    features = common.image_features(64, common.S2_L1C, s1=False, mask=False)
    features.update(common.label_features(sets))
    return features, {"s2": common.S2_L1C}, sets
