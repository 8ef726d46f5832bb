"""The library core: recipe, stage graph, runner, run store, templates, progress, streaming, prompt sources, tasks."""
