"""`pip install .` (not editable) gives a package that imports and runs from outside the repository.

To stay fast the fresh venv does not reinstall jax & co: a .pth file in it points at this interpreter's
site-packages for the dependencies, and mmrs itself is built into a wheel and installed with --no-deps. The test then
runs the installed copy from a directory outside the repo, with no PYTHONPATH, and checks it is that copy that ran.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib

import pytest

import tiny_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("mmrs", "configs", "data_prep", "launch", "benchmarks")


def _pyproject():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def _requirements(name: str) -> list[str]:
  """The requirement lines of a requirements file, comments and blank lines dropped."""
  with open(os.path.join(REPO, name)) as f:
    return [r for r in (line.split("#")[0].strip() for line in f) if r]


def _env():
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
  env["JAX_PLATFORMS"] = "cpu"
  return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  """(venv python, venv bin dir, venv site-packages) with mmrs installed from a wheel."""
  root = tmp_path_factory.mktemp("pkg")
  src = root / "src"  # a copy, so the build's build/ and *.egg-info stay out of the checkout
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), src / name)
  for pkg in PACKAGES:
    shutil.copytree(os.path.join(REPO, pkg), src / pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "samples", "*.tif", "*.sh"))
  venv = root / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  with open(os.path.join(site, "_mmrs_test_deps.pth"), "w") as f:
    f.write("\n".join(sorted(deps)) + "\n")
  proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                         "--quiet", "--disable-pip-version-check", str(src)], capture_output=True, text=True,
                        env=_env(), cwd=str(root))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return py, venv / "bin", site


def test_pyproject_declares_dependencies_extras_and_scripts():
  project = _pyproject()["project"]
  names = {d.split("[")[0].split("=")[0].split("~")[0].split(">")[0].strip().lower() for d in project["dependencies"]}
  for need in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "ml-collections", "absl-py",
               "numpy", "etils", "safetensors", "tensorboardx", "pillow"):
    assert need in names, need
  assert "einops" not in names and "tensorflow-datasets" not in names  # unused / optional
  extras = project["optional-dependencies"]
  assert extras["gpu"] == ["jax[cuda12]==0.10.2"] and extras["tpu"] == ["jax[tpu]==0.10.2"]
  assert {"export", "tfds", "dev"} <= set(extras)
  # The core pins agree with the exact lock in requirements.txt.
  lock = {}
  for line in _requirements("requirements.txt"):
    if "==" in line:
      name, ver = line.split("==")
      lock[name.split("[")[0].strip().lower()] = ver.strip()
  for dep in project["dependencies"]:
    if "==" in dep:
      name, ver = dep.split("==")
      assert lock[name.split("[")[0].lower()] == ver, dep
    elif "~=" in dep:
      name, ver = dep.split("~=")
      name = name.split("[")[0].lower()
      have, want = lock[name].split("."), ver.split(".")
      assert have[:len(want) - 1] == want[:len(want) - 1] and tuple(map(int, have)) >= tuple(map(int, want)), dep
  # CI installs the [export] extra from requirements-ci.txt: the same pins.
  assert sorted(_requirements("requirements-ci.txt")) == sorted(extras["export"])
  scripts = project["scripts"]
  assert scripts["mmrs-train"] == "launch.console:train"
  assert {"mmrs-convert", "mmrs-export", "mmrs-inspect", "mmrs-robustness", "mmrs-embed", "mmrs-aot"} <= set(scripts)


def test_installed_package_loads_an_encoder_outside_the_repo(installed, tmp_path):
  py, _, site = installed
  enc_dir = tiny_encoder.write_encoder(tmp_path / "enc", tiny_encoder.vit_params(), modalities="s2")
  code = ("import mmrs, numpy as np; e = mmrs.load_encoder(%r); "
          "t = e.embed(**e.normalize(s2=np.full((1, 8, 8, 13), 1000, np.uint16))); "
          "print(mmrs.__file__); print(t.shape)") % enc_dir
  out = subprocess.run([str(py), "-c", code], capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  where, shape = out.stdout.strip().splitlines()[-2:]
  assert where.startswith(site), f"imported {where}, not the installed copy in {site}"
  assert shape == "(1, 5, 32)"


def test_console_scripts_run(installed, tmp_path):
  _, bindir, _ = installed
  out = subprocess.run([str(bindir / "mmrs-train"), "--helpshort"], capture_output=True, text=True, env=_env(),
                       cwd=str(tmp_path), timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]  # absl exits 1 after --help, as `python -m launch.main` does
  assert "Entry point" in out.stdout and "--workdir" in out.stdout and "--config" in out.stdout  # launch.main's
  out = subprocess.run([str(bindir / "mmrs-export"), "--checkpoint=" + str(tmp_path / "nothing"), "--out=x"],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
  # launch.export's main ran, and its user error is one line and exit 2 (launch/cli.py), as with `python -m`
  assert out.returncode == 2 and out.stderr.strip().startswith("ERROR: export:"), out.stderr[-3000:]
  assert "launch.convert_checkpoint" in out.stderr and "Traceback" not in out.stderr
  configs_dir = subprocess.run([str(bindir / "python"), "-c", "import configs, os; print(os.path.dirname("
                                "configs.__file__))"], capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                               check=True).stdout.strip()
  out = subprocess.run([str(bindir / "mmrs-aot"), f"--config={configs_dir}/mixmae.py:tiny", "--topology=cpu:2",
                        "--plan_only"], capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  report = json.loads(out.stdout.strip().splitlines()[-1])  # launch.aot's JSON line, from the installed copy
  assert report["devices"] == 2 and report["per_device_param_and_opt_bytes"] > 0
  for name in _pyproject()["project"]["scripts"]:
    assert (bindir / name).exists(), name


def test_tfds_source_without_tensorflow_datasets_says_how_to_install(monkeypatch):
  from mmrs.data import sources
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` raises ImportError
  with pytest.raises(sources.ShardError, match=r'mmrs\[tfds\]'):
    sources.open_tfds("tfds:mmrs_eurosat:train@/nowhere", "train")
