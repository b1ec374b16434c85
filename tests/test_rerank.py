"""Best-of-n reranking: scripted samples, a reward model saved from the tiny Llama, scores checked one by one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from factory.config import BackendConfig, RunConfig
from factory.llm.base import BackendError
from factory.llm.scripted import ScriptedBackend
from factory.records import Reranked
from factory.rerank import run_rerank
from factory.store import read_jsonl
from factory.train import TrainError
from factory.train.chat import read_messages
from factory.train.models import ScalarModel, load_tokenizer
from factory.train.scoring import reply_ids
from factory.train.settings import RerankConfig
from factory.layout import RunLayout

OUTPUT = RunLayout(Path()).rerank.name

PROMPTS = ["Name a fruit.", "What is 2 + 2?", "Say something kind."]
RESPONSES = [
    ["Apple.", "A banana is a fruit.", "Cherries, plums and pears.", "Tomato, botanically."],
    ["4", "Four.", "2 + 2 = 4, since two and two make four.", "I think it is 5."],
    ["You matter.", "Have a lovely day!", "", "Thank you for asking; you are doing well."],
]


@pytest.fixture
def run(tmp_path, tiny_model):
    """A run folder with a prompts file and a reward model in rm/model (the tiny Llama with a random head)."""
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(1)
    rm = ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok)
    rm.bias = 0.25
    folder = tmp_path / "outputs" / "r" / "rm" / "model"
    rm.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = RunConfig(output_dir=tmp_path / "outputs", name="r", backend=BackendConfig(spec="scripted", batch_size=8),
                    rerank=RerankConfig(prompts=prompts, n=4, batch_size=3, device="cpu"))
    return cfg, rm.eval(), tok


def one_by_one(rm, tok, prompt: str, response: str) -> float:
    """The reward of one prompt + response, unbatched and unpadded, read at the reply's end-of-turn token."""
    context, reply = reply_ids(tok, [{"role": "user", "content": prompt}], response)
    ids = context + reply
    assert ids[-1] == tok.eos_token_id
    with torch.no_grad():
        return rm.last_scores(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()


def test_rerank_keeps_the_response_the_reward_model_scores_highest(run):
    cfg, rm, tok = run
    # Order each prompt's responses so that its best sits at a different index (1, 2, 3).
    queued, expected = [], []
    for p, (prompt, responses) in enumerate(zip(PROMPTS, RESPONSES)):
        scores = [one_by_one(rm, tok, prompt, r) for r in responses]
        best = max(range(4), key=lambda i: scores[i])
        shift = (best - (p + 1)) % 4
        order = responses[shift:] + responses[:shift]
        assert order[p + 1] == responses[best]
        queued += order
        expected.append((order, [scores[responses.index(r)] for r in order], p + 1))
    backend = ScriptedBackend(queued)
    summary = run_rerank(cfg, backend, RunLayout.of(cfg))
    assert (summary.total, summary.skipped, summary.written) == (3, 0, 3)

    # Two prompts per generate call (8 sequences / n = 4), n and seed passed on.
    assert [len(requests) for _, requests, _ in backend.calls] == [2, 1]
    assert [(params.n, params.seed, params.temperature) for _, _, params in backend.calls] == [(4, 0, 0.9), (4, 2, 0.9)]
    records = read_jsonl(cfg.run_dir / OUTPUT, Reranked)
    for rec, prompt, (order, scores, best) in zip(records, PROMPTS, expected):
        assert rec.responses == order
        assert rec.scores == pytest.approx(scores, abs=1e-4)  # batched and padded, the same rewards
        assert rec.chosen == best
        assert rec.messages == [{"role": "user", "content": prompt}, {"role": "assistant", "content": order[best]}]
        assert rec.reward_model == str(cfg.run_dir / "rm" / "model") and rec.model == "scripted"
    assert [r.source for r in records] == ["p0", "p1", "p2"]
    # The file is SFT data as it is.
    assert read_messages(cfg.run_dir / OUTPUT) == [r.messages for r in records]


def test_rerank_resumes_without_sampling_again(run):
    cfg, _, _ = run
    first = ScriptedBackend([f"reply {i}" for i in range(8)])  # enough for the first two prompts only
    with pytest.raises(BackendError):
        run_rerank(cfg, first, RunLayout.of(cfg))
    assert len(read_jsonl(cfg.run_dir / OUTPUT, Reranked)) == 2

    second = ScriptedBackend([f"late {i}" for i in range(4)])
    summary = run_rerank(cfg, second, RunLayout.of(cfg))
    assert (summary.skipped, summary.written) == (2, 1)
    assert [len(requests) for _, requests, _ in second.calls] == [1]
    assert second.calls[0][1][0][0]["content"] == PROMPTS[2]

    idle = ScriptedBackend()
    summary = run_rerank(cfg, idle, RunLayout.of(cfg))
    assert (summary.skipped, summary.written) == (3, 0) and idle.calls == []
    assert [r.prompt for r in read_jsonl(cfg.run_dir / OUTPUT, Reranked)] == PROMPTS


def test_missing_or_headless_reward_model_fails_before_sampling(run, tmp_path, tiny_model):
    cfg, _, _ = run
    backend = ScriptedBackend([f"r{i}" for i in range(12)])
    cfg.rerank = cfg.rerank.model_copy(update={"reward_model": tmp_path / "nowhere"})
    with pytest.raises(FileNotFoundError, match="run `factory train rm` first"):
        run_rerank(cfg, backend, RunLayout.of(cfg))
    cfg.rerank = cfg.rerank.model_copy(update={"reward_model": Path(tiny_model)})  # a causal LM, no head
    with pytest.raises(TrainError, match="not a reward model"):
        run_rerank(cfg, backend, RunLayout.of(cfg))
    assert backend.calls == []
