"""What a preview shows, read back from its store: dialogues, pool answers with their ratings, preference pairs
and judge verdicts (the first n of each), and what the preview paid beside the full run's estimate."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.core.recipe import Recipe, recipe_from_dict
from pipeline.core.sources import iter_prompts
from pipeline.run.estimate import estimate
from pipeline.run.preview import LABEL, PreviewStore
from pipeline.run.registry import STAGE_NAMES
from pipeline.teacher.spend import spend_summary


@dataclass(frozen=True)
class DialogueItem:
    prompt: str
    outcome: str  # the rounds and what ended the dialogue, or why the prompt was dropped or failed
    turns: list[tuple[str, str]]  # (role, text); none for a dropped or failed prompt


@dataclass(frozen=True)
class AnswerItem:
    prompt: str
    model: str
    text: str
    ratings: dict[str, float | None]  # aspect -> mean over the orders and raters that rated it (None: N/A)
    score: float | None  # the answer's score, which the pairs are drawn by


@dataclass(frozen=True)
class PairItem:
    prompt: str
    source: str  # pool, correction, on_policy
    chosen_model: str
    chosen: str
    score_chosen: float | None
    rejected_model: str
    rejected: str
    score_rejected: float | None


@dataclass(frozen=True)
class VerdictItem:
    question: str
    model: str
    baseline: str
    model_answer: str
    baseline_answer: str
    verdicts: tuple[str, str]  # the judge's verdict with the model's answer shown first (A), then second (B)
    outcome: str  # who won: a win needs both orders to agree, anything else is a tie
    grades: dict[str, float | None]  # the judge's 1-10 grade of each answer (first turn)


@dataclass
class PreviewItems:
    """The first n items of each kind and how many the preview made of each."""

    dialogues: list[DialogueItem] = field(default_factory=list)
    answers: list[AnswerItem] = field(default_factory=list)
    pairs: list[PairItem] = field(default_factory=list)
    verdicts: list[VerdictItem] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)

    def total(self, kind: str) -> int:
        """How many items of a kind the preview made (for dialogues: the prompts, each with a dialogue or why not)."""
        return self.totals.get("prompts" if kind == "dialogues" else kind, 0)

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """One kind's items as flat rows (a Prefect table artifact)."""
        return [{k: _flat(v) for k, v in asdict(item).items()} for item in getattr(self, kind)]


KINDS = ("dialogues", "answers", "pairs", "verdicts")


def _flat(value: Any) -> Any:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_num(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return " | ".join(": ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    return value


def _num(value: float | None) -> str:
    return "N/A" if value is None else f"{value:g}"


def preview_items(store: PreviewStore, trimmed: Recipe, n: int) -> PreviewItems:
    """The first n prompts' dialogues (or why a prompt has none), pool answers (with their ratings), pairs and
    verdicts the preview wrote."""
    dialogues = list(store.read_records("generate"))
    answers = list(store.read_records("sample", "completions"))
    pairs = list(store.read_records("feedback", "pairs"))
    verdicts = list(store.read_records("evaluate", "pairwise"))
    prompts = simulated(store, trimmed, dialogues)
    return PreviewItems(
        dialogues=prompts[:n],
        answers=rated_answers(store, by_prompt(answers)[:n]),
        pairs=[PairItem(r["prompt"], r["source"], r["chosen_model"], r["chosen"][-1]["content"], r["score_chosen"],
                        r["rejected_model"], r["rejected"][-1]["content"], r["score_rejected"]) for r in pairs[:n]],
        verdicts=judged(store, verdicts, n),
        totals={"prompts": len(prompts), "dialogues": len(dialogues), "answers": len(answers), "pairs": len(pairs),
                "verdicts": len(verdicts)})


def simulated(store: PreviewStore, trimmed: Recipe, dialogues: list[dict[str, Any]]) -> list[DialogueItem]:
    """Every prompt's dialogue in prompt order; a prompt a filter dropped or that failed, with the reason."""
    made = {r["prompt_id"]: r for r in dialogues}
    lost = {**{f.item_id: f"failed: {f.reason}" for f in store.ledger("generate").entries()},
            **{f.item_id: f"dropped: {f.reason}" for f in store.ledger("generate", "dropped").entries()}}
    items = []
    for seed in iter_prompts(trimmed.prompts, trimmed.task):
        if (r := made.get(seed.prompt_id)) is not None:
            rounds = f"{r['rounds']} round" + "s" * (r["rounds"] != 1)
            items.append(DialogueItem(seed.prompt, f"{rounds}, ended by {r['stop_reason']}",
                                      [(m["role"], m["content"]) for m in r["messages"]]))
        elif seed.prompt_id in lost:
            items.append(DialogueItem(seed.prompt, lost[seed.prompt_id], []))
    return items


def by_prompt(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answers grouped by prompt (in prompt order), each prompt's in pool order: the answers rated together."""
    prompts = {pid: i for i, pid in reversed(list(enumerate(a["prompt_id"] for a in answers)))}
    models = {m: i for i, m in reversed(list(enumerate(a["model"] for a in answers)))}
    return sorted(answers, key=lambda a: (prompts[a["prompt_id"]], models[a["model"]]))


def rated_answers(store: PreviewStore, answers: list[dict[str, Any]]) -> list[AnswerItem]:
    """Pool answers with each aspect's rating (the mean over orders shown and raters) and their score."""
    wanted = {a["completion_id"] for a in answers}
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    scores: dict[str, float | None] = {}
    for r in store.read_records("feedback", "ratings", columns=["completion_id", "source", "aspect", "rating",
                                                                 "score"]):
        if r["completion_id"] in wanted and r["source"] == "pool":
            aspect = values[r["completion_id"]][r["aspect"]]
            aspect += [] if r["rating"] is None else [r["rating"]]
            scores[r["completion_id"]] = r["score"]
    return [AnswerItem(a["prompt"], a["model"], a["completion"],
                       {k: sum(v) / len(v) if v else None for k, v in values[a["completion_id"]].items()},
                       scores.get(a["completion_id"])) for a in answers]


def judged(store: PreviewStore, verdicts: list[dict[str, Any]], n: int) -> list[VerdictItem]:
    """n pairwise verdicts, those between different answers first (identical answers are not sent to the
    judge), with both answers and the judge's grade of each."""
    shown = sorted(verdicts, key=lambda v: bool(v["identical"]))[:n]
    answers = {(r["item_id"], r["model"]): r for r in store.read_records("evaluate", "answers")}
    grades = {(r["item_id"], r["model"]): r["rating"] for r in store.read_records("evaluate", "single")
              if r["turn"] == 1}
    items = []
    for v in shown:
        mine, theirs = answers[(v["item_id"], v["model"])], answers[(v["item_id"], v["baseline"])]
        outcome = {1.0: f"{v['model']} wins", 0.0: f"{v['baseline']} wins"}.get(v["score"], "tie")
        items.append(VerdictItem(mine["turns"][0], v["model"], v["baseline"], mine["answers"][0],
                                 theirs["answers"][0], (v["verdict_first"], v["verdict_second"]),
                                 "identical answers" if v["identical"] else outcome,
                                 {m: grades.get((v["item_id"], m)) for m in (v["model"], v["baseline"])}))
    return items


def spend_beside_estimate(store: PreviewStore, recipe: Recipe, trimmed: Recipe) -> list[dict[str, Any]]:
    """Per stage: the full run's estimate (`distill estimate`), the preview's own estimate and what the preview
    paid (requests, cache hits, dollars) from the run's spend ledger; a `total` row last."""
    full, mine = estimate(recipe), estimate(trimmed)
    paid = spend_summary(store)["stages"]
    rows = []
    for stage in STAGE_NAMES:
        spent = paid.get(f"{LABEL}:{stage}", {})
        rows.append({"stage": stage, "full_requests": full["stages"][stage]["requests"],
                     "full_usd": full["stages"][stage]["usd"], "estimated_requests": mine["stages"][stage]["requests"],
                     "estimated_usd": mine["stages"][stage]["usd"], "paid_requests": spent.get("requests", 0),
                     "cached": spent.get("cached", 0), "paid_usd": spent.get("usd", 0.0)})
    rows.append({"stage": "total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "stage"}})
    return rows


def preview_items_and_spend(store: PreviewStore, recipe: Recipe, n: int) -> tuple[PreviewItems, list[dict[str, Any]]]:
    """Everything a preview shows, from its store: the items and the spend beside the estimate."""
    trimmed = recipe_from_dict(store.read_manifest()["recipe"], origin=f"<preview of run {store.run_name}>")
    return preview_items(store, trimmed, n), spend_beside_estimate(store, recipe, trimmed)

