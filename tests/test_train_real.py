"""The trainers on the real embedded model, end to end from the earlier stages' output:
critique and judge on a few red-team prompts, then `factory train sft`, `train rm` and
`train ppo` through the CLI, the trained policy loaded by the hf backend to generate the next
round, and best-of-n reranking with the trained reward model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.config import load_config
from factory.critique import run_critique
from factory.judge import run_judge
from factory.layout import RunLayout

REPO = Path(__file__).parents[1]
PROMPTS = 6

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judged(tmp_path_factory, hf_embedded) -> Path:
    """A run config whose run folder holds sft.jsonl and preferences.jsonl from real stages."""
    out = tmp_path_factory.mktemp("trained")
    config = out / "run.toml"
    config.write_text(f"""
name = "t"
output_dir = "{out}"
[backend]
device = "cpu"
[critique]
constitution = "{REPO / 'principles/harmless.yaml'}"
prompts = "{REPO / 'seeds/red_team_prompts.jsonl'}"
limit = {PROMPTS}
few_shot = 1
params = {{ max_tokens = 32 }}
[judge]
constitution = "{REPO / 'principles/harmless.yaml'}"
[sft]
batch_size = 2
max_length = 160
held_out = 0.2
[rm]
batch_size = 2
max_length = 160
held_out = 0.34
[ppo]
prompts = "{REPO / 'seeds/red_team_prompts.jsonl'}"
steps = 2
batch_size = 2
mini_batch_size = 2
ppo_epochs = 1
response_length = 8
eval_prompts = 2
eval_every = 1
checkpoint_every = 1
[rerank]
prompts = "{REPO / 'seeds/red_team_prompts.jsonl'}"
limit = 2
n = 2
params = {{ max_tokens = 16 }}
""")
    cfg = load_config(config)
    run_critique(cfg, hf_embedded, RunLayout.of(cfg))
    run_judge(cfg, hf_embedded, RunLayout.of(cfg))
    assert (cfg.run_dir / "sft.jsonl").is_file() and (cfg.run_dir / "preferences.jsonl").is_file()
    return config


def _train(config: Path, trainer: str) -> dict:
    result = CliRunner().invoke(cli, ["train", trainer, "--config", str(config)])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])  # the summary, after any progress lines


def _metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    logged = [(r["step"], tuple(sorted(r))) for r in rows]
    assert len(logged) == len(set(logged))  # no step logged twice
    return rows


def test_sft_rm_ppo_and_rerank_on_the_real_model(judged, hf_embedded):
    from factory.llm.base import GenParams
    from factory.llm.hf import HFBackend
    from factory.rerank import run_rerank

    run_dir = load_config(judged).run_dir

    _train(judged, "sft")
    losses = [r["train/loss"] for r in _metrics(run_dir / "sft/metrics.jsonl") if "train/loss" in r]
    assert losses and all(math.isfinite(x) for x in losses)
    assert (run_dir / "sft/model/config.json").is_file()

    _train(judged, "rm")
    report = json.loads((run_dir / "rm/eval.json").read_text())
    assert report and (run_dir / "rm/model").is_dir()
    assert any("eval/accuracy" in r for r in _metrics(run_dir / "rm/metrics.jsonl"))

    _train(judged, "ppo")  # the policy starts from sft/model, the value model from rm/model
    rows = _metrics(run_dir / "policy/metrics.jsonl")
    steps = [r for r in rows if "objective/kl" in r]
    assert len(steps) == 2
    for key in ("objective/kl", "objective/scores", "loss/policy", "loss/value", "val/ratio"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert (run_dir / "policy/samples.jsonl").read_text().strip()

    model_file = run_dir / "policy/model/model.safetensors"
    before = model_file.stat().st_mtime_ns
    again = CliRunner().invoke(cli, ["train", "ppo", "--config", str(judged)])
    assert again.exit_code == 0, again.output
    assert model_file.stat().st_mtime_ns == before  # a finished run is left as it is

    # The trained policy generates the next round through the ordinary backend.
    policy = HFBackend(str(run_dir / "policy/model"), device="cpu")
    try:
        out = policy.generate([[{"role": "user", "content": "Name a colour."}]], GenParams(max_tokens=8, temperature=0))
    finally:
        policy.close()
    assert out[0][0].text.strip()

    cfg = load_config(judged)
    summary = run_rerank(cfg, hf_embedded, RunLayout.of(cfg, run_dir))
    assert summary.written == 2


def test_dpo_offline_and_online_on_the_real_model(judged):
    """`factory train dpo` from the judge's pairs, then online DPO judged by the real embedded model;
    each policy answers through hf:RUN/dpo/model."""
    from factory.llm.base import GenParams
    from factory.llm.hf import HFBackend

    run_dir = load_config(judged).run_dir
    base = ["--set", "dpo.model=embedded", "--set", "dpo.batch_size=2", "--set", "dpo.max_length=160",
            "--set", "dpo.held_out=0.34"]
    summary = _train_with(judged, "dpo", *base)
    assert summary["steps"] > 0 and summary["accuracy"] is not None
    rows = _metrics(run_dir / "dpo/metrics.jsonl")
    assert all(math.isfinite(r["rewards/margins"]) for r in rows if "rewards/margins" in r)
    assert len((run_dir / "dpo/reference.jsonl").read_text().splitlines()) == 1 + summary["pairs"]["train"] + \
        summary["pairs"]["held_out"]

    online = _train_with(judged, "dpo", *base, "--set", "dpo.online=true", "--set", "dpo.output=dpo-online",
                         "--set", f"dpo.prompts={REPO / 'seeds/red_team_prompts.jsonl'}", "--set", "dpo.steps=2",
                         "--set", "dpo.response_length=12", "--set", "dpo.samples=2")
    assert online["steps"] == 2
    steps = [json.loads(line) for line in (run_dir / "dpo-online/online.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2] and all(s["judge_calls"] == 2 * 2 for s in steps)
    for folder in ("dpo", "dpo-online"):
        policy = HFBackend(str(run_dir / folder / "model"), device="cpu")
        try:
            out = policy.generate([[{"role": "user", "content": "Name a colour."}]], GenParams(max_tokens=8, temperature=0))
        finally:
            policy.close()
        assert out[0][0].text.strip()


def _train_with(config: Path, trainer: str, *args: str) -> dict:
    result = CliRunner().invoke(cli, ["train", trainer, "--config", str(config), *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{"):])


def test_ppo_with_the_judge_as_reward_and_rloo_on_the_real_model(judged):
    """No reward model: the embedded model judges each rollout against the rest of its group."""
    run_dir = load_config(judged).run_dir
    summary = _train_with(judged, "ppo", "--set", "ppo.policy=embedded", "--set", "ppo.reward=judge",
                          "--set", "ppo.advantage=rloo", "--set", "ppo.samples=2", "--set", "ppo.batch_size=4",
                          "--set", "ppo.output=policy-judge")
    assert summary["steps"] == 2
    steps = [r for r in _metrics(run_dir / "policy-judge/metrics.jsonl") if "objective/kl" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss/policy"]) and r["judge/calls"] > 0 for r in steps)
    assert all(-1 <= r["objective/scores"] <= 1 for r in steps)
    assert (run_dir / "policy-judge/model/config.json").is_file()
