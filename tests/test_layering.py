"""The package's floor plan (docs/ARCHITECTURE.md): every import inside ssrengine points down
the layer order or stays on its floor, and no set of modules imports itself in a circle.
Parsed from the source, so an import inside a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ssrengine"

# Lowest first. A module's floor is its stage package; the top-level modules (pipeline, cli,
# export, render, train, the API in __init__) stand on all of them.
LAYERS = (
    ("core",),
    ("data",),
    ("kernels", "models"),
    ("generation",),
    ("rehearsal",),
    ("training",),
    ("evaluation",),
)
TOP = len(LAYERS)
# Packages that stand on top with the entry points: `ssrengine.datasets` only keeps the earlier
# command `python -m ssrengine.datasets` working (now `python -m ssrengine.data`).
TOP_PACKAGES = ("datasets",)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) >= 2:
        for i, floor in enumerate(LAYERS):
            if parts[1] in floor:
                return i
    return TOP


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The ssrengine modules that ``module`` imports (``from pkg import mod`` names the module
    ``pkg.mod`` where one exists, else ``pkg`` itself)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                anchor = here[: len(here) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m == "ssrengine" or m.startswith("ssrengine.")} - {module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods) | {"ssrengine.kernels.cross_entropy"}  # kernels/ is ssrengine.kernels
    return {m: {d for d in imports(m, p, known) if d in mods} for m, p in mods.items()}


def test_every_module_is_on_a_known_floor():
    stray = [
        m
        for m in modules()
        if layer(m) == TOP and m.count(".") > 1 and m.split(".")[1] not in TOP_PACKAGES
    ]
    assert not stray, f"modules in a package the layer order does not name: {stray}"


def test_no_import_points_up_the_layer_order():
    up = [
        f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
        for m, deps in graph().items()
        for d in sorted(deps)
        if layer(d) > layer(m)
    ]
    assert not up, "\n".join(up)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(g.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d) :] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_circles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize(
    "g, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"x": {"y"}, "y": {"y"}}, ["y", "y"]),
    ],
)
def test_find_cycle_finds_circles_and_only_circles(g, expected):
    assert find_cycle(g) == expected


def test_the_checks_see_an_upward_import_and_a_function_level_one(tmp_path, monkeypatch):
    """The parser counts imports inside functions and resolves relative ones."""
    pkg = tmp_path / "ssrengine"
    (pkg / "core").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "training" / "__init__.py").write_text("")
    (pkg / "training" / "loop.py").write_text("from ..core import io\n")
    (pkg / "core" / "io.py").write_text("def f():\n    from ssrengine.training import loop\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "ROOT", tmp_path)
    monkeypatch.setattr(__import__(__name__, fromlist=["x"]), "PACKAGE", pkg)
    g = graph()
    assert g["ssrengine.core.io"] == {"ssrengine.training.loop"}
    assert g["ssrengine.training.loop"] == {"ssrengine.core.io"}
    assert layer("ssrengine.training.loop") > layer("ssrengine.core.io")
    assert find_cycle(g) == ["ssrengine.core.io", "ssrengine.training.loop", "ssrengine.core.io"]
