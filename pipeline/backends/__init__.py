"""Sampling backends, one protocol (`base`), three implementations: `transformers` (batched, CPU or one GPU),
`openai` (any OpenAI-compatible server, through the teacher client), `vllm` (imported only when used)."""
