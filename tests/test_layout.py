"""The run layout: a trainer's ``output`` setting moves its folder for every stage that reads it
(issue 16: PPO and rerank looked in ``rm/`` whatever ``rm.output`` said)."""

from __future__ import annotations

from pathlib import Path
import json

import pytest
import torch

from factory.config import BackendConfig, RunConfig
from factory.layout import RunLayout
from factory.llm.scripted import ScriptedBackend
from factory.pipeline import check_inputs, policy_spec
from factory.records import Reranked
from factory.rerank import run_rerank
from factory.store import read_jsonl
from factory.train import ppo
from factory.train.models import ScalarModel, load_tokenizer
from factory.train.settings import RerankConfig

OUTPUT = RunLayout(Path()).rerank.name

PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say something kind.", "Name a tree.", "Say hello."]


def test_paths_follow_each_trainers_output(tmp_path):
    cfg = RunConfig(output_dir=tmp_path, name="r", sft={"output": "tuned"}, rm={"output": "reward"},
                    ppo={"output": "ppo-out"})
    layout = RunLayout.of(cfg)
    assert layout.sft_model == tmp_path / "r" / "tuned" / "model"
    assert layout.rm_model == tmp_path / "r" / "reward" / "model"
    assert RunLayout.of(cfg, tmp_path / "r" / "round-1").policy_model == tmp_path / "r" / "round-1" / "ppo-out" / "model"
    assert RunLayout.of(RunConfig(output_dir=tmp_path, name="r")).rm_model == tmp_path / "r" / "rm" / "model"
    assert policy_spec(cfg.model_copy(update={"rounds": 2}), 2) == f"hf:{tmp_path / 'r' / 'round-1' / 'ppo-out' / 'model'}"


@pytest.fixture
def reward_run(tmp_path, tiny_model) -> RunConfig:
    """A run whose reward model lives in reward/model (rm.output = "reward"), nothing in rm/."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = RunConfig(
        output_dir=tmp_path / "outputs", name="r", backend=BackendConfig(spec="scripted", batch_size=4),
        rm={"output": "reward"}, rerank=RerankConfig(prompts=prompts, n=2, batch_size=4, device="cpu"),
        ppo=dict(policy=str(tiny_model), prompts=prompts, steps=1, batch_size=2, mini_batch_size=2, ppo_epochs=1,
                 response_length=4, max_prompt_length=32, eval_prompts=1, eval_every=10, checkpoint_every=10,
                 device="cpu"))
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(1)
    folder = RunLayout.of(cfg).rm_model
    ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    assert folder == cfg.run_dir / "reward" / "model" and not (cfg.run_dir / "rm").exists()
    return cfg


def test_start_up_check_looks_where_rm_output_says(reward_run):
    for stage in ("ppo", "rerank"):
        check_inputs(reward_run.model_copy(update={"stages": [stage]}))  # found in reward/model
    moved = reward_run.model_copy(update={"rm": reward_run.rm.model_copy(update={"output": "elsewhere"})})
    with pytest.raises(FileNotFoundError, match="elsewhere/model"):
        check_inputs(moved.model_copy(update={"stages": ["rerank"]}))


def test_ppo_finds_the_reward_model_in_rm_output(reward_run):
    summary = ppo.run_ppo(reward_run.ppo, RunLayout.of(reward_run), echo=lambda *_: None)
    assert summary["steps"] == 1
    assert (RunLayout.of(reward_run).policy_model / "config.json").is_file()


def test_rerank_finds_the_reward_model_in_rm_output(reward_run):
    backend = ScriptedBackend([f"Reply {i} to {p}" for p in PROMPTS for i in range(2)])
    summary = run_rerank(reward_run, backend, RunLayout.of(reward_run))
    records = read_jsonl(reward_run.run_dir / OUTPUT, Reranked)
    assert summary.written == len(PROMPTS)
    assert len(records) == len(PROMPTS)
    assert {r.reward_model for r in records} == {str(RunLayout.of(reward_run).rm_model)}
