"""The layering rules of docs/architecture.md, checked by folder from every module's imports (no import runs).

- every module sits in the folder of its layer (``LAYERS``); a new top-level module or folder fails until it is
  given a layer;
- a module imports raysemi modules of its own layer and the layers below it, never above;
- layers 0 and 1 (``core``, ``ml``, ``models``, ``data``) never import Ray: they run in any process, with or
  without a Ray session;
- ``distributed`` (the Ray glue) holds no ML: it imports no models, data, ml or stages;
- no module imports another module's private (underscore) names;
- no import cycle between modules, lazy imports included (a lazy import is not a way out of a cycle).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raysemi"
LAYERS = {
    "core": 0,  # config, errors, io, outputs, s3, console, tables, event log
    "ml": 1, "models": 1, "data": 1,  # the ML and the data, no Ray
    "distributed": 2, "stages": 2,  # the Ray glue; the stages (ML with a thin Ray adapter)
    "pipeline": 3, "tune": 3, "commands": 3,  # orchestration and the command line
}
TOP_LEVEL = {"__init__", "__main__"}  # the package's entry points, above every layer
NO_RAY_BELOW = 2
ML = ("raysemi.ml", "raysemi.models", "raysemi.data", "raysemi.stages")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def layer_of(module: str) -> int | None:
    """The layer of a dotted ``raysemi...`` module name (None for the package's entry points)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[1] in TOP_LEVEL:
        return None
    return LAYERS.get(parts[1], -1)


def _targets(mod: str, names: list[str], root: Path) -> list[str]:
    """``from a.b import c``: ``a.b.c`` when ``c`` is a module under ``root``, else ``a.b``."""
    full = [f"{mod}.{n}" for n in names if (root / (f"{mod}.{n}".replace(".", "/") + ".py")).exists()
            or (root / f"{mod}.{n}".replace(".", "/")).is_dir()]
    return full or [mod]


def offenders(pkg: Path = PKG) -> list[str]:
    """Every import that breaks a layer rule, as ``path:line what``."""
    bad = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg.parent).with_suffix("")
        me = ".".join(rel.parts)
        mine = layer_of(me)
        if mine is None:
            continue
        if mine == -1:
            bad.append(f"{rel}.py is in no layer's folder ({sorted(LAYERS)})")
            continue
        for mod, names, line in imports(path):
            where = f"{rel}.py:{line}"
            if mod == "ray" or mod.startswith("ray."):
                if mine < NO_RAY_BELOW:
                    bad.append(f"{where} imports {mod} (layer {mine} runs without Ray)")
                continue
            if not mod.startswith("raysemi"):
                continue
            for target in _targets(mod, names, pkg.parent):
                theirs = layer_of(target)
                if theirs is None or theirs > mine:
                    bad.append(f"{where} imports {target} (layer {theirs}) from layer {mine}")
                elif me.startswith("raysemi.distributed") and any(target.startswith(m) for m in ML):
                    bad.append(f"{where} imports {target}: the Ray glue holds no ML")
    return bad


def test_every_module_respects_its_layer():
    assert offenders() == []


@pytest.mark.parametrize("module, text, expected", [
    ("models/x.py", "def f():\n    from raysemi.distributed import ray_utils\n    import ray.train\n", 2),
    ("data/loading/x.py", "from raysemi.stages import pretrain\n", 1),
    ("core/x.py", "from raysemi.ml import losses\n", 1),
    ("distributed/x.py", "from raysemi.models import byol\n", 1),
    ("stages/x.py", "from raysemi.pipeline import run\n", 1),
    ("helpers.py", "import os\n", 1),
    ("stages/x.py", "import ray\nfrom raysemi.distributed import ray_utils\nfrom raysemi.ml import losses\n", 0),
])
def test_the_rules_are_enforced(tmp_path, module, text, expected):
    """The checker catches what it should (lazy imports inside a function included) and passes what is allowed."""
    for folder in ("distributed", "stages", "pipeline", "ml", "models"):
        (tmp_path / "raysemi" / folder).mkdir(parents=True, exist_ok=True)
    (tmp_path / "raysemi" / "distributed" / "ray_utils.py").write_text("")
    (tmp_path / "raysemi" / "stages" / "pretrain.py").write_text("")
    (tmp_path / "raysemi" / "pipeline" / "run.py").write_text("")
    (tmp_path / "raysemi" / "ml" / "losses.py").write_text("")
    (tmp_path / "raysemi" / "models" / "byol.py").write_text("")
    path = tmp_path / "raysemi" / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    assert len(offenders(tmp_path / "raysemi")) == expected


def test_no_module_imports_private_names():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        me = ".".join(path.relative_to(PKG.parent).with_suffix("").parts)
        for mod, names, line in imports(path):
            if mod.startswith("raysemi"):
                bad += [f"{me}:{line} {mod}.{n}" for n in names if n.startswith("_")]
    assert bad == []


def import_graph(pkg: Path = PKG) -> dict[str, set[str]]:
    """Module -> the raysemi modules it imports (lazy imports included)."""
    names = {".".join(p.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in pkg.rglob("*.py")}
    graph = {}
    for me, path in names.items():
        found = set()
        for mod, imported, _ in imports(path):
            if mod.startswith("raysemi"):
                found |= {t for t in _targets(mod, imported, pkg.parent) if t in names and t != me}
        graph[me] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: each strongly connected set of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = tmp_path / "raysemi" / "data"
    pkg.mkdir(parents=True)
    (pkg / "a.py").write_text("from raysemi.data import b\n")
    (pkg / "b.py").write_text("def f():\n    from raysemi.data.a import g\n")
    (pkg / "c.py").write_text("from raysemi.data import a\n")
    assert cycles(import_graph(tmp_path / "raysemi")) == [["raysemi.data.a", "raysemi.data.b"]]
