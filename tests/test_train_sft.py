"""SFT trainer on a tiny random Llama: assistant-only loss, learning, exact resume, LoRA merge, data errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from factory.config import RunConfig
from factory.layout import RunLayout
from factory.llm.base import GenParams
from factory.train import TrainError, sft
from factory.train.chat import chat_ids
from factory.train.models import load_causal_lm, load_tokenizer
from factory.train.settings import LoraSettings, SFTConfig

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "Name a primary colour."}, {"role": "assistant", "content": "Red."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "2 + 2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3 + 3?"},
     {"role": "assistant", "content": "6, since three and three make six."}],
    [{"role": "user", "content": "Say hello in French."}, {"role": "assistant", "content": "Bonjour !"}],
]


def write_data(path: Path, conversations=CONVERSATIONS) -> Path:
    # The shape of the critique stage's sft.jsonl: extra keys next to the messages.
    lines = [json.dumps({"key": f"k{i}", "source": f"k{i}", "constitution": "c", "principles": [], "messages": m})
             for i, m in enumerate(conversations)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_cfg(tmp_path: Path, tiny_model: Path, name: str = "run", **fields) -> RunConfig:
    settings = dict(model=str(tiny_model), device="cpu", epochs=10, batch_size=2, lr=1e-3, held_out=0.0,
                    max_length=64, data=write_data(tmp_path / f"{name}.jsonl")) | fields
    return RunConfig(output_dir=tmp_path / "outputs", name=name, sft=SFTConfig(**settings))


def metrics(cfg: RunConfig) -> list[dict]:
    lines = (cfg.run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_only_assistant_tokens_carry_loss(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    conversation = CONVERSATIONS[2]
    ids, mask = chat_ids(tok, conversation)
    learnt = tok.decode([i for i, m in zip(ids, mask) if m])
    assert learnt == "4<|im_end|>\n6, since three and three make six.<|im_end|>\n"

    # The loss is the mean negative log-likelihood of exactly those tokens, each predicted from
    # the tokens before it, and padding a shorter conversation beside it changes nothing.
    model = load_causal_lm(str(tiny_model), torch.device("cpu"), tok)
    other = chat_ids(tok, CONVERSATIONS[1])
    batch = [(ids, mask), other]
    with torch.no_grad():
        loss, n, real = sft.batch_loss(model, batch, tok.pad_token_id, torch.device("cpu"))
        total = 0.0
        for row_ids, row_mask in batch:
            logp = torch.log_softmax(model(torch.tensor([row_ids])).logits[0], dim=-1)
            total -= sum(logp[t - 1, row_ids[t]].item() for t in range(1, len(row_ids)) if row_mask[t])
    assert n == sum(mask) + sum(other[1])
    assert real == len(ids) + len(other[0])
    assert loss.item() == pytest.approx(total / n, rel=1e-5)

    # A cut keeps the start; nothing of the reply left means nothing to learn from.
    assert sft.cut(ids, mask, 10) is None
    kept = sft.cut(ids, mask, len(ids) - 3)
    assert kept == (ids[:-3], mask[:-3])


def test_split_and_batches_are_seeded():
    assert sft.split(2, 0.1, 0)[1] != []  # at least one held out
    assert sft.split(1, 0.5, 0) == ([0], [])  # but never the only one
    train, held = sft.split(20, 0.25, 3)
    assert len(held) == 5 and sorted(train + held) == list(range(20))
    assert sft.split(20, 0.25, 3) == (train, held) != sft.split(20, 0.25, 4)
    lengths = [5, 50, 6, 49, 7, 48, 8, 47]
    batches = sft.epoch_batches(lengths, 2, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(8))
    # Sorted by length within the window: each batch pairs near lengths.
    assert all(abs(lengths[a] - lengths[b]) <= 2 for a, b in batches)
    assert batches == sft.epoch_batches(lengths, 2, seed=0, epoch=0) != sft.epoch_batches(lengths, 2, seed=0, epoch=1)


def test_sft_learns_saves_a_loadable_model_and_stops_when_done(tmp_path, tiny_model):
    from factory.llm.hf import HFBackend

    cfg = make_cfg(tmp_path, tiny_model, held_out=0.25, lr=1e-2)
    summary = sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=lambda s: None)
    assert summary["conversations"] == {"train": 3, "held_out": 1, "truncated": 0, "dropped": 0}
    assert summary["steps"] == 20 and math.isfinite(summary["train_loss"]) and math.isfinite(summary["eval_loss"])

    rows = metrics(cfg)
    steps = [r for r in rows if "train/loss" in r]
    epochs = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))
    assert all(math.isfinite(r["train/loss"]) and r["lr"] > 0 and r["tokens"] > 0 for r in steps)
    assert [r["epoch"] for r in epochs] == list(range(1, 11))
    # Four short conversations are memorised: the epoch loss falls far from ln(vocab) ~ 10.8.
    assert epochs[-1]["train/epoch_loss"] < epochs[0]["train/epoch_loss"] - 2

    final = cfg.run_dir / "sft" / "model"
    before, after = load_file(str(tiny_model / "model.safetensors")), load_file(str(final / "model.safetensors"))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed

    backend = HFBackend(str(final), device="cpu", batch_size=2)
    try:
        out = backend.generate([CONVERSATIONS[0][:1]], GenParams(temperature=0.0, max_tokens=6))
    finally:
        backend.close()
    assert len(out) == 1 and out[0][0].tokens > 0

    said = []
    again = sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=said.append)
    assert again["already_finished"] and again["steps"] == 20
    assert "already finished" in said[0] and metrics(cfg) == rows


def test_resume_after_interruption_gives_the_same_weights(tmp_path, tiny_model, monkeypatch):
    def config(name: str) -> RunConfig:
        return make_cfg(tmp_path, tiny_model, name=name, epochs=2, batch_size=1, checkpoint_every=3)

    whole = config("whole")
    sft.run_sft(whole.sft, RunLayout.of(whole), echo=lambda s: None)

    # Interrupted at step 7 (4 steps an epoch): the last checkpoint is step 6, mid second epoch.
    cut = config("cut")
    real, calls = sft.batch_loss, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sft, "batch_loss", failing)
    with pytest.raises(KeyboardInterrupt):
        sft.run_sft(cut.sft, RunLayout.of(cut), echo=lambda s: None)
    assert json.loads((cut.run_dir / "sft" / "checkpoint" / "state.json").read_text())["step"] == 6
    monkeypatch.setattr(sft, "batch_loss", real)
    said = []
    summary = sft.run_sft(cut.sft, RunLayout.of(cut), echo=said.append)
    assert "resuming" in said[0] and "step 6" in said[0]

    a = load_file(str(whole.run_dir / "sft" / "model" / "model.safetensors"))
    b = load_file(str(cut.run_dir / "sft" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    untimed = [[{k: v for k, v in r.items() if k != "elapsed_s"} for r in metrics(c)] for c in (cut, whole)]
    assert untimed[0] == untimed[1]  # every step once, with the same losses
    assert summary["train_loss"] == json.loads((whole.run_dir / "sft" / "summary.json").read_text())["train_loss"]


def test_lora_trains_adapters_only_and_saves_them_merged(tmp_path, tiny_model):
    cfg = make_cfg(tmp_path, tiny_model, epochs=1, lora=LoraSettings(r=4, alpha=8))
    sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=lambda s: None)
    final = cfg.run_dir / "sft" / "model"
    assert not (final / "adapter_config.json").exists()
    before, after = load_file(str(tiny_model / "model.safetensors")), load_file(str(final / "model.safetensors"))
    assert before.keys() == after.keys()  # plain causal LM names, no lora_A / base_layer
    for k in before:
        if k.endswith("proj.weight"):  # every linear layer got an adapter, merged into its weight
            assert not torch.equal(before[k], after[k]), k
        else:  # embeddings and norms are base weights: frozen
            assert torch.equal(before[k], after[k]), k


def test_data_errors_name_the_file_and_line(tmp_path, tiny_model):
    cfg = make_cfg(tmp_path, tiny_model, data=None)
    with pytest.raises(TrainError, match="run the critique stage first, or set sft.data"):
        sft.run_sft(cfg.sft, RunLayout.of(cfg), echo=lambda s: None)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CONVERSATIONS[0]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(TrainError, match=f"{bad}:2"):
        run_cfg = make_cfg(tmp_path, tiny_model, data=bad)
        sft.run_sft(run_cfg.sft, RunLayout.of(run_cfg), echo=lambda s: None)
