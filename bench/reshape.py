"""Does editing the principle file reshape the *trained* model? Measured on prompts it never saw.

Two axes, each with two constitutions that pull in opposite directions, each readable without a
model:

- length: `concise` vs `detailed` (mean words per reply);
- format: `lists` vs `prose` (share of replies with two or more list lines).

For each constitution, from the same model and on the same training prompts (64 non-classification
seed tasks), the whole loop runs through `factory run` (bench/reshape.toml): critique -> revision,
the judge on each first answer against its revision (soft-labelled pairs), SFT on the revisions,
then the optimisers. The paths of one constitution share its critique, judge and SFT:

- sft: SFT on the revisions alone (the supervised stage of Constitutional AI);
- dpo: SFT, then DPO on the judge's pairs;
- rl:  SFT, then a reward model on the judge's pairs and PPO against it.

Every trained policy, and the base model, answers held-out prompts (seeds/heldout_prompts.jsonl,
written apart from the seed tasks, never used for training) greedily with 256 new tokens (the
`heldout` stage). Printed per path: the base model's mean on the axis, each policy's mean, the
ratio (length) or difference (format) between the opposing constitutions with a 95% bootstrap CI
over prompts, the share of degenerate replies, and the mean per-token KL of each policy to the
base on its own replies. Everything also goes to a JSON file.

    python bench/reshape.py                       # every path, both axes (a few hours on 2 cores)
    python bench/reshape.py --paths dpo --axes length
    python bench/reshape.py --set dpo.epochs=6    # any config key, for every run

The run folders stay in --work (default outputs/bench-reshape/); rerunning does only what is
missing (every stage resumes), so an interrupted benchmark goes on where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from factory.heldout import axis_value, bootstrap, describe, mean  # noqa: E402
from factory.seeds import load_seeds, task_prompt  # noqa: E402

AXES = {"length": ("words", "concise", "detailed"), "format": ("lists", "prose", "lists")}
"""each axis: what the heldout stage reads, the constitution that pulls it down, the one that pulls it up"""
PATHS = {"sft": "sft", "dpo": "dpo", "rl": "ppo"}
"""each path and the trained model that ends it"""
TARGET = {"down": 0.7, "up": 1.4, "ratio": 2.0, "ratio_low": 1.5, "degenerate": 0.05, "difference": 0.20}


def factory_run(config: Path, name: str, sets: list[str], log) -> float:
    cmd = [sys.executable, "-m", "factory.cli", "run", str(config), "--name", name, "--no-report", "--show", "0"]
    for s in sets:
        cmd += ["--set", s]
    print(f"== {name}: factory run {' '.join(cmd[5:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{name}: factory run failed (exit {proc.returncode}); see {log.name}")
    took = time.monotonic() - start
    print(f"   {name}: {took:.0f} s", flush=True)
    return took


def div(a: float, b: float) -> float:
    return a / b if b else float("nan")


def cut_share(record: dict, tok, max_tokens: int) -> float:
    """Share of a model's replies that ran to the token budget (re-tokenised: within 2 tokens of it)."""
    n = [len(tok(r["reply"], add_special_tokens=False)["input_ids"]) for r in record["replies"]]
    return mean([1.0 if k >= max_tokens - 2 else 0.0 for k in n])


def replies(work: Path, run: str, model: str) -> dict:
    return json.loads((work / run / "heldout" / f"{model}.json").read_text(encoding="utf-8"))


def preference_file(run: Path, which: str) -> Path:
    """Pairs for DPO and the reward model in factory's preference format: each final revision preferred
    over its first answer (p = 1), with the judge's pairs too for ``both``."""
    from factory.layout import RunLayout
    from factory.records import Preference, PreferencePair
    from factory.store import read_jsonl

    layout = RunLayout(run)
    out = [Preference(key=f"revision:{p.key}", prompt=p.prompt, messages=[{"role": "user", "content": p.prompt}],
                      chosen=p.chosen, rejected=p.rejected, p_chosen=1.0, margin=1.0, judge_model="revision",
                      source=p.source)
           for p in read_jsonl(layout.critique_pairs, PreferencePair) if p.chosen != p.rejected]
    if which == "both":
        out += read_jsonl(layout.preferences, Preference)
    path = run / f"pairs-{which}.jsonl"
    path.write_text("".join(p.model_dump_json() + "\n" for p in out), encoding="utf-8")
    return path


def training_data(work: Path, run: str, read: str, sign: int) -> dict:
    """What the optimisers learnt from, on the axis: first answers against revisions, and how often the
    judge's chosen reply is the one the constitution should prefer (``sign``: +1 when more is wanted)."""
    from factory.layout import RunLayout
    from factory.records import Preference, Revision
    from factory.store import read_jsonl

    layout = RunLayout(work / run)
    revisions, prefs = read_jsonl(layout.revisions, Revision), read_jsonl(layout.preferences, Preference)
    first = [axis_value(read, r.initial) for r in revisions]
    final = [axis_value(read, r.final) for r in revisions]
    agree = [(axis_value(read, p.chosen) - axis_value(read, p.rejected)) * sign for p in prefs]
    decided = [a for a in agree if a != 0]
    return {"first_answers": mean(first), "revisions": mean(final),
            "revisions_moved_the_right_way": mean([1.0 if (b - a) * sign > 0 else 0.0 for a, b in zip(first, final)]),
            "pairs": len(prefs), "mean_p_chosen": mean([p.p_chosen for p in prefs]),
            "judge_agrees_with_axis": mean([1.0 if a > 0 else 0.0 for a in decided]),
            "pairs_tied_on_axis": len(agree) - len(decided)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paths", default="sft,dpo,rl", help="comma-separated: sft, dpo, rl (default: all)")
    ap.add_argument("--axes", default="length,format", help="comma-separated: length, format (default: both)")
    ap.add_argument("--config", default=str(REPO / "bench" / "reshape.toml"), help="the runs' shared config")
    ap.add_argument("--work", default=None, help="folder of the run folders (default: the config's output_dir)")
    ap.add_argument("--backend", default=None, help="backend spec of the base model (default: the config's)")
    ap.add_argument("--train-prompts", type=int, default=64, help="seed tasks to train on (default 64)")
    ap.add_argument("--heldout", type=int, default=48, help="held-out prompts answered (default 48)")
    ap.add_argument("--heldout-prompts", default=str(REPO / "seeds" / "heldout_prompts.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=256, help="new tokens per held-out reply (default 256)")
    ap.add_argument("--pairs", choices=("judge", "revisions", "both"), default="judge",
                    help="what DPO and the reward model learn from: the judge's pairs (preferences.jsonl), each final "
                         "revision preferred over its first answer (critique_pairs.jsonl, p = 1), or both")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable)")
    ap.add_argument("--json", default=None, help="write the results here (default: WORK/reshape.json)")
    args = ap.parse_args()

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    axes = [a.strip() for a in args.axes.split(",") if a.strip()]
    for p in paths:
        if p not in PATHS:
            ap.error(f"--paths: unknown path {p!r}; expected sft, dpo or rl")
    for a in axes:
        if a not in AXES:
            ap.error(f"--axes: unknown axis {a!r}; expected length or format")
    config = Path(args.config).resolve()
    sets = list(args.sets)
    if args.backend:  # the base model answers, and the trainers start from it
        model = args.backend.partition(":")[2]
        sets += [f"backend.spec={args.backend}", f"sft.model={model}", f"rm.model={model}"]
    if args.work:
        sets.append(f"output_dir={Path(args.work).resolve()}")
        work = Path(args.work).resolve()
    else:
        from factory.config import load_config

        work = (REPO / load_config(config, []).output_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)

    tasks = [t for t in load_seeds(REPO / "seeds" / "seed_tasks.jsonl") if not t.is_classification]
    tasks = tasks[: args.train_prompts]
    train = work / f"train_prompts-{len(tasks)}.jsonl"
    text = "".join(json.dumps({"id": t.id, "prompt": task_prompt(t)}) + "\n" for t in tasks)
    if not train.is_file() or train.read_text(encoding="utf-8") != text:
        train.write_text(text, encoding="utf-8")
    heldout = [f"heldout.prompts={Path(args.heldout_prompts).resolve()}", f"heldout.limit={args.heldout}",
               f"heldout.params.max_tokens={args.max_tokens}", "heldout.params.temperature=0"]

    log_path = work / "reshape.log"
    timings: dict[str, float] = {}
    begin = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        stages = ["critique", "judge", "sft"] + (["dpo"] if "dpo" in paths else []) + (["rm", "ppo"] if "rl" in paths else [])
        measured = [PATHS[p] for p in paths]
        # The base model's replies are the same for every axis: one run, read on each.
        timings["base"] = factory_run(config, "base", sets + heldout + ['stages=["heldout"]', 'heldout.models=["base"]'],
                                      log)
        for axis in axes:
            read, down, up = AXES[axis]
            for name in (down, up):
                constitution = REPO / "principles" / f"{name}.yaml"
                data = [f"critique.constitution={constitution}", f"judge.constitution={constitution}",
                        f"critique.prompts={train}"]
                pairs = []
                if args.pairs != "judge":  # the pairs file is made from the critique's output: that runs first
                    factory_run(config, name, sets + data + ['stages=["critique", "judge"]'], log)
                    made = preference_file(work / name, args.pairs)
                    pairs = [f"dpo.pairs={made}", f"rm.pairs={made}"]
                timings[name] = factory_run(config, name, sets + heldout + data + pairs + [
                    f"stages={json.dumps(stages + ['heldout'])}", f"heldout.models={json.dumps(measured)}",
                    f"heldout.axis={read}", f"ppo.prompts={train}"], log)
    total = time.monotonic() - begin

    results: dict = {"model": None, "train_prompts": len(tasks), "heldout_prompts": None,
                     "max_tokens": args.max_tokens, "paths": paths, "axes": {}, "seconds": timings, "total_seconds": total}
    tok = None
    for axis in axes:
        read, down, up = AXES[axis]
        base = replies(work, "base", "base")
        results["model"] = base["spec"]
        if tok is None:
            from factory.llm.embedded import resolve_model
            from factory.train.models import load_tokenizer

            tok = load_tokenizer(resolve_model(base["spec"].partition(":")[2], "hf")[0])
        b = [axis_value(read, r["reply"]) for r in base["replies"]]
        results["heldout_prompts"] = len(b)
        out = {"measure": read, "down": down, "up": up, "paths": {},
               "base": {"mean": mean(b), "degenerate": base["degenerate"], "cut": cut_share(base, tok, args.max_tokens)}}
        print(f"\n{axis} ({read}): base model {describe(read, mean(b))}, degenerate {100 * base['degenerate']:.0f}%, "
              f"{100 * out['base']['cut']:.0f}% run to the {args.max_tokens}-token budget; {len(b)} held-out prompts")
        for path in paths:
            lo_run, hi_run = replies(work, down, PATHS[path]), replies(work, up, PATHS[path])
            if not [r["id"] for r in lo_run["replies"]] == [r["id"] for r in hi_run["replies"]] == [
                    r["id"] for r in base["replies"]]:
                raise SystemExit(f"{axis}/{path}: the runs answered different held-out prompts; rerun with the same "
                                 "--heldout and --heldout-prompts")
            lo = [axis_value(read, r["reply"]) for r in lo_run["replies"]]
            hi = [axis_value(read, r["reply"]) for r in hi_run["replies"]]
            row: dict = {name: {"mean": mean(v), "degenerate": run["degenerate"], "kl": run["kl"],
                                "cut": cut_share(run, tok, args.max_tokens)}
                         for name, v, run in ((down, lo, lo_run), (up, hi, hi_run))}
            if read == "words":
                est, ci_lo, ci_hi = bootstrap(hi, lo, "ratio")
                row |= {"vs_base": {down: div(mean(lo), mean(b)), up: div(mean(hi), mean(b))},
                        "ratio": est, "ci": [ci_lo, ci_hi]}
                row["met"] = (row["vs_base"][down] <= TARGET["down"] and row["vs_base"][up] >= TARGET["up"]
                              and est >= TARGET["ratio"] and ci_lo > TARGET["ratio_low"]
                              and max(lo_run["degenerate"], hi_run["degenerate"]) <= TARGET["degenerate"])
                effect = (f"{up}/{down} ratio {est:.2f} (95% CI {ci_lo:.2f}-{ci_hi:.2f}); "
                          f"{down} {row['vs_base'][down]:.2f}x base, {up} {row['vs_base'][up]:.2f}x base")
            else:
                est, ci_lo, ci_hi = bootstrap(hi, lo, "difference")
                row |= {"difference": est, "ci": [ci_lo, ci_hi]}
                row["met"] = (est >= TARGET["difference"] and ci_lo > 0
                              and max(lo_run["degenerate"], hi_run["degenerate"]) <= TARGET["degenerate"])
                effect = f"{up} - {down}: {100 * est:+.0f} points (95% CI {100 * ci_lo:+.0f} to {100 * ci_hi:+.0f})"
            out["paths"][path] = row
            kl = "/".join("-" if r["kl"] is None else f"{r['kl']:.3f}" for r in (lo_run, hi_run))
            print(f"  {path:4s} {down} {describe(read, mean(lo))}, {up} {describe(read, mean(hi))}; {effect}; "
                  f"degenerate {100 * lo_run['degenerate']:.0f}%/{100 * hi_run['degenerate']:.0f}%; "
                  f"at the budget {100 * row[down]['cut']:.0f}%/{100 * row[up]['cut']:.0f}%; "
                  f"KL to base {kl} nats/token; target {'met' if row['met'] else 'missed'}")
        if read == "words" and "sft" in paths:
            for path in paths:
                if path != "sft":
                    out["paths"][path]["above_sft"] = out["paths"][path]["ratio"] > out["paths"]["sft"]["ratio"]
        out["training_data"] = {name: training_data(work, name, read, sign) for name, sign in ((down, -1), (up, 1))}
        for name, d in out["training_data"].items():
            print(f"  {name} training data: first answers {describe(read, d['first_answers'])}, revisions "
                  f"{describe(read, d['revisions'])} ({100 * d['revisions_moved_the_right_way']:.0f}% moved the way "
                  f"{name} wants); {d['pairs']} judged pairs, mean p_chosen {d['mean_p_chosen']:.2f}, the judge's "
                  f"chosen reply is the one {name} wants in {100 * d['judge_agrees_with_axis']:.0f}% "
                  f"({d['pairs_tied_on_axis']} tied on the axis)")
        results["axes"][axis] = out
    print(f"\nmodel {results['model']}; {len(tasks)} training prompts; {results['heldout_prompts']} held-out prompts, greedy, "
          f"{args.max_tokens} new tokens; took {total / 60:.1f} min (runs already done are not redone)")
    target = Path(args.json) if args.json else work / "reshape.json"
    target.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {target}; each run's log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
