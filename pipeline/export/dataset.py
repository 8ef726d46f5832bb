"""A run's data as one `datasets.DatasetDict` with the split names people know: `train_sft`, `test_sft`,
`train_gen`, `test_gen` (ultrachat_200k's: prompt, prompt_id, messages) from generate and `train_prefs`,
`test_prefs` (ultrafeedback_binarized's columns) from feedback, saved with `save_to_disk` (and pushed when asked)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.core.arrow import MESSAGES, schema
from pipeline.core.rounds import round_store, split_key
from pipeline.core.store import RunStore
from pipeline.export.card import dataset_card
from pipeline.export.splits import Exported, ExportOptions, split_name

SFT_SCHEMA = schema(("prompt", pa.string()), ("prompt_id", pa.string()), ("messages", MESSAGES))
PREFS_SCHEMA = schema(("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", MESSAGES),
                      ("rejected", MESSAGES), ("messages", MESSAGES), ("score_chosen", pa.float64()),
                      ("score_rejected", pa.float64()))
ROUND_PREFS_SCHEMA = PREFS_SCHEMA.append(pa.field("round", pa.int64()))
SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen", "train_prefs", "test_prefs")


class ExportError(ValueError):
    """A run that cannot be exported as asked; the message names the run, the stage or the argument."""


def to_ultrafeedback_scale(score: float | None) -> float | None:
    """The feedback score (mean aspect rating, 1-5) on ultrafeedback_binarized's 1-10 scale: 1 -> 1, 5 -> 10."""
    return None if score is None else 1.0 + (float(score) - 1.0) * 9.0 / 4.0


def generation_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A dialogue up to its last user turn, for a model to answer (the `gen` splits, as in ultrachat_200k)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [{"content": m["content"], "role": m["role"]} for m in messages[:last_user + 1]]


def _completed(store: RunStore, stage: str) -> str | None:
    """None when the stage completed, else why its data is not exported."""
    state = store.stage_state(stage)
    return None if state.status == "completed" else f"the {stage} stage of this run is {state.status}"


def collect(store: RunStore, options: ExportOptions) -> Exported:
    """Every exported row, by split, sorted by prompt id (the order the teacher answered in is not reproducible)."""
    problem = _completed(store, "generate")
    if problem:
        raise ExportError(f"{store.url}: {problem}; export needs its dialogues (run `distill stage generate`)")
    out = Exported({name: [] for name in SPLITS}, ["generate"], rounds=options.rounds)
    for r in sorted(store.read_records("generate", columns=["prompt", "prompt_id", "messages"]),
                    key=lambda r: r["prompt_id"]):
        messages = [{"content": m["content"], "role": m["role"]} for m in r["messages"]]
        row = {"prompt": r["prompt"], "prompt_id": r["prompt_id"], "messages": messages}
        out.splits[split_name("sft", r["prompt_id"], options.test_share, options.seed)].append(row)
        out.splits[split_name("gen", r["prompt_id"], options.test_share, options.seed)].append(
            {**row, "messages": generation_messages(messages)})
    problem = _completed(store, "feedback")
    if problem:
        out.left_out["feedback"] = problem
        return out
    out.stages.append("feedback")
    for round_, rows in round_pairs(store, options.rounds):
        for r in rows:
            row = {k: r[k] for k in PREFS_SCHEMA.names} | ({"round": round_} if options.rounds else {})
            row.update(score_chosen=to_ultrafeedback_scale(r["score_chosen"]),
                       score_rejected=to_ultrafeedback_scale(r["score_rejected"]))
            out.splits[split_name("prefs", r["prompt_id"], options.test_share, options.seed)].append(row)
    return out


def round_pairs(store: RunStore, rounds: bool) -> list[tuple[int, list[dict[str, Any]]]]:
    """(round, its pairs sorted by prompt and pair id) for round 1, and with `rounds` for every later round whose
    feedback completed."""
    found = []
    for round_ in sorted({split_key(key)[1] for key in store.stage_names()} | {1} if rounds else {1}):
        view = round_store(store, round_)
        if round_ > 1 and view.stage_state("feedback").status != "completed":
            continue
        rows = view.read_records("feedback", "pairs", columns=["pair_id", *PREFS_SCHEMA.names])
        found.append((round_, sorted(rows, key=lambda r: (r["prompt_id"], r["pair_id"]))))
    return found


def dataset_dict(exported: Exported) -> Any:
    """The DatasetDict, each split with its declared features (an empty split keeps its columns)."""
    import datasets

    dd = datasets.DatasetDict()
    for name, rows in exported.splits.items():
        kind = name.rsplit("_", 1)[1]
        if kind == "prefs" and "feedback" not in exported.stages:
            continue
        arrow = SFT_SCHEMA if kind in ("sft", "gen") else ROUND_PREFS_SCHEMA if exported.rounds else PREFS_SCHEMA
        dd[name] = datasets.Dataset.from_list(rows, features=datasets.Features.from_arrow_schema(arrow))
    return dd


def export_run(store: RunStore, out: str, options: ExportOptions, overwrite: bool = False) -> tuple[Any, str]:
    """Write the DatasetDict and its README.md card to `out` (a path or an fsspec URL); (dataset dict, card)."""
    if not 0 <= options.test_share < 1:
        raise ExportError(f"--test-share {options.test_share}: give a share of prompts in [0, 1)")
    exported = collect(store, options)
    dd = dataset_dict(exported)
    card = dataset_card(store, exported, options)
    if "://" in out:
        _write_remote(dd, card, out, overwrite)
    else:
        _write_local(dd, card, Path(out), overwrite)
    return dd, card


def _write_local(dd: Any, card: str, out: Path, overwrite: bool) -> None:
    """Build next to `out` and rename into place, so `out` is whole or absent, never half-written."""
    if out.exists() and not overwrite:
        raise ExportError(f"{out} exists; choose another directory or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        dd.save_to_disk(str(tmp))
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_remote(dd: Any, card: str, out: str, overwrite: bool) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    if fs.exists(path) and not overwrite:
        raise ExportError(f"{out} exists; choose another location or pass --overwrite")
    dd.save_to_disk(out)
    fs.pipe_file(f"{path.rstrip('/')}/README.md", card.encode("utf-8"))  # the card last: it marks a whole export


def push_to_hub(dd: Any, card: str, repo: str, private: bool) -> str:
    """Push the splits and the card to a Hugging Face dataset repository (the token comes from HF_TOKEN or the
    hub login, never from an argument); the repository's URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo, repo_type="dataset", private=private, exist_ok=True)
    # the card first: datasets' push_to_hub keeps a README's text and adds the splits' metadata to it
    api.upload_file(path_or_fileobj=card.encode("utf-8"), path_in_repo="README.md", repo_id=repo,
                    repo_type="dataset", commit_message="zephyr-distill: dataset card")
    dd.push_to_hub(repo, private=private, commit_message="zephyr-distill: splits")
    return str(url)


def check_hub_target(repo: str) -> None:
    """Refuse a push that cannot happen before anything is written: a malformed repo id, or offline mode."""
    from huggingface_hub import constants
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo.count("/") != 1:
        raise ExportError(f"--push-to-hub '{repo}': expected a dataset repository as OWNER/NAME")
    try:
        validate_repo_id(repo)
    except HFValidationError as exc:
        raise ExportError(f"--push-to-hub '{repo}': not a valid repository id ({exc})") from None
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ExportError(f"--push-to-hub '{repo}': HF_HUB_OFFLINE is set, so nothing can be pushed; unset it "
                          "or export without --push-to-hub")
