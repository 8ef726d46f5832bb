"""Recurring runs (series) and the promotion gate."""
