"""The vLLM backend.

The first tests run everywhere: a small stand-in for the ``vllm`` package (installed into
``sys.modules``) records the requests the backend builds and answers them the way vLLM does
(prompt log-probabilities, log-probabilities of a generated token after the allowed-token mask,
seeds of n samples), from a toy next-token model over a tokenizer built in the test. They test
the backend's request building and result reading, not vLLM. The last ones need the vllm package
and a CUDA GPU, and are skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sys
import types
from dataclasses import dataclass, field

import pytest

torch = pytest.importorskip("torch")

from factory.config import BackendConfig  # noqa: E402
from factory.llm import load_backend  # noqa: E402
from factory.llm.base import BackendError, GenParams, chat_text, normalise, sample_seed  # noqa: E402
from tokenizer_families import build_tokenizer  # noqa: E402



def needs_vllm(fn):
    """A test of the real engine: it needs the vllm package and a CUDA GPU."""
    for mark in (
        pytest.mark.vllm,
        pytest.mark.gpu,
        pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed"),
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    ):
        fn = mark(fn)
    return fn


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- a stand-in for the vllm package ---------------------------------------------------------


@dataclass
class SamplingParams:
    """The fields of vllm.SamplingParams the backend may set (an unknown one fails, as in vLLM)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = 16
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    allowed_token_ids: list[int] | None = None
    logit_bias: dict[int, float] | None = None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None


def toy_logits(prefix: list[int], vocab: int) -> list[float]:
    """A fixed next-token model: logits that depend on the last token, the length and the candidate."""
    last = prefix[-1] if prefix else 0
    return [((last * 7 + t * 13 + len(prefix) * 3) % 17) / 4.0 for t in range(vocab)]


def log_softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    total = top + math.log(sum(math.exp(x - top) for x in xs))
    return [x - total for x in xs]


@dataclass
class FakeVLLM:
    """What the stand-in saw and how it behaves; one per test."""

    tokenizer: object
    engines: list = field(default_factory=list)
    needs_remote_code: bool = False
    llm_shutdown: bool = False  # whether LLM has a shutdown() of its own (newer vLLM)
    core_shutdowns: int = 0
    llm_shutdowns: int = 0
    destroyed: list = field(default_factory=list)

    def install(self, monkeypatch) -> None:
        fake = self

        class LLM:
            def __init__(self, model: str, **kwargs):
                if fake.needs_remote_code and not kwargs.get("trust_remote_code"):
                    # transformers' words when a repository ships its own code
                    raise ValueError(f"The repository {model} contains custom code which must be executed to "
                                     "correctly load the model. Please pass the argument `trust_remote_code=True`")
                self.model, self.kwargs, self.calls = model, kwargs, []
                self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(shutdown=fake._core_down))
                if fake.llm_shutdown:
                    self.shutdown = fake._llm_down
                fake.engines.append(self)

            def get_tokenizer(self):
                return fake.tokenizer

            def generate(self, prompts, sampling_params, use_tqdm=True):
                params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
                if len(params) != len(prompts):
                    raise ValueError("the lengths of prompts and sampling_params must be the same")
                self.calls.append((list(prompts), params))
                return [fake._answer(p["prompt_token_ids"], sp, self.kwargs) for p, sp in zip(prompts, params)]

        vllm = types.ModuleType("vllm")
        vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
        inputs = types.ModuleType("vllm.inputs")
        inputs.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}  # a TypedDict in vLLM
        distributed = types.ModuleType("vllm.distributed")
        parallel_state = types.ModuleType("vllm.distributed.parallel_state")
        parallel_state.destroy_model_parallel = lambda: fake.destroyed.append("model_parallel")
        parallel_state.destroy_distributed_environment = lambda: fake.destroyed.append("distributed_environment")
        vllm.inputs, vllm.distributed, distributed.parallel_state = inputs, distributed, parallel_state
        for name, module in [("vllm", vllm), ("vllm.inputs", inputs), ("vllm.distributed", distributed),
                             ("vllm.distributed.parallel_state", parallel_state)]:
            monkeypatch.setitem(sys.modules, name, module)

    def _core_down(self):
        self.core_shutdowns += 1

    def _llm_down(self):
        self.llm_shutdowns += 1

    def lp(self, prefix: list[int], token: int) -> float:
        return log_softmax(toy_logits(prefix, len(self.tokenizer)))[token]

    def _answer(self, ids: list[int], sp: SamplingParams, engine: dict):
        vocab = len(self.tokenizer)
        if sp.logprobs is not None and sp.logprobs > 20:  # vLLM's default max_logprobs
            raise ValueError(f"Requested sample logprobs of {sp.logprobs}, which is greater than max allowed: 20")
        prompt_logprobs = None
        if sp.prompt_logprobs is not None:
            # Position 0 has none; position p holds the actual token (plus the top prompt_logprobs).
            prompt_logprobs = [None] + [{ids[p]: Logprob(self.lp(ids[:p], ids[p]))} for p in range(1, len(ids))]
        outputs = []
        if sp.seed is not None:
            # vLLM v1's ParentRequest: child j of a seeded request samples with seed + j.
            seeds = [sp.seed + j for j in range(sp.n)]
        else:
            seeds = [random.randrange(2**31) for _ in range(sp.n)]
        for s in seeds:
            logits = toy_logits(ids, vocab)
            allowed = sp.allowed_token_ids or list(range(vocab))
            masked = [x if t in allowed else -math.inf for t, x in enumerate(logits)]
            token = max(allowed, key=lambda t: logits[t])
            logprobs = None
            if sp.logprobs is not None:
                # logprobs_mode: "processed_logprobs" reads them after the allowed-token mask, the
                # default "raw_logprobs" before it (over the whole vocabulary).
                processed = engine.get("logprobs_mode") == "processed_logprobs"
                values = log_softmax(masked) if processed else log_softmax(logits)
                top = sorted(range(vocab), key=lambda t: -values[t])[: sp.logprobs]
                logprobs = [{t: Logprob(values[t]) for t in [token, *top]}]
            text = f"{sum(ids) % 997}:{s}"
            outputs.append(types.SimpleNamespace(text=text, token_ids=[token] * 3, finish_reason="length",
                                                 logprobs=logprobs))
        return types.SimpleNamespace(prompt_token_ids=ids, prompt_logprobs=prompt_logprobs, outputs=outputs)


@pytest.fixture
def fake_vllm(monkeypatch):
    def make(family: str = "bpe", **behaviour) -> FakeVLLM:
        fake = FakeVLLM(tokenizer=build_tokenizer(family), **behaviour)
        fake.install(monkeypatch)
        return fake

    return make


def backend_for(fake: FakeVLLM, tmp_path, **kwargs):
    from factory.llm.vllm import VLLMBackend

    return VLLMBackend(str(tmp_path), **kwargs)


def in_context_reference(fake: FakeVLLM, messages, options) -> dict[str, float]:
    """Each option scored as the toy model reads text + option tokenised at once, over the whole
    sequence; the prompt's share is the same for every option, so normalising cancels it."""
    text = chat_text(fake.tokenizer, messages)
    scores = {}
    for o in options:
        seq = fake.tokenizer(text + o, add_special_tokens=False)["input_ids"]
        scores[o] = sum(fake.lp(seq[:p], seq[p]) for p in range(1, len(seq)))
    return normalise(scores)


# -- option_logprobs -------------------------------------------------------------------------


def test_single_token_options_are_read_from_one_request_per_prompt(fake_vllm, tmp_path):
    # The Metaspace family writes "A" alone as "▁A", but after "Answer: (A) or (B)? [/INST]" the text
    # goes on with a bare "A": the ids the model would emit are the latter.
    fake = fake_vllm("metaspace")
    tok = fake.tokenizer
    backend = backend_for(fake, tmp_path)
    assert fake.engines[0].kwargs["logprobs_mode"] == "processed_logprobs"
    requests = [chat("Answer: (A) or (B)?"), chat("Which reply is kind? Answer A or B.")]
    got = backend.option_logprobs(requests, ["A", "B"])

    (prompts, params), = fake.engines[0].calls  # one generate call, one request per prompt
    assert len(prompts) == len(requests)
    for r, prompt, sp in zip(requests, prompts, params):
        text = chat_text(tok, r)
        want_ids = [tok(text + o, add_special_tokens=False)["input_ids"][-1] for o in "AB"]
        assert want_ids != [tok(o, add_special_tokens=False)["input_ids"][-1] for o in "AB"]  # the case at hand
        assert prompt["prompt_token_ids"] == tok(text, add_special_tokens=False)["input_ids"]
        assert sp.allowed_token_ids == sorted(want_ids) and sp.logprobs == 2
        assert sp.max_tokens == 1 and sp.temperature == 1.0 and sp.prompt_logprobs is None
    for r, row in zip(requests, got):
        want = in_context_reference(fake, r, ["A", "B"])
        assert row == pytest.approx(want, abs=1e-9)


# A prefill ending in a space: byte-level BPE merges it into " Yes", " No": the options' ids start
# one id before the prompt's end.
PREFILLED = [{"role": "user", "content": "Is the task a classification task?"},
             {"role": "assistant", "content": "The answer is "}]


def test_multi_token_options_sum_prompt_logprobs_from_the_shared_start(fake_vllm, tmp_path):
    fake = fake_vllm("bpe")
    tok = fake.tokenizer
    backend = backend_for(fake, tmp_path)
    options = ["Yes", "No", "Not sure"]  # "Not sure" takes several ids
    requests = [PREFILLED, chat("Hello there, how are you today?")]
    text = chat_text(tok, PREFILLED)
    prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok(text + "Yes", add_special_tokens=False)["input_ids"][: len(prompt_ids)] != prompt_ids  # the case
    got = backend.option_logprobs(requests, options)

    (prompts, params), = fake.engines[0].calls
    assert [p["prompt_token_ids"] for p in prompts] == [
        tok(chat_text(tok, r) + o, add_special_tokens=False)["input_ids"] for r in requests for o in options
    ]
    assert all(sp.prompt_logprobs == 0 and sp.allowed_token_ids is None for sp in params)
    for r, row in zip(requests, got):
        assert row == pytest.approx(in_context_reference(fake, r, options), abs=1e-9)


def test_single_token_options_merged_with_the_prompt_end_are_read_after_the_shared_ids(fake_vllm, tmp_path):
    fake = fake_vllm("bpe")
    tok = fake.tokenizer
    backend = backend_for(fake, tmp_path)
    got = backend.option_logprobs([PREFILLED], ["A", "B"])[0]
    (prompts, params), = fake.engines[0].calls
    text = chat_text(tok, PREFILLED)
    seqs = [tok(text + o, add_special_tokens=False)["input_ids"] for o in "AB"]
    assert prompts[0]["prompt_token_ids"] == seqs[0][:-1] == seqs[1][:-1]  # the prompt less its trailing " "
    assert params[0].allowed_token_ids == sorted(s[-1] for s in seqs)
    assert got == pytest.approx(in_context_reference(fake, PREFILLED, ["A", "B"]), abs=1e-9)


def test_option_pools_larger_than_vllm_returns_go_through_prompt_logprobs(fake_vllm, tmp_path):
    fake = fake_vllm("metaspace")  # in context each is one bare character; alone, most are "▁x"
    backend = backend_for(fake, tmp_path)
    options = [str(d) for d in range(10)] + list("abcdefghijk")  # 21 one-character options
    messages = chat("Pick a character.")
    got = backend.option_logprobs([messages], options)[0]
    (_, params), = fake.engines[0].calls
    assert all(sp.logprobs is None and sp.prompt_logprobs == 0 for sp in params)
    assert got == pytest.approx(in_context_reference(fake, messages, options), abs=1e-9)


# -- generate ----------------------------------------------------------------------------------


def test_seeded_samples_each_get_a_seed_and_repeat(fake_vllm, tmp_path):
    fake = fake_vllm("bpe")
    backend = backend_for(fake, tmp_path)
    requests = [chat("Write a short poem about the sea."), chat("Write a short poem about the sea."), chat("Hi")]
    params = GenParams(n=3, seed=7, temperature=0.8, max_tokens=8)
    first = backend.generate(requests, params)

    (prompts, sent), = fake.engines[0].calls
    assert len(prompts) == 9 and all(sp.n == 1 for sp in sent)  # one request per sample
    # generation stops at the end of the turn: ChatML's <|im_end|>, though this EOS is <|endoftext|>
    im_end = fake.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(im_end in sp.stop_token_ids and fake.tokenizer.eos_token_id in sp.stop_token_ids for sp in sent)
    assert [sp.seed for sp in sent] == [sample_seed(7, j) for _ in requests for j in range(3)]
    assert len({sample_seed(7, j) for j in range(3)}) == 3 and sample_seed(7, 0) == 7
    texts = [[c.text for c in row] for row in first]
    assert all(len(set(row)) == 3 for row in texts)
    # a sample's text depends on its prompt, the seed and its index, not on the prompt's place in the call
    assert texts[0] == texts[1]

    again = backend_for(fake, tmp_path).generate(requests, params)
    assert [[c.text for c in row] for row in again] == texts
    other = backend.generate(requests, params.model_copy(update={"seed": 8}))
    assert all(set(a).isdisjoint(c.text for c in b) for a, b in zip(texts, other))

    # Without a seed there is nothing to reproduce: one request per prompt, n samples each.
    out = backend.generate(requests[1:], GenParams(n=2, max_tokens=8, stop=("x",)))
    prompts, sent = fake.engines[0].calls[-1]
    assert len(prompts) == 2 and all(sp.n == 2 and sp.seed is None and sp.stop == ["x"] for sp in sent)
    assert [len(row) for row in out] == [2, 2] and out[0][0].finish_reason == "length"


# -- engine settings -------------------------------------------------------------------------


def test_engine_settings_reach_vllm(fake_vllm, tmp_path):
    fake = fake_vllm("bpe")
    load_backend(BackendConfig(spec=f"vllm:{tmp_path}"))
    defaults = fake.engines[-1].kwargs
    assert defaults["enforce_eager"] is False and defaults["seed"] == 0 and defaults["trust_remote_code"] is False
    assert "max_model_len" not in defaults and defaults["load_format"] == "safetensors"
    cfg = BackendConfig(spec=f"vllm:{tmp_path}", max_model_len=512, enforce_eager=True, seed=3,
                        trust_remote_code=True)
    load_backend(cfg, allow_pickle=True)
    kw = fake.engines[-1].kwargs
    assert (kw["max_model_len"], kw["enforce_eager"], kw["seed"], kw["trust_remote_code"]) == (512, True, 3, True)
    assert kw["load_format"] == "auto"


def test_remote_code_is_refused_without_the_flag(fake_vllm, tmp_path):
    fake = fake_vllm("bpe", needs_remote_code=True)
    with pytest.raises(BackendError, match=r"--trust-remote-code.*backend\.trust_remote_code = true"):
        load_backend(BackendConfig(spec=f"vllm:{tmp_path}"))
    load_backend(BackendConfig(spec=f"vllm:{tmp_path}", trust_remote_code=True))
    assert fake.engines[-1].kwargs["trust_remote_code"] is True


def test_trust_remote_code_flag_sets_the_backend_key():
    from factory.cli.common import load_run_config

    assert load_run_config(None, (), None).backend.trust_remote_code is False
    assert load_run_config(None, (), None, trust_remote_code=True).backend.trust_remote_code is True


# -- close -----------------------------------------------------------------------------------


@pytest.mark.parametrize("llm_shutdown", [False, True], ids=["engine-core", "llm-shutdown"])
def test_close_shuts_the_engine_down_once(fake_vllm, tmp_path, monkeypatch, llm_shutdown):
    fake = fake_vllm("bpe", llm_shutdown=llm_shutdown)
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))
    backend = backend_for(fake, tmp_path)
    backend.close()
    assert (fake.llm_shutdowns, fake.core_shutdowns) == ((1, 0) if llm_shutdown else (0, 1))
    assert fake.destroyed == ["model_parallel", "distributed_environment"] and emptied == [1]
    assert backend.llm is None
    backend.close()  # a second close does nothing
    assert fake.llm_shutdowns + fake.core_shutdowns == 1 and emptied == [1]


def test_close_leaves_a_process_group_it_did_not_make(fake_vllm, tmp_path, monkeypatch):
    import factory.llm.vllm as vllm_backend

    fake = fake_vllm("bpe")
    monkeypatch.setattr(vllm_backend, "_distributed_initialized", lambda: True)
    backend = backend_for(fake, tmp_path)
    del fake.engines[0].llm_engine  # a version without an engine core to shut down
    backend.close()
    assert fake.destroyed == ["model_parallel"] and backend.llm is None


# -- the real engine -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_backend():
    from factory.llm.vllm import VLLMBackend

    b = VLLMBackend("embedded", gpu_memory_utilization=0.3)
    yield b
    b.close()


@needs_vllm
def test_generate_and_options_agree_with_hf(vllm_backend):
    from factory.llm.hf import HFBackend

    chat_ = [chat("Is water wet? Answer Yes or No.")]
    out = vllm_backend.generate(chat_, GenParams(temperature=0, max_tokens=8, n=1))
    assert out[0][0].text.strip()
    hf = HFBackend("embedded", device="cuda", dtype="float32")
    try:
        for options in (["Yes", "No"], ["Yes", "No", "Not sure"]):  # one prefill, then prompt log-probabilities
            want = hf.option_logprobs(chat_, options)[0]
            got = vllm_backend.option_logprobs(chat_, options)[0]
            for k in want:
                assert got[k] == pytest.approx(want[k], abs=0.05)
    finally:
        hf.close()


@needs_vllm
def test_seeded_samples_differ_and_repeat_on_the_engine(vllm_backend):
    requests = [chat("Write one word."), chat("Write one word.")]
    params = GenParams(n=3, seed=5, temperature=1.0, max_tokens=12)
    first = [[c.text for c in row] for row in vllm_backend.generate(requests, params)]
    assert first == [[c.text for c in row] for row in vllm_backend.generate(requests, params)]
    assert len(set(first[0])) == 3  # the samples of one prompt differ
    assert first[0] == first[1]  # and depend on the prompt and seed, not on the prompt's place in the call
    alone = vllm_backend.generate(requests[1:], params)
    assert [c.text for c in alone[0]] == first[1]
