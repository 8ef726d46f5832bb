"""The review report: judge–person agreement with its standard error (overall and by pair source), and the
position and length preferences of the person against the judge's on the same pairs."""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from pipeline.core.store import RunStore
from pipeline.review.answers import read_review, review_path


def share(hits: int, n: int) -> dict[str, Any]:
    """k of n with the share and its binomial standard error, sqrt(p (1 - p) / n); None where n is 0."""
    p = hits / n if n else None
    return {"k": hits, "n": n, "share": None if p is None else round(p, 4),
            "stderr": None if p is None else round(math.sqrt(p * (1 - p) / n), 4)}


def _answered(review: dict[str, Any]) -> list[dict[str, Any]]:
    """The items the person kept (agree or swap): agreement and preferences are over these."""
    return [i for i in review["items"] if i["verdict"] in ("agree", "swap")]


def preferences(items: list[dict[str, Any]]) -> dict[str, Any]:
    """How often the person and the judge picked the left answer (A) and the longer one (by characters, over
    pairs whose answers differ in length): a fair pick of a randomly placed answer is near 0.5 on position."""
    person = {i["number"]: i["answer"] for i in items}
    judge = {i["number"]: i["judge_pick"] for i in items}
    longer = {i["number"]: "A" if len(i["a"]) > len(i["b"]) else "B" for i in items if len(i["a"]) != len(i["b"])}
    return {
        "position": {"person_picks_a": share(sum(a == "A" for a in person.values()), len(items)),
                     "judge_picks_a": share(sum(a == "A" for a in judge.values()), len(items))},
        "length": {"person_picks_longer": share(sum(person[n] == side for n, side in longer.items()), len(longer)),
                   "judge_picks_longer": share(sum(judge[n] == side for n, side in longer.items()), len(longer))},
    }


def review_report(review: dict[str, Any], feedback_report: dict[str, Any] | None = None) -> dict[str, Any]:
    """report.json of a recorded review (answered or timed out)."""
    verdicts = [i["verdict"] for i in review["items"]]
    kept = _answered(review)
    by_source: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in kept:
        by_source[item["source"]].append(item)
    first = ((feedback_report or {}).get("first_position_advantage") or {}).get("all")
    return {
        "round": review["round"], "status": review["status"], "by": review["by"],
        "reviewed": len(review["items"]), "pairs_total": review["pairs_total"],
        "agree": verdicts.count("agree"), "swap": verdicts.count("swap"), "drop": verdicts.count("drop"),
        "agreement": share(verdicts.count("agree"), len(kept)),
        "agreement_by_source": {s: share(sum(i["verdict"] == "agree" for i in rows), len(rows))
                                for s, rows in sorted(by_source.items())},
        **preferences(kept),
        "judge_first_position_advantage": first,  # from feedback's report: the judge's bias in its own requests
    }


def _pct(s: dict[str, Any]) -> str:
    return "–" if s["share"] is None else f"{s['k']}/{s['n']} = {s['share']:.2f} ± {s['stderr']:.2f}"


def report_markdown(report: dict[str, Any], review: dict[str, Any]) -> str:
    """report.md: the numbers, then every reviewed pair with the judge's scores, now that it is answered."""
    lines = [f"# Review of round {report['round']}'s pairs", "",
             f"{report['reviewed']} of {report['pairs_total']} pairs, reviewed by {report['by']}."]
    if report["status"] != "answered":
        lines += ["", f"Nobody answered within {review.get('waited_s')} s: dpo trains on the judge's pairs as "
                      "they are (feedback.review.on_timeout: continue)."]
        return "\n".join(lines) + "\n"
    lines += ["", f"- judge–person agreement: **{_pct(report['agreement'])}** (± one standard error); "
                  f"{report['swap']} swapped, {report['drop']} dropped", ""]
    lines += ["| | share |", "|---|---|"]
    lines += [f"| agreement, {source} pairs | {_pct(s)} |" for source, s in report["agreement_by_source"].items()]
    lines += [f"| person picks the left answer (A) | {_pct(report['position']['person_picks_a'])} |",
              f"| judge's pick is the left answer | {_pct(report['position']['judge_picks_a'])} |",
              f"| person picks the longer answer | {_pct(report['length']['person_picks_longer'])} |",
              f"| judge picks the longer answer | {_pct(report['length']['judge_picks_longer'])} |"]
    if report["judge_first_position_advantage"] is not None:
        lines += ["", f"The judge's first-position advantage in its own rating requests (feedback report): "
                      f"{report['judge_first_position_advantage']:+.2f}."]
    lines += ["", "| pair | source | prompt | A | B | judge scores A / B | person | verdict | note |",
              "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {i['number']} | {i['source']} | {_cell(i['prompt'])} | {_cell(i['a'])} | {_cell(i['b'])} | "
              f"{i['score_a']} / {i['score_b']} | {i['answer']} | {i['verdict']} | {_cell(i['note'])} |"
              for i in review["items"]]
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 120) -> str:
    text = str(text or "").replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit] + "…"


def write_report(store: RunStore, review: dict[str, Any]) -> dict[str, Any]:
    """report.json and report.md next to the review's answers."""
    report = review_report(review, store.read_json(store.join("feedback", "report.json")))
    store.write_json(review_path(store, "report.json"), report)
    store.write_bytes(review_path(store, "report.md"), report_markdown(report, review).encode())
    return report


def status_line(store: RunStore) -> str | None:
    """`distill status`'s line for the round's review (`store` is its view); None when it has none."""
    review, label = read_review(store), f"review (round {store.round})"
    if review is None:
        waiting = store.read_json(review_path(store, "waiting.json"))
        if waiting:
            return f"{label}: waiting for answers in the Prefect UI, flow run {waiting['flow_run_id']}"
        form = review_path(store, "form.yaml")
        return f"{label}: waiting for answers in {form}" if store.fs.exists(form) else None
    if review["status"] != "answered":
        return f"{label}: nobody answered {len(review['items'])} pairs in time; dpo trains on the judge's pairs"
    report = review_report(review)
    return (f"{label}: {report['reviewed']} pairs, judge–person agreement {_pct(report['agreement'])}, "
            f"{report['swap']} swapped, {report['drop']} dropped")
