"""`transformers serve` (transformers' own app and command line) with replies constrained by `response_format`.

transformers serve accepts `response_format` but ignores it (it logs "Ignoring unsupported fields"), so a
schema-constrained rating comes back as free text. This launcher runs the same app with one change to its
chat-completions handler: a `json_schema` (or `json_object`) response format becomes a grammar-constrained
logits processor from xgrammar (the grammar engine vLLM and SGLang use), so every reply is JSON of the schema.
Requests may name the model by `--alias` (the endpoint's `model`); the server is pinned to MODEL_DIR.

    python -m pipeline.teacher.transformers_server MODEL_DIR --alias NAME [transformers serve options]
"""

from __future__ import annotations

import contextvars
import json
import sys
from functools import lru_cache
from typing import Any

_FORMAT: contextvars.ContextVar[dict | None] = contextvars.ContextVar("response_format", default=None)


def grammar_for(response_format: dict[str, Any] | None, tokenizer: Any, vocab_size: int) -> Any:
    """The compiled grammar a response format asks for; None for text. Raises ValueError on a bad format."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        # the properties keep their order: the grammar writes them in it (a rating before its rationale)
        return _compiler(tokenizer, vocab_size).compile_json_schema(json.dumps(schema), any_whitespace=False)
    if kind == "json_object":
        return _compiler(tokenizer, vocab_size).compile_builtin_json_grammar()
    raise ValueError(f"response_format.type '{kind}' is not one of text, json_object, json_schema")


@lru_cache(maxsize=4)
def _compiler(tokenizer: Any, vocab_size: int) -> Any:
    try:
        import xgrammar
    except ImportError:
        raise ValueError("response_format needs xgrammar on the server: pip install 'zephyr-distill[serve]'") from None
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    return xgrammar.GrammarCompiler(info)  # caches compiled grammars, so a schema compiles once


def constrained(inputs: Any, model: Any, processor: Any) -> Any:
    """`inputs` for `model.generate`, with the logits processor of this request's response format, if any."""
    from fastapi import HTTPException

    tokenizer = getattr(processor, "tokenizer", processor)
    try:
        grammar = grammar_for(_FORMAT.get(), tokenizer, model.config.get_text_config().vocab_size)
    except ValueError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from None
    if grammar is None:
        return inputs
    from transformers import LogitsProcessorList
    from xgrammar.contrib.hf import LogitsProcessor

    return {**inputs, "logits_processor": LogitsProcessorList([LogitsProcessor(grammar)])}


def install(alias: str | None, model_id: str) -> None:
    """Replace transformers serve's chat-completions handler by one that honours response_format."""
    from transformers.cli.serving import chat_completion

    base = chat_completion.ChatCompletionHandler

    class SchemaChatHandler(base):
        _unused_fields = base._unused_fields - {"response_format"}

        async def handle_request(self, body: dict, request_id: str) -> Any:
            if alias is not None and body.get("model") == alias:
                body["model"] = model_id
            token = _FORMAT.set(body.pop("response_format", None))
            try:
                return await super().handle_request(body, request_id)
            finally:
                _FORMAT.reset(token)

        async def _non_streaming(self, request_id: str, model: Any, processor: Any, model_id: str, inputs: Any,
                                 *args: Any, **kwargs: Any) -> Any:
            return await super()._non_streaming(request_id, model, processor, model_id,
                                                constrained(inputs, model, processor), *args, **kwargs)

        def _streaming(self, request_id: str, model: Any, processor: Any, model_id: str, inputs: Any,
                       *args: Any, **kwargs: Any) -> Any:
            return super()._streaming(request_id, model, processor, model_id, constrained(inputs, model, processor),
                                      *args, **kwargs)

    chat_completion.ChatCompletionHandler = SchemaChatHandler


SUPPORTED = ((5, 24), (5, 25))  # [from, to): the versions whose chat-completions handler this extends


def check_version(version: str) -> None:
    """Refuse a transformers whose serve internals this launcher was not written against."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        low, high = (".".join(map(str, v)) for v in SUPPORTED)
        raise SystemExit(f"served teacher: transformers {version} is installed; the json_schema launcher supports "
                         f"transformers serve >={low},<{high}: pip install 'zephyr-distill[serve]' "
                         f"(or use serve: {{server: vllm}} / an endpoint you run yourself)")


def main(argv: list[str] | None = None) -> None:
    import transformers

    check_version(transformers.__version__)
    args = list(sys.argv[1:] if argv is None else argv)
    alias = None
    if "--alias" in args:
        at = args.index("--alias")
        alias = args[at + 1]
        del args[at:at + 2]
    install(alias, args[0])
    from transformers.cli.transformers import app

    app(["serve", *args], prog_name="transformers serve")  # its own parser: every option of transformers serve


if __name__ == "__main__":
    main()
