"""`factory run` over the whole loop, SIGKILLed at a random moment and run again, ends with the
same record counts as an uninterrupted run with the same seed.

The embedded model writes the data (so bootstrap and instances produce real instructions);
the tiny random Llama (conftest) is the reward model's and the policy's base, so the trainers
take seconds. The kill moment is drawn uniformly over the uninterrupted run's duration.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.llm.embedded import embedded_model_dir

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parent.parent


def write_config(folder: Path, tiny_model: Path) -> Path:
    config = {
        "name": "loop", "output_dir": str(folder / "outputs"),
        "stages": ["bootstrap", "instances", "critique", "judge", "rm", "ppo"],
        "backend": {"spec": "hf:embedded", "batch_size": 16, "device": "cpu"},
        "bootstrap": {"seeds": [str(ROOT / "seeds" / "seed_tasks.jsonl")], "target": 3, "requests_per_batch": 4,
                      "params": {"max_tokens": 40}},
        "instances": {"max_instances": 2, "calibration_size": 4, "params": {"max_tokens": 32}},
        "critique": {"constitution": str(ROOT / "principles" / "harmless.yaml"), "few_shot": 0,
                     "params": {"max_tokens": 16}},
        "judge": {"constitution": str(ROOT / "principles" / "harmless.yaml")},
        "rm": {"model": str(tiny_model), "batch_size": 2, "held_out": 0.0, "device": "cpu", "checkpoint_every": 1},
        "ppo": {"policy": str(tiny_model), "steps": 3, "batch_size": 2, "mini_batch_size": 2, "ppo_epochs": 1,
                "response_length": 6, "max_prompt_length": 48, "eval_prompts": 1, "eval_every": 3,
                "checkpoint_every": 1, "device": "cpu"},
    }
    path = folder / "loop.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def run(config: Path, cwd: Path, kill_after_s: float | None = None) -> tuple[int, float]:
    """Run `factory run CONFIG`; SIGKILL its process group after kill_after_s. Returns (exit code, seconds)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "factory.cli", "run", str(config), "--show", "0"], cwd=cwd,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=kill_after_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return -9, time.monotonic() - start
    assert proc.returncode == 0, err.decode()[-3000:]
    return 0, time.monotonic() - start


def counts(run_dir: Path) -> dict[str, int]:
    """Lines of every JSONL file, and which trained models exist."""
    out = {str(p.relative_to(run_dir)): len(p.read_text(encoding="utf-8").splitlines())
           for p in run_dir.rglob("*.jsonl")}
    out |= {f"{m}/model": int((run_dir / m / "model" / "config.json").is_file()) for m in ("rm", "policy")}
    return out


def test_kill_at_a_random_moment_then_rerun(tmp_path, tiny_model):
    embedded_model_dir()  # converted once, outside the timed runs
    whole = tmp_path / "whole"
    whole.mkdir()
    code, seconds = run(write_config(whole, tiny_model), whole)
    expected = counts(whole / "outputs" / "loop")
    assert expected["instructions.jsonl"] == 3 and expected["preferences.jsonl"] >= 1
    assert expected["policy/model"] == 1 and expected["policy/metrics.jsonl"] >= 3

    moment = random.Random().uniform(0.05 * seconds, 0.8 * seconds)
    for attempt in range(3):  # a run can go faster than the first one did; then kill earlier
        killed = tmp_path / f"killed-{attempt}"
        killed.mkdir()
        config = write_config(killed, tiny_model)
        print(f"uninterrupted run {seconds:.0f} s; killing the next one after {moment:.1f} s")
        code, _ = run(config, killed, kill_after_s=moment)
        if code == -9:
            break
        moment /= 2
    assert code == -9, "every run finished before its kill"
    partial = counts(killed / "outputs" / "loop")
    assert partial != expected  # the kill did cut the run short
    run(config, killed)
    assert counts(killed / "outputs" / "loop") == expected
