"""The report's plots, drawn with matplotlib's object API (no pyplot, no global backend state)."""

from __future__ import annotations

import io
import math
from typing import Any

from pipeline.core.store import RunStore

STAGE = "evaluate"
PLOT_FILES = {"scores": "scores.png", "categories": "categories.png", "win_rate": "win_rate.png",
              "dpo_curves": "dpo_curves.png", "pair_scores": "pair_scores.png", "cost_time": "cost_time.png"}


def draw_plots(report: dict[str, Any], raw: dict[str, list[float]], store: RunStore,
               files: dict[str, str]) -> dict[str, str]:
    """Draw every plot the data allows into `<run>/evaluate/`; name -> file name next to report.md."""
    drawers = {"scores": _plot_scores, "categories": _plot_categories, "win_rate": _plot_win_rate,
               "dpo_curves": _plot_dpo_curves, "pair_scores": _plot_pair_scores, "cost_time": _plot_cost_time}
    drawn = {}
    for name, draw in drawers.items():
        fig = draw(report, raw)
        if fig is None:
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        store.write_bytes(store.join(STAGE, files[name]), buf.getvalue())
        drawn[name] = files[name]
    return drawn


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _plot_scores(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    ev = report.get("evaluation")
    models = {k: m for k, m in (ev or {}).get("models", {}).items() if m["judge"]["n"]}
    if not models:
        return None
    truth = {k: m["accuracy"] for k, m in models.items() if m["accuracy"]}
    fig = _figure(2.5 + 1.1 * len(models) * (2 if truth else 1), 3.6)
    axes = fig.subplots(1, 2 if truth else 1, squeeze=False)[0]
    bars = axes[0].bar(list(models), [m["judge"]["mean"] for m in models.values()],
                       yerr=[m["judge"]["stderr"] for m in models.values()], capsize=4, color="#4c72b0")
    axes[0].bar_label(bars, fmt="%.2f", padding=2)
    axes[0].set(ylim=(0, 10.9), title=f"judge score, {ev['eval_set']} (± 1 s.e.)", ylabel="mean rating (1-10)")
    if truth:
        bars = axes[1].bar(list(truth), [a["mean"] for a in truth.values()],
                           yerr=[a["stderr"] for a in truth.values()], capsize=4, color="#55a868")
        axes[1].bar_label(bars, fmt="%.2f", padding=2)
        axes[1].set(ylim=(0, 1.09), title="ground-truth accuracy (± 1 s.e.)", ylabel="share correct")
    return fig


def _plot_categories(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    ev = report.get("evaluation") or {}
    cats = ev.get("categories") or {}
    labels = [k for k, m in (ev.get("models") or {}).items() if m["judge"]["n"]]
    if not cats or not labels:
        return None
    names = list(cats)
    width = 0.8 / len(labels)
    fig = _figure(2.5 + 0.5 * len(names) * len(labels), 3.6)
    ax = fig.subplots()
    for j, label in enumerate(labels):
        stats = [cats[c]["models"][label]["judge"] for c in names]
        ax.bar([i + (j - (len(labels) - 1) / 2) * width for i in range(len(names))],
               [s["mean"] or 0.0 for s in stats], width, yerr=[s["stderr"] or 0.0 for s in stats], capsize=3,
               label=label)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0, ha="right" if len(names) > 4
                  else "center")
    ax.set(ylim=(0, 10.9), ylabel="mean rating (1-10)", title=f"judge score per category, {ev['eval_set']} (± 1 s.e.)")
    ax.legend(fontsize="small", ncols=min(len(labels), 4))
    return fig


def _plot_win_rate(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    ev = report.get("evaluation") or {}
    rows = {k: m["vs_baseline"] for k, m in ev.get("models", {}).items() if m["vs_baseline"] and m["vs_baseline"]["n"]}
    if not rows:
        return None
    fig = _figure(6.4, 1.4 + 0.6 * len(rows))
    ax = fig.subplots()
    bars = ax.barh(list(rows), [v["win_rate"] for v in rows.values()], xerr=[v["stderr"] for v in rows.values()],
                   capsize=4, color="#8172b2", label="raw")
    ax.bar_label(bars, labels=[f"{v['win_rate']:.2f}  (W{v['wins']} T{v['ties']} L{v['losses']})"
                               for v in rows.values()], padding=6)
    controlled = [(i, v["length_controlled"]["win_rate"]) for i, v in enumerate(rows.values())
                  if (v.get("length_controlled") or {}).get("win_rate") is not None]
    if controlled:
        ax.scatter([w for _, w in controlled], [i for i, _ in controlled], marker="D", color="#ccb974", zorder=3,
                   edgecolor="black", label="length-controlled")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="even (0.5)")
    ax.axvline(ev["promote_min_win_rate"], color="#c44e52", linestyle=":", linewidth=1.5,
               label=f"promotion threshold ({ev['promote_min_win_rate']:g})")
    ax.set(xlim=(0, 1.3), xlabel="win rate = (wins + ties/2) / n", title=f"pairwise win rate vs {ev['baseline']} "
           "(both orders, ± 1 s.e.)")
    ax.legend(loc="lower right", fontsize="small")
    return fig


def _plot_dpo_curves(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    curves = {k: v for k, v in ((report.get("training") or {}).get("dpo") or {}).get("curves", {}).items() if v}
    if not curves:
        return None
    fig = _figure(3.6 * len(curves), 3.2)
    for ax, (key, points) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items(), strict=True):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", color="#dd8452")
        ax.set(title=f"DPO {key}", xlabel="step")
        ax.grid(alpha=0.3)
    return fig


def _plot_pair_scores(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    if not raw.get("score_chosen"):
        return None
    values = raw["score_chosen"] + raw["score_rejected"]
    low, high = math.floor(min(values)), math.ceil(max(values))
    bins = [low + i * 0.25 for i in range(int((high - low) / 0.25) + 2)]
    fig = _figure(6.0, 3.4)
    ax = fig.subplots()
    ax.hist(raw["score_chosen"], bins=bins, alpha=0.6, label="chosen", color="#55a868")
    ax.hist(raw["score_rejected"], bins=bins, alpha=0.6, label="rejected", color="#c44e52")
    ax.set(title=f"feedback pair scores ({len(raw['score_chosen'])} pairs)", xlabel="teacher score", ylabel="pairs")
    ax.legend()
    return fig


def _plot_cost_time(report: dict[str, Any], raw: dict[str, list[float]]) -> Any:
    rows = report.get("stages") or []
    if not any(r["seconds"] or r["cost_usd"] for r in rows):
        return None
    fig = _figure(8.0, 3.2)
    left, right = fig.subplots(1, 2)
    names = [r["stage"] for r in rows]
    left.barh(names, [r["seconds"] for r in rows], color="#4c72b0")
    left.set(title="time per stage", xlabel="seconds")
    left.invert_yaxis()
    if report["totals"]["cost_usd"] > 0:
        right.barh(names, [r["cost_usd"] for r in rows], color="#dd8452")
        right.set(title=f"teacher cost per stage (total ${report['totals']['cost_usd']:.4f})", xlabel="USD")
    else:  # no prices in the recipe (a local teacher): the tokens are what was spent
        right.barh(names, [r["teacher_tokens"] for r in rows], color="#dd8452")
        right.set(title="teacher tokens per stage (no prices set)", xlabel="prompt + completion tokens")
    right.invert_yaxis()
    return fig
