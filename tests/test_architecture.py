"""The layout keeps its promises: every import points down a floor, no import cycles, Prefect only behind the
CLI and flows, no task named by the core, small modules and functions, a docstring on every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows")
# a top-level folder -> the package it installs as (pyproject's package-dir)
INSTALLED_AS = {"flows": "pipeline.flows"}
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60
# The floors, lowest first (ARCHITECTURE.md): a package imports its own modules and those of lower floors only;
# packages on one floor (two stages, teacher and train) do not import each other.
FLOORS = (("core",), ("teacher", "train", "tasks"), ("backends", "series", "export", "review"), ("stages",), ("run",),
          ("flows",), ("cli",))
RANK = {name: rank for rank, names in enumerate(FLOORS) for name in names}


def module_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the packages under `root`, named as installed."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root / package).with_suffix("").parts)
            parts = [*INSTALLED_AS.get(package, package).split("."), *parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of `known` that `name` imports anywhere: at the top, inside functions, under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    files = module_files(root, packages)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def floor_package(module: str) -> str:
    """The floor package a module belongs to: `stages.<name>` for a stage, else the first level below pipeline."""
    parts = module.split(".")
    if len(parts) > 2 and parts[1] == "stages":
        return f"stages.{parts[2]}"
    return parts[1] if len(parts) > 1 else "pipeline"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up a floor or sideways to another package of the same floor."""
    found = []
    for name, deps in sorted(graph.items()):
        here = floor_package(name)
        for dep in sorted(deps):
            there = floor_package(dep)
            if there == here or there == "pipeline":  # the package root holds only its version
                continue
            mine, theirs = RANK[here.split(".")[0]], RANK[there.split(".")[0]]
            if theirs > mine or (theirs == mine and there != here):
                found.append(f"{name} ({here}) imports {dep} ({there})")
    return found


def test_the_layer_test_catches_a_planted_upward_import(tmp_path: Path) -> None:
    for rel, text in {"pipeline/__init__.py": "", "pipeline/core/__init__.py": "",
                      "pipeline/core/store.py": "from pipeline.run.runner import run_stage\n",
                      "pipeline/run/__init__.py": "", "pipeline/run/runner.py": "from pipeline.core import store\n",
                      "pipeline/stages/__init__.py": "", "pipeline/stages/sft/__init__.py": "",
                      "pipeline/stages/sft/stage.py": "def f():\n    from pipeline.stages.dpo import stage\n",
                      "pipeline/stages/dpo/__init__.py": "", "pipeline/stages/dpo/stage.py": "",
                      "pipeline/teacher/__init__.py": "", "pipeline/teacher/client.py": "import pipeline.train.models\n",
                      "pipeline/train/__init__.py": "", "pipeline/train/models.py": "from pipeline.core.store import x\n",
                      "flows/__init__.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert upward_imports(import_graph(tmp_path)) == [
        "pipeline.core.store (core) imports pipeline.run.runner (run)",
        "pipeline.stages.sft.stage (stages.sft) imports pipeline.stages.dpo.stage (stages.dpo)",
        "pipeline.teacher.client (teacher) imports pipeline.train.models (train)",
    ]


def test_every_import_points_down_a_floor() -> None:
    graph = import_graph(ROOT)
    assert {floor_package(name).split(".")[0] for name in graph} <= {*RANK, "pipeline"}, "a package with no floor"
    assert upward_imports(graph) == []


def test_the_cycle_finder_sees_imports_inside_functions_and_type_checking(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""p"""\n')
    (pkg / "a.py").write_text('"""a"""\nfrom pkg.b import x\n')
    (pkg / "b.py").write_text('"""b"""\ndef f():\n    from pkg import c\n')
    (pkg / "c.py").write_text('"""c"""\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import y\n')
    (pkg / "d.py").write_text('"""d"""\nfrom . import a\n')
    assert cycles(import_graph(tmp_path, ("pkg",))) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_prefect_only_behind_the_cli_and_in_flows() -> None:
    offenders = []
    for name, path in module_files(ROOT, ("pipeline",)).items():
        if name == "pipeline.cli" or name.startswith("pipeline.cli."):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {m}" for m in mods
                          if m.split(".")[0] == "prefect" or m.split(".")[:2] == ["pipeline", "flows"]]
    assert offenders == []


def test_only_task_plugins_import_the_toy_task() -> None:
    graph = import_graph(ROOT)
    offenders = [f"{name} imports {dep}" for name, deps in graph.items() for dep in deps
                 if dep.startswith("pipeline.tasks.toy") and not name.startswith("pipeline.tasks.")]
    assert offenders == []


def test_modules_and_functions_stay_small() -> None:
    too_long = []
    for name, path in module_files(ROOT).items():
        text = path.read_text(encoding="utf-8")
        if text.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"module {name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"function {name}.{node.name}: {length} lines")
    assert too_long == []


@pytest.mark.parametrize("name", sorted(module_files(ROOT)))
def test_every_module_says_what_it_is_for(name: str) -> None:
    path = module_files(ROOT)[name]
    assert ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))), f"{path} has no module docstring"
