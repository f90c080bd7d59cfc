"""Console scripts of `pip install mmrs` (pyproject.toml [project.scripts]): each runs a module's absl `main`.

    mmrs-train      = python -m launch.main                 mmrs-convert = python -m launch.convert_checkpoint
    mmrs-export     = python -m launch.export               mmrs-embed   = python -m launch.embed
    mmrs-inspect    = python -m data_prep.inspect           mmrs-prep-*  = python -m data_prep.<converter>
    mmrs-aot        = python -m launch.aot                  mmrs-robustness = python -m launch.robustness

Each function runs the module as `__main__`, exactly as `python -m` does: the module's own
`if __name__ == "__main__": app.run(main)` parses sys.argv, and absl's --help/--helpshort show that module's
docstring and flags (absl exits with status 1 after printing help, with either spelling). Calling a module's
`main` from another module instead would make absl list no flags under --helpshort (they belong to `__main__`'s
module only). User errors exit 2 with one `ERROR:` line (launch/cli.py).
"""
import runpy


def _run(module: str) -> None:
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def train():
  _run("launch.main")


def convert():
  _run("launch.convert_checkpoint")


def export():
  _run("launch.export")


def embed():
  _run("launch.embed")


def inspect():
  _run("data_prep.inspect")


def aot():
  _run("launch.aot")


def robustness():
  _run("launch.robustness")


def prep_bigearthnet_mm():
  _run("data_prep.bigearthnet_mm")


def prep_ssl4eo():
  _run("data_prep.ssl4eo")


def prep_sen1floods11():
  _run("data_prep.sen1floods11")


def prep_sen12ms():
  _run("data_prep.sen12ms")


def prep_eurosat():
  _run("data_prep.eurosat")


def prep_pair_catalog():
  _run("data_prep.pair_catalog")


def prep_tfds():
  _run("data_prep.tfds.prepare")
