"""Reward-model training speed and held-out accuracy: ours against TRL's ``RewardTrainer``.

Same pairs (tests/fixtures/human_pairs.jsonl, 64 HH-RLHF pairs, split by prompt with a fixed seed
into train and held-out), same tokens (both read the prompt + reply ids our trainer builds, cut
to the same max length), same model (the embedded SmolLM2-135M-Instruct with a scalar head),
batch size, optimiser steps (one epoch over the train pairs), learning rate and linear schedule,
fp32 on CPU. TRL runs with gradient checkpointing off (its default is on; ours has none, and
recomputing activations would only slow TRL down), no eval, no saving, no logging.

Timed: training only (model loading excluded). Ours is ``run_reward``'s training loop, which
includes its end-of-epoch checkpoint (weights and optimiser state written to disk); TRL's is
``trainer.train()``. Accuracy: each final model scores the held-out pairs' chosen and rejected
replies (ours through ``factory.train.reward.score``), and a pair counts when chosen scores higher.

Needs trl==1.12.0: run it through ``python bench/train.py --part rm [--quick]``, which sets up
.bench-env/. The machine is shared: the ratio, measured in one process, is what to read.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "tests" / "fixtures" / "human_pairs.jsonl"


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("rm")
    if "--quick" not in ap._option_string_actions:  # bench/train.py's other part may add it too
        ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    g.add_argument("--rm-batch", type=int, default=8, help="pairs per optimiser step")
    g.add_argument("--rm-max-length", type=int, default=256, help="tokens per prompt + reply")
    g.add_argument("--rm-lr", type=float, default=2e-5, help="peak learning rate (linear decay, no warm-up)")
    g.add_argument("--rm-held-out", type=int, default=16, help="prompts held out for accuracy")
    g.add_argument("--rm-steps", type=int, default=None,
                   help="optimiser steps (default: one epoch over the train pairs; at most that)")
    g.add_argument("--rm-seed", type=int, default=0, help="seed of the split, the heads and the data order")
    g.add_argument("--rm-ablate", action="store_true",
                   help="also run ours with share_prompt off (length bucketing only), to see what each part gives")


def split(prefs: list, held_out: int, seed: int) -> tuple[list, list]:
    """(train, held-out) records: whole prompts held out, so no held-out prompt was trained on."""
    prompts = sorted({json.dumps(p.messages, sort_keys=True) for p in prefs})
    random.Random(f"bench-rm:{seed}").shuffle(prompts)
    held = set(prompts[:held_out])
    return ([p for p in prefs if json.dumps(p.messages, sort_keys=True) not in held],
            [p for p in prefs if json.dumps(p.messages, sort_keys=True) in held])


def run_ours(work: Path, train: list, held: list, s: dict, model_dir: Path, share_prompt: bool = True) -> dict:
    import torch

    from factory.config import RunConfig
    from factory.records import Preference
    from factory.store import Store
    from factory.train.models import ScalarModel, load_tokenizer
    from factory.layout import RunLayout
    from factory.train.reward import run_reward
    from factory.train.scoring import score

    name = "ours" if share_prompt else "ours-plain"
    run = work / name
    run.mkdir(parents=True)
    Store(run / "preferences.jsonl", Preference).append(train)
    cfg = RunConfig(name=name, output_dir=work, rm=dict(
        model=str(model_dir), share_prompt=share_prompt, epochs=1, batch_size=s["batch"], max_length=s["max_length"], held_out=0.0,
        lr=s["lr"], device="cpu", seed=s["seed"], checkpoint_every=10**6))
    summary = run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    rows = [json.loads(x) for x in (run / "rm" / "metrics.jsonl").read_text().splitlines()]
    steps_s = max(r["elapsed_s"] for r in rows if "train/loss" in r)  # the steps alone, no checkpoint

    tok = load_tokenizer(str(run / "rm" / "model"))
    model = ScalarModel.from_pretrained(run / "rm" / "model", torch.device("cpu"), tok)
    convs = [[*p.messages, {"role": "assistant", "content": reply}] for p in held for reply in (p.chosen, p.rejected)]
    scores = score(model, tok, convs, 2 * s["batch"], s["max_length"], torch.device("cpu"))
    right = [scores[2 * i] > scores[2 * i + 1] for i in range(len(held))]
    return {"seconds": summary["seconds"], "steps_seconds": steps_s, "steps": summary["steps"],
            "pairs": len(train), "accuracy": sum(right) / len(right),
            "final_loss": [r["train/loss"] for r in rows if "train/loss" in r][-1]}


def run_trl(work: Path, train: list, held: list, s: dict, model_dir: Path) -> dict:
    import torch
    import datasets
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging
    from trl import RewardConfig, RewardTrainer

    from factory.train.chat import length_mask, pad_right
    from factory.train.models import load_tokenizer
    from factory.train.reward import make_pairs

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()  # the load report lists the new score head and the unused LM head
    tok = load_tokenizer(str(model_dir))  # pad <|endoftext|>, as ours; TRL sets config.pad_token_id from it
    torch.manual_seed(s["seed"])
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id

    def rows(prefs: list) -> list[dict]:
        pairs, _ = make_pairs(tok, prefs, s["max_length"], soft_labels=False)  # the very tokens ours trains on
        return [{"chosen_ids": list(x.chosen[0] + x.chosen[1]), "rejected_ids": list(x.rejected[0] + x.rejected[1])}
                for x in pairs]

    args = RewardConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=s["batch"], max_steps=s["steps"],
        learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_length=s["max_length"], gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True,
        dataloader_num_workers=0, seed=s["seed"])
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows(train)), processing_class=tok)
    t0 = time.time()
    out = trainer.train()
    seconds = time.time() - t0

    model.eval()
    right = []
    test = rows(held)
    with torch.no_grad():
        for i in range(0, len(test), s["batch"]):
            chunk = test[i: i + s["batch"]]
            seqs = [r["chosen_ids"] for r in chunk] + [r["rejected_ids"] for r in chunk]
            logits = model(input_ids=pad_right(seqs, tok.pad_token_id), attention_mask=length_mask(seqs)).logits
            r = logits.squeeze(-1)
            right += (r[: len(chunk)] > r[len(chunk):]).tolist()
    return {"seconds": seconds, "steps": trainer.state.global_step, "pairs": len(train),
            "accuracy": sum(right) / len(right), "final_loss": out.training_loss}


def warm_up(train: list, s: dict, model_dir: Path) -> None:
    """One untimed forward and backward, so that neither timed run pays the process's one-time
    costs (thread pools, allocator growth, first touch of the weights' pages)."""
    import torch

    from factory.train.models import ScalarModel, load_tokenizer
    from factory.train.reward import batch_loss, make_pairs

    tok = load_tokenizer(str(model_dir))
    model = ScalarModel.from_pretrained(model_dir, torch.device("cpu"), tok)
    pairs, _ = make_pairs(tok, train[: s["batch"]], s["max_length"], soft_labels=True)
    batch_loss(model, pairs, tok.pad_token_id, torch.device("cpu"), False, 2 * s["max_length"])[0].backward()


def bench_rm(args) -> dict:
    from factory.llm.embedded import embedded_model_dir
    from factory.preferences import import_hh

    quick = getattr(args, "quick", False)
    s = {"batch": 2 if quick else args.rm_batch, "max_length": 128 if quick else args.rm_max_length,
         "lr": args.rm_lr, "seed": args.rm_seed, "held_out": 4 if quick else args.rm_held_out}
    prefs, _ = import_hh(PAIRS)
    train, held = split(prefs, s["held_out"], s["seed"])
    epoch = math.ceil(len(train) / s["batch"])
    steps = 2 if quick else min(args.rm_steps or epoch, epoch)
    train = train[: steps * s["batch"]]  # exactly `steps` batches, one epoch, for both
    s["steps"] = math.ceil(len(train) / s["batch"])
    model_dir = embedded_model_dir(progress=False)
    print(f"bench rm: {len(train)} train / {len(held)} held-out pairs, batch {s['batch']}, max length "
          f"{s['max_length']}, {s['steps']} steps, lr {s['lr']}, fp32 CPU", flush=True)
    warm_up(train, s, model_dir)
    with tempfile.TemporaryDirectory(prefix="bench-rm-") as tmp:
        ours = run_ours(Path(tmp), train, held, s, model_dir)
        print(f"  ours done: {ours['seconds']:.1f} s", flush=True)
        plain = run_ours(Path(tmp), train, held, s, model_dir, share_prompt=False) if args.rm_ablate else None
        trl = run_trl(Path(tmp), train, held, s, model_dir)
        print(f"  trl  done: {trl['seconds']:.1f} s", flush=True)
    table = [("ours", ours), *([("plain", plain)] if plain else []), ("TRL", trl)]
    for _, r in table:
        r["pairs_per_s"] = r["pairs"] / r["seconds"]
    ratio = ours["pairs_per_s"] / trl["pairs_per_s"]
    print(f"\n  {'':6}{'steps':>7}{'train s':>10}{'pairs/s':>10}{'held-out acc':>14}{'final loss':>12}")
    for name, r in table:
        print(f"  {name:6}{r['steps']:>7}{r['seconds']:>10.1f}{r['pairs_per_s']:>10.3f}{r['accuracy']:>14.3f}"
              f"{r['final_loss']:>12.4f}")
    print(f"  ours / TRL pairs/s: {ratio:.2f}x  (ours, steps only, no checkpoint: "
          f"{ours['pairs'] / ours['steps_seconds']:.3f} pairs/s, "
          f"{ours['pairs'] / ours['steps_seconds'] / trl['pairs_per_s']:.2f}x)\n", flush=True)
    if plain:
        print(f"  ours with share_prompt off (bucketing only) / TRL: {plain['pairs_per_s'] / trl['pairs_per_s']:.2f}x",
              flush=True)
    return {"settings": s, "ours": ours, **({"ours_plain": plain} if plain else {}), "trl": trl, "speedup": ratio,
            "accuracy_gap": ours["accuracy"] - trl["accuracy"]}


def main() -> int:
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("bench rm needs trl==1.12.0: run `python bench/train.py --part rm`, which sets up .bench-env/")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    print(json.dumps(bench_rm(ap.parse_args()), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
