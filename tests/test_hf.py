"""The hf backend on the real embedded model (SmolLM2-135M-Instruct, CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from factory.llm.base import Backend, GenParams, normalise

pytestmark = pytest.mark.slow

QUESTIONS = ["Name three colours.", "What is 2 + 2? Answer briefly.", "Write one sentence about cats and the rain."]


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_is_a_backend(hf_embedded):
    assert isinstance(hf_embedded, Backend)
    assert hf_embedded.model_id.startswith("hf:embedded/SmolLM2-135M-Instruct-")


def test_encode_uses_chat_template_without_doubled_bos(hf_embedded):
    ids = hf_embedded.encode(chat("Hello"))
    text = hf_embedded.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>") == 3  # default system turn, user turn, assistant prompt


def test_batched_greedy_equals_one_at_a_time(hf_embedded):
    params = GenParams(temperature=0.0, max_tokens=20)
    batched = hf_embedded.generate([chat(q) for q in QUESTIONS], params)
    single = [hf_embedded.generate([chat(q)], params)[0] for q in QUESTIONS]
    assert [len(b) for b in batched] == [1, 1, 1]
    # Left padding with correct masks must not change what the model says.
    assert [b[0].text for b in batched] == [s[0].text for s in single]
    for (c,) in batched:
        assert c.text.strip()
        assert 0 < c.tokens <= 20
        assert c.finish_reason == ("length" if c.tokens == 20 else "stop")


def test_length_limit_reports_length(hf_embedded):
    (c,), = hf_embedded.generate([chat("Write a long story about a dragon who learns to bake.")], GenParams(temperature=0, max_tokens=5))
    assert c.finish_reason == "length"
    assert c.tokens == 5


def test_sampling_n_and_seed(hf_embedded):
    params = GenParams(temperature=1.0, max_tokens=12, n=3, seed=7)
    first = hf_embedded.generate([chat(q) for q in QUESTIONS[:2]], params)
    again = hf_embedded.generate([chat(q) for q in QUESTIONS[:2]], params)
    assert [len(r) for r in first] == [3, 3]
    assert [[c.text for c in r] for r in first] == [[c.text for c in r] for r in again]
    assert len({c.text for c in first[1]}) > 1, "three samples at temperature 1 should not all agree"


def test_stop_strings_cut_the_text(hf_embedded):
    (c,), = hf_embedded.generate([chat("List five fruits, one per line.")], GenParams(temperature=0, max_tokens=40, stop=("\n",)))
    assert "\n" not in c.text and c.text.strip()
    assert c.finish_reason == "stop"


def brute_force(backend, messages, options):
    """Each option scored alone, unpadded, by a plain forward pass over prompt + option."""
    prompt = backend.encode(messages)
    raw = {}
    for o in options:
        ids = backend.tokenizer(o, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = backend.model(torch.tensor([prompt + ids])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        raw[o] = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids))
    return normalise(raw)


def test_option_logprobs_match_brute_force_with_multi_token_options(hf_embedded):
    options = ["Yes", "No", "Not sure at all"]
    assert len(hf_embedded.tokenizer("Not sure at all", add_special_tokens=False)["input_ids"]) > 1
    requests = [chat(q + " Answer yes or no.") for q in QUESTIONS]
    got = hf_embedded.option_logprobs(requests, options)
    for messages, row in zip(requests, got):
        assert set(row) == set(options)
        assert math.isclose(sum(math.exp(v) for v in row.values()), 1.0, rel_tol=1e-9)
        want = brute_force(hf_embedded, messages, options)
        for o in options:
            assert row[o] == pytest.approx(want[o], abs=1e-4)


def test_option_logprobs_order_and_batching_do_not_matter(hf_embedded):
    requests = [chat(q) for q in QUESTIONS]
    together = hf_embedded.option_logprobs(requests, ["A", "B", "C"])
    alone = [hf_embedded.option_logprobs([r], ["C", "A", "B"])[0] for r in requests]
    for t, a in zip(together, alone):
        for o in "ABC":
            assert t[o] == pytest.approx(a[o], abs=1e-4)


def test_option_logprobs_follow_the_content(hf_embedded):
    # The same pool, two prompts that each point at one option: the scores must follow the prompt.
    requests = [chat("What is the capital of France? Answer with one word."),
                chat("What is the capital of England? Answer with one word.")]
    france, england = hf_embedded.option_logprobs(requests, ["Paris", "London"])
    assert france["Paris"] > france["London"]
    assert england["London"] > england["Paris"]


@pytest.mark.parametrize("bad", [["A"], ["A", "A"], ["A", " "], []])
def test_option_pool_is_validated(hf_embedded, bad):
    with pytest.raises(ValueError):
        hf_embedded.option_logprobs([chat("Hi")], bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_agrees_with_cpu(hf_embedded):
    from factory.llm.hf import HFBackend

    gpu = HFBackend("embedded", device="cuda", dtype="float32")
    try:
        assert gpu.device.type == "cuda" and gpu.info["dtype"] == "float32"
        requests = [chat(q) for q in QUESTIONS]
        cpu_scores = hf_embedded.option_logprobs(requests, ["Yes", "No", "Not sure at all"])
        gpu_scores = gpu.option_logprobs(requests, ["Yes", "No", "Not sure at all"])
        for c, g in zip(cpu_scores, gpu_scores):
            for o in c:
                assert g[o] == pytest.approx(c[o], abs=1e-3)
        out = gpu.generate(requests, GenParams(temperature=0.0, max_tokens=8))
        assert all(r[0].text.strip() for r in out)
        assert HFBackend("embedded", device="cuda").info["dtype"] == "bfloat16"  # auto on a GPU
    finally:
        gpu.close()


def test_a_final_assistant_message_is_continued(hf_embedded):
    messages = [chat("Count from one to ten in words, separated by commas.")[0],
                {"role": "assistant", "content": "one, two, three,"}]
    text = hf_embedded.tokenizer.decode(hf_embedded.encode(messages))
    assert text.endswith("<|im_start|>assistant\none, two, three,")  # no end-of-turn after the prefill
    (c,), = hf_embedded.generate([messages], GenParams(temperature=0, max_tokens=6))
    assert c.text.lstrip().lower().startswith("four")


def test_shared_prefix_cache_gives_the_same_scores(hf_embedded, monkeypatch):
    # Few-shot prompts share a long start, which option_logprobs runs once and reuses.
    few_shot = [chat("Is 7 prime? Answer Yes or No.")[0], {"role": "assistant", "content": "Yes"},
                chat("Is 8 prime? Answer Yes or No.")[0], {"role": "assistant", "content": "No"}]
    requests = [few_shot + chat(f"Is {n} prime? Answer Yes or No.") for n in (9, 11, 21)]
    options = ["Yes", "No", "Not sure at all"]
    cached = hf_embedded.option_logprobs(requests, options)
    import factory.llm.hf as hf

    monkeypatch.setattr(hf, "MIN_SHARED_PREFIX", 10**9)  # force the plain path
    plain = hf_embedded.option_logprobs(requests, options)
    for c, p in zip(cached, plain):
        for o in options:
            assert c[o] == pytest.approx(p[o], abs=1e-4)


def test_single_token_options_read_from_one_row_match_brute_force(hf_embedded, monkeypatch):
    # A/B (the judge) and Yes/No take the fast path: one row per prompt, every option read
    # from its last logits. It must give what scoring each option on its own row gives.
    import factory.llm.hf as hf

    system = {"role": "system", "content": "You are a fair judge of AI assistant replies. You answer with one letter."}
    requests = [[system, chat(f"Which is bigger? (A) {a} (B) {b}")[0], {"role": "assistant", "content": "Answer: ("}]
                for a, b in (("3", "30"), ("an elephant", "a mouse"), ("1 kg", "2 kg"))]
    assert all(len(hf_embedded.tokenizer(o, add_special_tokens=False)["input_ids"]) == 1 for o in "AB")
    for messages, row in zip(requests, hf_embedded.option_logprobs(requests, ["A", "B"])):
        want = brute_force(hf_embedded, messages, ["A", "B"])
        assert row["A"] == pytest.approx(want["A"], abs=1e-4) and row["B"] == pytest.approx(want["B"], abs=1e-4)
    monkeypatch.setattr(hf, "MIN_SHARED_PREFIX", 10**9)  # no shared-prefix cache: the same scores
    for messages, row in zip(requests, hf_embedded.option_logprobs(requests, ["A", "B"])):
        assert row["A"] == pytest.approx(brute_force(hf_embedded, messages, ["A", "B"])["A"], abs=1e-4)
