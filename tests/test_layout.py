"""The layout's rules, checked on the source (docs/ARCHITECTURE.md): no import cycle (lazy imports
count), the library free of Ray and of the jobs, the runner free of every job, small files and
functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("uta_core", "pipelines")
JOBS = ("pretrain", "contrastive", "cache", "evaluate", "export", "sweep", "demo")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imported(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, anywhere in it (a lazy import inside a function counts)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()

    def ours(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    return {m: {t for t in map(ours, imported(p, m)) if t and t != m} for m, p in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle_between_modules():
    assert cycles(graph()) == []


def test_no_import_cycle_between_the_librarys_subpackages():
    def sub(module: str) -> str:
        parts = module.split(".")
        return ".".join(parts[:2]) if len(parts) > 2 else module

    packages: dict[str, set[str]] = {}
    for module, targets in graph().items():
        if module.startswith("uta_core."):
            packages.setdefault(sub(module), set()).update(sub(t) for t in targets if t.startswith("uta_core."))
    assert cycles({k: v - {k} for k, v in packages.items()}) == []


def test_the_library_imports_neither_ray_nor_the_jobs():
    mods = modules()
    bad = {m: sorted(t for t in imported(p, m) if t.split(".")[0] in ("ray", "pipelines"))
           for m, p in mods.items() if m.startswith("uta_core")}
    assert {m: t for m, t in bad.items() if t} == {}


def test_the_runner_imports_no_job():
    mods = modules()
    jobs = tuple(f"pipelines.lib.{j}" for j in JOBS) + tuple(f"pipelines.{j}" for j in JOBS)
    bad = {m: sorted(t for t in imported(p, m) if t.startswith(jobs))
           for m, p in mods.items() if m.startswith("pipelines.lib.train")}
    assert {m: t for m, t in bad.items() if t} == {}


@pytest.mark.parametrize("package", PACKAGES)
def test_files_stay_under_400_lines_and_functions_under_60(package):
    long_files, long_functions = [], []
    for path in (ROOT / package).rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} "
                                      f"({node.end_lineno - node.lineno + 1})")
    assert long_files == [] and long_functions == []
