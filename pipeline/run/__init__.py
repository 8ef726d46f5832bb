"""Orchestration, above the stages: the stage registry, the runner, checks before paying, estimates, errors."""
