"""`factory run` over the whole loop: data stages, trainers, and RLAIF rounds.

Everything here runs real models: the tiny random Llama (conftest) generates, judges and is
trained, so the loop's plumbing is exercised in seconds; the text it writes is noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from factory.cli import cli
from factory.config import ConfigError, load_config
from factory.layout import RunLayout
from factory.pipeline import check_inputs
from factory.records import Preference, Revision
from factory.store import read_jsonl

TOPICS = ["tea", "rain", "maps", "bread", "owls", "clocks"]


def loop_config(folder: Path, model: Path, rounds: int = 2, stages=("critique", "judge", "rm", "ppo")) -> Path:
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in TOPICS))
    config = {
        "name": "loop", "output_dir": str(folder / "outputs"), "stages": list(stages), "rounds": rounds,
        "backend": {"spec": f"hf:{model}", "batch_size": 16, "device": "cpu"},
        "critique": {"prompts": str(prompts), "params": {"max_tokens": 6}},
        "rm": {"model": str(model), "batch_size": 2, "held_out": 0.2, "device": "cpu", "lr": 1e-3},
        "dpo": {"model": str(model), "batch_size": 2, "held_out": 0.2, "max_length": 64, "device": "cpu", "lr": 1e-3,
                "prompts": str(prompts), "steps": 2, "response_length": 6, "checkpoint_every": 1},
        "ppo": {"policy": str(model), "prompts": str(prompts), "steps": 2, "batch_size": 2, "mini_batch_size": 2,
                "ppo_epochs": 1, "response_length": 6, "max_prompt_length": 32, "eval_prompts": 2, "eval_every": 2,
                "checkpoint_every": 2, "device": "cpu", "lr": 1e-3},
    }
    path = folder / "loop.json.yaml"  # JSON is YAML
    path.write_text(json.dumps(config))
    return path


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


def test_two_rounds(tmp_path, tiny_model):
    config = loop_config(tmp_path, tiny_model)
    result = CliRunner().invoke(cli, ["run", str(config), "--show", "1"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "outputs" / "loop"
    first, second = RunLayout(run).round_dirs()
    assert (first.name, second.name) == ("round-1", "round-2")
    assert "round 2 of 2" in result.output
    page = run / "report" / "index.html"
    assert f"report: {page}" in result.output and (run / "report" / "rounds.png").is_file()
    policy_1 = first / "policy" / "model"
    for folder in (first, second):
        assert len(read_jsonl(folder / "revisions.jsonl", Revision)) == len(TOPICS)
        assert read_jsonl(folder / "preferences.jsonl", Preference)
        assert (folder / "rm" / "model" / "scalar_model.json").is_file()
        assert (folder / "policy" / "model" / "config.json").is_file()

    # Round 2's answers come from round 1's policy; the judge stays the configured model.
    assert {r.model for r in read_jsonl(second / "revisions.jsonl", Revision)} != \
        {r.model for r in read_jsonl(first / "revisions.jsonl", Revision)}
    assert str(policy_1) in {r.model for r in read_jsonl(second / "revisions.jsonl", Revision)}.pop()
    judges = {p.judge_model for f in (first, second) for p in read_jsonl(f / "preferences.jsonl", Preference)}
    assert len(judges) == 1
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["backend"]["generator"] == f"hf:{policy_1}"
    assert manifest["config"]["ppo"]["policy"] == str(policy_1)

    # Round 2's PPO starts from round 1's final policy: its step-0 greedy samples are the ones
    # round 1 ended with (same held-out prompts, greedy decoding).
    end_1 = [r for r in rows(first / "policy" / "samples.jsonl") if r["step"] == 2]
    start_2 = [r for r in rows(second / "policy" / "samples.jsonl") if r["step"] == 0]
    assert [r["response"] for r in start_2] == [r["response"] for r in end_1] and end_1
    # ... and each round moved its policy: weights differ from where the round started.
    weights = [load_file(f / "model.safetensors") for f in (tiny_model, policy_1, second / "policy" / "model")]
    for before, after in zip(weights, weights[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)

    # A rerun of the finished run does no work.
    before = {p: p.read_bytes() for p in run.rglob("*.jsonl")}
    again = CliRunner().invoke(cli, ["run", str(config), "--show", "0"])
    assert again.exit_code == 0, again.output
    assert {p: p.read_bytes() for p in run.rglob("*.jsonl")} == before
    assert "critique: 0 written" in again.output and "nothing to do" in again.output


@pytest.mark.parametrize("online", [False, True], ids=["offline", "online"])
def test_two_rounds_of_dpo(tmp_path, tiny_model, online):
    stages = ("critique", "dpo") if online else ("critique", "judge", "dpo")
    config = loop_config(tmp_path, tiny_model, stages=stages)
    args = ["run", str(config), "--show", "0"] + (["--set", "dpo.online=true"] if online else [])
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "outputs" / "loop"
    first, second = RunLayout(run).round_dirs()
    for folder in (first, second):
        assert (folder / "dpo" / "model" / "config.json").is_file()
        summary = json.loads((folder / "dpo" / "summary.json").read_text())
        assert summary["steps"] > 0
        if online:
            assert len(rows(folder / "dpo" / "online.jsonl")) == 2
        else:
            assert len(rows(folder / "dpo" / "reference.jsonl")) == 1 + len(rows(folder / "preferences.jsonl"))
    # Round 2 answers with round 1's DPO policy and starts its DPO from it (its reference too).
    policy_1 = first / "dpo" / "model"
    assert str(policy_1) in {r.model for r in read_jsonl(second / "revisions.jsonl", Revision)}.pop()
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["backend"]["generator"] == f"hf:{policy_1}" and manifest["config"]["dpo"]["model"] == str(policy_1)
    weights = [load_file(f / "model.safetensors") for f in (tiny_model, policy_1, second / "dpo" / "model")]
    for before, after in zip(weights, weights[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)
    # The policy answers through hf:RUN/dpo/model; a rerun does no work.
    from factory.llm import load_backend
    from factory.llm.base import GenParams
    from factory.llm.settings import BackendConfig

    backend = load_backend(BackendConfig(spec=f"hf:{second / 'dpo' / 'model'}", device="cpu"))
    try:
        assert backend.generate([[{"role": "user", "content": "Hi"}]], GenParams(max_tokens=4, temperature=0))[0]
    finally:
        backend.close()
    before = {p: p.read_bytes() for p in run.rglob("*.jsonl")}
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert {p: p.read_bytes() for p in run.rglob("*.jsonl")} == before
    assert "already finished" in again.output


def test_ppo_with_the_judge_as_reward_and_rloo(tmp_path, tiny_model):
    """`factory run` with PPO and no reward model: the judge scores each rollout against the rest of
    its group (rloo), two rounds; round 2's policy starts from round 1's."""
    config = loop_config(tmp_path, tiny_model, stages=("critique", "ppo"))
    args = ["run", str(config), "--show", "0", "--set", "ppo.reward=judge", "--set", "ppo.advantage=rloo",
            "--set", "ppo.samples=2", "--set", "ppo.batch_size=4", "--set", "ppo.no_eos_score=null"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    run = tmp_path / "outputs" / "loop"
    first, second = RunLayout(run).round_dirs()
    for folder in (first, second):
        steps = [r for r in rows(folder / "policy" / "metrics.jsonl") if "objective/kl" in r]
        assert [r["step"] for r in steps] == [1, 2]
        assert steps[0]["judge/calls"] == 2 * 2  # 2 prompts, 1 pair each, both orders (step 2 evaluates too)
        assert not (folder / "policy" / "checkpoint" / "value.safetensors").exists()  # rloo: no value model
        assert (folder / "policy" / "model" / "config.json").is_file()
    manifest = json.loads((second / "manifest.json").read_text())
    assert manifest["config"]["ppo"]["policy"] == str(first / "policy" / "model")


def test_the_judge_is_its_own_model(tmp_path, tiny_model):
    """judge.backend: the judge stage asks that model, the answers come from the run's backend."""
    import shutil

    judge_dir = tmp_path / "judge-model"
    shutil.copytree(tiny_model, judge_dir)
    config = loop_config(tmp_path, tiny_model, rounds=1, stages=("critique", "judge"))
    result = CliRunner().invoke(cli, ["run", str(config), "--show", "0", "--set", f"judge.backend=hf:{judge_dir}"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "outputs" / "loop"
    judges = {p.judge_model for p in read_jsonl(run / "preferences.jsonl", Preference)}
    models = {r.model for r in read_jsonl(run / "revisions.jsonl", Revision)}
    assert len(judges) == 1 and str(judge_dir) in judges.pop()
    assert len(models) == 1 and str(judge_dir) not in models.pop()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["backend"]["spec"] == f"hf:{judge_dir}" and manifest["backend"]["generator"] == f"hf:{tiny_model}"


def test_rounds_need_ppo(tmp_path, tiny_model):
    with pytest.raises(ConfigError, match="rounds = 2 needs the ppo or dpo stage"):
        load_config(loop_config(tmp_path, tiny_model, stages=("critique", "judge", "rm")))


def test_trainers_check_their_inputs_before_any_model_loads(tmp_path, tiny_model):
    cfg = load_config(loop_config(tmp_path, tiny_model, rounds=1, stages=("rm", "ppo")))
    with pytest.raises(FileNotFoundError, match=r"preferences.jsonl: no preference pairs .* run the judge stage"):
        check_inputs(cfg)
    cfg = load_config(loop_config(tmp_path, tiny_model, rounds=1, stages=("ppo",)))
    with pytest.raises(FileNotFoundError, match=r"rm/model: no reward model for PPO"):
        check_inputs(cfg)
    result = CliRunner().invoke(cli, ["run", str(loop_config(tmp_path, tiny_model, rounds=1, stages=("sft",)))])
    assert result.exit_code == 2 and "sft.jsonl: nothing to fine-tune on" in result.output
