"""The house rules of the package's imports, read from the source (``ast``), so they cannot rot silently:

* no import cycle between qtoolkit modules (function-level imports and sub-package ``__init__`` files included);
* imports only run *down* the layers: primitives and kernels ← quantizers ← nn modules ← passes ← workflows;
* nothing below the top-level ``__init__`` imports the ``qtoolkit`` package itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qtoolkit"

# rank of each module (prefix match, longest first); an import may not reach a higher rank
LAYERS = {
    0: ["qtoolkit._version", "qtoolkit.spec", "qtoolkit.numerics", "qtoolkit.packing", "qtoolkit.atomic",
        "qtoolkit.inference", "qtoolkit.layer_kinds", "qtoolkit.module_swap", "qtoolkit.kernels"],
    1: ["qtoolkit.calibration", "qtoolkit.histogram_calibrators", "qtoolkit.tensor_calibrators", "qtoolkit.calibrators", "qtoolkit.observer_base",
        "qtoolkit.minmax_observers", "qtoolkit.histogram_observer", "qtoolkit.per_channel_observers",
        "qtoolkit.calibrator_registry", "qtoolkit.config", "qtoolkit.observers", "qtoolkit.fake_quant"],
    2: ["qtoolkit.nn"],
    3: ["qtoolkit.toggles", "qtoolkit.fuse_common", "qtoolkit.fuse_classes", "qtoolkit.fuse_rewrites", "qtoolkit.fuse", "qtoolkit.summary", "qtoolkit.table_grids", "qtoolkit.calibrate", "qtoolkit.prepare",
        "qtoolkit.convert_passes", "qtoolkit.executor", "qtoolkit.convert"],
    4: ["qtoolkit.qat", "qtoolkit.ptq", "qtoolkit.export"],
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """qtoolkit modules ``name`` imports anywhere in its code (type-checking-only blocks excluded)."""
    out: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for n in child.orelse:
                    visit(n)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.startswith("qtoolkit"))
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative import
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.startswith("qtoolkit"):
                    out.add(mod)
                    out.update(f"{mod}.{a.name}" for a in child.names if f"{mod}.{a.name}" in known)
            visit(child)

    visit(ast.parse(path.read_text()))
    # importing a.b.c runs the sub-package a.b's __init__ too (the root package is always loaded first)
    full = set()
    for mod in out:
        parts = mod.split(".")
        full.update(".".join(parts[:i]) for i in range(2, len(parts) + 1))
    # ... except the importer's own ancestors: they are already loading when it runs
    return {m for m in full if m in known and m != name and not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {n: _imports(n, p, known) for n, p in mods.items() if n != "qtoolkit"}


def _rank(mod: str) -> int:
    best, rank = -1, None
    for r, prefixes in LAYERS.items():
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), r
    if rank is None:
        raise AssertionError(f"{mod} has no layer in tests/test_imports.py: LAYERS; add it where it belongs")
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w == "qtoolkit":
                continue
            if w not in index:
                strong(w)
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
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return out


def test_the_checker_sees_a_cycle_and_an_upward_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _rank("qtoolkit.kernels.dispatch") < _rank("qtoolkit.nn.int8_layer")
    with pytest.raises(AssertionError, match="no layer"):
        _rank("qtoolkit.something_new")


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_imports_only_run_down_the_layers():
    bad = [f"{m} (layer {_rank(m)}) imports {d} (layer {_rank(d)})"
           for m, deps in _graph().items() for d in sorted(deps) if _rank(d) > _rank(m)]
    assert bad == []


def test_kernels_never_import_nn_and_nothing_imports_the_root_package():
    graph = _graph()
    assert not [d for m, deps in graph.items() if m.startswith("qtoolkit.kernels") for d in deps if d.startswith("qtoolkit.nn")]
    root = [m for m, p in _modules().items() if m != "qtoolkit"
            and any(isinstance(n, ast.ImportFrom) and n.module == "qtoolkit" and not n.level
                    and any(f"qtoolkit.{a.name}" not in _modules() for a in n.names)
                    for n in ast.walk(ast.parse(p.read_text())))]
    assert root == []


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert long == {}
