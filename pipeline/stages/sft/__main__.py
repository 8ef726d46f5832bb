"""One rank of a multi-GPU sft run under `accelerate launch` (see pipeline.train.launch)."""

from pipeline.stages.sft.stage import run
from pipeline.train.launch import rank_main

if __name__ == "__main__":
    rank_main(run)
