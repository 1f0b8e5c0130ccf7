"""The package's layering, read from the source: no import cycles, and no stage imports a higher one.

Every import counts, at module level or inside a function, so a lazy import cannot hide an
upward dependency. Stages, lowest first (a module may import its own stage and lower ones):

    core < io < model < discovery < export < verification < evaluation < inspect < pipeline < steer < api < cli
    < testing

(``steer``: the one-command job composed of pipeline functions, ``cna_export/steer.py``; ``testing``: the
fixtures of the tests and benchmarks, which may import anything and which no module of the package imports.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "cna_export"
STAGES = ["core", "io", "model", "discovery", "export", "verification", "evaluation", "inspect", "pipeline", "steer",
          "", "cli", "__main__", "testing"]


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


MODULES = _modules()


def _imports(mod: str, path: Path) -> set[str]:
    """The package modules ``mod`` imports, anywhere in its body."""
    is_pkg = path.name == "__init__.py"
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.split(".")[0] == "cna_export")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "cna_export":
                target = node.module
            else:
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                deps.add(sub if sub in MODULES else target)
    deps.discard(mod)
    return {d for d in deps if d in MODULES}


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def stage(mod: str) -> int:
    parts = mod.split(".")
    name = parts[1] if len(parts) > 1 else ""
    if name not in STAGES:
        raise AssertionError(f"{mod} is in no stage: add its package to STAGES in tests/test_layering.py")
    return STAGES.index(name)


def test_every_module_has_a_stage():
    for mod in MODULES:
        stage(mod)


def test_graph_is_read():
    # guards the reader itself: these edges exist, so an empty graph would be a bug in the test
    assert "cna_export.core.errors" in GRAPH["cna_export.core.circuit"]
    assert any(d.startswith("cna_export.core") for d in GRAPH["cna_export.io.gguf_read"])


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_upward_import(mod):
    upward = sorted(d for d in GRAPH[mod] if stage(d) > stage(mod))
    assert not upward, f"{mod} (stage {STAGES[stage(mod)] or 'api'}) imports higher stages: {upward}"


def test_nothing_imports_testing():
    """The test fixtures (``cna_export.testing``) are the top stage: the library never depends on them."""
    assert any(m.startswith("cna_export.testing.") for m in MODULES)
    users = sorted(m for m, deps in GRAPH.items() if not m.startswith("cna_export.testing")
                   and any(d == "cna_export.testing" or d.startswith("cna_export.testing.") for d in deps))
    assert not users, f"library modules import the test fixtures: {users}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(GRAPH)
    assert not cycles, f"import cycles: {cycles}"


def test_export_and_verify_do_not_import_each_other():
    for mod, deps in GRAPH.items():
        if mod.startswith("cna_export.export"):
            assert not [d for d in deps if d.startswith("cna_export.verification")], mod


def test_public_api_names_are_not_shadowed_by_subpackages():
    """``from cna_export import verify`` must give the function even after ``cna_export.verification``
    and every other subpackage were imported (a subpackage named like an API function would replace it)."""
    import importlib
    import subprocess
    import sys

    import cna_export

    subpackages = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    clash = sorted(set(cna_export._API) & subpackages)
    assert not clash, f"API names equal to subpackage names: {clash}"
    code = (
        "import importlib, pkgutil, cna_export\n"
        "for m in pkgutil.walk_packages(cna_export.__path__, 'cna_export.'):\n"
        "    if not m.name.endswith('__main__'): importlib.import_module(m.name)\n"
        "import cna_export as c\n"
        "bad = [n for n in c._API if not callable(getattr(c, n))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert importlib.import_module("cna_export").__version__
