"""DPO benchmark: our trainer (factory/train/dpo.py) against TRL's ``DPOTrainer``, on the embedded model, CPU, fp32.

Part ``dpo``, speed and held-out accuracy. Same pairs (tests/fixtures/human_pairs.jsonl, 64 pairs,
whole prompts held out with a fixed seed; the train pairs cut to whole batches), same tokens (TRL
reads the prompt and reply ids our trainer builds, ``factory.train.reward.make_pairs``: the chat
template's prompt, each reply through its end-of-turn token, cut to the same max length), same
model (the embedded SmolLM2-135M-Instruct, policy and reference), batch size, optimiser steps
(the same epochs over the same train pairs), beta, sigmoid loss on hard labels (p = 1), learning
rate with a linear decay and no warm-up, AdamW without weight decay, gradient clipping at 1, fp32 on
the CPU. Both compute the reference's log-probs once before training (ours always does; TRL with
``precompute_ref_log_probs=True``, so it keeps no reference model in memory either); TRL runs with
gradient checkpointing off (its default is on; ours is off), no eval, no saving, no logging.

Each trainer runs in a child process of its own, so that its peak resident memory
(``ru_maxrss``) is its own. Timed: training only, the reference pass apart (ours: the summary's
``pairs_per_s``; TRL: ``trainer.train()``, its reference pass timed inside its constructor), and
"with the reference pass". Model loading, tokenisation and the final save are outside both.
Held-out accuracy: one function for both, in this process: each final model and the base model
(the reference) score the held-out pairs' replies, and a pair counts when its implicit reward
margin (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)) is positive.

Part ``online``, ours only: seconds per step of online DPO (the policy samples 2 replies to each
of 2 prompts, the judge labels them in both orders, a DPO step on those pairs) and of PPO with the
judge as reward and RLOO advantages (the same 2 x 2 rollouts a step), the judge being the embedded
model itself (hf:embedded), on the red-team prompts.

TRL 1.16.0 (the current release; PPO left TRL after 1.12.0) lives in .bench-env-dpo/ only: run
this through bench/train.py, which sets that environment up and re-runs itself there:

    python bench/train.py --part dpo [--quick] [--dpo-batch 8 --dpo-epochs 1 ...]
    python bench/train.py --part online [--quick] [--online-steps 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAIRS = REPO / "tests" / "fixtures" / "human_pairs.jsonl"
PROMPTS = REPO / "seeds" / "red_team_prompts.jsonl"
TRL_VERSION = "1.16.0"


def add_args(ap: argparse.ArgumentParser) -> None:
    if "--quick" not in ap._option_string_actions:  # bench/train.py's other parts may add it too
        ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    g = ap.add_argument_group("dpo")
    g.add_argument("--dpo-batch", type=int, default=8, help="pairs per optimiser step")
    g.add_argument("--dpo-max-length", type=int, default=256, help="tokens per prompt + reply")
    g.add_argument("--dpo-epochs", type=int, default=1, help="passes over the train pairs (the same steps for both)")
    g.add_argument("--dpo-lr", type=float, default=5e-6, help="peak learning rate (linear decay, no warm-up)")
    g.add_argument("--dpo-beta", type=float, default=0.1, help="DPO's beta")
    g.add_argument("--dpo-held-out", type=int, default=16, help="prompts held out for accuracy")
    g.add_argument("--dpo-train-pairs", type=int, default=None,
                   help="train pairs (default: all that are not held out, cut to whole batches)")
    g.add_argument("--dpo-seed", type=int, default=0, help="seed of the split and of both trainers")
    g.add_argument("--dpo-ablate", action="store_true", help="also run ours with share_prompt off")
    g.add_argument("--dpo-trl-live-ref", action="store_true",
                   help="also run TRL with its default reference handling (a reference forward every step)")
    g = ap.add_argument_group("online")
    g.add_argument("--online-steps", type=int, default=4, help="steps of each (also timed: the mean after the first)")
    g.add_argument("--online-response-length", type=int, default=32, help="tokens sampled per reply")


# -- held-out accuracy: one function for both ------------------------------------------------------


def reply_logps(model, seqs: list, pad_id: int, batch: int) -> list[float]:
    """Sum of the log-probs of each (prompt ids, reply ids)'s reply tokens, given its prompt."""
    import torch

    from factory.train.chat import length_mask, pad_right

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            chunk = seqs[i: i + batch]
            rows = [list(p) + list(r) for p, r in chunk]
            ids = pad_right(rows, pad_id)
            logits = model(input_ids=ids, attention_mask=length_mask(rows)).logits[:, :-1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for k, (p, r) in enumerate(chunk):
                out.append(float(logp[k, len(p) - 1: len(p) + len(r) - 1].sum()))
    return out


def held_out_accuracy(model_dirs: dict[str, Path], base: Path, held: list, s: dict) -> dict[str, dict]:
    """For each final model: the share of held-out pairs whose implicit reward margin is positive,
    and the mean of beta x that margin, against the base model as the reference."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from factory.train.models import load_tokenizer
    from factory.train.reward import make_pairs

    hf_logging.disable_progress_bar()
    tok = load_tokenizer(str(base))
    pairs, _ = make_pairs(tok, held, s["max_length"], soft_labels=False)
    seqs = [seq for x in pairs for seq in (x.chosen, x.rejected)]

    def logps(folder: Path) -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        try:
            return reply_logps(model, seqs, tok.pad_token_id, s["batch"])
        finally:
            del model
            gc.collect()

    ref = logps(base)
    out = {}
    for name, folder in model_dirs.items():
        pol = logps(folder)
        margins = [(pol[2 * i] - ref[2 * i]) - (pol[2 * i + 1] - ref[2 * i + 1]) for i in range(len(pairs))]
        out[name] = {"accuracy": sum(m > 0 for m in margins) / len(margins),
                     "reward_margin": s["beta"] * sum(margins) / len(margins)}
    return out


# -- the trainers, each in a child process -----------------------------------------------------


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_ours(spec: dict) -> dict:
    from factory.layout import RunLayout
    from factory.train.dpo import run_dpo
    from factory.train.settings import DPOConfig

    s = spec["settings"]
    run = Path(spec["work"]) / spec["name"]
    cfg = DPOConfig(
        pairs=Path(spec["train"]), model=spec["model"], beta=s["beta"], loss="sigmoid", soft_labels=False,
        epochs=s["epochs"], batch_size=s["batch"], max_length=s["max_length"], held_out=0.0,
        share_prompt=spec["share_prompt"], lr=s["lr"], schedule="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, device="cpu", dtype="float32", seed=s["seed"], checkpoint_every=10**6)
    t0 = time.perf_counter()
    summary = run_dpo(cfg, RunLayout(run), echo=lambda *_: None)
    wall = time.perf_counter() - t0
    pairs = s["pairs_trained"]
    ref_s = float(summary.get("reference_seconds") or 0.0)
    train_pps = float(summary["pairs_per_s"])  # its training loop: steps, epoch-end checkpoints (no reference pass)
    rows = [json.loads(x) for x in RunLayout(run).dpo.metrics.read_text().splitlines() if x.strip()]
    steps_s = max(r["elapsed_s"] for r in rows if "train/loss" in r)  # up to the last step: no final checkpoint
    return {"steps": summary["steps"], "pairs": pairs, "pairs_per_s": train_pps,
            "train_seconds": float(summary["seconds"]), "steps_seconds": steps_s, "reference_seconds": ref_s,
            "pairs_per_s_with_reference": pairs / (pairs / train_pps + ref_s),
            "run_dpo_wall_seconds": wall, "peak_rss_mib": peak_rss_mib(),
            "model": str(RunLayout(run).dpo.model),
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool)) or v is None}}


def child_trl(spec: dict) -> dict:
    import datasets
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    from factory.records import Preference
    from factory.store import read_jsonl
    from factory.train.models import load_tokenizer
    from factory.train.reward import make_pairs

    assert trl.__version__ == TRL_VERSION, f"bench dpo wants trl=={TRL_VERSION}, found {trl.__version__}"
    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    s = spec["settings"]
    tok = load_tokenizer(spec["model"])  # pad <|endoftext|>, as ours
    pairs, _ = make_pairs(tok, read_jsonl(Path(spec["train"]), Preference), s["max_length"], soft_labels=False)
    rows = []
    for x in pairs:
        # One prompt per pair in TRL's format. Cut to max_length, a pair's two prompts differ only when
        # a side was cut (the one kept shorter is then a suffix of the other): take that one.
        prompt = min(x.chosen[0], x.rejected[0], key=len)
        rows.append({"prompt_ids": list(prompt), "chosen_ids": list(x.chosen[1]), "rejected_ids": list(x.rejected[1])})
    live = spec["name"] == "trl-live-ref"

    class SameTokens(DPOTrainer):
        """TRL's DPOTrainer, given the very ids ours trains on (its tokenisation skipped), its
        reference pass timed."""

        reference_seconds = 0.0

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            self.reference_seconds += time.perf_counter() - t0
            return out

    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32) if live else None
    args = DPOConfig(
        output_dir=str(Path(spec["work"]) / spec["name"]), per_device_train_batch_size=s["batch"],
        max_steps=s["steps"], learning_rate=s["lr"], lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, beta=s["beta"], loss_type=["sigmoid"], max_length=s["max_length"],
        precompute_ref_log_probs=not live, precompute_ref_batch_size=s["batch"], gradient_checkpointing=False,
        bf16=False, fp16=False, use_cpu=True, eval_strategy="no", save_strategy="no", logging_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_num_workers=0, seed=s["seed"],
        optim="adamw_torch_fused")  # as ours: AdamW, fused kernel (also TRL's default with torch >= 2.8)
    trainer = SameTokens(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok)
    t0 = time.perf_counter()
    out = trainer.train()
    seconds = time.perf_counter() - t0
    folder = Path(spec["work"]) / spec["name"] / "model"
    trainer.save_model(str(folder))
    pairs = trainer.state.global_step * s["batch"]
    ref_s = trainer.reference_seconds
    return {"steps": trainer.state.global_step, "pairs": pairs, "pairs_per_s": pairs / seconds,
            "train_seconds": seconds, "reference_seconds": ref_s,
            "pairs_per_s_with_reference": pairs / (seconds + ref_s), "peak_rss_mib": peak_rss_mib(),
            "final_loss": out.training_loss, "model": str(folder), "trl": trl.__version__,
            "reference": "live: a reference model's forward every step" if live else "precomputed before training"}


def run_child(name: str, spec: dict, work: Path) -> dict:
    """Run one trainer in a fresh process of this interpreter; its result as a dict."""
    spec = {**spec, "name": name}
    spec_file, result_file = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, __file__, "--child", str(spec_file), str(result_file)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not result_file.is_file():
        sys.stderr.write(proc.stdout[-6000:])
        raise SystemExit(f"bench dpo: the {name} run failed (exit {proc.returncode})")
    return json.loads(result_file.read_text())


def bench_dpo(args) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from train_rm import split

    from factory.llm.embedded import embedded_model_dir
    from factory.preferences import import_hh
    from factory.records import Preference
    from factory.store import Store

    quick = getattr(args, "quick", False)
    s = {"batch": 2 if quick else args.dpo_batch, "max_length": 128 if quick else args.dpo_max_length,
         "epochs": 1 if quick else args.dpo_epochs, "lr": args.dpo_lr, "beta": args.dpo_beta, "seed": args.dpo_seed,
         "held_out": 4 if quick else args.dpo_held_out, "loss": "sigmoid", "labels": "hard (p = 1)",
         "dtype": "float32", "device": "cpu", "schedule": "linear, no warm-up", "weight_decay": 0.0,
         "max_grad_norm": 1.0}
    prefs, _ = import_hh(PAIRS)
    train, held = split(prefs, s["held_out"], s["seed"])
    limit = 4 if quick else (args.dpo_train_pairs or len(train))
    train = train[: min(limit, len(train)) // s["batch"] * s["batch"]]  # whole batches: the same steps for both
    if not train:
        raise SystemExit("bench dpo: fewer train pairs than one batch")
    s["train_pairs"] = len(train)
    s["held_out_pairs"] = len(held)
    s["steps"] = s["epochs"] * len(train) // s["batch"]
    s["pairs_trained"] = s["steps"] * s["batch"]
    model_dir = embedded_model_dir(progress=False)
    import torch

    s["torch_threads"] = torch.get_num_threads()
    print(f"bench dpo: {len(train)} train / {len(held)} held-out pairs, batch {s['batch']}, max length "
          f"{s['max_length']}, {s['epochs']} epoch(s) = {s['steps']} steps, beta {s['beta']}, lr {s['lr']}, "
          f"fp32 CPU, TRL {TRL_VERSION}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-dpo-") as tmp:
        work = Path(tmp)
        Store(work / "train.jsonl", Preference).append(train)
        spec = {"settings": s, "work": str(work), "train": str(work / "train.jsonl"), "model": str(model_dir),
                "share_prompt": True}
        runs = {"ours": run_child("ours", spec, work)}
        print(f"  ours done: {runs['ours']['train_seconds']:.1f} s training "
              f"(+{runs['ours']['reference_seconds']:.1f} s reference)", flush=True)
        if args.dpo_ablate:
            runs["ours-plain"] = run_child("ours-plain", {**spec, "share_prompt": False}, work)
        runs["trl"] = run_child("trl", spec, work)
        print(f"  trl  done: {runs['trl']['train_seconds']:.1f} s training "
              f"(+{runs['trl']['reference_seconds']:.1f} s reference)", flush=True)
        if args.dpo_trl_live_ref:
            runs["trl-live-ref"] = run_child("trl-live-ref", spec, work)
        acc = held_out_accuracy({k: Path(r["model"]) for k, r in runs.items()}, model_dir, held, s)
    for name, r in runs.items():
        r.update(acc[name])
        r.pop("model")
    ours, trl = runs["ours"], runs["trl"]
    if len({r["steps"] for r in runs.values()}) > 1:
        print(f"  warning: the trainers took different numbers of steps: "
              f"{ {k: r['steps'] for k, r in runs.items()} }", flush=True)
    ratio = ours["pairs_per_s"] / trl["pairs_per_s"]
    ratio_ref = ours["pairs_per_s_with_reference"] / trl["pairs_per_s_with_reference"]
    print(f"\n  {'':13}{'steps':>6}{'train s':>9}{'ref s':>7}{'pairs/s':>9}{'+ref pairs/s':>13}{'held-out acc':>14}"
          f"{'margin':>8}{'peak RSS MiB':>14}")
    for name, r in runs.items():
        print(f"  {name:13}{r['steps']:>6}{r['train_seconds']:>9.1f}{r['reference_seconds']:>7.1f}"
              f"{r['pairs_per_s']:>9.3f}{r['pairs_per_s_with_reference']:>13.3f}{r['accuracy']:>14.3f}"
              f"{r['reward_margin']:>8.3f}{r['peak_rss_mib']:>14.0f}")
    target = ratio >= 1.5 and ours["accuracy"] >= trl["accuracy"]
    print(f"  ours / TRL pairs/s: {ratio:.2f}x training only, {ratio_ref:.2f}x with the reference pass; held-out "
          f"accuracy {ours['accuracy']:.3f} vs {trl['accuracy']:.3f} (target: >= 1.5x at no lower accuracy: "
          f"{'met' if target else 'NOT met'})\n", flush=True)
    return {"settings": s, **{k.replace("-", "_"): r for k, r in runs.items()}, "speedup": ratio,
            "speedup_with_reference": ratio_ref, "accuracy_gap": ours["accuracy"] - trl["accuracy"],
            "target_met": target}


# -- online DPO and PPO with the judge, ours only ------------------------------------------------


def _per_step(summary: dict, metrics: Path, judge_calls: int) -> dict:
    """A trainer's seconds per step: its summary's mean, and the mean after the first step (which
    pays the process's one-time costs), with the mean time of each part of a step."""
    rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.is_file() else []
    rows = [r for r in rows if "time/step_s" in r]
    later = rows[1:] or rows
    parts = sorted({k for r in later for k in r if k.startswith("time/") and k != "time/step_s"})
    return {"seconds_per_step": summary.get("seconds_per_step"), "steps": summary.get("steps"),
            "seconds_per_step_after_first": round(sum(r["time/step_s"] for r in later) / len(later), 3) if later
            else None,
            "parts_after_first": {k: round(sum(r.get(k, 0.0) for r in later) / len(later), 3) for k in parts},
            "judge_calls": judge_calls,
            "summary": {k: v for k, v in summary.items() if isinstance(v, (int, float, str, bool))}}


def bench_online(args) -> dict:
    from factory.config import JudgeConfig
    from factory.feedback import Labeller
    from factory.layout import RunLayout
    from factory.llm import load_backend
    from factory.llm.embedded import embedded_model_dir
    from factory.llm.settings import BackendConfig
    from factory.train.dpo import run_dpo
    from factory.train.ppo import run_ppo
    from factory.train.settings import DPOConfig, PPOConfig

    quick = getattr(args, "quick", False)
    steps = 2 if quick else args.online_steps
    length = 8 if quick else args.online_response_length
    model_dir = str(embedded_model_dir(progress=False))
    backend = load_backend(BackendConfig(spec="hf:embedded", device="cpu", dtype="float32"))
    labeller = Labeller.of(backend, JudgeConfig(constitution=REPO / "principles" / "harmless.yaml"))
    setup = {"prompts": str(PROMPTS.relative_to(REPO)), "prompts_per_step": 2, "samples": 2,
             "response_length": length, "steps": steps, "judge": "hf:embedded", "device": "cpu", "dtype": "float32"}
    print(f"bench online: {steps} steps each, 2 prompts x 2 samples a step, {length} tokens a reply, "
          f"judge hf:embedded, fp32 CPU", flush=True)
    out: dict = {"setup": setup}
    with tempfile.TemporaryDirectory(prefix="bench-online-") as tmp:
        work = Path(tmp)
        calls = labeller.calls
        dpo = run_dpo(DPOConfig(
            model=model_dir, online=True, steps=steps, batch_size=2, samples=2, response_length=length,
            prompts=PROMPTS, held_out=0.0, device="cpu", dtype="float32", seed=0, checkpoint_every=10**6),
            RunLayout(work / "dpo"), labeller=labeller, echo=lambda *_: None)
        out["online_dpo"] = _per_step(dpo, RunLayout(work / "dpo").dpo.metrics, labeller.calls - calls)
        print(f"  online DPO: {out['online_dpo']['seconds_per_step']} s/step "
              f"({out['online_dpo']['seconds_per_step_after_first']} after the first)", flush=True)
        calls = labeller.calls
        ppo = run_ppo(PPOConfig(
            policy=model_dir, reward="judge", advantage="rloo", samples=2, batch_size=4, mini_batch_size=2,
            ppo_epochs=1, steps=steps, response_length=length, prompts=PROMPTS, eval_prompts=2,
            eval_every=10**6, checkpoint_every=10**6, device="cpu", dtype="float32", seed=0),
            RunLayout(work / "ppo"), labeller=labeller, echo=lambda *_: None)
        out["ppo_judge_rloo"] = _per_step(ppo, RunLayout(work / "ppo").policy.metrics, labeller.calls - calls)
        print(f"  PPO (judge reward, RLOO): {out['ppo_judge_rloo']['seconds_per_step']} s/step "
              f"({out['ppo_judge_rloo']['seconds_per_step_after_first']} after the first)", flush=True)
    return out


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":  # one trainer, in a process of its own
        spec = json.loads(Path(sys.argv[2]).read_text())
        run = child_trl if spec["name"].startswith("trl") else child_ours
        Path(sys.argv[3]).write_text(json.dumps(run(spec)))
        return 0
    sys.path.insert(0, str(REPO / "bench"))
    from train import main as bench_main

    if not any(a == "--part" or a.startswith("--part=") for a in sys.argv[1:]):
        sys.argv[1:1] = ["--part", "dpo"]
    return bench_main()


if __name__ == "__main__":
    sys.exit(main())
