"""report.md: the run report as markdown, from report.json's data (evaluation first, then training, pairs, cost)."""

from __future__ import annotations

from typing import Any


def pm(stat: dict[str, Any] | None, digits: int = 2) -> str:
    """`mean ± stderr`, or a dash when there is no number."""
    if not stat or stat.get("mean") is None:
        return "–"
    return f"{stat['mean']:.{digits}f} ± {stat['stderr']:.{digits}f}"


def render_markdown(report: dict[str, Any], images: dict[str, str] | None = None) -> str:
    """report.md: the evaluation table first, then training, pairs, cost and time, the plots.

    `images` maps a plot to what the image link points at (default: the PNG next to report.md)."""
    lines = [f"# Run report: {report['run']}", ""]
    ev = report.get("evaluation")
    if ev:
        lines += _evaluation_lines(ev, report.get("promotion"))
    lines += _training_lines(report)
    pairs = report.get("pairs")
    if pairs:
        lines += ["## Preference pairs", "", f"{pairs['count']} pairs; score chosen {pm(pairs['score_chosen'])}, "
                  f"rejected {pm(pairs['score_rejected'])}, margin {pm(pairs['margin'])}.", ""]
    if report.get("parsing"):
        from pipeline.teacher.structured import describe

        lines += ["## Rater and judge replies (mode, parse rate at the first attempt and overall)", "",
                  *[f"- {role}: {describe(tally)}" for role, tally in report["parsing"].items()], ""]
    lines += ["## Cost and time per stage", "", "| stage | status | items | failures | teacher tokens | cost $ | time s |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stage']} | {r['status']} | {r['items']} | {r['failures']} | {r['teacher_tokens']} | "
              f"{r['cost_usd']:.4f} | {r['seconds']:.1f} |" for r in report["stages"]]
    lines += [f"| total | | | | | {report['totals']['cost_usd']:.4f} | {report['totals']['seconds']:.1f} |", ""]
    if report.get("plots"):
        links = images or report["plots"]
        lines += ["## Plots", ""] + [f"![{name}]({links[name]})" for name in report["plots"] if name in links] + [""]
    if report["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    return "\n".join(lines)


def _evaluation_lines(ev: dict[str, Any], promo: dict[str, Any] | None) -> list[str]:
    baseline = ev["baseline"] + (f" (the set's outputs, by {ev['outputs_generator']})"
                                 if ev.get("outputs_generator") and ev["baseline_spec"] == "outputs" else "")
    lines = [f"Evaluation set **{ev['eval_set']}**: {ev['items']} prompts, {ev['turns']} turns; judge "
             f"`{ev['judge']}`; baseline **{baseline}**"
             + ("; ground truth by the set's checker." if ev["ground_truth"] else "."), ""]
    if ev["requested_items"] > ev["items"]:
        lines += [f"({ev['requested_items']} prompts asked for; the set has only {ev['items']}.)", ""]
    lines += ["| model | judge score (1-10) | accuracy | win rate vs baseline | length-controlled | W / T / L | failed |",
              "|---|---|---|---|---|---|---|"]
    for label, m in ev["models"].items():
        vs = m["vs_baseline"]
        wtl = f"{vs['wins']} / {vs['ties']} / {vs['losses']}" if vs else "(baseline)"
        rate = pm({"mean": vs["win_rate"], "stderr": vs["stderr"]}, 3) if vs else "–"
        lc = vs.get("length_controlled") if vs else None
        lc_text = pm({"mean": lc["win_rate"], "stderr": lc["stderr"]}, 3) if lc else "–"
        nfail = m["answer_failures"] + m["judge"]["failed"] + (vs["failed"] if vs else 0)
        lines.append(f"| {label} | {pm(m['judge'])} | {pm(m['accuracy'], 3)} | {rate} | {lc_text} | {wtl} | {nfail} |")
    lines += ["", "± is one standard error. Pairwise verdicts are judged in both orders; disagreement is a tie; "
              "win rate = (wins + ties/2) / n. The length-controlled win rate (AlpacaEval 2) is a logistic "
              "regression of the outcome on the length difference, read at zero difference.", ""]
    lines += _category_lines(ev) + _bias_lines(ev.get("judge_bias"))
    agree = ev.get("judge_vs_truth")
    if agree:
        lines += [f"Judge vs ground truth: mean rating {num(agree['mean_rating_correct'])} for correct answers, "
                  f"{num(agree['mean_rating_wrong'])} for wrong ones; the judge "
                  f"{'agrees' if agree['agree'] else 'DISAGREES'} in direction with the ground truth.", ""]
    if promo:
        lines += [f"Promotion gate: **{'promote' if promo['promote'] else 'keep the current model'}** "
                  f"({promo['reason']}).", ""]
    return lines


def _category_lines(ev: dict[str, Any]) -> list[str]:
    """Judge score, accuracy and win rate per category and model, for sets with several categories."""
    cats = ev.get("categories") or {}
    if len(cats) < 2:
        return []
    labels = list(ev["models"])
    lines = ["### Per category", "", "Judge score (1-10) ± s.e.; accuracy and win rate vs baseline where there are "
             "some.", "", "| category | items | " + " | ".join(labels) + " |", "|---" * (len(labels) + 2) + "|"]
    for cat, row in cats.items():
        cells = []
        for label in labels:
            m = row["models"][label]
            bits = [pm(m["judge"])]
            if m["accuracy"]:
                bits.append(f"acc {pm(m['accuracy'])}")
            if m["win_rate"]:
                bits.append(f"win {pm(m['win_rate'])}")
            cells.append("<br>".join(bits))
        lines.append(f"| {cat} | {row['items']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _bias_lines(bias: dict[str, Any] | None) -> list[str]:
    if not bias or not bias["pairs"]:
        return []
    return ["### The judge's own biases", "",
            f"- Position consistency: {share(bias['flip_share'])} of {bias['pairs']} comparisons flip when the "
            "order of the answers is swapped (MT-Bench's GPT-4: about 13 %).",
            f"- The answer shown first wins {share(bias['first_shown_win_share'])} of "
            f"{bias['decisive_verdicts']} decisive verdicts (unbiased: 50 %).",
            f"- The longer answer wins {share(bias['longer_win_share'])} of {bias['decided_with_length_difference']} "
            "decided comparisons of answers of different length (MT-Bench's GPT-4: about 68 %).", ""]


def share(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def _training_lines(report: dict[str, Any]) -> list[str]:
    training = report.get("training") or {}
    if not training:
        return []
    lines = ["## Training", "", "| stage | steps | final loss | reward margin | reward accuracy |", "|---|---|---|---|---|"]
    for stage, t in training.items():
        f = t["final"]
        lines.append(f"| {stage} | {t['global_step']} | {num(f.get('loss'))} | {num(f.get('rewards/margins'))} | "
                     f"{num(f.get('rewards/accuracies'))} |")
    return lines + [""]


def num(value: Any, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"
