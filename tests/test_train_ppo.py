"""PPO trainer: the pure pieces on hand-computed values, then short runs on the tiny random Llama
(policy) and a scalar model saved from it (reward model): losses, changed weights, metrics and
samples, resume after an interruption, PPO-ptx and LoRA."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.config import RunConfig
from factory.layout import RunLayout
from factory.train import TrainError, ppo
from factory.train.models import ScalarModel, load_tokenizer

STEP_KEYS = [
    "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "objective/non_score_reward",
    "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy", "loss/value", "val/ratio", "val/num_eos_tokens",
    "val/clipfrac_avg", "lr", "kl_coef", "time/step_s", "time/generate_s", "time/update_s",
]

# -- pure pieces --------------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 1.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, ret = ppo.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=0.5)
    # t=2: 2 - 0.1 = 1.9; t=1: 0 + 0.1 - 0.2 + 0.5 * 1.9 = 0.85; t=0: 1 + 0.2 - 0.5 + 0.5 * 0.85 = 1.125
    assert torch.allclose(adv, torch.tensor([[1.125, 0.85, 1.9]]))
    assert torch.allclose(ret, torch.tensor([[1.625, 1.05, 2.0]]))
    # The masked last token ends the episode: its reward and value count for nothing.
    adv, ret = ppo.gae(rewards[1:], values[1:], mask[1:], gamma=0.9, lam=1.0)
    assert torch.allclose(adv, torch.tensor([[2.3, 1.0, 0.0]]))  # t=1: 2 - 1; t=0: 1 + 0.9 - 0.5 + 0.9 * 1
    assert torch.allclose(ret, torch.tensor([[2.8, 2.0, 0.0]]))


def test_truncate_after_first_eos():
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 5, 5, 5]])
    out, lengths, has_eos = ppo.truncate_after_eos(responses, 2, pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert lengths.tolist() == [2, 4, 1]
    assert has_eos.tolist() == [True, False, True]


def test_kl_penalised_reward_at_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -2.0, -2.0]])
    rewards, kl, non_score = ppo.kl_penalised_rewards(logprobs, ref, torch.tensor([2.0, -1.0]),
                                                      torch.tensor([2, 3]), kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(non_score, torch.tensor([[-0.05, 0.1, 0.0], [-0.1, -0.1, -0.1]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 2.1, 0.0], [-0.1, -0.1, -1.1]]))


def test_no_eos_score():
    scores, has_eos = torch.tensor([1.0, 2.0]), torch.tensor([True, False])
    assert ppo.apply_no_eos_score(scores, has_eos, -1.0).tolist() == [1.0, -1.0]
    assert ppo.apply_no_eos_score(scores, has_eos, None).tolist() == [1.0, 2.0]


def test_adaptive_kl_controller():
    ctl = ppo.KLController(0.1, adaptive=True, target=6.0, horizon=100)
    ctl.update(12.0, n_steps=10)  # KL/target - 1 = 1, clipped to 0.2: 0.1 * (1 + 0.2 * 10 / 100)
    assert ctl.value == pytest.approx(0.102)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(6.6, n_steps=10)  # 0.1 * (1 + 0.1 * 0.1)
    assert ctl.value == pytest.approx(0.101)
    ctl.load_state_dict({"value": 0.1})
    ctl.update(0.0, n_steps=10)  # -1 clipped to -0.2
    assert ctl.value == pytest.approx(0.098)
    assert ctl.state_dict() == {"value": pytest.approx(0.098)}
    fixed = ppo.KLController(0.1, adaptive=False, target=6.0, horizon=100)
    fixed.update(100.0, n_steps=10)
    assert fixed.value == 0.1


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased variance (1 + 0 + 1) / 2 = 1; the masked entry comes out 0
    assert torch.allclose(ppo.masked_whiten(x, mask), torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)
    assert torch.allclose(ppo.masked_whiten(x, mask, shift_mean=False), torch.tensor([[1.0, 2.0, 3.0, 0.0]]),
                          atol=1e-6)


def test_batch_rows_walk_seeded_permutations():
    rows = [ppo.batch_rows(5, 2, i, seed=3) for i in range(5)]
    flat = sum(rows, [])
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    assert rows == [ppo.batch_rows(5, 2, i, seed=3) for i in range(5)]
    assert ppo.batch_rows(3, 7, 0, seed=0)[:3] != [] and len(ppo.batch_rows(3, 7, 0, seed=0)) == 7


def test_response_entropy_by_hand():
    ninf = float("-inf")
    logits = torch.tensor([
        # uniform over 2 ids (ln 2), again with other logits (ln 2), uniform over 3 (ln 3)
        [[0.0, 0.0, ninf, ninf], [5.0, 5.0, ninf, ninf], [7.0, 7.0, 7.0, ninf]],
        # uniform over 4 (ln 4), certain (0), then past the response's end: counts for nothing
        [[0.0, 0.0, 0.0, 0.0], [0.0, ninf, ninf, ninf], [1.0, 2.0, 3.0, 4.0]],
    ])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = torch.tensor([2 * math.log(2) + math.log(3), math.log(4)])
    assert torch.allclose(ppo.response_entropy(logits, mask), expected)
    # p = (1/4, 3/4) from logits (ln 1, ln 3): -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623 nats
    skewed = ppo.response_entropy(torch.log(torch.tensor([[[1.0, 3.0]]])), torch.tensor([[True]]))
    assert skewed.item() == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel=1e-6)


# -- runs on the tiny model ---------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


@pytest.fixture(scope="module")
def rm_dir(tiny_model: Path, tmp_path_factory) -> Path:
    """A reward-model folder: a scalar head on the tiny model, saved with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-rm")
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(1)
    ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ppo-data")
    topics = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes", "glass", "moss", "ink", "kites"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n"
                                                  for t in topics))
    sft = [{"messages": [{"role": "user", "content": f"Name a colour of {t}."},
                         {"role": "assistant", "content": f"{t.title()} can be grey."}]} for t in topics]
    (folder / "sft.jsonl").write_text("".join(json.dumps(s) + "\n" for s in sft))
    return folder


def test_rollout_logprobs_match_the_update(tiny_model):
    """The log-probs kept from sampling (KV cache, left padding) are those the update recomputes
    in one forward, so the PPO ratio starts at 1; and a row's do not depend on its padding."""
    from factory.train.models import load_causal_lm

    tok = load_tokenizer(str(tiny_model))
    policy = load_causal_lm(str(tiny_model), torch.device("cpu"), tok).eval()
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    ids, mask = ppo.left_pad(rows, tok.pad_token_id, "cpu")
    assert mask.tolist()[1] == [0, 0, 0, 0, 0, 1, 1]
    torch.manual_seed(0)
    responses, logprobs = ppo.sample(policy, ids, mask, 6, 0.7, tok.eos_token_id)
    full, full_mask = torch.cat([ids, responses], 1), torch.cat([mask, torch.ones_like(responses)], 1)
    with torch.no_grad():
        again, _ = ppo.response_logprobs(policy, full, full_mask, responses.shape[1], 0.7)
        alone, _ = ppo.response_logprobs(policy, full[1:2, 5:], full_mask[1:2, 5:], responses.shape[1], 0.7)
    assert torch.allclose(logprobs, again, atol=1e-5)
    assert torch.allclose(again[1:2], alone, atol=1e-5)


def make_cfg(out: Path, tiny_model: Path, rm_dir: Path, data_dir: Path, **ppo_settings) -> RunConfig:
    settings = dict(policy=str(tiny_model), reward_model=rm_dir, prompts=data_dir / "prompts.jsonl", steps=3,
                    batch_size=4, mini_batch_size=2, ppo_epochs=2, response_length=8, max_prompt_length=40,
                    eval_prompts=2, eval_every=2, checkpoint_every=2, device="cpu", lr=1e-3, seed=0)
    return RunConfig(name="run", output_dir=out, ppo=settings | ppo_settings)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before.keys() & after.keys())


def test_ppo_run(tmp_path, tiny_model, rm_dir, data_dir):
    from transformers import AutoModelForCausalLM

    cfg = make_cfg(tmp_path, tiny_model, rm_dir, data_dir)
    summary = ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    out = cfg.run_dir / "policy"
    assert summary["steps"] == 3 and math.isfinite(summary["kl_final"]) and summary["seconds_per_step"] > 0

    metrics = rows(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3]
    assert "eval/score" in metrics[0] and "eval/score" in metrics[2] and "eval/score" in metrics[3]
    for r in metrics[1:]:
        missing = [k for k in STEP_KEYS if k not in r]
        assert not missing, missing
        assert all(math.isfinite(r[k]) for k in STEP_KEYS)
        assert "loss/ptx" not in r
    samples = rows(out / "samples.jsonl")
    assert [s["step"] for s in samples] == [0, 0, 2, 2, 3, 3]
    assert all(isinstance(s["response"], str) and math.isfinite(s["score"]) for s in samples)

    start_policy = load_file(str(tiny_model / "model.safetensors"))
    trained = load_file(str(out / "checkpoint" / "policy.safetensors"))
    assert changed(start_policy, trained)
    start_value = {f"backbone.{k}": v for k, v in load_file(str(rm_dir / "model.safetensors")).items()}
    start_value |= {f"head.{k}": v for k, v in load_file(str(rm_dir / "scalar_head.safetensors")).items()}
    value = load_file(str(out / "checkpoint" / "value.safetensors"))
    assert start_value.keys() & value.keys() >= {"head.weight"}
    assert changed({"head.weight": start_value["head.weight"]}, value)
    assert changed({k: v for k, v in start_value.items() if k.startswith("backbone.")}, value)

    final = AutoModelForCausalLM.from_pretrained(out / "model")
    assert changed(start_policy, final.state_dict())
    from factory.llm.base import GenParams
    from factory.llm.hf import HFBackend

    backend = HFBackend(str(out / "model"), device="cpu")  # what `hf:<out>/model` loads for the next round
    [[reply]] = backend.generate([[{"role": "user", "content": "Hello"}]], GenParams(temperature=0, max_tokens=4))
    assert isinstance(reply.text, str)
    backend.close()

    said = []
    assert ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=said.append) == summary  # finished: nothing to do
    assert "nothing to do" in said[0]


def test_missing_reward_model(tmp_path, tiny_model, data_dir):
    cfg = make_cfg(tmp_path, tiny_model, tmp_path / "nowhere", data_dir)
    with pytest.raises(TrainError, match="factory train rm"):
        ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)


def test_resume_matches_uninterrupted_run(tmp_path, tiny_model, rm_dir, data_dir, monkeypatch):
    settings = dict(steps=4, eval_every=3, checkpoint_every=2)
    whole = make_cfg(tmp_path / "a", tiny_model, rm_dir, data_dir, **settings)
    ppo.run_ppo(whole.ppo, RunLayout.of(whole), echo=lambda *_: None)

    class Interrupted(Exception):
        pass

    class KilledAfterStep3(ppo.Metrics):
        def log(self, step, **values):
            row = super().log(step, **values)
            if step == 3:  # step 3 logged and its samples written, the last checkpoint is step 2's
                raise Interrupted
            return row

    parts = make_cfg(tmp_path / "b", tiny_model, rm_dir, data_dir, **settings)
    monkeypatch.setattr(ppo, "Metrics", KilledAfterStep3)
    with pytest.raises(Interrupted):
        ppo.run_ppo(parts.ppo, RunLayout.of(parts), echo=lambda *_: None)
    monkeypatch.undo()
    said = []
    ppo.run_ppo(parts.ppo, RunLayout.of(parts), echo=said.append)
    assert "resuming after step 2" in said[0]

    a, b = whole.run_dir / "policy", parts.run_dir / "policy"
    for name in ("model/model.safetensors", "checkpoint/value.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa), name
    ma, mb = rows(a / "metrics.jsonl"), rows(b / "metrics.jsonl")
    assert [r["step"] for r in mb] == [0, 1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra.get("objective/kl") == pytest.approx(rb.get("objective/kl"), abs=1e-6)
        assert ra.get("kl_coef") == rb.get("kl_coef")
    sa, sb = rows(a / "samples.jsonl"), rows(b / "samples.jsonl")
    assert [(s["step"], s["response"]) for s in sa] == [(s["step"], s["response"]) for s in sb]


def test_objective_entropy_is_the_policy_entropy(tmp_path, tiny_model, rm_dir, data_dir):
    """objective/entropy is the entropy of the temperature-scaled distribution the policy samples
    from, not the sampled tokens' -log-probs (a one-sample estimate of it): with one-token responses
    it depends on the step's prompts alone, recomputed here one prompt at a time."""
    from factory.train.models import load_causal_lm

    cfg = make_cfg(tmp_path, tiny_model, rm_dir, data_dir, steps=1, response_length=1, temperature=0.2)
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    logged = rows(cfg.run_dir / "policy" / "metrics.jsonl")[1]["objective/entropy"]

    tok = load_tokenizer(str(tiny_model))
    policy = load_causal_lm(str(tiny_model), torch.device("cpu"), tok).eval()
    prompts = ppo._prompts(cfg.ppo, RunLayout.of(cfg), tok)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    train = [prompts[i] for i in order[cfg.ppo.eval_prompts:]]  # the run's split, then its first batch
    expected = []
    with torch.no_grad():
        for _, ids in (train[i] for i in ppo.batch_rows(len(train), cfg.ppo.batch_size, 0, cfg.ppo.seed)):
            logp = torch.log_softmax(policy(torch.tensor([ids])).logits[0, -1] / 0.2, dim=-1)
            expected.append(-(logp.exp() * logp).sum().item())
    assert logged == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_ptx(tmp_path, tiny_model, rm_dir, data_dir):
    cfg = make_cfg(tmp_path, tiny_model, rm_dir, data_dir, steps=2, ptx_coef=0.5,
                   sft_data=data_dir / "sft.jsonl", adaptive_kl=True, whiten_rewards=True)
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    metrics = rows(cfg.run_dir / "policy" / "metrics.jsonl")
    for r in metrics[1:]:
        assert math.isfinite(r["loss/ptx"]) and r["loss/ptx"] > 0
    assert metrics[2]["kl_coef"] != metrics[1]["kl_coef"]  # adaptive: it moved after step 1


def test_lora(tmp_path, tiny_model, rm_dir, data_dir):
    cfg = make_cfg(tmp_path, tiny_model, rm_dir, data_dir, steps=2, lora={"r": 4, "alpha": 8})
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    out = cfg.run_dir / "policy"
    start_policy = load_file(str(tiny_model / "model.safetensors"))
    policy = load_file(str(out / "checkpoint" / "policy.safetensors"))
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.items() if "lora_" not in k}
    assert all(torch.equal(start_policy[k], base[k]) for k in start_policy.keys() & base.keys())
    assert len(start_policy.keys() & base.keys()) > 10  # the base weights were found, and stayed
    lora_b = [v for k, v in policy.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # adapters start at B = 0 and moved

    value = load_file(str(out / "checkpoint" / "value.safetensors"))
    start_rm = load_file(str(rm_dir / "model.safetensors"))
    vbase = {k.replace("backbone.base_model.model.", "").replace(".base_layer", ""): v
             for k, v in value.items() if "lora_" not in k and k.startswith("backbone.")}
    assert len(start_rm.keys() & vbase.keys()) > 10
    assert all(torch.equal(start_rm[k], vbase[k]) for k in start_rm.keys() & vbase.keys())
    assert any(v.abs().sum() > 0 for k, v in value.items() if "lora_B" in k)

    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(out / "model").state_dict()
    assert changed(start_policy, merged)
