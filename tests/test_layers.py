"""The layering rules of docs/architecture.md, checked by reading every module's imports (no import runs).

- models and data never import Ray, the Ray glue (``ray_utils``), the stages, the pipeline or tuning:
  they run in any process, with or without a Ray session;
- ``ray_utils`` holds Ray plumbing only: no models, losses or stages;
- no module imports another module's private (underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "raysemi"
FORBIDDEN_BELOW = ("raysemi.ray_utils", "raysemi.stages", "raysemi.pipeline", "raysemi.tuning", "raysemi.tune",
                   "ray")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every import in the file, at any depth (lazy imports count)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _below(mod: str, roots: tuple[str, ...]) -> bool:
    return any(mod == r or mod.startswith(r + ".") for r in roots)


def offenders(folder: str, forbidden: tuple[str, ...], pkg: Path = PKG) -> list[str]:
    bad = []
    for path in sorted((pkg / folder).rglob("*.py")):
        for mod, names, line in imports(path):
            targets = [mod] + [f"{mod}.{n}" for n in names]
            if any(_below(t, forbidden) for t in targets):
                bad.append(f"{path.relative_to(pkg.parent)}:{line} imports {mod} {names or ''}".strip())
    return bad


@pytest.mark.parametrize("folder", ["models", "data"])
def test_models_and_data_never_import_ray_glue_or_stages(folder):
    assert offenders(folder, FORBIDDEN_BELOW) == []


def test_the_rule_is_enforced(tmp_path):
    """The checker itself catches lazy imports inside a function (so the test above can fail)."""
    bad = tmp_path / "raysemi" / "models"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("def f():\n    from raysemi import ray_utils\n    import ray.train\n")
    assert len(offenders("models", FORBIDDEN_BELOW, tmp_path / "raysemi")) == 2


def test_ray_utils_holds_no_ml():
    ml = ("raysemi.models", "raysemi.losses", "raysemi.stages", "raysemi.data", "raysemi.optim")
    assert [m for m, names, _ in imports(PKG / "ray_utils.py")
            if any(_below(t, ml) for t in [m] + [f"{m}.{n}" for n in names])] == []


def test_no_module_imports_private_names():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        for mod, names, line in imports(path):
            if mod.startswith("raysemi"):
                bad += [f"{module_name(path)}:{line} {mod}.{n}" for n in names if n.startswith("_")]
    assert bad == []
