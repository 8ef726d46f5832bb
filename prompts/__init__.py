"""Prompt templates (Jinja, one file per prompt) and the shipped evaluation set, installed as pipeline.prompts."""
