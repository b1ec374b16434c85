"""Does editing the principle file move the model? Length under `concise` vs `detailed`.

The same 64 prompts (non-classification seed tasks) go through one critique -> revision
round under each of two constitutions that pull in opposite directions. The first
answers are identical (same model, prompts and seed); only the principles differ.
Prints the mean length in words of the final revisions under each, the ratio
detailed / concise, and a 95% bootstrap confidence interval of that ratio
(prompts resampled in pairs), whichever way it comes out.

    python bench/steer.py [--prompts 64] [--max-tokens 160] [--backend hf:embedded]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from factory.config import load_config
from factory.critique import run_critique
from factory.heldout import bootstrap, words
from factory.llm import load_backend
from factory.records import Revision
from factory.seeds import load_seeds, task_prompt
from factory.store import read_jsonl
from factory.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--backend", default="hf:embedded")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    tasks = [t for t in load_seeds(REPO / "seeds" / "seed_tasks.jsonl") if not t.is_classification][: args.prompts]
    work = Path(tempfile.mkdtemp(prefix="steer-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": t.id, "prompt": task_prompt(t)}) + "\n" for t in tasks), encoding="utf-8")

    backend = None
    lengths: dict[str, list[int]] = {}
    first: list[int] = []
    for name in ("concise", "detailed"):
        cfg = load_config(None, [
            f"output_dir={work}", f"name={name}", "stages=[critique]", f"backend.spec={args.backend}",
            f"critique.constitution={REPO / 'principles' / f'{name}.yaml'}", f"critique.prompts={prompts}",
            "critique.rounds=1", f"critique.params.max_tokens={args.max_tokens}", "critique.params.seed=0",
        ])
        backend = backend or load_backend(cfg.backend)
        print(f"{name}: critique -> revision on {len(tasks)} prompts ...", flush=True)
        run_critique(cfg, backend, RunLayout.of(cfg))
        recs = {r.prompt_id: r for r in read_jsonl(cfg.run_dir / "revisions.jsonl", Revision)}
        lengths[name] = [words(recs[t.id].final) for t in tasks]
        first = [words(recs[t.id].initial) for t in tasks]

    concise, detailed = lengths["concise"], lengths["detailed"]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    ratio = mean(detailed) / mean(concise)
    _, lo, hi = bootstrap(detailed, concise, "ratio")
    print(f"model: {backend.model_id}; {len(tasks)} prompts; one round; max {args.max_tokens} new tokens")
    print(f"mean words, first answers:            {mean(first):7.1f}")
    print(f"mean words, final under 'concise':    {mean(concise):7.1f}")
    print(f"mean words, final under 'detailed':   {mean(detailed):7.1f}")
    print(f"ratio detailed / concise: {ratio:.2f}  (95% bootstrap CI {lo:.2f} - {hi:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": backend.model_id, "first": mean(first), "concise": mean(concise),
                                               "detailed": mean(detailed), "ratio": ratio, "ci": [lo, hi]}, indent=2))
    backend.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
