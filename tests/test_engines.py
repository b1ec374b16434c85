"""One model engine (hf or vLLM) alive at a time: on a GPU two do not fit (vLLM reserves most of
the card when it starts), so the pipeline lets the generator go before the judge loads, and the
other way round, and lets everything go before a trainer. That holds for the judge stage that
samples with the previous round's policy too: every sample is drawn before the judge loads.

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

import factory.pipeline as pipeline
from factory.config import load_config
from factory.llm import load_backend
from factory.judge import Sampled
from factory.layout import RunLayout
from factory.records import Judgment, Preference, Revision
from factory.store import read_jsonl

SAMPLES = RunLayout(Path()).judge_samples.name

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

    def __init__(self, load=load_backend):
        self.load = load
        self.live: Counter[str] = Counter()
        self.loads: list[str] = []
        self.peak = 0

    def __call__(self, bc, allow_pickle: bool = False):
        backend = self.load(bc, allow_pickle)
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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


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
    # Round 1's first stage loads the model anyway: it is loaded for the manifest, which records what it reports.
    first = json.loads((run / "round-1" / "manifest.json").read_text())["backend"]
    assert (first["device"], first["dtype"]) == ("cpu", "float32") and "loaded" not in first
    assert (manifest["device"], manifest["dtype"]) == ("cpu", "float32")  # remembered from round 1


def test_judge_samples_with_the_generator_engine_when_the_spec_is_the_same(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model, rounds=1, stages=("critique", "judge"), judge={"candidates": "samples"})
    pipeline.run_stages(cfg, echo=quiet)
    assert tally.loads == [f"hf:{tiny_model}"] and tally.peak == 1
    judged = read_jsonl(cfg.run_dir / "judgments.jsonl", Judgment)
    assert len(judged) == len(TOPICS) and {j.judge_model for j in judged} == {f"hf:{tiny_model}"}


def test_judge_sampling_with_the_previous_policy_holds_one_engine_at_a_time(tmp_path, tiny_model, tally):
    # vLLM specs, each engine a tiny hf model standing in (vLLM needs a GPU): until now this config was
    # refused, since the policy sampled and the judge judged batch by batch, both engines loaded.
    cfg = config(tmp_path, tiny_model, stages=("judge", "rm", "ppo"), spec=f"vllm:{tiny_model}",
                 judge={"candidates": "samples", "n": 3})

    def vllm_stand_in(bc, allow_pickle: bool = False):
        model = bc.spec.removeprefix("vllm:")
        backend = load_backend(bc.model_copy(update={"spec": f"hf:{model}"}), allow_pickle)
        backend.model_id = f"vllm:{model}"
        return backend

    tally.load = vllm_stand_in
    pipeline.run_stages(cfg, echo=quiet)
    policy_1 = cfg.run_dir / "round-1" / "policy" / "model"
    # Round 1: the configured model samples and judges. Round 2: round 1's policy samples every prompt
    # and is let go, then the configured model loads and judges.
    assert tally.loads == [f"vllm:{tiny_model}", f"vllm:{policy_1}", f"vllm:{tiny_model}"] and tally.peak == 1
    assert sum(tally.live.values()) == 0
    second = cfg.run_dir / "round-2"
    judged = read_jsonl(second / "judgments.jsonl", Judgment)
    drawn = {s.key: s.responses for s in read_jsonl(second / SAMPLES, Sampled)}
    assert len(judged) == len(TOPICS) and {j.judge_model for j in judged} == {f"vllm:{tiny_model}"}
    assert all(j.responses == drawn[j.key] for j in judged)  # the policy's samples, judged
    manifest = json.loads((second / "manifest.json").read_text())["backend"]
    assert (manifest["model_id"], manifest["generator"]) == (f"vllm:{tiny_model}", f"vllm:{policy_1}")


def test_a_round_started_afresh_loads_no_engine_only_for_its_manifest(tmp_path, tiny_model, tally):
    # Round 2 of a run whose round 1 is done, in a process of its own: the manifest names the judge
    # without loading it, so the policy (critique, then sampling for the judge) and the judge load once each.
    cfg = config(tmp_path, tiny_model, stages=("critique", "judge", "ppo"), judge={"candidates": "samples"})
    cfg = cfg.model_copy(update={"stages": ["critique", "judge"]})  # the round's data stages are what counts here
    policy_1 = cfg.run_dir / "round-1" / "policy" / "model"
    policy_1.parent.mkdir(parents=True)
    policy_1.symlink_to(tiny_model, target_is_directory=True)  # round 1's policy, as far as round 2 can tell
    backends = pipeline.Backends(cfg)
    pipeline.run_round(cfg, 2, backends, quiet)
    assert tally.loads == [f"hf:{policy_1}", f"hf:{tiny_model}"] and tally.peak == 1
    manifest = json.loads((cfg.run_dir / "round-2" / "manifest.json").read_text())["backend"]
    assert manifest == {"spec": f"hf:{tiny_model}", "model_id": f"hf:{tiny_model}", "path": str(tiny_model),
                        "device": "cpu", "dtype": "auto", "loaded": False, "generator": f"hf:{policy_1}"}
    backends.release()
    assert sum(tally.live.values()) == 0


def test_backends_let_the_other_engine_go(tmp_path, tiny_model, tally):
    cfg = config(tmp_path, tiny_model, rounds=1, stages=("critique",))
    other = tmp_path / "other"
    other.symlink_to(tiny_model, target_is_directory=True)
    a, b = f"hf:{tiny_model}", f"hf:{other}"
    backends = pipeline.Backends(cfg)
    assert backends.get(a) is backends.get(a)  # loaded once
    backends.get(b)
    assert list(backends.live) == [b] and tally.peak == 1
    assert backends.describe(a)["model_id"] == a and len(tally.loads) == 2  # remembered, not reloaded
    assert backends.describe(a)["device"] == "cpu" and "loaded" not in backends.describe(a)  # as the backend said
    backends.release()
    assert sum(tally.live.values()) == 0 and not backends.live
    assert backends.describe(b)["model_id"] == b and len(tally.loads) == 2
    # A spec never loaded is named as its backend would name itself, without loading it (unless asked to).
    third = tmp_path / "third"
    third.symlink_to(tiny_model, target_is_directory=True)
    c = f"hf:{third}"
    assert backends.describe(c) == {"model_id": c, "path": str(third), "device": "cpu", "dtype": "auto",
                                    "loaded": False}
    assert len(tally.loads) == 2
    assert backends.describe(c, load=True)["dtype"] == "float32" and tally.loads[-1] == c
    backends.release()


def test_freeing_memory_does_not_import_torch():
    code = "import sys, factory.pipeline as p; p.free_memory(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
