"""Prefect flows for zephyr-distill: thin wrappers around `pipeline` stages."""

import os

# The library logs under "pipeline"; send those records to the Prefect API with the flows' own.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline")
