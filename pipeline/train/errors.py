"""The training stages' error type (its own module, so template checks import it without the recipe)."""


class TrainingError(RuntimeError):
    """A training stage cannot start or finish; the message says where and what to do."""
