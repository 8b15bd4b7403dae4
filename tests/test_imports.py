"""Structural tests of the source tree: no import cycles, a core-only install imports every
library module, and the core (layers/, models/) stays plain Flax without backend words."""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from flax import linen as nn

ROOT = Path(__file__).resolve().parent.parent
GRAPHED = ("attention_flax", "train")  # the packages whose import graph must be acyclic
CORE_DIRS = (ROOT / "attention_flax" / "layers", ROOT / "attention_flax" / "models")


# --- the import graph ------------------------------------------------------------------


def _module_files(root: Path = ROOT, packages: tuple[str, ...] = GRAPHED
                  ) -> dict[str, tuple[Path, bool]]:
  """{dotted module name: (file, is_package)} for every .py file under ``packages``."""
  modules = {}
  for top in packages:
    for path in sorted((root / top).rglob("*.py")):
      parts = list(path.relative_to(root).with_suffix("").parts)
      if "__pycache__" in parts:
        continue
      is_package = parts[-1] == "__init__"
      if is_package:
        parts = parts[:-1]
      modules[".".join(parts)] = (path, is_package)
  return modules


def _ancestors(name: str) -> list[str]:
  """'a.b.c' -> ['a', 'a.b']: the packages Python initialises before 'a.b.c'."""
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
  package = module if is_package else module.rpartition(".")[0]
  for _ in range(level - 1):
    package = package.rpartition(".")[0]
  return f"{package}.{target}" if target else package


def import_edges(modules: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
  """{importer: {imported module: line}} over every import statement, in functions too.

  ``import a.b.c`` depends on a.b.c and on the packages a and a.b that Python runs first;
  ``from a.b import c`` on a.b (and a), and on a.b.c when that is a module. A package that
  contains the importer is already being initialised when the importer runs, so importing
  a submodule through it (``from attention_flax import ops`` inside attention_flax) is no
  edge; reading any other name from it (``from attention_flax import create_model``) is.
  """
  edges: dict[str, dict[str, int]] = {m: {} for m in modules}
  for module, (path, is_package) in modules.items():
    own = set(_ancestors(module)) | ({module} if is_package else set())
    tree = ast.parse(path.read_text(), filename=str(path))

    def add(target: str, line: int, reads_names: bool = False) -> None:
      for name in _ancestors(target) + [target]:
        if name not in modules or name == module:
          continue
        if name in own and not (reads_names and name == target):
          continue
        edges[module].setdefault(name, line)

    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          add(alias.name, node.lineno)
      elif isinstance(node, ast.ImportFrom):
        base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                else node.module)
        submodules = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        reads_names = any(f"{base}.{a.name}" not in modules for a in node.names)
        add(base, node.lineno, reads_names)
        for sub in submodules:
          add(sub, node.lineno)
  return edges


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
  """One cycle (first node repeated at the end) per strongly connected component of more
  than one module, or of one module importing itself (Tarjan's algorithm)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def connect(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, {}):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1 or v in edges.get(v, {}):
        components.append(sorted(component))

  sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))
  for v in sorted(edges):
    if v not in index:
      connect(v)

  cycles = []
  for component in components:
    members = set(component)
    start = component[0]
    # Breadth-first from start inside the component, back to start: a shortest cycle.
    parent: dict[str, str] = {}
    frontier = [start]
    found = None
    while frontier and found is None:
      nxt = []
      for v in frontier:
        for w in sorted(edges[v]):
          if w == start:
            found = v
            break
          if w in members and w not in parent:
            parent[w] = v
            nxt.append(w)
        if found is not None:
          break
      frontier = nxt
    path = [start]
    v = found
    while v != start:
      path.append(v)
      v = parent[v]
    path.append(start)
    cycles.append([start] + path[1:-1][::-1] + [start])
  return cycles


def _describe(cycle: list[str], edges: dict[str, dict[str, int]],
              modules: dict[str, tuple[Path, bool]]) -> str:
  hops = []
  for a, b in zip(cycle, cycle[1:]):
    path = modules[a][0].relative_to(ROOT)
    hops.append(f"  {a} -> {b}   ({path}:{edges[a][b]})")
  return " -> ".join(cycle) + "\n" + "\n".join(hops)


def test_the_cycle_finder_on_small_graphs():
  acyclic = {"a": {"b": 1}, "b": {"c": 1}, "c": {}}
  assert find_cycles(acyclic) == []
  ring = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
  assert find_cycles(ring) == [["a", "b", "c", "a"]]
  two = {"a": {"b": 1}, "b": {"a": 1}, "c": {"c": 1}}
  assert find_cycles(two) == [["a", "b", "a"], ["c", "c"]]


def test_the_edges_follow_python_import_rules(tmp_path):
  files = {
      "pkg/__init__.py": "from pkg.sub import thing\n",
      "pkg/sub/__init__.py": "from . import leaf\nfrom pkg import sub2\n",
      "pkg/sub/leaf.py": "def f():\n  from ..other import name\n",
      "pkg/sub2.py": "import pkg.sub.leaf\n",
      "pkg/other.py": "from pkg import VERSION\n",
  }
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  edges = import_edges(_module_files(tmp_path, ("pkg",)))
  assert edges["pkg"] == {"pkg.sub": 1}
  assert edges["pkg.sub"] == {"pkg.sub.leaf": 1, "pkg.sub2": 2}  # relative; a submodule
  assert edges["pkg.sub.leaf"] == {"pkg.other": 2}  # inside a function, two levels up
  assert edges["pkg.sub2"] == {"pkg.sub": 1, "pkg.sub.leaf": 1}  # the package runs first
  assert edges["pkg.other"] == {"pkg": 1}  # reads a name from its half-built parent
  assert [c[0] for c in find_cycles(edges)] == ["pkg"]


def test_no_import_cycles():
  modules = _module_files()
  assert "attention_flax.layers" in modules and "train.trainer" in modules
  edges = import_edges(modules)
  assert "attention_flax.layers" in edges["attention_flax"]
  cycles = find_cycles(edges)
  assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges, modules)
                                                    for c in cycles)


def _within(name: str, package: str) -> bool:
  return name == package or name.startswith(package + ".")


def test_imports_point_one_way():
  """The library never imports the application; layers never know models or the tools
  built on them; the speed seam (ops) knows none of the core."""
  edges = import_edges(_module_files())
  forbidden = {
      "attention_flax": ("train",),
      "attention_flax.layers": ("attention_flax.models", "attention_flax.inspect",
                                "attention_flax.plot", "attention_flax.convert"),
      "attention_flax.ops": ("attention_flax.layers", "attention_flax.models",
                             "attention_flax.inspect", "attention_flax.plot",
                             "attention_flax.convert"),
  }
  wrong = [f"{m} -> {t}" for m, targets in edges.items() for t in targets
           for package, banned in forbidden.items()
           if _within(m, package) and any(_within(t, b) for b in banned)]
  assert not wrong, "\n".join(sorted(wrong))


# --- a core-only install ---------------------------------------------------------------

_CORE_ONLY = textwrap.dedent(r"""
    import importlib, importlib.abc, importlib.metadata, json, pkgutil, sys, tomllib

    CORE = ["jax", "jaxlib", "flax", "numpy"]
    before = set(sys.modules)
    import jax, jax.numpy, flax, flax.linen, numpy  # what they load when imported
    loaded = {m.partition(".")[0] for m in set(sys.modules) - before}

    # The distributions `pip install .` brings (the declared dependencies, transitively).
    from packaging.requirements import Requirement
    with open("pyproject.toml", "rb") as f:
      todo = [Requirement(r).name for r in tomllib.load(f)["project"]["dependencies"]] + CORE
    def key(name):
      return name.lower().replace("_", "-").replace(".", "-")
    dists = set()
    while todo:
      name = todo.pop()
      if key(name) in dists:
        continue
      dists.add(key(name))
      try:
        requires = importlib.metadata.distribution(name).requires or []
      except importlib.metadata.PackageNotFoundError:
        continue
      for r in requires:
        req = Requirement(r)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
          todo.append(req.name)
    provided = {top for top, owners in importlib.metadata.packages_distributions().items()
                if any(key(d) in dists for d in owners)}
    allowed = (set(sys.stdlib_module_names) | set(sys.builtin_module_names) | loaded
               | provided | {m.partition(".")[0] for m in sys.modules} | {"attention_flax"})

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in allowed:
          raise ModuleNotFoundError(f"No module named {name!r} (not a core dependency)",
                                    name=name)
        return None

    sys.meta_path.insert(0, Block())
    result = {"allowed_sample": sorted(a for a in ("matplotlib", "PIL", "torch", "timm")
                                       if a in allowed)}
    try:
      import matplotlib
      result["matplotlib"] = "imported"
    except ModuleNotFoundError:
      result["matplotlib"] = "blocked"

    errors = {}
    def onerror(name):
      errors[name] = "{}: {}".format(type(sys.exc_info()[1]).__name__, sys.exc_info()[1])
    # The modules pkgutil finds, and those the parent found on disk (argv), in case a
    # package that fails to import hides its submodules from pkgutil.
    names = ["attention_flax"] + [
        info.name for info in pkgutil.walk_packages(["attention_flax"], "attention_flax.",
                                                    onerror)]
    names += [n for n in sys.argv[1:] if n not in names]
    for name in names:
      try:
        importlib.import_module(name)
      except BaseException as e:
        errors.setdefault(name, f"{type(e).__name__}: {e}")
    result["modules"] = names
    result["errors"] = errors

    import numpy as np
    try:
      from attention_flax import plot
    except BaseException:
      print("RESULT " + json.dumps(result))
      raise
    result["plot"] = {}
    calls = {
        "plot_overlays": lambda: plot.plot_overlays(np.zeros((1, 4, 4, 1)),
                                                    {"m": np.zeros((1, 2, 2))}),
        "plot_channel_gates": lambda: plot.plot_channel_gates({"g": np.zeros((2, 1, 1, 3))}),
        "to_palette": lambda: plot.to_palette("unused.png"),
    }
    for name, call in calls.items():
      try:
        call()
        result["plot"][name] = "no error"
      except ImportError as e:
        result["plot"][name] = "ImportError: " + str(e)
      except BaseException as e:
        result["plot"][name] = f"{type(e).__name__}: {e}"
    print("RESULT " + json.dumps(result))
""")


def test_every_library_module_imports_with_the_core_dependencies_only():
  on_disk = sorted(_module_files(ROOT, ("attention_flax",)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  proc = subprocess.run([sys.executable, "-c", _CORE_ONLY, *on_disk], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  # The blocker works: the extras are out of reach.
  assert result["matplotlib"] == "blocked" and result["allowed_sample"] == []
  expected = {"attention_flax.plot", "attention_flax.convert", "attention_flax.inspect",
              "attention_flax.models.__main__", "attention_flax.ops", "attention_flax.layers"}
  assert expected <= set(result["modules"]) and set(on_disk) <= set(result["modules"])
  assert not result["errors"], "with jax, flax and numpy only:\n" + "\n".join(
      f"{name}: {error}" for name, error in sorted(result["errors"].items()))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name, outcome in result["plot"].items():
    assert outcome.startswith("ImportError") and "attention_flax[plot]" in outcome, (
        name, outcome)


# --- the core stays plain --------------------------------------------------------------

FORBIDDEN = re.compile(r"platform_dependent|custom_vjp|custom_jvp")
BACKEND = re.compile(r"(?<![a-z0-9])(cpu|gpu|cuda|tpu|rocm|xla)s?(?![a-z0-9])", re.IGNORECASE)


def test_layers_and_models_name_no_backend():
  hits = []
  for directory in CORE_DIRS:
    for path in sorted(directory.rglob("*.py")):
      for number, line in enumerate(path.read_text().splitlines(), 1):
        if FORBIDDEN.search(line) or BACKEND.search(line):
          hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not hits, ("backend machinery or names in the core (they belong in "
                    "attention_flax/ops or docs/benchmarks.md):\n" + "\n".join(hits))


def _layer_classes() -> dict[str, type]:
  import attention_flax.layers as layers  # pylint: disable=import-outside-toplevel

  classes = {}
  for factory in layers.ATTENTIONS.values():
    while isinstance(factory, functools.partial):
      factory = factory.func
    # Other tests may register layers of their own; this checks the library's.
    if inspect.isclass(factory) and factory.__module__.startswith("attention_flax."):
      classes[f"{factory.__module__}.{factory.__qualname__}"] = factory
  for path in sorted((ROOT / "attention_flax" / "layers").glob("*.py")):
    name = "attention_flax.layers" + ("" if path.stem == "__init__" else "." + path.stem)
    module = importlib.import_module(name)
    for _, cls in inspect.getmembers(module, inspect.isclass):
      if issubclass(cls, nn.Module) and cls.__module__ == name:
        classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
  return classes


def test_layer_calls_take_the_input_and_train_only():
  classes = _layer_classes()
  assert "attention_flax.layers.channel.SqueezeExcite" in classes
  assert "attention_flax.layers.norm.TorchBatchNorm" in classes
  wrong = {}
  for name, cls in classes.items():
    allowed = {"self", "x", "inputs", "train"}
    if cls.__name__ == "TorchBatchNorm":
      allowed.add("use_running_average")
    params = list(inspect.signature(cls.__call__).parameters)
    extra = [p for p in params if p not in allowed]
    if extra or not {"x", "inputs"} & set(params):
      wrong[name] = params
  assert not wrong, f"__call__ must be (x, train=False): {wrong}"


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-q", "-n", "0"]))
