"""Three tokenizer families (tests/tokenizer_families.py), each on a tiny random model: options are
scored as the model would emit them in context, and every trainer finds the end of a turn where the
template puts it (issue 15, points 2 and 3). Brute force is the reference: the full text tokenised
at once, scored by one plain forward pass."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from factory.layout import RunLayout
from factory.llm.base import chat_text, end_of_turn_ids, option_sequences
from factory.llm.hf import HFBackend
from factory.train import ppo, scoring
from factory.train.chat import chat_ids
from factory.train.models import end_ids, load_tokenizer
from tokenizer_families import FAMILIES, build_model_dir, build_tokenizer

NAMES = list(FAMILIES)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for tiny models


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    return {name: build_model_dir(name, tmp_path_factory.mktemp(name)) for name in NAMES}


def turn_end(tok, name: str) -> int:
    return tok.convert_tokens_to_ids(FAMILIES[name][6])


# -- option scoring -----------------------------------------------------------------------------

REQUESTS = [
    # the judge's shape: a prefill that stops right before the letter
    [{"role": "user", "content": "Which reply is better? Reply A is kind; reply B is rude."},
     {"role": "assistant", "content": "Answer: ("}],
    # the classification check's shape: a new assistant turn, no prefill
    [{"role": "user", "content": "Is the task a classification task? Answer Yes or No."}],
    # a prefill ending with a space, which a byte-level BPE merges into the option (" A")
    [{"role": "user", "content": "Say the answer."}, {"role": "assistant", "content": "The answer is "}],
]
POOLS = [["A", "B"], ["Yes", "No"], [str(i) for i in range(1, 11)], ["yes please", "no thanks", "maybe"]]


def brute_force(model, tok, messages, options) -> dict[str, float]:
    """log p(prompt text + option), each tokenised at once and scored by one plain forward pass,
    normalised over the pool: the shared prompt cancels, whatever the tokenizer merges."""
    text = chat_text(tok, messages)
    raw = {}
    for o in options:
        ids = tok(text + o, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        raw[o] = sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)))
    top = max(raw.values())
    total = top + math.log(sum(math.exp(v - top) for v in raw.values()))
    return {k: v - total for k, v in raw.items()}


@pytest.mark.parametrize("name", NAMES)
def test_option_ids_are_the_full_text_tokenised_at_once(name):
    tok = build_tokenizer(name)
    for messages in REQUESTS:
        text = chat_text(tok, messages)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        for pool in POOLS:
            start, seqs = option_sequences(tok, text, pool)
            for o, seq in zip(pool, seqs):
                assert seq == tok(text + o, add_special_tokens=False)["input_ids"]
                assert seq[:start] == prompt[:start] and len(seq) > start
            # no earlier start would do: some option's ids part from the prompt's right there
            assert start == len(prompt) or any(s[start] != prompt[start] for s in seqs)


def test_the_families_really_differ_from_options_tokenised_alone():
    """What makes the families worth testing: SentencePiece writes "A" alone as "▁A", while after
    "Answer: (" the model writes a bare "A"; a byte-level BPE merges a trailing space into " A"."""
    tok = build_tokenizer("metaspace")
    text = chat_text(tok, REQUESTS[0])
    start, seqs = option_sequences(tok, text, ["A", "B"])
    alone = tok("A", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone) == ["▁A"] and tok.convert_ids_to_tokens(seqs[0][start:]) == ["A"]
    tok = build_tokenizer("bpe")
    text = chat_text(tok, REQUESTS[2])
    start, seqs = option_sequences(tok, text, ["A", "B"])
    assert start < len(tok(text, add_special_tokens=False)["input_ids"])  # the space went into "ĠA"
    assert tok.convert_ids_to_tokens(seqs[0][start:]) == ["ĠA"]


@pytest.mark.parametrize("name", NAMES)
def test_hf_option_logprobs_equal_brute_force(name, model_dirs):
    backend = HFBackend(str(model_dirs[name]), device="cpu", batch_size=4)
    try:
        for pool in POOLS:
            got = backend.option_logprobs(REQUESTS, pool)
            for messages, scores in zip(REQUESTS, got):
                want = brute_force(backend.model, backend.tokenizer, messages, pool)
                assert scores == pytest.approx(want, abs=1e-4), (name, pool, messages[-1]["content"])
    finally:
        backend.close()


# -- the end of a turn ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_end_of_turn_ids(name, model_dirs):
    tok = build_tokenizer(name)
    assert turn_end(tok, name) in end_of_turn_ids(tok) and tok.eos_token_id in end_of_turn_ids(tok)
    # The trainers' tokenizer: pad ends no turn, and the same ends are found from the folder.
    tok = load_tokenizer(str(model_dirs[name]))
    assert tok.pad_token_id not in end_ids(tok, model_dirs[name])
    assert turn_end(tok, name) in end_ids(tok, model_dirs[name])
    # The hf backend stops generating there, though the generation config names only EOS.
    backend = HFBackend(str(model_dirs[name]), device="cpu")
    assert turn_end(tok, name) in backend.eos_ids
    backend.close()


CONVERSATION = [{"role": "user", "content": "Write a short poem about the sea."},
                {"role": "assistant", "content": "The sea is wide and blue."}]


@pytest.mark.parametrize("name", NAMES)
def test_sft_mask_and_reward_reply_end_at_the_turn_token(name, model_dirs):
    tok = load_tokenizer(str(model_dirs[name]))
    end = turn_end(tok, name)
    ids, mask = chat_ids(tok, CONVERSATION)
    learnt = [i for i, m in zip(ids, mask) if m]
    assert end in learnt  # the model learns to stop
    # turn by turn, the ids are those of the whole conversation tokenised at once
    assert ids == tok(tok.apply_chat_template(CONVERSATION, tokenize=False), add_special_tokens=False)["input_ids"]

    prompt, reply = scoring.reply_ids(tok, CONVERSATION[:1], CONVERSATION[1]["content"])
    assert reply[-1] == end  # read where PPO reads a finished rollout, not at a newline after it
    # An over-long reply cut for the reward model keeps its end-of-turn token last.
    ends = end_ids(tok, model_dirs[name])
    kept_prompt, kept_reply = scoring.cut(prompt, reply, len(prompt) + 3, ends)
    assert len(kept_prompt) + len(kept_reply) == len(prompt) + 3
    assert kept_reply[-1] == end and list(kept_reply[:-1]) == reply[: len(kept_reply) - 1]


@pytest.mark.parametrize("name", NAMES)
def test_ppo_truncates_at_the_turn_token(name, model_dirs):
    tok = load_tokenizer(str(model_dirs[name]))
    end = turn_end(tok, name)
    ends = torch.tensor(end_ids(tok, model_dirs[name]))
    responses = torch.tensor([[7, 8, end, 9, 10], [7, 8, 9, 10, 11]])
    out, lengths, has_eos = ppo.truncate_after_eos(responses, ends, tok.pad_token_id)
    assert lengths.tolist() == [3, 5] and has_eos.tolist() == [True, False]
    assert out[0].tolist() == [7, 8, end] + [tok.pad_token_id] * 2


def test_ppo_rollouts_end_at_gemmas_end_of_turn(tmp_path, model_dirs):
    """A policy that learnt to close its turn with <end_of_turn> (EOS is <eos>): PPO sees its
    rollouts end, scores them with the reward model there, and does not give every one the
    no-EOS penalty."""
    from factory.config import RunConfig
    from factory.train.models import ScalarModel
    from factory.train.sft import run_sft

    name, base = "gemma", model_dirs["gemma"]
    topics = ["tea", "rain", "maps", "bread", "owls", "clocks", "snow", "bikes", "glass", "moss", "ink", "kites"]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say something about {t}."},
                                                     {"role": "assistant", "content": "Yes."}]}) + "\n"
                            for t in topics))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Say something about {t}."}) + "\n"
                                                    for t in topics))
    cfg = RunConfig(output_dir=tmp_path / "out", name="run", sft=dict(
        model=str(base), data=data, epochs=40, batch_size=4, lr=1e-2, held_out=0.0, max_length=64, device="cpu"))
    run_sft(cfg.sft, RunLayout.of(cfg), echo=lambda *_: None)
    policy = cfg.run_dir / "sft" / "model"

    tok = load_tokenizer(str(policy))
    rm_dir = tmp_path / "rm"
    torch.manual_seed(1)
    ScalarModel.from_pretrained(base, torch.device("cpu"), tok).save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    cfg = RunConfig(output_dir=tmp_path / "out", name="run", ppo=dict(
        policy=str(policy), reward_model=rm_dir, prompts=tmp_path / "prompts.jsonl", steps=2, batch_size=4,
        mini_batch_size=2, ppo_epochs=1, response_length=8, max_prompt_length=40, eval_prompts=2, eval_every=2,
        checkpoint_every=2, device="cpu", lr=1e-4, seed=0, temperature=0.7))
    ppo.run_ppo(cfg.ppo, RunLayout.of(cfg), echo=lambda *_: None)
    metrics = [json.loads(line) for line in (cfg.run_dir / "policy" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "val/num_eos_tokens" in r]
    assert steps and all(r["val/num_eos_tokens"] >= 3 for r in steps), steps
    assert all(r["objective/scores"] != -1.0 for r in steps)
    samples = [json.loads(line) for line in (cfg.run_dir / "policy" / "samples.jsonl").read_text().splitlines()]
    assert any(s["response"].strip() == "Yes." for s in samples), samples
    assert turn_end(tok, name) not in tok.convert_tokens_to_ids(tok.tokenize(samples[0]["response"]))


def test_sft_warns_when_the_template_writes_no_end_of_turn(tmp_path, model_dirs):
    """A template that ends a reply with no end-of-turn token leaves the model nothing to learn to
    stop from: SFT says so; with a template that writes one (Gemma's), it says nothing."""
    import shutil

    from factory.config import RunConfig
    from factory.train.sft import run_sft

    bare = tmp_path / "bare"
    shutil.copytree(model_dirs["gemma"], bare)
    tok = build_tokenizer("gemma")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(bare)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": CONVERSATION}) + "\n" for _ in range(4)))
    for name, folder in (("bare", bare), ("gemma", model_dirs["gemma"])):
        said: list[str] = []
        cfg = RunConfig(output_dir=tmp_path / name, name="run", sft=dict(
            model=str(folder), data=data, epochs=1, batch_size=4, held_out=0.0, max_length=64, device="cpu"))
        run_sft(cfg.sft, RunLayout.of(cfg), echo=said.append)
        warned = [line for line in said if "will not learn to stop" in line]
        assert warned == ([] if name == "gemma" else [warned[0]]) and (name == "gemma" or "4 of 4" in warned[0])
