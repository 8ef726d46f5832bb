"""Installs: every third-party module the package imports is declared in pyproject.toml, optional ones (extras)
are imported only where used, and the core package alone, in a fresh venv, runs the quickstart's generate and sft."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows", "prompts")
# import name -> distribution, for modules that need not be installed here (an extra's)
NOT_INSTALLED_HERE = {"vllm": "vllm", "deepspeed": "deepspeed", "s3fs": "s3fs"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, {extra: distributions})."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {_name(r) for r in project["dependencies"]}, extras


def third_party_imports() -> dict[str, list[tuple[str, bool]]]:
    """Top-level module -> [(file, imported at module level)] for every non-stdlib, non-project import."""
    found: dict[str, list[tuple[str, bool]]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            top_level = {id(n) for n in tree.body} | {id(n) for t in tree.body if isinstance(t, ast.If | ast.Try)
                                                      for n in ast.walk(t)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in PACKAGES:
                        found.setdefault(top, []).append((str(path.relative_to(ROOT)), id(node) in top_level))
    return found


def distributions_of(module: str) -> set[str]:
    dists = importlib.metadata.packages_distributions().get(module) or [NOT_INSTALLED_HERE.get(module, module)]
    return {d.lower().replace("_", "-") for d in dists}


def test_every_third_party_import_is_declared_and_extras_are_imported_only_where_used():
    core, extras = declared()
    optional = set().union(*extras.values())
    undeclared, eager = [], []
    for module, places in sorted(third_party_imports().items()):
        dists = distributions_of(module)
        if not dists & (core | optional):
            undeclared.append(f"{module} ({places[0][0]})")
        elif not dists & core:  # only an extra brings it: never imported when a module is imported
            eager += [f"{module} in {file}" for file, at_top in places if at_top]
    assert undeclared == [] and eager == []
    assert {"peft"} <= extras["lora"] and {"vllm", "deepspeed"} <= extras["gpu"] and {"s3fs"} <= extras["s3"]


@pytest.mark.slow
def test_the_core_package_alone_in_a_fresh_venv_runs_the_quickstarts_generate_and_sft(tmp_path):
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    python = venv / "bin" / "python"

    def sh(*args: str | Path, timeout: float = 900) -> subprocess.CompletedProcess:
        done = subprocess.run([str(a) for a in args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done

    try:
        sh(getattr(sys, "_base_executable", sys.executable), "-m", "venv", venv)
        # CPU torch first, pinned: an unpinned resolve would pull CUDA wheels (gigabytes)
        sh(python, "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0")
        sh(python, "-m", "pip", "install", "-q", "--no-compile", ROOT)
        missing = subprocess.run([python, "-c", "import peft"], capture_output=True, env=env)
        assert missing.returncode != 0  # the lora extra is not there: sft must not need it
        shipped = sh(python, "-c", "import pipeline.train.templates as t; print(t.__file__); "
                     "print(all(t.family_template(f, training=True) for f in t.FAMILIES), t.family_template('mistral')[:2])")
        assert str(venv) in shipped.stdout and "True {#" in shipped.stdout  # chat templates are package data
        sh(venv / "bin" / "distill", "run", ROOT / "configs" / "quickstart.yaml", "--no-prefect",
           "--stages", "generate,sft", "--run-name", "core", "--set", f"storage.root={tmp_path / 'runs'}",
           "--set", "prompts.count=48", "--set", "sft.args.num_train_epochs=1", "--set", "sft.args.max_steps=3")
        run = tmp_path / "runs" / "core"
        assert (run / "sft" / "model" / "config.json").is_file()
        assert (run / "sft" / "model" / "tokenizer_config.json").is_file()
        status = sh(venv / "bin" / "distill", "status", run).stdout
        assert re.search(r"generate\s+completed", status) and re.search(r"sft\s+completed", status)
    finally:
        shutil.rmtree(venv, ignore_errors=True)  # a torch install: do not leave it to pytest's tmp retention
