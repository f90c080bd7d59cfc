"""`pip install .` (not editable) gives a package that imports and runs from outside the repository.

To stay fast the fresh venv does not reinstall jax & co: a .pth file in it points at a directory of links to exactly
the distributions pyproject.toml's core dependencies pull in (their own requirements, extras and markers resolved)
from this interpreter's site-packages, so a module mmrs imports without declaring it fails there as after
`pip install mmrs`; mmrs itself is built into a wheel and installed with --no-deps. The tests then run the installed
copy from a directory outside the repo, with no PYTHONPATH, and check it is that copy that ran.
"""
import ast
import json
import os
import shutil
import importlib.metadata
import pathlib
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import tiny_encoder
from timeouts import HANG_GUARD_S

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


def _closure(requirements) -> dict:
  """canonical name -> importlib.metadata Distribution of `requirements` and everything they require, here."""
  seen, todo = {}, [Requirement(r) for r in requirements]
  while todo:
    req = todo.pop()
    name, extras = canonicalize_name(req.name), frozenset(req.extras)
    if name in seen and extras <= seen[name][1]:
      continue
    dist = importlib.metadata.distribution(req.name)
    extras |= seen.get(name, (None, frozenset()))[1]
    seen[name] = (dist, extras)
    for line in dist.requires or []:
      sub = Requirement(line)
      if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras | {""}):
        todo.append(sub)
  return {name: dist for name, (dist, _) in seen.items()}


def _link_distributions(dists, dest: pathlib.Path) -> None:
  """Symlinks each distribution's top-level modules, packages and metadata into `dest` (namespace packages such as
  google/ get a real directory holding links to only these distributions' sub-packages)."""
  dest.mkdir(parents=True, exist_ok=True)
  for dist in dists:
    root = pathlib.Path(dist.locate_file(""))
    for f in dist.files or []:
      parts = pathlib.PurePath(f).parts
      if ".." in parts or not (root / parts[0]).exists():
        continue
      top = parts[0]
      namespace = (len(parts) > 2 and (root / top).is_dir() and not (root / top / "__init__.py").exists()
                   and not top.endswith((".dist-info", ".libs", ".data")))
      link, target = (dest / top / parts[1], root / top / parts[1]) if namespace else (dest / top, root / top)
      link.parent.mkdir(parents=True, exist_ok=True)
      if not link.exists() and not link.is_symlink():
        link.symlink_to(target)


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
  declared, tools = root / "declared", root / "build_tools"
  _link_distributions(_closure(_pyproject()["project"]["dependencies"]).values(), declared)
  _link_distributions(_closure(["pip", "setuptools"]).values(), tools)  # to build the wheel only
  pth = os.path.join(site, "_mmrs_test_deps.pth")
  with open(pth, "w") as f:
    f.write(f"{declared}\n{tools}\n")
  proc = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                         "--quiet", "--disable-pip-version-check", str(src)], capture_output=True, text=True,
                        env=_env(), cwd=str(root))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  with open(pth, "w") as f:
    f.write(f"{declared}\n")
  return py, venv / "bin", site


def test_pyproject_declares_dependencies_extras_and_scripts():
  project = _pyproject()["project"]
  names = {d.split("[")[0].split("=")[0].split("~")[0].split(">")[0].strip().lower() for d in project["dependencies"]}
  for need in ("jax", "flax", "optax", "orbax-checkpoint", "grain", "array-record", "ml-collections", "absl-py",
               "numpy", "etils", "safetensors", "tensorboardx", "pillow"):
    assert need in names, need
  assert "einops" not in names and "tensorflow-datasets" not in names  # unused / optional
  extras = project["optional-dependencies"]
  assert extras["gpu"] == ["jax[cuda12]==0.10.2"]
  assert extras["tpu"] == ["jax[tpu]==0.10.2", "gcsfs==2026.10.1"]  # gs:// workdirs on TPU VMs
  tpu_pins = {r for r in _requirements("requirements-tpu.txt") if not r.startswith("-r")}
  assert "gcsfs==2026.10.1" in tpu_pins and "gcsfs==2026.10.1" in _requirements("requirements-gcs-test.txt")
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
                       timeout=HANG_GUARD_S)
  assert out.returncode == 0, out.stderr[-3000:]
  where, shape = out.stdout.strip().splitlines()[-2:]
  assert where.startswith(site), f"imported {where}, not the installed copy in {site}"
  assert shape == "(1, 5, 32)"


def test_console_scripts_run(installed, tmp_path):
  _, bindir, _ = installed
  out = subprocess.run([str(bindir / "mmrs-train"), "--helpshort"], capture_output=True, text=True, env=_env(),
                       cwd=str(tmp_path), timeout=HANG_GUARD_S)
  assert out.returncode == 1, out.stderr[-3000:]  # absl exits 1 after --help, as `python -m launch.main` does
  assert "Entry point" in out.stdout and "--workdir" in out.stdout and "--config" in out.stdout  # launch.main's
  out = subprocess.run([str(bindir / "mmrs-export"), "--checkpoint=" + str(tmp_path / "nothing"), "--out=x"],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=HANG_GUARD_S)
  # launch.export's main ran, and its user error is one line and exit 2 (launch/cli.py), as with `python -m`
  assert out.returncode == 2 and out.stderr.strip().startswith("ERROR: export:"), out.stderr[-3000:]
  assert "launch.convert_checkpoint" in out.stderr and "Traceback" not in out.stderr
  configs_dir = subprocess.run([str(bindir / "python"), "-c", "import configs, os; print(os.path.dirname("
                                "configs.__file__))"], capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                               check=True).stdout.strip()
  out = subprocess.run([str(bindir / "mmrs-aot"), f"--config={configs_dir}/mixmae.py:tiny", "--topology=cpu:2",
                        "--plan_only"], capture_output=True, text=True, env=_env(), cwd=str(tmp_path),
                       timeout=HANG_GUARD_S)
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


# Import names that only an extra provides ([export], [tfds], [tensorboard]): a module may need them, with a message.
EXTRA_IMPORTS = {"torch", "torchvision", "transformers", "timm", "tensorflow_datasets", "tensorboard"}

IMPORT_ALL = r"""
import importlib, json, pkgutil, sys
from absl import flags
optional, bad, count = set(json.loads(sys.argv[1])), [], 0
base = set(flags.FLAGS)
for top in ("mmrs", "launch", "data_prep", "configs", "benchmarks"):
  pkg = importlib.import_module(top)
  for m in pkgutil.walk_packages(pkg.__path__, top + "."):
    try:
      importlib.import_module(m.name)
      count += 1
    except ModuleNotFoundError as e:
      if (e.name or "").split(".")[0] not in optional:
        bad.append(f"{m.name}: {e}")
    for name in set(flags.FLAGS) - base:  # launch modules define flags of the same names (--out, --checkpoint)
      delattr(flags.FLAGS, name)
from mmrs.finetune import robustness
result = {"metric": "map_micro", "stresses": {"clouds": {"unit": "% cover", "severities": [0.0, 50.0]}},
          "runs": {"r": {"modalities": ["s2"], "clean": 50.0, "skipped": {},
                         "stresses": {"clouds": [{"severity": 0.0, "value": 50.0, "n": 2},
                                                 {"severity": 50.0, "value": 30.0, "n": 2}]}}}}
paths = robustness.write_outputs(sys.argv[2], result)
print(json.dumps({"bad": bad, "count": count, "paths": paths, "mmrs": importlib.import_module("mmrs").__file__}))
"""


def test_every_module_runs_on_the_declared_dependencies(installed, tmp_path):
  """Every module of the package imports (undeclared = ModuleNotFoundError) and launch.robustness's PNG renders
  (matplotlib), with only pyproject.toml's dependencies on the path."""
  py, _, site = installed
  res = subprocess.run([str(py), "-c", IMPORT_ALL, json.dumps(sorted(EXTRA_IMPORTS)), str(tmp_path / "rob")],
                       capture_output=True, text=True, env=_env(), cwd=str(tmp_path), timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["mmrs"].startswith(site) and out["count"] > 50
  assert not out["bad"], "imports missing from pyproject.toml's dependencies:\n" + "\n".join(out["bad"])
  assert (tmp_path / "rob" / "robustness.png").stat().st_size > 1000


def _module_flags(path: str) -> set[str]:
  """The flag names a module defines itself: the string first argument of every DEFINE_* call in it."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  return {node.args[0].value for node in ast.walk(tree)
          if isinstance(node, ast.Call)
          and getattr(node.func, "attr", getattr(node.func, "id", "")).startswith("DEFINE")
          and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)}


def test_every_console_script_helpshort_lists_its_flags(installed, tmp_path):
  _, bindir, _ = installed
  console = ast.parse(open(os.path.join(REPO, "launch", "console.py"), encoding="utf-8").read())
  modules = {f.name: f.body[0].value.args[0].value for f in console.body
             if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
  procs = {}
  for script, target in _pyproject()["project"]["scripts"].items():
    assert target.startswith("launch.console:"), f"{script} = {target}: run modules through launch/console.py"
    module = modules[target.split(":")[1]]
    procs[script] = (module, subprocess.Popen([str(bindir / script), "--helpshort"], cwd=str(tmp_path), env=_env(),
                                              text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
  for script, (module, proc) in procs.items():
    stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    want = _module_flags(os.path.join(REPO, *module.split(".")) + ".py")
    assert want, module
    missing = sorted(f for f in want if f"--{f}" not in stdout and f"--[no]{f}" not in stdout)  # [no]: a bool
    assert proc.returncode == 1 and not missing, \
        f"{script} --helpshort lacks {missing}:\n{stdout[-2000:]}{stderr[-2000:]}"
