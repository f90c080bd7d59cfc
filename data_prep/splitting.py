"""Split-list files shipped with datasets (Sen1Floods11 CSVs, SEN12MS pickles, EuroSAT text lists).

`--split` specs (`train`, `hash:0.8,0.1,0.1`) are parsed by `data_prep.convert.parse_split_spec` / `split_of`.
"""
from __future__ import annotations

import csv
import io
import os
import pickle


class _NamesOnly(pickle.Unpickler):
  """Split lists shipped as pickles (SEN12MS) hold plain lists of strings: refuse anything else (no code runs)."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a split list must hold only strings")


def load_name_list(path: str) -> list[str]:
  """File names listed one per line (.txt), in the first CSV column (.csv) or as a pickled list (.pkl)."""
  try:
    if path.endswith(".pkl"):
      with open(path, "rb") as f:
        names = _NamesOnly(f).load()
      if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError("expected a pickled list of file names")
      return [n.strip() for n in names if n.strip()]
    with open(path, newline="") as f:
      text = f.read()
    if path.endswith(".csv"):
      return [row[0].strip() for row in csv.reader(io.StringIO(text)) if row and row[0].strip()]
    return [line.strip() for line in text.splitlines() if line.strip()]
  except (OSError, ValueError, pickle.UnpicklingError, EOFError) as e:
    raise ValueError(f"Cannot read the split list {path}: {e}") from None


def stem(name: str) -> str:
  """'dir/AnnualCrop_1.jpg' -> 'AnnualCrop_1'."""
  return os.path.splitext(os.path.basename(name.strip()))[0]
