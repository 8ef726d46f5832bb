"""Task plugins (see pipeline.core.task): each supplies prompts and optionally a checker, a teacher and a corpus."""
