"""Entry point of one rank under `accelerate launch`: `python -m pipeline.train STAGE --recipe F --run DIR`."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

from pipeline.recipe import recipe_from_dict
from pipeline.store import RunStore


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    parser.add_argument("stage", choices=["sft", "dpo"])
    parser.add_argument("--recipe", required=True, help="recipe snapshot (JSON) written by the launching stage")
    parser.add_argument("--run", required=True, help="run directory (path or fsspec URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with open(args.recipe) as fh:
        recipe = recipe_from_dict(json.load(fh), origin=args.recipe)
    store = RunStore.open_existing(args.run)
    importlib.import_module(f"pipeline.train.{args.stage}").run(recipe, store)


if __name__ == "__main__":
    main()
