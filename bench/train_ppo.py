"""PPO benchmark: our trainer (factory/train/ppo.py) against TRL 1.12.0, on the embedded model, CPU, fp32.

Part 1, speed: seconds per PPO step, ours and ``trl.experimental.ppo.PPOTrainer`` (TRL 1.12.0, the
last release that shipped PPO), on the same prompts (the shipped seed tasks, or the red-team
prompts), the same models (policy and reference: the embedded SmolLM2-135M-Instruct; reward and
value: its backbone with one linear head, the same initial head for both trainers), the same batch,
mini-batch, PPO epochs, response length and sampling temperature. One warm-up step each, then the
mean of the timed steps; the ratio ours / TRL should be <= 1. Both run in this process, one
after the other, with the same torch threads.

Part 2, does it learn: a short PPO run of ours against a reward model trained briefly on real
preference pairs (tests/fixtures/human_pairs.jsonl, by factory.train.reward), or the one named by
--ppo-rm. It prints the mean reward-model score of greedy responses to held-out prompts at the
start and at the end, and the final KL to the reference against the stated bound.

Run it through bench/train.py (it sets up .bench-env with trl==1.12.0):

    python bench/train.py --part ppo [--quick] [--ppo-batch 8 ...]
    python bench/train_ppo.py [...]     (the same, re-run inside .bench-env)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT_FILES = {"seed": REPO / "seeds" / "seed_tasks.jsonl", "red_team": REPO / "seeds" / "red_team_prompts.jsonl"}
PAIRS = REPO / "tests" / "fixtures" / "human_pairs.jsonl"


def add_args(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("ppo")
    if "--quick" not in ap._option_string_actions:  # bench/train.py's other part may add it too
        ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that it runs")
    g.add_argument("--ppo-prompts", choices=sorted(PROMPT_FILES), default="seed", help="prompt set")
    g.add_argument("--ppo-batch", type=int, default=8, help="rollouts per PPO step")
    g.add_argument("--ppo-mini-batch", type=int, default=4, help="rollouts per gradient step")
    g.add_argument("--ppo-epochs", type=int, default=1, help="passes over each step's rollouts")
    g.add_argument("--ppo-response-length", type=int, default=32, help="tokens sampled per response")
    g.add_argument("--ppo-timed-steps", type=int, default=3, help="part 1: timed steps after one warm-up step")
    g.add_argument("--ppo-run-steps", type=int, default=30, help="part 2: PPO steps of the learning run")
    g.add_argument("--ppo-run-batch", type=int, default=4, help="part 2: rollouts per step")
    g.add_argument("--ppo-run-lr", type=float, default=2e-5, help="part 2: learning rate")
    g.add_argument("--ppo-kl-bound", type=float, default=6.0,
                   help="part 2: the bound the final KL (nats per response) should stay under (ppo.target_kl's default)")
    g.add_argument("--ppo-rm", type=Path, help="part 2: a reward-model folder (default: train one on human_pairs.jsonl)")
    g.add_argument("--ppo-rm-pairs", type=int, default=40, help="part 2: human pairs the reward model is trained on")
    g.add_argument("--ppo-part", choices=["speed", "learn", "both"], default="both")


def _prompts(which: str, limit: int | None = None) -> list[str]:
    out = []
    for line in PROMPT_FILES[which].read_text(encoding="utf-8").splitlines():
        obj = json.loads(line)
        if "prompt" in obj:
            out.append(obj["prompt"])
        else:
            first = obj["instances"][0]["input"] if obj.get("instances") else ""
            out.append(f"{obj['instruction']}\n\n{first}" if first else obj["instruction"])
    return out[:limit]


def _sizes(args) -> dict:
    if args.quick:
        return dict(batch=2, mini=1, epochs=1, length=8, timed=1, run_steps=2, run_batch=2, rm_pairs=8)
    return dict(batch=args.ppo_batch, mini=args.ppo_mini_batch, epochs=args.ppo_epochs, length=args.ppo_response_length,
                timed=args.ppo_timed_steps, run_steps=args.ppo_run_steps, run_batch=args.ppo_run_batch,
                rm_pairs=args.ppo_rm_pairs)


# -- part 1: speed ------------------------------------------------------------------------------


def _heads(model_dir: Path, work: Path, tok):
    """A sequence-classification model (TRL's reward and value models) and a reward-model folder of
    ours with the very same head, so both trainers start from identical weights."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from factory.train.models import ScalarModel

    torch.manual_seed(0)
    cls = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    cls.config.pad_token_id = tok.pad_token_id
    ours = ScalarModel.from_pretrained(model_dir, torch.device("cpu"), tok)
    with torch.no_grad():
        ours.head.weight.copy_(cls.score.weight)
        ours.head.bias.zero_()
    ours.save_pretrained(work / "rm")
    tok.save_pretrained(work / "rm")
    del ours
    return cls


def _time_trl(model_dir: Path, tok, prompts: list[str], s: dict, work: Path, temperature: float) -> list[float]:
    import copy

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from factory.train.chat import prompt_ids

    steps = 1 + s["timed"]
    rows = [{"input_ids": prompt_ids(tok, [{"role": "user", "content": p}])[-256:]} for p in prompts]
    train = Dataset.from_list(rows)
    tok.padding_side = "left"  # TRL's rollouts put the prompt on the left, its collator pads with the tokenizer
    config = PPOConfig(
        output_dir=str(work / "trl"), report_to="none", save_strategy="no", use_cpu=True, seed=0,
        # TRL 1.12: local batch = per_device_train_batch_size x gradient_accumulation_steps, split into
        # num_mini_batches; with no accumulation each mini-batch is one optimiser step, as in ours.
        per_device_train_batch_size=s["batch"], gradient_accumulation_steps=1, num_mini_batches=s["batch"] // s["mini"],
        num_ppo_epochs=s["epochs"], response_length=s["length"],
        local_rollout_forward_batch_size=s["batch"], total_episodes=s["batch"] * steps, temperature=temperature,
        stop_token="eos", missing_eos_penalty=1.0, kl_coef=0.05, learning_rate=3e-6, num_sample_generations=0,
        logging_steps=1, disable_tqdm=True, bf16=False, fp16=False,
    )
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reward = _heads(model_dir, work, tok)
    value = copy.deepcopy(reward)
    ref = copy.deepcopy(policy)
    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            marks.append(time.perf_counter())

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train.select(range(2)),
                         callbacks=[Clock()])
    trainer.train()
    tok.padding_side = "right"
    del trainer, policy, ref, reward, value
    gc.collect()
    return [b - a for a, b in zip(marks, marks[1:])]


def _time_ours(model_dir: Path, prompts: list[str], s: dict, work: Path, temperature: float) -> list[float]:
    from factory.config import RunConfig
    from factory.layout import RunLayout
    from factory.train.ppo import run_ppo

    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    steps = 1 + s["timed"]
    cfg = RunConfig(name="ours", output_dir=work, ppo=dict(
        policy=str(model_dir), reward_model=work / "rm", prompts=work / "prompts.jsonl", steps=steps,
        batch_size=s["batch"], mini_batch_size=s["mini"], ppo_epochs=s["epochs"], response_length=s["length"],
        temperature=temperature, lr=3e-6, eval_prompts=0, eval_every=10**6, checkpoint_every=10**6, device="cpu",
        seed=0, no_eos_score=-1.0, kl_coef=0.05))
    run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    rows = [json.loads(line) for line in (work / "ours" / "policy" / "metrics.jsonl").read_text().splitlines()]
    # Wall time between consecutive metric lines: everything a step does, logging included.
    marks = [r["elapsed_s"] for r in rows]
    gc.collect()
    return [b - a for a, b in zip(marks, marks[1:])]


def bench_speed(args, s: dict, model_dir: Path) -> dict:
    import torch

    from factory.train.models import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    # Exactly one batch of prompts: every step of either trainer rolls out the same prompts.
    prompts = _prompts(args.ppo_prompts, s["batch"])
    temperature = 0.7
    with tempfile.TemporaryDirectory(prefix="bench-ppo-") as tmp:
        work = Path(tmp)
        trl_steps = _time_trl(model_dir, tok, prompts, s, work, temperature)
        ours_steps = _time_ours(model_dir, prompts, s, work, temperature)
    trl_s = sum(trl_steps[1:]) / len(trl_steps[1:])
    ours_s = sum(ours_steps[1:]) / len(ours_steps[1:])
    result = {
        "setup": {"prompts": args.ppo_prompts, "batch_size": s["batch"], "mini_batch_size": s["mini"],
                  "ppo_epochs": s["epochs"], "response_length": s["length"], "timed_steps": s["timed"],
                  "temperature": temperature, "torch_threads": torch.get_num_threads()},
        "trl_s_per_step": round(trl_s, 2), "ours_s_per_step": round(ours_s, 2),
        "trl_steps_s": [round(x, 2) for x in trl_steps], "ours_steps_s": [round(x, 2) for x in ours_steps],
        "ratio_ours_over_trl": round(ours_s / trl_s, 3),
    }
    print(f"ppo speed: ours {ours_s:.2f} s/step, TRL {trl_s:.2f} s/step, ratio {ours_s / trl_s:.2f} (target <= 1.0)",
          flush=True)
    return result


# -- part 2: a short learning run ---------------------------------------------------------------


def _train_rm(work: Path, s: dict) -> Path:
    """A reward model on the embedded backbone, trained briefly on the human-labelled pairs."""
    try:
        from factory.layout import RunLayout
        from factory.train.reward import run_reward
    except ImportError:
        sys.exit("bench ppo: factory.train.reward is not there yet; pass a reward model with --ppo-rm PATH")
    from factory.config import RunConfig
    from factory.preferences import import_hh
    from factory.store import Store
    from factory.records import Preference

    run = work / "rm-run"
    run.mkdir(parents=True)
    prefs, _ = import_hh(PAIRS)
    Store(run / "preferences.jsonl", Preference).append(prefs[: s["rm_pairs"]])
    cfg = RunConfig(name="rm-run", output_dir=work, rm=dict(epochs=1, batch_size=8, max_length=256, held_out=0.1,
                                                              lr=2e-5, device="cpu", seed=0))
    run_reward(cfg.rm, RunLayout.of(cfg), echo=lambda *_: None)
    return run / "rm" / "model"


def bench_learn(args, s: dict, model_dir: Path) -> dict:
    from factory.config import RunConfig
    from factory.layout import RunLayout
    from factory.train.ppo import run_ppo

    with tempfile.TemporaryDirectory(prefix="bench-ppo-run-") as tmp:
        work = Path(tmp)
        t0 = time.time()
        rm = args.ppo_rm or _train_rm(work, s)
        rm_s = time.time() - t0
        prompts = _prompts(args.ppo_prompts)
        (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        eval_prompts = 2 if args.quick else 8
        cfg = RunConfig(name="learn", output_dir=work, ppo=dict(
            policy=str(model_dir), reward_model=rm, prompts=work / "prompts.jsonl", steps=s["run_steps"],
            batch_size=s["run_batch"], mini_batch_size=s["run_batch"], ppo_epochs=1, response_length=s["length"],
            lr=args.ppo_run_lr, eval_prompts=eval_prompts, kl_coef=0.05,
            # The held-out figure is the reward model's score, so the run optimises that score
            # itself: no fixed score for unfinished responses (ppo.no_eos_score) in between.
            no_eos_score=None,
            eval_every=max(1, s["run_steps"] // 3), checkpoint_every=10**6, device="cpu", seed=0))
        t0 = time.time()
        summary = run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
        ppo_s = time.time() - t0
        samples = [json.loads(x) for x in (work / "learn" / "policy" / "samples.jsonl").read_text().splitlines()]
    end = [x for x in samples if x["step"] == summary["steps"]][:2]
    kl = summary["kl_final"]
    result = {
        "reward_model": str(args.ppo_rm) if args.ppo_rm else f"trained here on {s['rm_pairs']} human pairs",
        "steps": summary["steps"], "batch_size": s["run_batch"], "lr": args.ppo_run_lr,
        "eval_score_start": summary["eval_score_start"], "eval_score_end": summary["eval_score_end"],
        "kl_final": kl, "kl_bound": args.ppo_kl_bound, "kl_within_bound": bool(kl is not None and kl < args.ppo_kl_bound),
        "seconds_per_step": summary["seconds_per_step"], "rm_train_s": round(rm_s, 1), "ppo_s": round(ppo_s, 1),
        "final_samples": [{"prompt": x["prompt"][:80], "response": x["response"][:160], "score": x["score"]} for x in end],
    }
    rose = summary["eval_score_end"] - summary["eval_score_start"]
    print(f"ppo learn: held-out RM score {summary['eval_score_start']:.3f} -> {summary['eval_score_end']:.3f} "
          f"({rose:+.3f}) in {summary['steps']} steps; final KL {kl:.3f} nats "
          f"({'within' if result['kl_within_bound'] else 'OVER'} the bound {args.ppo_kl_bound})", flush=True)
    return result


def bench_ppo(args) -> dict:
    import os

    from factory.llm.embedded import embedded_model_dir

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = embedded_model_dir(progress=False)
    s = _sizes(args)
    if s["batch"] % s["mini"]:
        raise SystemExit(f"--ppo-batch ({s['batch']}) must be a multiple of --ppo-mini-batch ({s['mini']})")
    out: dict = {}
    if args.ppo_part in ("speed", "both"):
        out["speed"] = bench_speed(args, s, model_dir)
    if args.ppo_part in ("learn", "both"):
        out["learn"] = bench_learn(args, s, model_dir)
    return out


def main() -> int:
    sys.path.insert(0, str(REPO / "bench"))
    from train import in_bench_env, make_env

    if not in_bench_env():  # TRL 1.12.0 lives in .bench-env only: run there
        import subprocess

        return subprocess.run([str(make_env()), __file__, *sys.argv[1:]], cwd=REPO).returncode
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(ap)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    result = bench_ppo(args)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
