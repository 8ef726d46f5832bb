"""`python -m pipeline.cli` runs the `distill` command line."""

from pipeline.cli import main

main()
