"""The dataset card (README.md) of an export: recipe, endpoints, counts, filters, decontamination, licence."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from pipeline.core.store import RunStore
from pipeline.export.splits import Exported, ExportOptions

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.I)


def redact_url(value: str) -> str:
    """A URL without user, password, query or fragment (where credentials can hide); anything else as is."""
    if not _URL.match(value):
        return value
    parts = urlsplit(value)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _redacted(obj: Any) -> Any:
    if isinstance(obj, str):
        return redact_url(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_redacted(v) for v in obj]
    return obj


def _served(endpoint: dict[str, Any]) -> str:
    serve = endpoint.get("serve") or {}
    return f"{serve['model']} served on loopback by {serve.get('server', 'transformers')}" if serve else ""


def endpoints(recipe: dict[str, Any]) -> list[dict[str, str]]:
    """Who wrote and rated the data: the teacher, any named endpoints, and the sampling pool."""
    found = []
    teacher = recipe.get("teacher") or {}
    if teacher:
        where = teacher.get("base_url") or ""
        found.append({"role": "teacher (dialogues, ratings, judge)", "model": str(teacher.get("model", "")),
                      "endpoint": _served(teacher) or ("the task's built-in teacher on loopback" if where == "builtin"
                                                       else redact_url(where))})
    named = recipe.get("endpoints") or {}
    for name, ep in (named.items() if isinstance(named, dict) else enumerate(named)):
        if isinstance(ep, dict):
            found.append({"role": f"endpoint {ep.get('name', name)}", "model": str(ep.get("model", "")),
                          "endpoint": _served(ep) or redact_url(str(ep.get("base_url") or ""))})
    for member in (recipe.get("sample") or {}).get("pool") or []:
        where = member.get("base_url")
        if member.get("backend") == "openai" and where in (None, "builtin"):
            where = "the teacher's endpoint"
        found.append({"role": f"sample pool: {member.get('name')}", "model": str(member.get("model")),
                      "endpoint": f"{member.get('backend')}" + (f" at {redact_url(where)}" if where else "")})
    return found


def _stats(store: RunStore, stage: str) -> dict[str, Any]:
    try:
        return store.read_json(store.join(stage, "stats.json"), default={}) or {}
    except json.JSONDecodeError:
        return {}


def _counts_table(store: RunStore) -> list[str]:
    lines = ["| stage | status | input | output | failed | dropped |", "|---|---|---|---|---|---|"]
    for name in store.stage_names():
        st = store.stage_state(name)
        c = st.counts
        lines.append(f"| {name} | {st.status} | {c.get('input', '–')} | {c.get('output', '–')} | "
                     f"{c.get('failed', '–')} | {c.get('dropped', '–')} |")
    return lines


def _reasons(title: str, reasons: dict[str, int]) -> list[str]:
    if not reasons:
        return [f"- {title}: none"]
    return [f"- {title}: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1]))]


def _filters(recipe: dict[str, Any], store: RunStore) -> list[str]:
    gen = recipe.get("generate") or {}
    fb = recipe.get("feedback") or {}
    lines = ["Dialogue filters (`generate.filters`):", "", "```yaml",
             yaml.safe_dump(gen.get("filters") or {}, sort_keys=True).rstrip(), "```", ""]
    lines += _reasons("prompts and dialogues dropped by generate", _stats(store, "generate").get("dropped_by_reason", {}))
    lines += _reasons("items dropped by feedback (no pair formed)", _stats(store, "feedback").get("dropped_by_reason", {}))
    pairs = fb.get("pairs") or {}
    lines += [f"- pairs: strategy `{pairs.get('strategy')}`, minimum margin {pairs.get('min_margin')} (on the 1-5 "
              f"scale); sources {fb.get('sources')}; aspects {fb.get('aspects')}"]
    return lines


def _decontamination(recipe: dict[str, Any], store: RunStore) -> list[str]:
    cfg = (recipe.get("generate") or {}).get("decontamination") or {}
    stats = _stats(store, "generate")
    files = cfg.get("eval_files") or []
    contaminated = (stats.get("dropped_by_reason") or {}).get("contaminated", 0)
    if not files:
        lines = ["No evaluation set was checked for overlap (`generate.decontamination.eval_files` is empty): "
                 "check these prompts against your benchmarks before reporting results on them."]
    else:
        lines = [f"Prompts sharing a {cfg.get('ngram')}-gram with any turn of these evaluation sets were dropped "
                 f"before the teacher was asked: {contaminated} prompts.", ""]
        lines += [f"- `{redact_url(f)}`" for f in files]
    detail = stats.get("decontamination")
    if detail:
        lines += ["", "```json", json.dumps(_redacted(detail), indent=2, sort_keys=True, default=str), "```"]
    return lines


def dataset_card(store: RunStore, exported: Exported, options: ExportOptions) -> str:
    """README.md: YAML metadata (licence included), then what the data is, how it was made and how to use it."""
    recipe = store.read_manifest().get("recipe") or {}
    sizes = {name: len(rows) for name, rows in exported.splits.items()
             if name.endswith(("sft", "gen")) or "feedback" in exported.stages}
    meta = {"license": options.license, "pretty_name": f"{recipe.get('name', 'distill')} / {store.run_name}",
            "task_categories": ["text-generation"], "tags": ["zephyr-distill", "synthetic", "sft", "dpo"],
            "size_categories": [_size_category(max(sizes.values(), default=0))]}
    teacher = (recipe.get("teacher") or {}).get("model", "the teacher")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
             f"# {meta['pretty_name']}", "",
             f"Distillation data made by zephyr-distill from run `{store.run_name}`: dialogues written by "
             f"`{teacher}` playing both user and assistant (UltraChat style), and preference pairs rated by it "
             "(UltraFeedback style), in the splits of `HuggingFaceH4/ultrachat_200k` and "
             "`HuggingFaceH4/ultrafeedback_binarized`.", "",
             f"**Licence:** `{options.license}`. Data written by a model is subject to that model's terms of use; "
             "check them (and set `--license`) before you publish.", "", "## Splits", "",
             "| split | rows | columns |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {_columns(name)} |" for name, n in sizes.items()]
    lines += ["", *_split_notes(exported, options), "", "## Endpoints", "", "| role | model | endpoint |",
              "|---|---|---|"]
    lines += [f"| {e['role']} | `{e['model']}` | {e['endpoint']} |" for e in endpoints(recipe)]
    lines += ["", "## Counts per stage", "", *_counts_table(store), "", "## Filters", "", *_filters(recipe, store),
              "", "## Decontamination", "", *_decontamination(recipe, store), "", *_usage(), "",
              "## Recipe", "", "The run's whole recipe (secrets are named there, never stored):", "", "```yaml",
              yaml.safe_dump(_redacted(recipe), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def _columns(split: str) -> str:
    if split.endswith("prefs"):
        return "prompt, prompt_id, chosen, rejected, messages, score_chosen, score_rejected"
    return "prompt, prompt_id, messages"


def _split_notes(exported: Exported, options: ExportOptions) -> list[str]:
    notes = [f"- Train and test are split by `prompt_id` (= sha256 of the prompt): a prompt is in the test splits "
             f"when a hash of its id salted with seed {options.seed} falls below {options.test_share:g}, so a "
             "prompt is never in a train and a test split, and the split is the same at every export.",
             "- `train_sft`/`test_sft`: whole dialogues. `train_gen`/`test_gen`: the same dialogues up to their last "
             "user turn, for a model to answer (rejection sampling, on-policy pairs), as in ultrachat_200k.",
             "- `score_chosen`/`score_rejected` are on ultrafeedback_binarized's 1-10 scale: the teacher's mean "
             "aspect rating (1-5, N/A left out) mapped linearly, 1 -> 1 and 5 -> 10. A prompt can have a pair "
             "per source (pool, on-policy, correction).",
             "- This run's own models were trained on every row, test splits included."]
    for stage, why in exported.left_out.items():
        notes.append(f"- No `train_prefs`/`test_prefs`: {why}." if stage == "feedback" else f"- {stage}: {why}.")
    return notes


def _usage() -> list[str]:
    return ["## Use", "", "```python", "from datasets import load_from_disk", "",
            "ds = load_from_disk(PATH)  # or load_dataset(REPO) once pushed",
            "sft = ds[\"train_sft\"].select_columns([\"messages\"])            # trl.SFTTrainer",
            "dpo = ds[\"train_prefs\"].select_columns([\"chosen\", \"rejected\"])  # trl.DPOTrainer, implicit prompt",
            "```", "",
            "As in alignment-handbook's recipes (`dataset_mixture` ... `columns: [messages]` for SFT, "
            "`[chosen, rejected]` for DPO): TRL reads a string `prompt` column beside message lists as another "
            "format, so select the conversation columns."]


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"
