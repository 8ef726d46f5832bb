"""Installs: every third-party module the package imports is declared in pyproject.toml, optional ones (extras)
are imported only where used; the core package alone, installed from the tree (not editable) in a fresh venv, runs
the quickstart's generate and sft and validates a multi-GPU recipe from another directory; a wheel, an editable
install and a plain checkout import the same names, all under `pipeline`."""

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
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "flows", "prompts")
# where each installed name comes from, printed by a fresh interpreter in the environment under test
PROBE = ("import pipeline.flows, pipeline.prompts; from importlib import resources; "
         "print(pipeline.flows.__file__, pipeline.prompts.__file__, resources.files('pipeline.configs') / 'accelerate')")
# import name -> distribution, for modules that need not be installed here (an extra's)
NOT_INSTALLED_HERE = {"vllm": "vllm", "deepspeed": "deepspeed", "s3fs": "s3fs"}


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~\[;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def declared() -> tuple[set[str], dict[str, set[str]]]:
    """(core distributions, {extra: distributions})."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {k: {_name(r) for r in v} for k, v in project["optional-dependencies"].items()}
    return {_name(r) for r in project["dependencies"]}, extras


def test_the_package_list_names_every_folder_that_installs():
    """pyproject lists the packages by hand (package-dir cannot be combined with packages.find): a folder left
    out would be missing from the wheel only."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {"pipeline": "pipeline", **{source: name for name, source in tool["package-dir"].items()}}
    tree = set()
    for source, name in folders.items():
        for folder in [ROOT / source, *(ROOT / source).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__":
                tree.add(".".join([name, *folder.relative_to(ROOT / source).parts]))
    assert set(tool["packages"]) == tree
    assert set(tool["package-dir"]) == {"pipeline.flows", "pipeline.prompts", "pipeline.configs"}


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


class Venv:
    """A fresh venv under `root`, and commands run with its interpreter from `root` (no PYTHONPATH)."""

    def __init__(self, root: Path) -> None:
        self.root, self.path = root, root / "venv"
        self.python, self.bin = self.path / "bin" / "python", self.path / "bin"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        self.env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.sh(getattr(sys, "_base_executable", sys.executable), "-m", "venv", self.path)

    def run(self, *args: str | Path, cwd: Path | None = None, timeout: float = 900,
            **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(a) for a in args], cwd=cwd or self.root, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)

    def sh(self, *args: str | Path, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
        done = self.run(*args, cwd=cwd, **env)
        assert done.returncode == 0, f"{args}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory):
    """The core package installed from the tree, not editable (what `pip install .` does), in a fresh venv."""
    venv = Venv(tmp_path_factory.mktemp("installed"))
    # a copy of the tree: setuptools' build/ in the checkout could carry modules the tree no longer has
    source = shutil.copytree(ROOT, venv.root / "source", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "runs", ".*_cache"))
    try:
        # CPU torch first, pinned: an unpinned resolve would pull CUDA wheels (gigabytes)
        venv.sh(venv.python, "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0")
        venv.sh(venv.python, "-m", "pip", "install", "-q", "--no-compile", source)
        yield venv
    finally:
        shutil.rmtree(venv.path, ignore_errors=True)  # a torch install: do not leave it to pytest's tmp retention
        shutil.rmtree(source, ignore_errors=True)


@pytest.mark.slow
def test_the_core_package_alone_in_a_fresh_venv_runs_the_quickstarts_generate_and_sft(installed, tmp_path):
    venv = installed
    missing = venv.run(venv.python, "-c", "import peft")
    assert missing.returncode != 0  # the lora extra is not there: sft must not need it
    shipped = venv.sh(venv.python, "-c", "import pipeline.train.templates as t; print(t.__file__); "
                      "print(all(t.family_template(f, training=True) for f in t.FAMILIES), t.family_template('mistral')[:2])")
    assert str(venv.path) in shipped.stdout and "True {#" in shipped.stdout  # chat templates are package data
    venv.sh(venv.bin / "distill", "run", ROOT / "configs" / "quickstart.yaml", "--no-prefect",
            "--stages", "generate,sft", "--run-name", "core", "--set", f"storage.root={tmp_path / 'runs'}",
            "--set", "prompts.count=48", "--set", "sft.args.num_train_epochs=1", "--set", "sft.args.max_steps=3",
            cwd=tmp_path)
    run = tmp_path / "runs" / "core"
    assert (run / "sft" / "model" / "config.json").is_file()
    assert (run / "sft" / "model" / "tokenizer_config.json").is_file()
    status = venv.sh(venv.bin / "distill", "status", run).stdout
    assert re.search(r"generate\s+completed", status) and re.search(r"sft\s+completed", status)


@pytest.mark.slow
def test_an_installed_package_validates_a_multi_gpu_recipe_from_another_directory(installed, tmp_path):
    venv, distill = installed, installed.bin / "distill"
    recipe = tmp_path / "multi.yaml"  # nothing of the source tree here: the recipe names a shipped config
    recipe.write_text(yaml.safe_dump({**yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text()),
                                      "compute": {"num_gpus": 2, "accelerate_config": "deepspeed_zero3"}}))
    assert "valid recipe 'quickstart'" in venv.sh(distill, "validate", recipe, cwd=tmp_path).stdout
    venv.sh(distill, "validate", recipe, "--set", "compute.accelerate_config=configs/accelerate/fsdp.yaml",
            cwd=tmp_path)  # the spelling the shipped recipes use
    refused = venv.run(distill, "validate", recipe, "--set", "compute.accelerate_config=nope.yaml", cwd=tmp_path)
    assert refused.returncode != 0 and "compute.accelerate_config: 'nope.yaml'" in refused.stderr

    flows, prompts, accelerate = venv.sh(venv.python, "-c", PROBE, cwd=tmp_path).stdout.split()
    site = venv.sh(venv.python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    assert (flows, prompts, accelerate) == (f"{site}/pipeline/flows/__init__.py",
                                            f"{site}/pipeline/prompts/__init__.py", f"{site}/pipeline/configs/accelerate")
    tops = venv.sh(venv.python, "-c", "import importlib.metadata as m; print(*sorted({f.parts[0] for f in "
                   "m.distribution('zephyr-distill').files if f.parts[0] != '..' and not f.parts[0].endswith('.dist-info')}))").stdout.split()
    assert tops == ["pipeline"]
    # a worker loads each deployment's entrypoint from the folder that holds flows/ (here: inside the install)
    loaded = venv.sh(venv.python, "-c", "from prefect.flows import load_flow_from_entrypoint as load; "
                     "from pipeline.flows.deploy import PROJECT_DIR, deployment_specs; "
                     "print(*sorted({(s['flow'].name, load(f\"{PROJECT_DIR}/{s['entrypoint']}\", use_placeholder_flow=False).name) "
                     "for s in deployment_specs()}))", cwd=tmp_path).stdout
    pairs = re.findall(r"\('([\w-]+)', '([\w-]+)'\)", loaded)
    assert len(pairs) == 7 and all(want == got for want, got in pairs), loaded


@pytest.mark.slow
def test_an_editable_install_and_a_plain_checkout_import_the_same_names_from_the_tree(tmp_path):
    want = [str(ROOT / "flows" / "__init__.py"), str(ROOT / "prompts" / "__init__.py"), str(ROOT / "configs" / "accelerate")]
    venv = Venv(tmp_path)
    try:
        checkout = venv.sh(venv.python, "-c", PROBE, PYTHONPATH=str(ROOT)).stdout.split()
        assert checkout == want
        venv.sh(venv.python, "-m", "pip", "install", "-q", "--no-deps", "-e", ROOT)
        assert venv.sh(venv.python, "-c", PROBE).stdout.split() == want
        assert venv.run(venv.python, "-c", "import flows").returncode != 0  # no generic top-level names
        assert venv.run(venv.python, "-c", "import prompts").returncode != 0
    finally:
        shutil.rmtree(venv.path, ignore_errors=True)
