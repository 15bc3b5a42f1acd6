"""The package's structure: an import graph without circles that only points down the
layers of docs/design.md §6, at most a dozen top-level modules, a map that lists them all,
and ``import refngd`` that loads the library without the harness."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

import refngd

PKG = Path(refngd.__file__).resolve().parent
DESIGN = PKG.parent / "docs" / "design.md"

#: the layers of docs/design.md §6, bottom first: a module may import from its own layer
#: and the layers below, never from above
LAYERS = [
    {"backend", "options"},
    {"conventions", "rows", "losses"},
    {"nn"},
    {"derivatives", "memory", "autodiff"},
    {"curvature"},
    {"updates", "metrics"},
    {"optim"},
    {"check", "interop", "testing"},
    {"experiments"},
    {"cli", "__main__", "__init__"},
]


def _modules() -> dict[str, Path]:
    """Dotted name (relative to refngd) → file, for every module of the package."""
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict) -> str | None:
    """The module (or package) that the dotted ``name`` refers to, if any."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, modules: dict) -> set[str]:
    """The refngd modules ``mod`` imports anywhere in its file (lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(anchor + ([node.module] if node.module else []))
            elif (node.module or "").startswith("refngd"):
                target = node.module[len("refngd."):] if node.module != "refngd" else ""
            else:
                continue
            names = [f"{target}.{a.name}" if target else a.name for a in node.names]
            for n in names:
                hit = _resolve(n, modules) if n in modules else _resolve(target, modules)
                if hit and hit != mod:
                    out.add(hit)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("refngd."):
                    hit = _resolve(a.name[len("refngd."):], modules)
                    if hit and hit != mod:
                        out.add(hit)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    modules.pop("", None)
    return {m: _imports(m, p, modules) for m, p in modules.items() if m}


def _layer(mod: str) -> int:
    top = mod.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"refngd.{mod} is in no layer of tests/test_architecture.py: add it "
                         "(and to docs/design.md §6).")


def test_no_import_circles():
    graph = _graph()
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_imports_point_down_the_layers():
    bad = []
    for mod, targets in _graph().items():
        for t in targets:
            if _layer(t) > _layer(mod):
                bad.append(f"refngd.{mod} -> refngd.{t}")
    assert not bad, "imports from a higher layer (docs/design.md §6): " + ", ".join(sorted(bad))


def _top_modules() -> set[str]:
    return {p.stem for p in PKG.glob("*.py")}


def _top_packages() -> set[str]:
    return {p.parent.name for p in PKG.glob("*/__init__.py")}


def test_at_most_a_dozen_top_level_modules():
    mods = _top_modules() - {"__init__", "__main__"}
    assert len(mods) <= 12, sorted(mods)


def test_every_top_level_module_is_in_the_map():
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("## §6"):]
    listed = set(re.findall(r"^\s{2}([A-Za-z_]+)(?:\.py|/)", section, flags=re.M))
    missing = (_top_modules() - {"__init__", "__main__"} | _top_packages()) - listed
    assert not missing, f"docs/design.md §6 does not list: {sorted(missing)}"
    gone = listed - _top_modules() - _top_packages()
    assert not gone, f"docs/design.md §6 lists modules that do not exist: {sorted(gone)}"


def test_every_module_has_a_layer():
    for mod in _graph():
        _layer(mod)


def test_import_refngd_loads_the_library_not_the_harness():
    code = ("import sys, refngd, refngd.curvature, refngd.updates, refngd.metrics; "
            "print(' '.join(sorted(m for m in ('matplotlib', 'sklearn', 'tqdm', 'torch', "
            "'refngd.experiments', 'refngd.check', 'dask') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=PKG.parent).stdout.split()
    assert out == [], f"import refngd loaded {out}"


@pytest.mark.parametrize("name", ["refngd.interop", "refngd.testing", "refngd.conventions",
                                  "refngd.subsets", "refngd.losses", "refngd.check"])
def test_public_modules_stay_importable(name):
    import importlib

    mod = importlib.import_module(name)
    assert mod.__name__.startswith("refngd.")


def test_readme_names_are_exported():
    for name in ("curvature", "updates", "metrics", "losses", "nn", "optim", "subsets",
                 "FunctionModel", "gradient"):
        assert name in refngd.__all__ and hasattr(refngd, name), name
