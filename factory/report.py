"""``factory report``: statistics and figures of a run folder, as one self-contained HTML page.

The page (``index.html``) embeds every figure as a base64 PNG, so it can be mailed or attached
as one file; the same PNGs sit beside it under stable names (``judge_labels.png``, and
``round-2_judge_labels.png`` for a multi-round run). Everything is read from the run folder's
files; a stage whose files are missing is shown as "not run". Every string a model or a user
wrote goes through ``html.escape``: model text can hold ``<script>``.

This module lays out the page: the rounds compared, then each round's sections
(``factory.report_sections``), read through ``factory.report_rounds``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from factory import report_figures as figs
from factory.layout import RunLayout
from factory.records import Preference
from factory.report_figures import Page, esc
from factory.report_rounds import DATA_FILES, TRAINERS, RoundData, flip_rate, last
from factory.report_sections import (bootstrap_section, critique_section, heldout_section, instances_section,
                                     judge_section, overview, samples_only, training_sections)


def round_report(page: Page, rd: RoundData) -> None:
    prefix = f"{rd.name}_" if rd.name else ""
    page.add(f'<section id="{esc(rd.name or "run")}">')
    page.text(f"Round {rd.index}: {rd.folder}" if rd.name else "Run", "h2")
    overview(page, rd, prefix)
    bootstrap_section(page, rd, prefix)
    instances_section(page, rd)
    samples_only(page, rd, "generate")
    used = {"critique rounds": Counter(critique_section(page, rd, prefix)),
            "judge draws": Counter(judge_section(page, rd, prefix))}
    samples_only(page, rd, "rerank")
    training_sections(page, rd, prefix)
    heldout_section(page, rd, prefix)
    page.text("Principle usage", "h3")
    used = {k: c for k, c in used.items() if c}
    if used:
        page.figure(f"{prefix}principles.png", figs.principles(used),
                    "how often each principle was used: per critique round, and per prompt judged")
    else:
        page.not_run("critique and judge")
    page.add("</section>")


def compare_rounds(page: Page, rounds: list[RoundData]) -> None:
    page.text("Rounds compared", "h2")
    metrics: dict[str, list[float | None]] = {k: [] for k in (
        "pairs judged", "mean p_chosen", "position-flip rate", "RM held-out accuracy", "PPO final reward",
        "PPO final KL", "held-out eval score")}
    for rd in rounds:
        prefs = rd.read(rd.layout.preferences, Preference)
        rm = rd.metrics("rm") if rd.ran("rm") else []
        ppo = rd.metrics("ppo") if rd.ran("ppo") else []
        metrics["pairs judged"].append(len(prefs) if rd.ran("judge") else None)
        metrics["mean p_chosen"].append(sum(p.p_chosen for p in prefs) / len(prefs) if prefs else None)
        metrics["position-flip rate"].append(flip_rate(prefs))
        metrics["RM held-out accuracy"].append(last(rm, "eval/accuracy"))
        metrics["PPO final reward"].append(last(ppo, "objective/rlhf_reward"))
        metrics["PPO final KL"].append(last(ppo, "objective/kl"))
        metrics["held-out eval score"].append(last(ppo, "eval/score"))
    names = [rd.name for rd in rounds]
    page.figure("rounds.png", figs.rounds(names, metrics), "each round's judge, reward model and PPO figures; the "
                "eval score is the reward model's mean score of the policy's greedy replies to held-out prompts")
    page.table(["round", *metrics], [[name, *(values[i] for values in metrics.values())]
                                     for i, name in enumerate(names)])


# -- the page -----------------------------------------------------------------------------------


def build_report(run_dir: Path, out_dir: Path | None = None) -> Path:
    """Write the report of RUN into out_dir (default RUN/report): index.html and one PNG per figure.

    Returns the path of index.html. A missing run folder, or one with no run files, is a
    FileNotFoundError naming it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    layout = RunLayout(run_dir)
    folders = layout.round_dirs()
    multi = folders != [run_dir]
    rounds = [RoundData(f, f.name if multi else "", i) for i, f in enumerate(folders, start=1)]
    if not any(rd.manifest is not None or any(rd.ran(s) for s in [*DATA_FILES, *TRAINERS]) for rd in rounds):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no manifest.json and no stage output in it)")
    out_dir = Path(out_dir) if out_dir is not None else layout.report
    out_dir.mkdir(parents=True, exist_ok=True)

    page = Page(out_dir)
    page.text(f"factory report: {run_dir.resolve().name}", "h1")
    page.text(f"run folder: {run_dir}" + (f", {len(rounds)} rounds" if multi else ""))
    if multi:
        compare_rounds(page, rounds)
    for rd in rounds:
        round_report(page, rd)
    index = out_dir / "index.html"
    index.write_text(page.html(f"factory report: {run_dir.resolve().name}"), encoding="utf-8")
    return index

