"""The figures of ``factory report``: plain matplotlib, one function per figure.

Each function takes numbers already counted by factory/report.py and returns a Figure; ``png``
renders it. Figures use matplotlib's object API on an Agg canvas, never pyplot: no global state,
no display, and nothing here runs until a report is built (the CLI imports this lazily).
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

WIDE = (11, 4)
SINGLE = (7, 4)


def png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def label(text: str) -> str:
    # matplotlib reads text between two '$' as TeX math; user text (principle ids, words) is shown as written.
    return text.replace("$", r"\$")


def _whole(axis) -> None:
    """Ticks at whole numbers only, for counts, steps and epochs."""
    axis.set_major_locator(MaxNLocator(integer=True))


def _legend(ax, **kwargs) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty legend only warns
        ax.legend(**kwargs)


def _barh(ax, counts: Sequence[tuple[str, int]], title: str, xlabel: str = "count") -> None:
    """Horizontal bars, the largest on top."""
    names = [label(n) for n, _ in counts][::-1]
    values = [v for _, v in counts][::-1]
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), names, fontsize=8)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    _whole(ax.xaxis)


def stage_counts(counts: dict[str, tuple[str, int]]) -> Figure:
    """counts: stage -> (what it makes, how many)."""
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    bars = ax.bar([f"{stage}\n({what})" for stage, (what, _) in counts.items()], [n for _, n in counts.values()],
                  color="tab:blue")
    ax.bar_label(bars)
    ax.set_title("records written per stage")
    ax.set_ylabel("records")
    _whole(ax.yaxis)
    return fig


def rejections(by_stage: dict[str, Counter[str]]) -> Figure:
    rows = [(f"{stage}: {reason}", n) for stage, c in by_stage.items() for reason, n in c.most_common()]
    fig = Figure(figsize=(8, 1.2 + 0.3 * len(rows)))
    _barh(fig.add_subplot(), rows, "rejected items by stage and reason")
    return fig


def instruction_length(new: list[int], seeds: list[int] | None) -> Figure:
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    top = max(new + (seeds or []) + [1])
    bins = range(0, top + 2, max(1, (top + 1) // 30))
    # density: a few dozen new instructions and a few hundred seeds compare by shape
    ax.hist(new, bins=bins, density=True, color="tab:blue", alpha=0.8, label=f"new instructions ({len(new)})")
    if seeds:
        ax.hist(seeds, bins=bins, density=True, histtype="step", color="black", linewidth=1.5,
                label=f"seed instructions ({len(seeds)})")
    ax.set_title("instruction length")
    ax.set_xlabel("words")
    ax.set_ylabel("share of instructions")
    _legend(ax)
    return fig


def seed_similarity(best: list[float], mean: list[float], threshold: float | None) -> Figure:
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    bins = [i / 40 for i in range(41)]
    ax.hist(best, bins=bins, color="tab:blue", alpha=0.8, label="highest F1 against any seed")
    ax.hist(mean, bins=bins, histtype="step", color="black", linewidth=1.5, label="mean F1 over the seeds")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"dedup threshold {threshold}")
    ax.set_title("ROUGE-L similarity of new instructions to the seed instructions")
    ax.set_xlabel("ROUGE-L F1")
    ax.set_ylabel("instructions")
    _whole(ax.yaxis)
    _legend(ax)
    return fig


def verbs(top_verbs: list[tuple[str, int]], top_pairs: list[tuple[str, int]]) -> Figure:
    fig = Figure(figsize=(11, 1.5 + 0.25 * max(len(top_verbs), len(top_pairs))))
    _barh(fig.add_subplot(1, 2, 1), top_verbs, "leading verbs", "instructions")
    _barh(fig.add_subplot(1, 2, 2), top_pairs, "verb + object", "instructions")
    return fig


def principles(panels: dict[str, Counter[str]]) -> Figure:
    """One panel per source of principle use (critique rounds, judge draws)."""
    tallest = max(len(c) for c in panels.values())
    fig = Figure(figsize=(5.5 * len(panels), 1.5 + 0.3 * tallest))
    for k, (title, counts) in enumerate(panels.items(), start=1):
        _barh(fig.add_subplot(1, len(panels), k), counts.most_common(), title, "uses")
    return fig


def critique_rounds(rounds_per_revision: Counter[int], per_round: list[dict[str, int]]) -> Figure:
    fig = Figure(figsize=WIDE)
    ax = fig.add_subplot(1, 2, 1)
    sizes = sorted(rounds_per_revision)
    ax.bar([str(s) for s in sizes], [rounds_per_revision[s] for s in sizes], color="tab:blue")
    ax.set_title("rounds per revision")
    ax.set_xlabel("critique rounds")
    ax.set_ylabel("revisions")
    _whole(ax.yaxis)
    ax = fig.add_subplot(1, 2, 2)
    xs = range(1, len(per_round) + 1)
    width = 0.27
    for offset, (key, color) in zip((-width, 0, width), (("revised", "tab:blue"), ("skipped", "tab:gray"),
                                                         ("changed", "tab:green"))):
        ax.bar([x + offset for x in xs], [r[key] for r in per_round], width, label=key, color=color)
    ax.set_xticks(list(xs))
    ax.set_title("per round: revised, skipped, text changed")
    ax.set_xlabel("round")
    ax.set_ylabel("responses")
    _whole(ax.yaxis)
    _legend(ax)
    return fig


def judge_labels(p_chosen: list[float], two_orders: list[tuple[float, float]], flip_rate: float | None) -> Figure:
    fig = Figure(figsize=WIDE if two_orders else SINGLE)
    ax = fig.add_subplot(1, 2 if two_orders else 1, 1)
    low = 0.5 if min(p_chosen, default=1) >= 0.5 else 0.0  # the judge's chosen side is always >= 0.5
    ax.hist(p_chosen, bins=[low + (1 - low) * i / 20 for i in range(21)], color="tab:blue")
    ax.set_title("judge soft labels (p_chosen)")
    ax.set_xlabel("p_chosen")
    ax.set_ylabel("pairs")
    _whole(ax.yaxis)
    if two_orders:
        ax = fig.add_subplot(1, 2, 2)
        ax.scatter([a for a, _ in two_orders], [b for _, b in two_orders], s=12, alpha=0.6)
        ax.axhline(0.5, color="gray", linewidth=0.8)
        ax.axvline(0.5, color="gray", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        rate = "" if flip_rate is None else f": {flip_rate:.1%} flip"
        ax.set_title(f"P(chosen) in each presentation order{rate}")
        ax.set_xlabel("first presentation order")
        ax.set_ylabel("second order (letters swapped)")
    return fig


def rm_accuracy(epochs: list[int], held_out: list[float], train: dict[int, float]) -> Figure:
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    if held_out:
        ax.plot(epochs, held_out, marker="o", label="held-out accuracy")
    if train:
        ax.plot(list(train), list(train.values()), marker="s", linestyle="--", label="train accuracy (epoch mean)")
    ax.axhline(0.5, color="gray", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, 1.02)
    ax.set_title("reward model accuracy per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    _whole(ax.xaxis)
    _legend(ax)
    return fig


def _curve(ax, rows: list[dict], key: str, **style) -> None:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if points:
        ax.plot([s for s, _ in points], [v for _, v in points], label=key, **style)


def ppo_curves(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(14, 4))
    ax = fig.add_subplot(1, 3, 1)
    _curve(ax, rows, "objective/rlhf_reward")
    _curve(ax, rows, "objective/scores")
    _curve(ax, rows, "eval/score", marker="o", linestyle="--")
    ax.set_title("reward")
    _legend(ax, fontsize=8)
    for k, (key, title) in enumerate((("objective/kl", "KL to the reference"),
                                      ("objective/entropy", "entropy")), start=2):
        ax = fig.add_subplot(1, 3, k)
        _curve(ax, rows, key)
        ax.set_title(title)
    for ax in fig.axes:
        ax.set_xlabel("PPO step")
        _whole(ax.xaxis)
    return fig


def sft_loss(rows: list[dict]) -> Figure:
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    _curve(ax, rows, "train/loss")
    _curve(ax, rows, "eval/loss", marker="o", linestyle="--")
    ax.set_title("SFT loss")
    ax.set_xlabel("step")
    _whole(ax.xaxis)
    _legend(ax)
    return fig


def heldout(names: list[str], means: list[float], axis: str, prompts: int, degenerate: list[float]) -> Figure:
    """The axis' mean on the held-out prompts of each model, in ``heldout.models`` order (the base in grey)."""
    fig = Figure(figsize=SINGLE)
    ax = fig.add_subplot()
    values = [100 * m for m in means] if axis == "lists" else means
    bars = ax.bar(range(len(values)), values, color=["tab:gray" if n == "base" else "tab:blue" for n in names])
    for bar, value, bad in zip(bars, values, degenerate):
        ax.annotate(f"{value:.0f}" + (f"\n{100 * bad:.0f}% degenerate" if bad else ""),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)), [label(n) for n in names])
    ax.set_ylabel("mean words per reply" if axis == "words" else "% of replies in list form")
    ax.set_title(f"held-out replies ({prompts} prompts no stage trained on), greedy")
    return fig


def rounds(names: list[str], metrics: dict[str, list[float | None]]) -> Figure:
    """One small panel per metric, the rounds along x; a round without the metric is left out."""
    cols = 3
    nrows = (len(metrics) + cols - 1) // cols
    fig = Figure(figsize=(12, 3.2 * nrows))
    for k, (title, values) in enumerate(metrics.items(), start=1):
        ax = fig.add_subplot(nrows, cols, k)
        points = [(x, v) for x, v in enumerate(values) if v is not None]
        ax.plot([x for x, _ in points], [v for _, v in points], marker="o")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title)
    return fig


# -- the page: HTML around the figures ----------------------------------------------------------------------------------


def esc(value: Any) -> str:
    return html.escape(str(value))


class Page:
    """The HTML being written, and the PNGs written beside it."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.parts, self.figures = out_dir, [], []

    def add(self, markup: str) -> None:
        self.parts.append(markup)

    def text(self, text: str, tag: str = "p", cls: str = "") -> None:
        self.add(f"<{tag}{f' class={cls!r}' if cls else ''}>{esc(text)}</{tag}>")

    def figure(self, name: str, fig, caption: str) -> None:
        data = png(fig)
        (self.out_dir / name).write_bytes(data)
        self.figures.append(name)
        src = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        self.add(f'<figure><img data-figure="{esc(name)}" alt="{esc(caption)}" src="{src}">'
                 f"<figcaption>{esc(caption)}</figcaption></figure>")

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
        self.add(f"<table><tr>{head}</tr>{body}</table>")

    def sample(self, title: str, fields: list[tuple[str, Any]]) -> None:
        items = "".join(f"<dt>{esc(k)}</dt><dd><pre>{esc(v)}</pre></dd>" for k, v in fields)
        self.add(f'<div class="sample"><div class="sample-title">{esc(title)}</div><dl>{items}</dl></div>')

    def not_run(self, stage: str) -> None:
        self.add(f'<p class="not-run" data-stage="{esc(stage)}">{esc(stage)}: not run</p>')

    def html(self, title: str) -> str:
        """The whole page: one file, styles, figures and the image check inline."""
        return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
                f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(self.parts)
                + f"\n<script>{CHECK_IMAGES}</script>\n</body></html>\n")


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1200px; margin: 1em auto; padding: 0 1em; color: #222; }
h2 { border-bottom: 2px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
figure { margin: .5em 0; } img { max-width: 100%; } figcaption { color: #555; font-size: 12px; }
.not-run { color: #888; font-style: italic; } .note { color: #a60; }
.sample { border-left: 3px solid #9bd; padding: 2px 10px; margin: .6em 0; background: #f7fafc; }
.sample-title { font-weight: bold; } dt { color: #555; font-size: 12px; } dd { margin: 0 0 .3em 0; }
pre { white-space: pre-wrap; margin: 0; font: 13px/1.35 ui-monospace, monospace; }
"""
# Marks each figure as decoded or not once the page has loaded, so a headless browser's dump of the
# DOM shows whether every embedded PNG really renders (a broken one has naturalWidth 0).
CHECK_IMAGES = """
window.addEventListener("load", function () {
  var ok = 0;
  for (var img of document.images) {
    var decoded = img.complete && img.naturalWidth > 0;
    img.setAttribute("data-decoded", decoded ? "yes" : "no");
    ok += decoded ? 1 : 0;
  }
  document.body.setAttribute("data-images", ok + "/" + document.images.length);
});
"""
