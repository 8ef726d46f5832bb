"""zephyr-distill: Zephyr-style distillation of a teacher into a small chat model."""

__version__ = "0.1.0"
