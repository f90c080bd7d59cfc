"""The library stands on its own: every `mmrs` module imports with `configs` and `data_prep` made unimportable, no
mmrs module names configs/data_prep/launch/benchmarks in an import, and no modules of the house (mmrs, configs,
data_prep, launch, benchmarks) import each other in a circle."""
import ast
import os
import pathlib
import subprocess
import sys

from timeouts import HANG_GUARD_S

ROOT = pathlib.Path(__file__).resolve().parents[1]


PACKAGES = ("mmrs", "configs", "data_prep", "launch", "benchmarks")


def _modules(packages=("mmrs",)):
  for path in sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    yield ".".join(parts), path


def test_every_mmrs_module_imports_without_configs_and_data_prep():
  names = [name for name, _ in _modules()]
  code = (
      "import sys, importlib\n"
      "class Block:\n"
      "  def find_spec(self, name, path=None, target=None):\n"
      "    if name.split('.')[0] in ('configs', 'data_prep'):\n"
      "      raise ImportError(f'library imported {name}')\n"
      "sys.meta_path.insert(0, Block())\n"
      f"for n in {names!r}:\n"
      "  importlib.import_module(n)\n"
      "print('ok', len(sys.modules))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=HANG_GUARD_S)
  assert res.returncode == 0, res.stderr[-3000:]


def _imports(path: pathlib.Path, module: str, tops=("mmrs",)) -> set[str]:
  """Modules of the packages `tops` imported by `path`, at any depth (function-level imports count: they still form
  a cycle)."""
  out = set()
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
      out.add(base)
      out.update(f"{base}.{a.name}" for a in node.names)
  return {m for m in out if m.split(".")[0] in tops}


def test_no_import_circles_in_the_house():
  modules = dict(_modules(PACKAGES))
  graph = {m: {d for d in _imports(p, m, PACKAGES) if d in modules and d != m and not m.startswith(d + ".")}
           for m, p in modules.items()}
  # Package __init__ files that only re-export lazily are not edges worth a cycle: skip edges into the top packages.
  graph = {m: {d for d in deps if d not in PACKAGES} for m, deps in graph.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for d in sorted(graph[m]):
      if state.get(d) == 1:
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_library_imports_no_configs_data_prep_launch_or_benchmarks():
  arrows = [(m, d) for m, path in _modules() for d in _imports(path, m, tops=PACKAGES) if d.split(".")[0] != "mmrs"]
  assert not arrows, f"library -> application imports: {arrows}"
