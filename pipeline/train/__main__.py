"""Entry point of one rank under `accelerate launch`: `python -m pipeline.train STAGE --recipe F --run DIR`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.core.recipe import recipe_from_dict
from pipeline.core.store import RunStore
from pipeline.stages.dpo.stage import run as dpo
from pipeline.stages.sft.stage import run as sft

STAGES = {"sft": sft, "dpo": dpo}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.train", description=__doc__)
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--recipe", required=True, help="recipe snapshot (JSON) written by the launching stage")
    parser.add_argument("--run", required=True, help="run directory (path or fsspec URL)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    with open(args.recipe) as fh:
        recipe = recipe_from_dict(json.load(fh), origin=args.recipe)
    store = RunStore.open_existing(args.run)
    STAGES[args.stage](recipe, store)


if __name__ == "__main__":
    main()
