"""The review as a file a person fills in, for runs without Prefect (`distill review RUN`): one YAML entry per
drawn pair with its prompt and both answers; the person sets each `answer` to A, B or drop."""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.core.store import RunStore
from pipeline.review.answers import ReviewError, normalize_answer, review_path
from pipeline.review.sample import ReviewItem


class _FormDumper(yaml.SafeDumper):
    """Multi-line prompts and answers as `|` blocks, readable and editable as they are."""


_FormDumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                                 style="|" if "\n" in s else None))


def form_path(store: RunStore) -> str:
    return review_path(store, "form.yaml")


def form_text(items: list[ReviewItem], store: RunStore, pairs_total: int,
              review: dict[str, Any] | None = None) -> str:
    """The form for `items`, prefilled with a recorded review's answers (to change them) where there is one."""
    recorded = {i["pair_id"]: i for i in (review or {}).get("items", []) if i.get("answer")}
    entries = [{"pair": i.number, "id": i.pair_id, "prompt": i.prompt, "A": i.a, "B": i.b,
                "answer": recorded.get(i.pair_id, {}).get("answer"), "note": recorded.get(i.pair_id, {}).get("note", "")}
               for i in items]
    body = yaml.dump({"pairs": entries}, Dumper=_FormDumper, sort_keys=False, allow_unicode=True, width=110)
    body = body.replace("  answer: null\n", "  answer:            # A, B or drop\n")
    header = [f"# Review of run {store.run_name}, round {store.round}: {len(items)} of {pairs_total} pairs drawn at "
              "random (feedback.review).",
              "# For each pair set `answer` to A (A is the better answer), B (B is better) or drop (neither should",
              "# train); a note is optional. The judge's scores show in the review report once this is recorded.",
              f"# Record it with: distill review {store.url}" + (f" --round {store.round}" if store.round > 1 else "")]
    return "\n".join(header) + "\n" + body


def parse_form(text: str, origin: str, items: list[ReviewItem]) -> dict[int, tuple[str, str]]:
    """{pair number: (answer, note)} for the answered pairs of a filled-in form; errors name the form and pair."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ReviewError(f"{origin}: not valid YAML ({exc})") from None
    entries = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ReviewError(f"{origin}: expected a `pairs:` list as `distill review` writes it")
    drawn = {i.number: i for i in items}
    answers: dict[int, tuple[str, str]] = {}
    for n, entry in enumerate(entries, start=1):
        number = entry.get("pair") if isinstance(entry, dict) else None
        if number not in drawn:
            raise ReviewError(f"{origin}: pairs[{n}]: `pair: {number}` is not one of the {len(items)} drawn pairs")
        if entry.get("id") != drawn[number].pair_id:
            raise ReviewError(f"{origin}: pair {number}: id {entry.get('id')} is not the pair drawn for this review "
                              f"({drawn[number].pair_id}); the form is for other pairs: delete it and run "
                              "`distill review` again")
        if entry.get("answer") in (None, ""):
            continue
        answer = normalize_answer(entry["answer"])
        if answer is None:
            raise ReviewError(f"{origin}: pair {number}: answer '{entry['answer']}' is not one of A, B, drop")
        answers[number] = (answer, str(entry.get("note") or ""))
    return answers
