"""zephyr-distill: Zephyr-style distillation of a teacher into a small chat model."""

from pathlib import Path

__version__ = "0.1.0"

# A source tree keeps flows/, prompts/ and configs/ beside this package, where an install puts them inside it
# (pyproject's package-dir); with the tree's root on this package's path, pipeline.flows, pipeline.prompts and
# pipeline.configs import from a checkout (PYTHONPATH, editable install) as they do from a wheel.
_TREE = Path(__file__).resolve().parent.parent
if (_TREE / "pyproject.toml").is_file() and (_TREE / "flows" / "distill.py").is_file():
    __path__.append(str(_TREE))
