"""One model engine (hf or vLLM) alive at a time: on a GPU two do not fit (vLLM reserves most of
the card when it starts), so the pipeline lets the generator go before the judge loads, and the
other way round, and lets everything go before a trainer.

The stages run for real on the tiny random Llama (conftest); only ``load_backend`` is wrapped,
to count which backends are alive at each moment.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import factory.pipeline as pipeline
from factory.config import ConfigError, load_config
from factory.llm import load_backend
from factory.records import Judgment, Preference, Revision
from factory.store import read_jsonl

TOPICS = ["tea", "rain", "maps", "bread"]


def config(folder: Path, model: Path | str, rounds: int = 2, stages=("critique", "judge", "rm", "ppo"),
           spec: str | None = None, judge: dict | None = None, device: str = "cpu"):
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in TOPICS))
    raw = {
        "name": "engines", "output_dir": str(folder / "outputs"), "stages": list(stages), "rounds": rounds,
        "backend": {"spec": spec or f"hf:{model}", "batch_size": 16, "device": device},
        "critique": {"prompts": str(prompts), "params": {"max_tokens": 4}},
        "judge": {"prompts": str(prompts), "params": {"max_tokens": 4}, **(judge or {})},
        "rm": {"model": str(model), "batch_size": 2, "held_out": 0.25, "device": "cpu", "epochs": 1},
        "ppo": {"policy": str(model), "prompts": str(prompts), "steps": 1, "batch_size": 2, "mini_batch_size": 2,
                "ppo_epochs": 1, "response_length": 4, "max_prompt_length": 32, "eval_prompts": 2, "eval_every": 1,
                "checkpoint_every": 1, "device": "cpu"},
    }
    path = folder / "engines.json.yaml"  # JSON is YAML
    path.write_text(json.dumps(raw))
    return load_config(path)


class Tally:
    """The real ``load_backend``, counting the backends alive by kind; ``peak`` is the most engines
    (hf + vllm) ever alive at once, ``loads`` every spec loaded, in order."""

    def __init__(self):
        self.live: Counter[str] = Counter()
        self.loads: list[str] = []
        self.peak = 0

    def __call__(self, bc, allow_pickle: bool = False):
        backend = load_backend(bc, allow_pickle)
        kind = bc.spec.partition(":")[0]
        self.loads.append(bc.spec)
        self.live[kind] += 1
        self.peak = max(self.peak, self.live["hf"] + self.live["vllm"])
        close, closed = backend.close, []

        def counted_close():
            if not closed:
                closed.append(True)
                self.live[kind] -= 1
            close()

        backend.close = counted_close
        return backend


@pytest.fixture
def tally(monkeypatch):
    t = Tally()
    monkeypatch.setattr(pipeline, "load_backend", t)
    return t


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quiet(_: str) -> None:
    pass


def test_two_rounds_hold_one_engine_at_a_time(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model)
    pipeline.run_stages(cfg, echo=quiet)
    run = cfg.run_dir
    policy_1 = run / "round-1" / "policy" / "model"
    # Round 1: one engine writes and judges (same spec). Round 2: round 1's policy writes, is let
    # go, then the configured model judges; the manifest names the judge without loading it again.
    assert tally.peak == 1
    assert tally.loads == [f"hf:{tiny_model}", f"hf:{policy_1}", f"hf:{tiny_model}"]
    assert sum(tally.live.values()) == 0  # all closed at the end
    second = run / "round-2"
    assert {r.model for r in read_jsonl(second / "revisions.jsonl", Revision)} == {f"hf:{policy_1}"}
    assert {p.judge_model for p in read_jsonl(second / "preferences.jsonl", Preference)} == {f"hf:{tiny_model}"}
    manifest = json.loads((second / "manifest.json").read_text())["backend"]
    assert (manifest["model_id"], manifest["generator"]) == (f"hf:{tiny_model}", f"hf:{policy_1}")


def test_judge_samples_with_the_generator_engine_when_the_spec_is_the_same(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model, rounds=1, stages=("critique", "judge"), judge={"candidates": "samples"})
    pipeline.run_stages(cfg, echo=quiet)
    assert tally.loads == [f"hf:{tiny_model}"] and tally.peak == 1
    judged = read_jsonl(cfg.run_dir / "judgments.jsonl", Judgment)
    assert len(judged) == len(TOPICS) and {j.judge_model for j in judged} == {f"hf:{tiny_model}"}


def test_backends_let_the_other_engine_go_unless_asked_to_keep_it(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model, rounds=1, stages=("critique",))
    other = tmp_path / "other"
    other.symlink_to(tiny_model, target_is_directory=True)
    a, b = f"hf:{tiny_model}", f"hf:{other}"
    backends = pipeline.Backends(cfg)
    assert backends.get(a) is backends.get(a)  # loaded once
    backends.get(b)
    assert list(backends.live) == [b] and tally.peak == 1
    backends.get(a, beside=b)  # the judge stage sampling with one model and judging with another
    assert set(backends.live) == {a, b} and tally.peak == 2
    assert backends.describe(a)["model_id"] == a and len(tally.loads) == 3  # remembered, not reloaded
    backends.release()
    assert sum(tally.live.values()) == 0 and not backends.live
    assert backends.describe(b)["model_id"] == b and len(tally.loads) == 3


def test_two_vllm_engines_are_refused_before_any_model_loads(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model, spec=f"vllm:{tiny_model}", judge={"candidates": "samples"})
    with pytest.raises(ConfigError, match=r"two vLLM engines do not fit on one GPU.*judge.candidates = critique"):
        pipeline.run_stages(cfg, echo=quiet)
    assert tally.loads == []


def test_two_hf_models_on_cuda_warn_before_any_model_loads(tmp_path, tiny_model):
    said: list[str] = []
    samples = {"candidates": "samples"}
    pipeline.check_engines(config(tmp_path, tiny_model, judge=samples, device="cuda"), said.append)
    assert len(said) == 1 and "warning:" in said[0] and "both models fit in GPU memory" in said[0]
    for quiet_cfg in (config(tmp_path, tiny_model, judge=samples, device="cpu"),  # CPU memory: both fit
                      config(tmp_path, tiny_model, device="cuda"),  # critique candidates: one model at a time
                      config(tmp_path, tiny_model, rounds=1, stages=("critique", "judge"), judge=samples,
                             spec=f"vllm:{tiny_model}")):  # round 1 samples with the judge itself
        pipeline.check_engines(quiet_cfg, said.append)
    assert len(said) == 1


def test_freeing_memory_does_not_import_torch():
    code = "import sys, factory.pipeline as p; p.free_memory(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
