"""The report's sections of one round: what each stage made and refused, a few of its records, and
its figures. Every function here adds to a ``Page``; none reads a file but through ``RoundData``.
"""

from __future__ import annotations

from collections import Counter

from factory import report_figures as figs
from factory.records import (BootstrapRequest, ChatExample, Generation, Instruction, Judgment, Preference,
                             PreferencePair, Reranked, Revision, Task)
from factory.report_diversity import seed_instructions, seed_similarity, verb_object
from factory.report_figures import Page, fmt
from factory.report_rounds import DATA_FILES, TRAINERS, RoundData, first, flip_rate, json_rows, last

SAMPLES = 3
"""records shown per stage"""
TOP = 20
"""bars in the verb and verb-object charts"""


# -- counts per stage -----------------------------------------------------------------------------


def parse_errors(records: list) -> Counter[str]:
    return Counter(r.parse_error for r in records if r.parse_error)


def stage_counts(rd: RoundData, stage: str) -> tuple[dict[str, int | float | None], Counter[str]]:
    """What a stage made, and what it refused by reason (a parse failure's reason is its message)."""
    if stage == "generate":
        gens = rd.read(rd.layout.generations, Generation)
        return {"generations": len(gens)}, parse_errors(gens)
    if stage == "bootstrap":
        requests = rd.read(rd.layout.bootstrap_requests, BootstrapRequest)
        verdicts = Counter(c.verdict for r in requests for c in r.candidates)
        refused = Counter({v: n for v, n in verdicts.items() if v not in ("accepted", "over_target")})
        return ({"instructions": len(rd.read(rd.layout.instructions, Instruction)), "requests": len(requests),
                 "candidates": verdicts.total(), "unchecked (target reached)": verdicts["over_target"]},
                refused + parse_errors(requests))
    if stage == "instances":
        tasks = rd.read(rd.layout.tasks, Task)
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
        revs = rd.read(rd.layout.revisions, Revision)
        return ({"revisions": len(revs), "rounds": sum(len(r.rounds) for r in revs),
                 "skipped rounds": sum(rd_.skipped for r in revs for rd_ in r.rounds),
                 "revisions that changed the text": sum(r.final.strip() != r.initial.strip() for r in revs),
                 "SFT examples": len(rd.read(rd.layout.sft_data, ChatExample)),
                 "critique pairs": len(rd.read(rd.layout.critique_pairs, PreferencePair))}, parse_errors(revs))
    if stage == "judge":
        judgments, prefs = rd.read(rd.layout.judgments, Judgment), rd.read(rd.layout.preferences, Preference)
        return ({"pairs": len(prefs), "judgments": len(judgments),
                 "comparisons": sum(len(j.comparisons) for j in judgments),
                 "position flips": sum(p.consistent is False for p in prefs),
                 "low confidence": sum(p.low_confidence for p in prefs)},
                Counter(j.dropped for j in judgments if j.dropped) + parse_errors(judgments))
    if stage == "rerank":
        reranked = rd.read(rd.layout.rerank, Reranked)
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
    new = [i.instruction for i in rd.read(rd.layout.instructions, Instruction)]
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
    for rec in rd.read(rd.layout.instructions, Instruction)[:SAMPLES]:
        closest = rec.most_similar[0] if rec.most_similar else None
        page.sample(rec.instruction, [("closest pool instruction"
                                       + (f" (ROUGE-L {closest.score:.2f})" if closest else ""),
                                       closest.instruction if closest else "(none)")])


def instances_section(page: Page, rd: RoundData) -> None:
    page.text("Tasks (instances)", "h3")
    if not rd.ran("instances"):
        return page.not_run("instances")
    tasks = rd.read(rd.layout.tasks, Task)
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
    revs = rd.read(rd.layout.revisions, Revision)
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
    prefs = rd.read(rd.layout.preferences, Preference)
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
    return [pid for j in rd.read(rd.layout.judgments, Judgment) for pid in j.principles]


def samples_only(page: Page, rd: RoundData, stage: str) -> None:
    """generate and rerank: no figure of their own, a few records."""
    page.text({"generate": "Generations", "rerank": "Best-of-n (rerank)"}[stage], "h3")
    if not rd.ran(stage):
        return page.not_run(stage)
    if stage == "generate":
        for g in rd.read(rd.layout.generations, Generation)[:SAMPLES]:
            page.sample(g.messages[-1]["content"] if g.messages else g.task_id, [("reply", g.text)])
    else:
        for r in rd.read(rd.layout.rerank, Reranked)[:SAMPLES]:
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
            page.text(f"{rd.trainer(stage).metrics} is empty: the trainer logged nothing yet")
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


def heldout_section(page: Page, rd: RoundData, prefix: str) -> None:
    """What the loop did to the model on held-out prompts: the heldout stage's summary as a figure."""
    page.text("Held-out prompts", "h3")
    try:
        summary = rd.heldout()
        if summary is None:
            page.not_run("heldout")
            return
        models = summary["models"]
        names = list(models)
        means = [float(models[n]["mean"]) for n in names]
    except (OSError, ValueError, KeyError, TypeError) as e:
        page.text(f"{rd.layout.heldout / 'summary.json'}: unreadable ({e})")
        return
    page.figure(f"{prefix}heldout.png",
                figs.heldout(names, means, summary.get("axis", "words"), summary.get("prompts", 0),
                             [float(models[n].get("degenerate") or 0) for n in names]),
                summary.get("line", ""))
    page.table(["model", "mean", "degenerate", "KL to base (nats/token)"],
               [[n, models[n]["mean"], models[n].get("degenerate"), models[n].get("kl")] for n in names])


def ppo_samples(page: Page, rd: RoundData) -> None:
    """The policy's greedy replies at the last eval, beside its replies to the same prompts at step 0."""
    rows = json_rows(rd.trainer("ppo").samples)
    if not rows:
        return
    final = max(r["step"] for r in rows)
    start = {r["prompt"]: r for r in rows if r["step"] == 0}
    for r in [r for r in rows if r["step"] == final][:SAMPLES]:
        fields = [(f"step {final} (reward {r['score']:.2f})", r["response"])]
        if final != 0 and r["prompt"] in start:
            fields.insert(0, (f"step 0 (reward {start[r['prompt']]['score']:.2f})", start[r["prompt"]]["response"]))
        page.sample(r["prompt"], fields)

