"""``factory report``: statistics and figures of a run folder, as one self-contained HTML page.

The page (``index.html``) embeds every figure as a base64 PNG, so it can be mailed or attached
as one file; the same PNGs sit beside it under stable names (``judge_labels.png``, and
``round-2_judge_labels.png`` for a multi-round run). Everything is read from the run folder's
files; a stage whose files are missing is shown as "not run". Every string a model or a user
wrote goes through ``html.escape``: model text can hold ``<script>``.

Diversity of instructions uses a plain heuristic (after Self-Instruct's verb-noun analysis,
without its parser): the first word is the verb, and its object is the first later word that is
not a determiner, pronoun, preposition or conjunction (``STOP_WORDS``).
"""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

from factory import report_figures as figs
from factory.report_figures import Page, esc, fmt
from factory.dedup import RougeIndex
from factory.pipeline import round_dirs
from factory.records import (BootstrapRequest, ChatExample, Generation, Instruction, Judgment, Preference,
                             PreferencePair, Revision, Task, file_sha256)
from factory.records import Reranked
from factory.seeds import SeedError, load_seeds
from factory.store import read_jsonl

SAMPLES = 3
"""records shown per stage"""
TOP = 20
"""bars in the verb and verb-object charts"""
STOP_WORDS = frozenset("""
    a an the this that these those some any each every all both either neither no my your his her its our their
    which what whose another such i me you he him she it we us they them myself yourself itself ourselves
    themselves someone something anyone anything everyone everything one about above across after against along
    among around at before behind below between by down during for from in inside into like near of off on onto
    out over through to toward towards under up upon with within without and or but so how why when where whether
    if than as
""".split())
DATA_FILES = {
    "generate": ("generations.jsonl",),
    "bootstrap": ("instructions.jsonl", "bootstrap_requests.jsonl"),
    "instances": ("tasks.jsonl",),
    "critique": ("revisions.jsonl",),
    "judge": ("judgments.jsonl", "preferences.jsonl"),
    "rerank": ("rerank.jsonl",),
}
TRAINERS = {"sft": "sft", "rm": "rm", "ppo": "policy"}
"""trainer stage -> its default output folder (the config's <stage>.output overrides it)"""


# -- reading a round's folder ---------------------------------------------------------------------


class RoundData:
    """One round's folder (the run folder itself for a single-round run), its files read once."""

    def __init__(self, folder: Path, name: str, index: int):
        self.folder, self.name, self.index = folder, name, index  # name: "round-2", or "" for a single round
        self._records: dict[str, list] = {}
        path = folder / "manifest.json"
        try:
            self.manifest = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except ValueError:
            self.manifest = None  # the data can still be shown; the seed section says the manifest is unreadable

    @property
    def config(self) -> dict[str, Any]:
        return (self.manifest or {}).get("config", {})

    def train_dir(self, stage: str) -> Path:
        return self.folder / self.config.get(stage, {}).get("output", TRAINERS[stage])

    def ran(self, stage: str) -> bool:
        if stage in TRAINERS:
            return (self.train_dir(stage) / "metrics.jsonl").is_file()
        return any((self.folder / f).is_file() for f in DATA_FILES[stage])

    def read(self, name: str, model) -> list:
        """The records of one of the round's JSONL files (none if it is missing)."""
        if name not in self._records:
            self._records[name] = read_jsonl(self.folder / name, model)
        return self._records[name]

    @property
    def copied_tasks(self) -> bool:
        """Rounds after the first get round 1's tasks.jsonl as a copy; its rejections are round 1's."""
        return self.index > 1 and "instances" not in self.config.get("stages", ["instances"])

    def metrics(self, stage: str) -> list[dict]:
        return json_rows(self.train_dir(stage) / "metrics.jsonl")


def json_rows(path: Path) -> list[dict]:
    """A trainer's JSONL (metrics.jsonl, samples.jsonl); none if missing."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line from a killed trainer
    return rows


def last(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)


def first(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in rows if isinstance(r.get(key), (int, float))), None)


def flip_rate(prefs: list[Preference]) -> float | None:
    """Share of judged pairs whose presentation orders disagree (imported pairs have no orders)."""
    judged = [p for p in prefs if p.consistent is not None]
    return sum(not p.consistent for p in judged) / len(judged) if judged else None


def verb_object(instruction: str) -> tuple[str, str | None] | None:
    """The leading verb and its object by the heuristic of the module docstring."""
    words = re.findall(r"[a-z][a-z'-]*", instruction.lower())
    if not words:
        return None
    return words[0], next((w for w in words[1:] if w not in STOP_WORDS), None)


def made_from(rd: RoundData) -> list[Path]:
    """The folder the run was started from, when the run folder's path ends with output_dir/name."""
    out, name = rd.config.get("output_dir"), rd.config.get("name")
    if not out or not name or Path(out).is_absolute():
        return []
    tail = (Path(out) / name).parts
    parts = rd.folder.resolve().parts
    return [Path(*parts[: -len(tail)])] if parts[-len(tail):] == tail and len(parts) > len(tail) else []


def seed_instructions(rd: RoundData) -> tuple[list[str] | None, list[str]]:
    """The seed instructions of the run's bootstrap, and notes on any seed file that could not be used.

    Seed paths in the manifest are relative to the folder the run was made from: the current
    folder is tried first, then the one the run folder's own path implies.
    """
    if rd.manifest is None:
        return None, ["no readable manifest.json, so the seed files are unknown"]
    bases = list(dict.fromkeys([Path.cwd(), *made_from(rd)]))
    found, notes = [], []
    for name in rd.config.get("bootstrap", {}).get("seeds", []):
        path = next((b / name for b in bases if (b / name).is_file()), None)
        if path is None:
            notes.append(f"seed file {name} not found (looked in {', '.join(map(str, bases))})")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the run warned about its seeds already
                found += [t.instruction for t in load_seeds(path)]
        except SeedError as e:
            notes.append(f"seed file {path} could not be read: {e}")
            continue
        recorded = rd.manifest.get("inputs", {}).get(str(name))
        if recorded and recorded != file_sha256(path):
            notes.append(f"seed file {path} has changed since the run (its sha256 differs from manifest.json)")
    return found or None, notes


def seed_similarity(new: list[str], seeds: list[str]) -> tuple[list[float], list[float]]:
    """For each new instruction: its highest and its mean exact ROUGE-L F1 against the seed instructions."""
    index = RougeIndex()
    for text in seeds:
        index.add(text)
    scored = [index.most_similar(text, k=1) for text in new]
    return [top[0][1] if top else 0.0 for top, _ in scored], [mean for _, mean in scored]


# -- counts per stage -----------------------------------------------------------------------------


def parse_errors(records: list) -> Counter[str]:
    return Counter(r.parse_error for r in records if r.parse_error)


def stage_counts(rd: RoundData, stage: str) -> tuple[dict[str, int | float | None], Counter[str]]:
    """What a stage made, and what it refused by reason (a parse failure's reason is its message)."""
    if stage == "generate":
        gens = rd.read("generations.jsonl", Generation)
        return {"generations": len(gens)}, parse_errors(gens)
    if stage == "bootstrap":
        requests = rd.read("bootstrap_requests.jsonl", BootstrapRequest)
        verdicts = Counter(c.verdict for r in requests for c in r.candidates)
        refused = Counter({v: n for v, n in verdicts.items() if v not in ("accepted", "over_target")})
        return ({"instructions": len(rd.read("instructions.jsonl", Instruction)), "requests": len(requests),
                 "candidates": verdicts.total(), "unchecked (target reached)": verdicts["over_target"]},
                refused + parse_errors(requests))
    if stage == "instances":
        tasks = rd.read("tasks.jsonl", Task)
        counts = {"tasks": len(tasks), "tasks with instances": sum(1 for t in tasks if t.instances),
                  "instances": sum(len(t.instances) for t in tasks),
                  "classification tasks": sum(t.is_classification for t in tasks)}
        if rd.copied_tasks:
            return counts, Counter()
        refused = Counter()
        for t in tasks:
            refused.update(t.rejected)
            refused.update([f"task_{t.dropped}"] if t.dropped else [])
        return counts, refused + parse_errors(tasks)
    if stage == "critique":
        revs = rd.read("revisions.jsonl", Revision)
        return ({"revisions": len(revs), "rounds": sum(len(r.rounds) for r in revs),
                 "skipped rounds": sum(rd_.skipped for r in revs for rd_ in r.rounds),
                 "revisions that changed the text": sum(r.final.strip() != r.initial.strip() for r in revs),
                 "SFT examples": len(rd.read("sft.jsonl", ChatExample)),
                 "critique pairs": len(rd.read("critique_pairs.jsonl", PreferencePair))}, parse_errors(revs))
    if stage == "judge":
        judgments, prefs = rd.read("judgments.jsonl", Judgment), rd.read("preferences.jsonl", Preference)
        return ({"pairs": len(prefs), "judgments": len(judgments),
                 "comparisons": sum(len(j.comparisons) for j in judgments),
                 "position flips": sum(p.consistent is False for p in prefs),
                 "low confidence": sum(p.low_confidence for p in prefs)},
                Counter(j.dropped for j in judgments if j.dropped) + parse_errors(judgments))
    if stage == "rerank":
        reranked = rd.read("rerank.jsonl", Reranked)
        return {"prompts": len(reranked), "responses": sum(len(r.responses) for r in reranked)}, parse_errors(reranked)
    rows = rd.metrics(stage)
    counts = {"steps": last(rows, "step")}
    if stage == "sft":
        counts |= {"train loss": last(rows, "train/loss"), "held-out loss": last(rows, "eval/loss")}
    elif stage == "rm":
        counts |= {"held-out accuracy": last(rows, "eval/accuracy"), "held-out margin": last(rows, "eval/margin")}
    else:
        counts |= {"final KL": last(rows, "objective/kl"), "eval score start": first(rows, "eval/score"),
                   "eval score end": last(rows, "eval/score")}
    return counts, Counter()


def overview(page: Page, rd: RoundData, prefix: str) -> None:
    page.text("Stages", "h3")
    rows, made, refused = [], {}, {}
    for stage in [*DATA_FILES, *TRAINERS]:
        if not rd.ran(stage):
            rows.append([stage, "not run", "", ""])
            continue
        counts, rejected = stage_counts(rd, stage)
        status = "copied from round 1" if stage == "instances" and rd.copied_tasks else "ran"
        rows.append([stage, status, ", ".join(f"{k} {fmt(v)}" for k, v in counts.items()),
                     ", ".join(f"{reason} {n}" for reason, n in rejected.most_common()) or "none"])
        if stage in DATA_FILES:
            made[stage] = next(iter(counts.items()))
        if rejected:
            refused[stage] = rejected
    page.table(["stage", "status", "counts", "rejected"], rows)
    if made:
        page.figure(f"{prefix}stage_counts.png", figs.stage_counts(made), "records written by each data stage")
    if refused:
        page.figure(f"{prefix}rejections.png", figs.rejections(refused), "items each stage refused, by reason")


# -- per-stage sections ---------------------------------------------------------------------------


def bootstrap_section(page: Page, rd: RoundData, prefix: str) -> None:
    page.text("Instructions (bootstrap)", "h3")
    if not rd.ran("bootstrap"):
        return page.not_run("bootstrap")
    new = [i.instruction for i in rd.read("instructions.jsonl", Instruction)]
    seeds, notes = seed_instructions(rd)
    for note in notes:
        page.text(note, cls="note")
    if not new:
        return page.text("no instruction was accepted")
    lengths = [len(t.split()) for t in new]
    page.figure(f"{prefix}instruction_length.png",
                figs.instruction_length(lengths, [len(t.split()) for t in seeds] if seeds else None),
                f"words per instruction: {len(new)} new, mean {sum(lengths) / len(lengths):.1f}")
    if seeds:
        best, mean = seed_similarity(new, seeds)
        threshold = rd.config.get("bootstrap", {}).get("rouge_threshold")
        page.figure(f"{prefix}seed_similarity.png", figs.seed_similarity(best, mean, threshold),
                    f"exact ROUGE-L F1 of each new instruction against the {len(seeds)} seed instructions; "
                    f"median highest {sorted(best)[len(best) // 2]:.2f}")
    pairs = [vo for vo in map(verb_object, new) if vo]
    top_verbs = Counter(v for v, _ in pairs).most_common(TOP)
    top_pairs = Counter(f"{v} {o}" for v, o in pairs if o).most_common(TOP)
    page.figure(f"{prefix}verbs.png", figs.verbs(top_verbs, top_pairs),
                f"{len({v for v, _ in pairs})} distinct leading verbs in {len(new)} instructions; an object is the "
                "first later word that is not a determiner, pronoun, preposition or conjunction")
    for rec in rd.read("instructions.jsonl", Instruction)[:SAMPLES]:
        closest = rec.most_similar[0] if rec.most_similar else None
        page.sample(rec.instruction, [("closest pool instruction"
                                       + (f" (ROUGE-L {closest.score:.2f})" if closest else ""),
                                       closest.instruction if closest else "(none)")])


def instances_section(page: Page, rd: RoundData) -> None:
    page.text("Tasks (instances)", "h3")
    if not rd.ran("instances"):
        return page.not_run("instances")
    tasks = rd.read("tasks.jsonl", Task)
    for t in ([t for t in tasks if t.instances] or tasks)[:SAMPLES]:
        kind = "classification" if t.is_classification else "generation"
        fields = [f for k, i in enumerate(t.instances[:2], start=1)
                  for f in ((f"instance {k} input", i.input or "(none)"), (f"instance {k} output", i.output))]
        page.sample(f"{t.instruction}  [{kind}, p={t.p_classification:.2f}]", fields or [("dropped", t.dropped)])


def critique_section(page: Page, rd: RoundData, prefix: str) -> list[str]:
    page.text("Critique and revision", "h3")
    if not rd.ran("critique"):
        page.not_run("critique")
        return []
    revs = rd.read("revisions.jsonl", Revision)
    per_round: list[dict[str, int]] = []
    for r in revs:
        before = r.initial
        for k, rnd in enumerate(r.rounds):
            if k == len(per_round):
                per_round.append({"revised": 0, "skipped": 0, "changed": 0})
            per_round[k]["skipped" if rnd.skipped else "revised"] += 1
            per_round[k]["changed"] += rnd.revision.strip() != before.strip()
            before = rnd.revision
    if per_round:
        page.figure(f"{prefix}critique_rounds.png",
                    figs.critique_rounds(Counter(len(r.rounds) for r in revs), per_round),
                    f"{len(revs)} revisions; {sum(r.final.strip() != r.initial.strip() for r in revs)} "
                    "end with a text different from the first answer")
    for r in revs[:SAMPLES]:
        fields = [("first answer", r.initial)]
        for k, rnd in enumerate(r.rounds, start=1):
            fields.append((f"round {k} critique under {rnd.principle_id}", rnd.critique))
            fields.append((f"round {k} revision" + (" (skipped)" if rnd.skipped else ""), rnd.revision))
        page.sample(r.prompt, fields + [("final", r.final)])
    return [rnd.principle_id for r in revs for rnd in r.rounds]


def judge_section(page: Page, rd: RoundData, prefix: str) -> list[str]:
    page.text("AI judge (preferences)", "h3")
    if not rd.ran("judge"):
        page.not_run("judge")
        return []
    prefs = rd.read("preferences.jsonl", Preference)
    rate = flip_rate(prefs)
    if prefs:
        two = [(p.p_orders[0], p.p_orders[1]) for p in prefs if len(p.p_orders) == 2]
        page.figure(f"{prefix}judge_labels.png", figs.judge_labels([p.p_chosen for p in prefs], two, rate),
                    f"{len(prefs)} pairs, mean p_chosen {sum(p.p_chosen for p in prefs) / len(prefs):.3f}, "
                    f"position-flip rate {fmt(rate)} (pairs whose presentation orders disagree)")
    else:
        page.text("no pairs were judged")
    for p in prefs[:SAMPLES]:
        orders = ", ".join(f"{q:.2f}" for q in p.p_orders)
        page.sample(p.prompt, [("chosen", p.chosen), ("rejected", p.rejected),
                               ("label", f"p_chosen {p.p_chosen:.3f}; orders {orders}; principles "
                                         f"{', '.join(p.principles)}")])
    return [pid for j in rd.read("judgments.jsonl", Judgment) for pid in j.principles]


def samples_only(page: Page, rd: RoundData, stage: str) -> None:
    """generate and rerank: no figure of their own, a few records."""
    page.text({"generate": "Generations", "rerank": "Best-of-n (rerank)"}[stage], "h3")
    if not rd.ran(stage):
        return page.not_run(stage)
    if stage == "generate":
        for g in rd.read("generations.jsonl", Generation)[:SAMPLES]:
            page.sample(g.messages[-1]["content"] if g.messages else g.task_id, [("reply", g.text)])
    else:
        for r in rd.read("rerank.jsonl", Reranked)[:SAMPLES]:
            page.sample(r.prompt, [(f"kept (reward {r.scores[r.chosen]:.2f})", r.responses[r.chosen]),
                                   ("all rewards", ", ".join(f"{s:.2f}" for s in r.scores))])


def training_sections(page: Page, rd: RoundData, prefix: str) -> None:
    for stage, title in (("sft", "SFT"), ("rm", "Reward model"), ("ppo", "PPO policy")):
        page.text(title, "h3")
        if not rd.ran(stage):
            page.not_run(stage)
            continue
        rows = rd.metrics(stage)
        if not rows:
            page.text(f"{rd.train_dir(stage) / 'metrics.jsonl'} is empty: the trainer logged nothing yet")
            continue
        if stage == "sft":
            page.figure(f"{prefix}sft_loss.png", figs.sft_loss(rows), "SFT loss per step, held-out loss per epoch")
        elif stage == "rm":
            evals = [r for r in rows if "eval/accuracy" in r]
            train: dict[int, list[float]] = {}
            for r in rows:
                if "train/accuracy" in r:
                    train.setdefault(r["epoch"], []).append(r["train/accuracy"])
            page.figure(f"{prefix}rm_accuracy.png",
                        figs.rm_accuracy([r["epoch"] for r in evals], [r["eval/accuracy"] for r in evals],
                                         {e: sum(v) / len(v) for e, v in train.items()}),
                        f"held-out pairwise accuracy per epoch; last {fmt(last(rows, 'eval/accuracy'))}")
        else:
            page.figure(f"{prefix}ppo_curves.png", figs.ppo_curves(rows),
                        f"PPO reward, KL and entropy per step; eval score {fmt(first(rows, 'eval/score'))} -> "
                        f"{fmt(last(rows, 'eval/score'))}")
            ppo_samples(page, rd)


def ppo_samples(page: Page, rd: RoundData) -> None:
    """The policy's greedy replies at the last eval, beside its replies to the same prompts at step 0."""
    rows = json_rows(rd.train_dir("ppo") / "samples.jsonl")
    if not rows:
        return
    final = max(r["step"] for r in rows)
    start = {r["prompt"]: r for r in rows if r["step"] == 0}
    for r in [r for r in rows if r["step"] == final][:SAMPLES]:
        fields = [(f"step {final} (reward {r['score']:.2f})", r["response"])]
        if final != 0 and r["prompt"] in start:
            fields.insert(0, (f"step 0 (reward {start[r['prompt']]['score']:.2f})", start[r["prompt"]]["response"]))
        page.sample(r["prompt"], fields)


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
        prefs = rd.read("preferences.jsonl", Preference)
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
    folders = round_dirs(run_dir)
    multi = folders != [run_dir]
    rounds = [RoundData(f, f.name if multi else "", i) for i, f in enumerate(folders, start=1)]
    if not any(rd.manifest is not None or any(rd.ran(s) for s in [*DATA_FILES, *TRAINERS]) for rd in rounds):
        raise FileNotFoundError(f"{run_dir}: not a run folder (no manifest.json and no stage output in it)")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "report"
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

