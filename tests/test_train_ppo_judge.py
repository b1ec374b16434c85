"""PPO with the AI judge as its reward (ppo.reward = judge | judge-score) and the group baselines
(ppo.advantage = rloo | grpo): the reward mapping and the advantages on hand-computed values, then
short runs on the tiny random Llama with a stub judge whose option log-probs are made by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pydantic import ValidationError
import torch
from safetensors.torch import load_file

from factory.config import RunConfig
from factory.constitution import load_constitution
from factory.feedback import RATINGS, Labeller
from factory.layout import RunLayout
from factory.stage import Context
from factory.store import StoreWarning
from factory.train import TrainError, ppo
from factory.train.models import ScalarModel, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = ROOT / "principles" / "concise.yaml"


class StubJudge:
    """A judge backend with hand-made option log-probs.

    Pairwise: each reply shown has a strength (``strength(text)``), the one shown first (A) times
    ``bias`` (a position bias, which judging both orders must cancel); the letters' probabilities are
    proportional to those. Rating: ``rating(text)`` gives the weight of each "N/10" option.
    Every request is kept, to count them and read what was shown."""

    model_id = "stub-judge"

    def __init__(self, strength=lambda text: 1.0 + len(text), bias: float = 2.0, rating=None):
        self.strength, self.bias = strength, bias
        self.rating = rating or (lambda text: {"6/10": 1.0, "8/10": 1.0})
        self.requests: list[list[dict]] = []

    def generate(self, requests, params):
        raise AssertionError("the judge is only asked for option log-probs")

    def option_logprobs(self, requests, options):
        out = []
        for request in requests:
            self.requests.append(request)
            ask = request[1]["content"]
            if list(options) == RATINGS:
                reply = ask.split("\n\nResponse: ", 1)[1].rsplit("\n\nQuestion: ", 1)[0]
                weights = self.rating(reply)
                weights = {o: weights.get(o, 0.0) for o in options}
            else:
                assert list(options) == ["A", "B"], options
                shown = ask.split("\n\nResponse (A): ", 1)[1].rsplit("\n\nQuestion: ", 1)[0]
                a, b = shown.split("\n\nResponse (B): ", 1)
                weights = {"A": self.bias * self.strength(a), "B": self.strength(b)}
            total = sum(weights.values())
            out.append({o: math.log(w / total) if w > 0 else float("-inf") for o, w in weights.items()})
        return out

    def close(self) -> None:
        pass


def labeller(backend: StubJudge, seed: int = 0) -> Labeller:
    return Labeller(backend, load_constitution(CONSTITUTION), principles=1, seed=seed)


# -- the judge as the reward --------------------------------------------------------------------


def test_pairwise_reward_judges_both_orders():
    strengths = {"a good reply": 3.0, "the reference": 1.0}
    judge = StubJudge(strength=strengths.__getitem__, bias=2.0)
    rewards = ppo.pairwise_rewards(labeller(judge), ["Say hi.", "Say hi."], ["a good reply", "the reference"],
                                   ["the reference", "the reference"], ["1:0", "1:0"])
    # reply shown first: 2*3 / (2*3 + 1) = 6/7; shown second: 3 / (3 + 2*1) = 3/5; p = (6/7 + 3/5) / 2 = 51/70
    assert rewards[0] == pytest.approx(2 * 51 / 70 - 1)
    assert rewards[1] == pytest.approx(0.0)  # the reference against itself: the position bias cancels
    assert len(judge.requests) == 4  # each pair in both orders, one principle


def test_rating_reward_is_the_expected_rating_mapped():
    ratings = {"fine": {"6/10": 1.0, "8/10": 1.0}, "best": {"10/10": 1.0}, "worst": {"1/10": 1.0},
               "skewed": {"4/10": 3.0, "10/10": 1.0}}
    judge = StubJudge(rating=ratings.__getitem__)
    rewards = ppo.rating_rewards(labeller(judge), ["q"] * 4, list(ratings), ["0", "1", "2", "3"])
    # expected ratings 7, 10, 1 and (3 * 4 + 10) / 4 = 5.5, mapped by (r - 5.5) / 4.5
    assert rewards == pytest.approx([1.5 / 4.5, 1.0, -1.0, 0.0])
    assert len(judge.requests) == 4


def test_group_rewards_are_win_rates_within_each_group():
    strengths = {"one": 1.0, "two": 2.0, "four": 4.0}
    judge = StubJudge(strength=strengths.__getitem__, bias=1.0)
    rewards = ppo.group_rewards(labeller(judge), ["p", "q"], ["one", "two", "four", "four", "one", "two"], 3,
                                ["1:0", "1:1"])
    # P(i beats j) = s_i / (s_i + s_j). "one": (1/3 + 1/5) / 2 = 4/15; "two": (2/3 + 1/3) / 2 = 1/2;
    # "four": (4/5 + 2/3) / 2 = 11/15; each mapped to 2p - 1
    assert rewards == pytest.approx([-7 / 15, 0.0, 7 / 15, 7 / 15, -7 / 15, 0.0])
    assert len(judge.requests) == 2 * 3 * 2  # 3 pairs per group, both orders

    # JudgeReward takes one prompt and draw key per rollout, and compares each group of `group` rollouts
    judge.requests.clear()
    reward = ppo.JudgeReward(labeller(judge), "judge", group=3)
    got = reward(["p"] * 3 + ["q"] * 3, ["one", "two", "four", "four", "one", "two"], ["1:0"] * 3 + ["1:1"] * 3)
    assert got == pytest.approx(rewards)
    assert reward.take()["judge/calls"] == 12 and reward.take()["judge/calls"] == 0


def test_rloo_and_grpo_advantages_by_hand():
    returns = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 1.0, -1.0])
    # rloo: each minus the mean of the other three of its group
    expected = [1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2, 0 - 0, 0 - 0, 1 + 1 / 3, -1 - 1 / 3]
    assert torch.allclose(ppo.rloo_advantages(returns, 4), torch.tensor(expected), atol=1e-6)
    # grpo: group 1 mean 3, population variance (4 + 1 + 0 + 9) / 4 = 3.5; group 2 mean 0, variance 0.5
    s1, s2 = math.sqrt(3.5), math.sqrt(0.5)
    expected = [-2 / s1, -1 / s1, 0.0, 3 / s1, 0.0, 0.0, 1 / s2, -1 / s2]
    assert torch.allclose(ppo.grpo_advantages(returns, 4), torch.tensor(expected), atol=1e-6)
    # two samples: rloo is the difference, grpo exactly +-1; a group of equal returns gets 0
    pairs = torch.tensor([0.5, -0.25, 2.0, 2.0])
    assert torch.allclose(ppo.rloo_advantages(pairs, 2), torch.tensor([0.75, -0.75, 0.0, 0.0]))
    assert torch.allclose(ppo.grpo_advantages(pairs, 2), torch.tensor([1.0, -1.0, 0.0, 0.0]), atol=1e-6)


# -- the stage ----------------------------------------------------------------------------------


def stage_cfg(tmp_path: Path, **ppo_settings) -> RunConfig:
    return RunConfig(name="run", output_dir=tmp_path, ppo=ppo_settings, judge={"constitution": CONSTITUTION})


def test_stage_asks_the_judge_instead_of_a_reward_model(tmp_path, monkeypatch):
    by_model = stage_cfg(tmp_path)
    layout = RunLayout.of(by_model)
    assert ppo.STAGE.roles(by_model) == ()
    assert any(n.path == layout.rm_model for n in ppo.STAGE.needs(by_model, layout))
    assert CONSTITUTION not in ppo.STAGE.user_files(by_model)

    for reward in ("judge", "judge-score"):
        cfg = stage_cfg(tmp_path, reward=reward)
        assert ppo.STAGE.roles(cfg) == ("judge",)
        assert not any(n.path == layout.rm_model for n in ppo.STAGE.needs(cfg, layout))
        assert CONSTITUTION in ppo.STAGE.user_files(cfg)
        ppo.STAGE.check(cfg)  # the constitution loads

    seen = {}

    def fake_run(settings, layout, allow_pickle=False, echo=print, labeller=None):
        seen["labeller"] = labeller
        return {}

    monkeypatch.setattr(ppo, "run_ppo", fake_run)
    backend = StubJudge()
    asked = []
    cfg = stage_cfg(tmp_path, reward="judge", seed=7)
    ppo.STAGE.run(Context(cfg, layout, lambda role, lazy: asked.append((role, lazy)) or backend))
    assert asked == [("judge", True)]
    assert seen["labeller"].backend is backend and seen["labeller"].seed == 7
    ppo.STAGE.run(Context(by_model, layout, lambda role, lazy: pytest.fail("no model for reward = model")))
    assert seen["labeller"] is None


# -- runs on the tiny model ---------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models

TOPICS = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes", "glass", "moss", "ink", "kites"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ppo-judge-data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n" for t in TOPICS))
    return path


def make_cfg(out: Path, tiny_model: Path, prompts: Path, **ppo_settings) -> RunConfig:
    # no_eos_score = None: the tiny random model's 8 tokens hardly ever end, and the judge's reward is wanted
    settings = dict(policy=str(tiny_model), prompts=prompts, steps=2, batch_size=4, mini_batch_size=2, ppo_epochs=2,
                    response_length=8, max_prompt_length=40, eval_prompts=2, eval_every=2, checkpoint_every=2,
                    device="cpu", lr=1e-3, seed=0, reward="judge", no_eos_score=None)
    return RunConfig(name="run", output_dir=out, ppo=settings | ppo_settings, judge={"constitution": CONSTITUTION})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quiet(*_):
    pass


def test_judge_reward_needs_a_labeller(tmp_path, tiny_model, prompts):
    cfg = make_cfg(tmp_path, tiny_model, prompts)
    with pytest.raises(TrainError, match="ppo.reward = 'judge' needs the judge"):
        ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet)
    # whitening per-token rewards is GAE's: with a group baseline the config is refused as it loads
    with pytest.raises(ValidationError, match="set whiten_rewards = false"):
        make_cfg(tmp_path, tiny_model, prompts, advantage="rloo", samples=2, whiten_rewards=True)


def test_group_baselines_default_to_four_samples():
    from factory.train.settings import PPOConfig

    assert PPOConfig(advantage="rloo").samples == 4 and PPOConfig(advantage="grpo").samples == 4
    assert PPOConfig().samples == 1
    with pytest.raises(ValidationError, match=r"multiple of samples \(4, the default with advantage = 'rloo'\)"):
        PPOConfig(advantage="rloo", batch_size=6, mini_batch_size=2)
    with pytest.raises(ValidationError, match="needs samples >= 2"):
        PPOConfig(advantage="grpo", samples=1)


def test_judge_rloo_run(tmp_path, tiny_model, prompts):
    """reward = judge with rloo: the rollouts of each prompt are judged against each other, there is
    no value model, and only the held-out prompts get reference replies (for the evals)."""
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, tiny_model, prompts, advantage="rloo", samples=2)
    judge = StubJudge()
    summary = ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet, labeller=labeller(judge))
    out = cfg.run_dir / "policy"
    assert summary["steps"] == 2 and math.isfinite(summary["kl_final"])

    checkpoint = sorted(p.name for p in (out / "checkpoint").iterdir())
    assert "policy.safetensors" in checkpoint and not any("value" in name for name in checkpoint)
    assert len(rows(out / "reference.jsonl")) == 2  # the eval prompts only
    start = load_file(str(tiny_model / "model.safetensors"))
    final = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start.keys() & final.keys())

    metrics = rows(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2]
    assert metrics[0]["eval/score"] == pytest.approx(0.0, abs=1e-6)  # the greedy replies are the references
    # per step: 2 prompts x 1 pair x 2 orders; an eval: 2 held-out prompts x 2 orders against their reference
    assert [r["judge/calls"] for r in metrics] == [4, 4, 8]
    for r in metrics[1:]:
        assert all(math.isfinite(r[k]) for k in ("objective/scores", "objective/kl", "loss/policy", "time/judge_s"))
        assert "loss/value" not in r and "val/clipfrac_avg" not in r
        # win rates within a group of two add up to 1: their 2p - 1 average 0
        assert r["objective/scores"] == pytest.approx(0.0, abs=1e-6)
    assert metrics[1]["loss/policy"] != 0  # the judge's preferences moved the policy, not the KL alone
    samples = rows(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 2, 2]
    assert len(judge.requests) == 16


def test_judge_gae_reference_computed_once_and_reused(tmp_path, tiny_model, prompts):
    """reward = judge with gae: a value model on the policy's backbone with a fresh head; every prompt's
    reference reply computed before step 1, written a batch at a time, and what is written is
    reused (a killed run's torn line aside) by the run that resumes."""
    cfg = make_cfg(tmp_path, tiny_model, prompts, steps=1)
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet, labeller=labeller(StubJudge()))
    out = cfg.run_dir / "policy"
    reference = out / "reference.jsonl"
    lines = reference.read_text().splitlines()
    assert len(lines) == len(TOPICS)  # 2 held-out + 10 training prompts
    assert {r["prompt"] for r in map(json.loads, lines)} == {f"Say something about {t}." for t in TOPICS}
    value = load_file(str(out / "checkpoint" / "value.safetensors"))
    assert "head.weight" in value and any(k.startswith("backbone.") for k in value)
    metrics = rows(out / "metrics.jsonl")
    assert metrics[1]["judge/calls"] == 4 * 2 + 2 * 2  # 4 rollouts x 2 orders against their reference; the eval
    assert "loss/value" in metrics[1]

    # As if killed while writing the training prompts' second batch: the held-out batch and the
    # first training batch of 4 are whole, then a torn line. One written reply is edited, to see it reused.
    first = json.loads(lines[0])
    kept = [json.dumps(first | {"reply": "EDITED"})] + lines[1:6]
    reference.write_text("\n".join(kept) + "\n" + lines[6][:20])
    judge = StubJudge()
    said = []
    more = make_cfg(tmp_path, tiny_model, prompts, steps=2)
    with pytest.warns(StoreWarning, match="torn"):
        ppo.run_ppo(more.ppo, RunLayout.of(more), echo=said.append, labeller=labeller(judge))
    assert any("resuming after step 1" in s for s in said)
    assert any(s.startswith("ppo: 6 reference replies") for s in said)  # the two missing batches only
    again = reference.read_text().splitlines()
    assert again[:6] == kept and again[6:] == lines[6:]  # sampled from the starting policy, as before
    # the edited reply is the one the eval compared the first held-out prompt's greedy reply with
    assert any("EDITED" in r[1]["content"] and first["prompt"] in r[1]["content"] for r in judge.requests)

    # A third run reads every reply from the file
    said.clear()
    done = make_cfg(tmp_path, tiny_model, prompts, steps=3)
    ppo.run_ppo(done.ppo, RunLayout.of(done), echo=said.append, labeller=labeller(StubJudge()))
    assert not any("reference replies" in s for s in said)
    assert reference.read_text().splitlines() == again


def test_judge_gae_with_lora(tmp_path, tiny_model, prompts):
    """With LoRA and a judge reward the value model is adapters on a frozen copy of the policy's
    backbone, with a fresh head."""
    cfg = make_cfg(tmp_path, tiny_model, prompts, steps=1, lora={"r": 4, "alpha": 8})
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet, labeller=labeller(StubJudge()))
    value = load_file(str(cfg.run_dir / "policy" / "checkpoint" / "value.safetensors"))
    assert "head.weight" in value and any("lora_B" in k and v.abs().sum() > 0 for k, v in value.items())
    start = load_file(str(tiny_model / "model.safetensors"))
    base = {k.removeprefix("backbone.base_model.model.").replace(".base_layer", ""): v
            for k, v in value.items() if "lora_" not in k and k.startswith("backbone.")}
    shared = {f"model.{k}" for k in base} & start.keys()
    assert len(shared) > 10 and all(torch.equal(start[k], base[k.removeprefix("model.")]) for k in shared)


def test_judge_score_grpo_run(tmp_path, tiny_model, prompts):
    """reward = judge-score with grpo: each rollout rated alone; no value model, no reference replies."""
    ratings = lambda text: {"2/10": 1.0, "9/10": 1.0 + len(text)}  # noqa: E731 (longer replies rate higher)
    cfg = make_cfg(tmp_path, tiny_model, prompts, steps=1, reward="judge-score", advantage="grpo", samples=2,
                   no_eos_score=-1.0)
    judge = StubJudge(rating=ratings)
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet, labeller=labeller(judge))
    out = cfg.run_dir / "policy"
    assert not (out / "reference.jsonl").exists()
    assert not (out / "checkpoint" / "value.safetensors").exists()
    metrics = rows(out / "metrics.jsonl")
    assert [r["judge/calls"] for r in metrics] == [2, 4 + 2]  # one rating per reply: eval, rollouts + eval
    # no rollout ended within 8 tokens: each got no_eos_score, whatever its rating
    assert metrics[1]["val/num_eos_tokens"] == 0 and metrics[1]["objective/scores"] == -1.0
    assert all(-1 <= s["score"] <= 1 for s in rows(out / "samples.jsonl"))
    assert all(r[-1]["content"].startswith("Rating") for r in judge.requests)


def test_reward_model_with_a_group_baseline(tmp_path, tiny_model, prompts):
    """reward = model with rloo: the reward model scores, the group baseline replaces the value model."""
    rm = tmp_path / "rm"
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(1)
    ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok).save_pretrained(rm)
    tok.save_pretrained(rm)
    cfg = make_cfg(tmp_path, tiny_model, prompts, steps=1, reward="model", reward_model=rm, advantage="rloo",
                   samples=4)
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=quiet)
    out = cfg.run_dir / "policy"
    assert not (out / "checkpoint" / "value.safetensors").exists() and not (out / "reference.jsonl").exists()
    step = rows(out / "metrics.jsonl")[1]
    assert math.isfinite(step["loss/policy"]) and "loss/value" not in step and "judge/calls" not in step


def test_a_checkpoint_of_other_reward_settings_is_refused(tmp_path, tiny_model, prompts):
    cfg = make_cfg(tmp_path, tiny_model, prompts, advantage="rloo", samples=2, steps=4)
    layout = RunLayout.of(cfg)
    state = layout.policy.checkpoint / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"step": 2, "reward": "judge", "advantage": "gae", "samples": 1}))
    with pytest.raises(TrainError, match="made with ppo.reward = 'judge', ppo.advantage = 'gae', ppo.samples = 1"):
        ppo.run_ppo(cfg.ppo, layout, echo=quiet, labeller=labeller(StubJudge()))
