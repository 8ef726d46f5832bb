"""zephyr-distill: Zephyr-style distillation of a teacher into a small chat model."""

import importlib.util
import sys
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path

__version__ = "0.1.0"

# A source tree keeps flows/, prompts/ and configs/ beside this package, where an install puts them inside it
# (pyproject's package-dir). In a checkout this finder answers for exactly those three names, so
# pipeline.flows, pipeline.prompts and pipeline.configs import from a checkout (PYTHONPATH, editable install)
# as they do from a wheel, and nothing else under the tree's root becomes part of the package.
_TREE = Path(__file__).resolve().parent.parent
_MAPPED = ("flows", "prompts", "configs")


class _TreeFinder:
    @staticmethod
    def find_spec(fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        prefix, _, short = fullname.partition(".")
        if prefix != __name__ or short not in _MAPPED:
            return None
        folder = _TREE / short
        init = folder / "__init__.py"
        if init.is_file():
            return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(folder)])
        spec = PathFinder.find_spec(short, [str(_TREE)])
        if spec is not None:
            spec.name = fullname
        return spec


if (_TREE / "pyproject.toml").is_file() and (_TREE / "flows" / "distill.py").is_file() and not any(
    getattr(f, "__qualname__", None) == "_TreeFinder" for f in sys.meta_path  # once, even after a reload
):
    sys.meta_path.insert(0, _TreeFinder)  # before an editable install's finder, which may name another tree
