"""`factory train sft|rm|ppo` run through the same entry as `factory run` (run_stages): each writes
the run's manifest.json, and a missing input is refused with a clear message before any model or
tokenizer loads. The real runs are a step or two on the tiny model (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.records import Preference

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
    [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4, since two and two make four."}],
]
QUESTIONS = ["Why is the sky blue?", "Name a prime number.", "How do I boil an egg?", "Is a tomato a fruit?",
             "What does CPU stand for?", "Give me a synonym for happy."]


def invoke(*args) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_preferences(path: Path) -> Path:
    prefs = [Preference(key=f"k{i}", prompt=q, messages=[{"role": "user", "content": q}],
                        chosen=f"A careful answer to: {q}", rejected="No idea.", p_chosen=0.9, margin=0.8,
                        judge_model="test", source=f"test:{i}") for i, q in enumerate(QUESTIONS)]
    return write_jsonl(path, [p.model_dump(mode="json") for p in prefs])


def tiny_settings(tmp_path: Path, tiny_model: Path) -> list[str]:
    """--set options for a run folder tmp_path/outputs/run whose three trainers take seconds on the tiny model."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Say something about {q}"} for q in QUESTIONS])
    settings = [
        f"output_dir={tmp_path / 'outputs'}", "name=run",
        f"sft.model={tiny_model}", "sft.device=cpu", "sft.epochs=1", "sft.batch_size=2", "sft.held_out=0",
        "sft.max_length=64", "sft.lr=1e-3",
        f"rm.model={tiny_model}", "rm.device=cpu", "rm.epochs=1", "rm.batch_size=2", "rm.max_length=64",
        "rm.lr=1e-3",
        f"ppo.policy={tiny_model}", "ppo.device=cpu", f"ppo.prompts={prompts}", "ppo.steps=1", "ppo.batch_size=2",
        "ppo.mini_batch_size=2", "ppo.ppo_epochs=1", "ppo.response_length=4", "ppo.max_prompt_length=40",
        "ppo.eval_prompts=2", "ppo.eval_every=1", "ppo.lr=1e-3",
    ]
    return [arg for s in settings for arg in ("--set", s)]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model, tokenizer or backend load fails the test: what is checked must be checked before."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError(f"a model was loaded before the inputs were checked: {args[:1]}")

    for cls in (transformers.PreTrainedModel, transformers.AutoModel, transformers.AutoModelForCausalLM,
                transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", staticmethod(refuse))
    monkeypatch.setattr("factory.llm.load_backend", refuse)
    monkeypatch.setattr("factory.pipeline.load_backend", refuse, raising=False)


def test_train_sft_writes_the_manifest_in_the_run_folder_whatever_the_rounds(tmp_path, tiny_model):
    run_dir = tmp_path / "outputs" / "run"
    write_jsonl(run_dir / "sft.jsonl", [{"messages": m} for m in CHATS])
    # A config of several rounds: `factory train` trains in the run folder itself, as one round.
    config = tmp_path / "loop.toml"
    config.write_text('rounds = 2\nstages = ["sft", "ppo"]\n', encoding="utf-8")
    result = invoke("train", "sft", "--config", config, *tiny_settings(tmp_path, tiny_model))
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["stages"] == ["sft"] and manifest["config"]["rounds"] == 1
    assert manifest["config"]["sft"]["model"] == str(tiny_model)
    assert (run_dir / "sft" / "model").is_dir() and not list(run_dir.glob("round-*"))
    summary = json.loads(result.output[result.output.index("{"):])  # the trainer's summary, printed last
    assert isinstance(summary, dict) and summary


def test_train_rm_then_ppo_write_the_manifest(tmp_path, tiny_model):
    run_dir = tmp_path / "outputs" / "run"
    write_preferences(run_dir / "preferences.jsonl")
    settings = tiny_settings(tmp_path, tiny_model)
    result = invoke("train", "rm", *settings)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["stages"] == ["rm"]
    assert (run_dir / "rm" / "model").is_dir()

    # PPO finds the run's reward model where `train rm` put it.
    result = invoke("train", "ppo", *settings)
    assert result.exit_code == 0, result.output
    manifest = json.loads((run_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["config"]["stages"] == ["ppo"]
    assert str(tmp_path / "prompts.jsonl") in manifest["inputs"]
    assert len(manifest["history"]) == 1  # the rm invocation before it
    assert (run_dir / "policy" / "model").is_dir()


@pytest.mark.parametrize("trainer, missing", [
    ("sft", "sft.jsonl"),
    ("rm", "preferences.jsonl"),
    ("ppo", "rm/model"),
])
def test_train_refuses_a_missing_input_before_any_model_loads(tmp_path, tiny_model, no_model_loads, trainer, missing):
    result = invoke("train", trainer, *tiny_settings(tmp_path, tiny_model))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "a model was loaded" not in result.output
    assert result.output.startswith("Error: ")
    assert str(tmp_path / "outputs" / "run" / missing) in result.output
    assert not (tmp_path / "outputs" / "run" / "manifest.json").exists()  # nothing ran


@pytest.mark.parametrize("trainer, key", [("sft", "sft.data"), ("rm", "rm.pairs"), ("ppo", "ppo.prompts")])
def test_train_refuses_a_named_input_that_is_not_there(tmp_path, tiny_model, no_model_loads, trainer, key):
    nowhere = tmp_path / "nowhere.jsonl"
    result = invoke("train", trainer, *tiny_settings(tmp_path, tiny_model), "--set", f"{key}={nowhere}",
                    "--set", f"ppo.reward_model={tmp_path}")
    assert result.exit_code == 2, result.output
    assert f"{nowhere}: input file not found" in result.output


@pytest.mark.parametrize("trainer", ["sft", "rm", "ppo"])
def test_the_guard_catches_what_each_trainer_loads(tmp_path, tiny_model, no_model_loads, trainer):
    """The tests above mean something: with its inputs there, each trainer's first load trips the guard."""
    run_dir = tmp_path / "outputs" / "run"
    write_jsonl(run_dir / "sft.jsonl", [{"messages": m} for m in CHATS])
    write_preferences(run_dir / "preferences.jsonl")
    result = invoke("train", trainer, *tiny_settings(tmp_path, tiny_model), "--set", f"ppo.reward_model={tiny_model}")
    assert isinstance(result.exception, AssertionError), result.output
    assert "a model was loaded" in str(result.exception)
