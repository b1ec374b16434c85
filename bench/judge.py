"""Judge throughput in pairs/s: ``judge_groups`` batched against scoring one order at a time.

The pairs are the first ``--pairs`` human-labelled pairs of tests/fixtures/human_pairs.jsonl,
each judged under one principle in both orders, on the embedded model on CPU. Ours is one
``judge_groups`` call: every order of every pair is scored in batches of ``--batch-size`` rows,
and the backend runs each batch's common prefix (the judge's system turn) once. The reference
builds the very same requests and calls ``option_logprobs`` once per order, alone, then combines
the two orders exactly as ``judge_groups`` does. Both must give the same soft label for every
pair (within 1e-3: batching and padding must not change the answer), or the script fails.
Runs alternate between the two after a warm-up and the best of each is kept, because these
machines are shared and noisy: the ratio is what matters.

    python bench/judge.py [--pairs 24] [--batch-size 64] [--repeats 1] [--threads 0] [--principle accuracy]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from factory.constitution import Principle, load_constitution, render
from factory.comparisons import LETTERS, Group, judge_groups, judge_messages, presentations
from factory.llm.hf import HFBackend
from factory.preferences import import_hh, prompt_text

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-3


def one_by_one(backend: HFBackend, groups: list[Group]) -> list[float]:
    """The reference: each order of each pair scored in its own call, combined as judge_groups does."""
    labels = []
    for group in groups:
        conversation = prompt_text(group.messages)
        principle: Principle = group.principles[0]
        question = render(principle.judge, prompt=conversation)
        p_orders = []
        for order in presentations(2, "pairwise"):  # (0, 1) then (1, 0)
            request = judge_messages(conversation, question, [group.responses[i] for i in order])
            scores = backend.option_logprobs([request], list(LETTERS[:2]))[0]
            prob = {resp: math.exp(scores[LETTERS[pos]]) for pos, resp in enumerate(order)}
            total = prob[0] + prob[1]
            p_orders.append(prob[0] / total if total > 0 else 0.5)
        labels.append(sum(p_orders) / len(p_orders))
    return labels


def batched(backend: HFBackend, groups: list[Group]) -> list[float]:
    return [comparisons[0].p for comparisons in judge_groups(backend, groups)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--data", default=str(REPO / "tests/fixtures/human_pairs.jsonl"))
    ap.add_argument("--constitution", default=str(REPO / "principles/helpful-honest.yaml"))
    ap.add_argument("--principle", default="accuracy")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    principle = load_constitution(Path(args.constitution)).get(args.principle)
    pairs, _ = import_hh(Path(args.data))
    groups = [Group(p.messages, [p.chosen, p.rejected], [principle]) for p in pairs[: args.pairs]]
    backend = HFBackend(args.model, device=args.device, batch_size=args.batch_size)
    print(f"model {backend.model_id} on {backend.device}, {torch.get_num_threads()} threads, "
          f"{len(groups)} pairs x 2 orders under '{principle.id}', batch size {args.batch_size}, "
          f"best of {args.repeats}")
    one_by_one(backend, groups[:2])  # warm-up
    batched(backend, groups[:2])

    best = {"one_by_one": 0.0, "batched": 0.0}
    labels: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for name, fn in (("one_by_one", one_by_one), ("batched", batched)):
            t0 = time.perf_counter()
            labels[name] = fn(backend, groups)
            best[name] = max(best[name], len(groups) / (time.perf_counter() - t0))
    diff = max(abs(a - b) for a, b in zip(labels["one_by_one"], labels["batched"]))
    ratio = best["batched"] / best["one_by_one"]
    print(f"one by one {best['one_by_one']:.2f} pairs/s, batched {best['batched']:.2f} pairs/s, "
          f"ratio (batched / one by one) {ratio:.2f}")
    ok = diff <= TOLERANCE
    print(f"max |p batched - p one by one| = {diff:.2e} over {len(groups)} pairs: "
          + ("PASS" if ok else f"FAIL (above {TOLERANCE:g})"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(backend.device), "threads": torch.get_num_threads(), "pairs": len(groups),
                       "batch_size": args.batch_size, "one_by_one_pairs_s": best["one_by_one"],
                       "batched_pairs_s": best["batched"], "ratio": ratio, "max_abs_diff": diff}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
