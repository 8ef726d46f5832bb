"""One rank of a multi-GPU dpo run under `accelerate launch` (see pipeline.train.launch)."""

from pipeline.stages.dpo.stage import run
from pipeline.train.launch import rank_main

if __name__ == "__main__":
    rank_main(run)
