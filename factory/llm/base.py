"""The backend protocol: the two batched calls every stage uses to talk to a model.

A request is a chat conversation: a list of ``{"role": ..., "content": ...}`` messages.
When its last message is the assistant's, the model *continues* that message (a
prefill): Self-Instruct's list prompts and fixed answer formats rely on it.
Every backend takes a *batch* of requests per call; batching is where the speed is
(the embedded model makes ~15 tokens/s for one sequence and ~140 tokens/s for 64).
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

_SURROGATE = re.compile("[\ud800-\udfff]")
Message = dict[str, str]
Messages = list[Message]


class BackendError(RuntimeError):
    """A model call failed for good (after retries, or for a reason retrying cannot fix)."""


class RequestFailed(BackendError):
    """One request failed for good, for a reason of its own (retries spent, a reply too long):
    the other requests of its batch may still be fine."""


class BatchIncomplete(BackendError):
    """Some requests of a batch failed for good; the others' results are here.

    ``results`` holds one entry per request, None where it failed; ``reasons`` maps the index of
    each failed request to why. A stage drops those requests' items, records them as failed and
    goes on (see ``factory.failures``); a caller that cannot do without them sees a BackendError.
    """

    def __init__(self, results: list, reasons: dict[int, str]):
        self.results, self.reasons = results, reasons
        first = min(reasons)
        super().__init__(f"{len(reasons)} of {len(results)} requests failed; request {first}: {reasons[first]}")


class GenParams(BaseModel):
    """Sampling settings for one ``generate`` call."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(1, ge=1, description="completions per request")
    temperature: float = Field(0.7, ge=0.0, description="0 means greedy decoding")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(256, ge=1, description="new tokens per completion")
    stop: tuple[str, ...] = Field((), description="the text is cut before the first of these")
    seed: int | None = Field(None, description="sampling seed; same seed and batch give the same text")

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v


class Completion(BaseModel):
    """One sampled reply."""

    model_config = ConfigDict(extra="forbid")

    text: str
    finish_reason: Literal["stop", "length"]
    """``stop``: the model ended or hit a stop string; ``length``: cut by ``max_tokens``."""
    tokens: int = 0
    """new tokens generated (0 where the backend does not say)."""

    @field_validator("text")
    @classmethod
    def _valid_utf8(cls, v: str) -> str:
        # JSON may carry a lone surrogate ("\ud800") that no UTF-8 file can hold: it would crash the
        # write of the record. It becomes U+FFFD, as any decoder turns bytes it cannot read.
        return _SURROGATE.sub("\ufffd", v)


@runtime_checkable
class Backend(Protocol):
    """What every stage needs from a model. Implementations: hf, openai, vllm, scripted."""

    model_id: str
    """a stable name of the model actually used, recorded in manifests and records."""

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        """``params.n`` completions for each request, in request order."""
        ...

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        """For each request, the log-probability of each option as the start of the
        assistant's reply, normalised over the pool (``logsumexp`` of the values is 0)."""
        ...

    def close(self) -> None:
        """Free what the backend holds (a model, a connection pool, a server process)."""
        ...


def chat_text(tokenizer, messages: Messages) -> str:
    """Render a conversation with the tokenizer's chat template, up to where the model writes:
    a new assistant turn, or the inside of a final assistant message (prefill)."""
    prefill = bool(messages) and messages[-1].get("role") == "assistant"
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=not prefill, continue_final_message=prefill, tokenize=False
    )


def sample_seed(seed: int, j: int) -> int:
    """The seed of sample ``j`` (0-based) of one prompt, in a call seeded with ``seed``: the vLLM
    and HTTP backends send each seeded sample as a request of its own with this seed.

    Sample 0 keeps ``seed`` itself, so an ``n=1`` call sends what it always did. Later samples
    get a hash of ``(seed, j)`` rather than ``seed + j``, which would collide with the seeds the
    stages give neighbouring batches (``seed + offset``). It depends on neither the prompt's place
    in the call nor the batch, so a resumed or retried item gets the text it would have got. The
    value lies in ``[0, 2**31)``, which every server accepts (llama.cpp reads -1 as "random").
    """
    if j == 0:
        return seed
    digest = hashlib.sha256(f"factory-sample:{seed}:{j}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


_TURN_MARK = "factoryreplyends"


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """The ids that end the assistant's turn: where a reply stops, is scored, is learned to stop.

    EOS alone is not enough: Gemma's turn ends with ``<end_of_turn>`` and ChatML's with
    ``<|im_end|>``, which some models (Qwen's base models) keep apart from their EOS
    ``<|endoftext|>``. The set is the tokenizer's EOS, the generation config's ``eos_token_id``
    (an id or a list) and the first special token the chat template writes after an assistant
    message. Derived once per tokenizer; the sampler, the SFT mask, the reward model and PPO all
    read the same set.
    """
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen = getattr(generation_config, "eos_token_id", None)
    ids.update(i for i in (gen if isinstance(gen, (list, tuple)) else [gen]) if i is not None)
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": _TURN_MARK}], tokenize=False)
    except Exception:  # a template that refuses this shape: EOS and the generation config decide alone
        text = ""
    if _TURN_MARK in text:
        tail = tokenizer(text[text.rindex(_TURN_MARK) + len(_TURN_MARK):], add_special_tokens=False)["input_ids"]
        special = set(tokenizer.all_special_ids) | {
            i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        ids.update(next(([i] for i in tail if i in special), []))
    return sorted(ids)


def check_options(options: Sequence[str]) -> list[str]:
    """Refuse a pool of options that cannot be scored: empty, blank or repeated strings."""
    opts = list(options)
    if len(opts) < 2:
        raise ValueError(f"option_logprobs needs at least two options, got {opts!r}")
    if any(not o.strip() for o in opts):
        raise ValueError(f"options must be non-blank strings, got {opts!r}")
    if len(set(opts)) != len(opts):
        raise ValueError(f"options must be distinct, got {opts!r}")
    return opts


def _shared_start(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def option_sequences(tokenizer, text: str, options: Sequence[str]) -> tuple[int, list[list[int]]]:
    """(``start``, one id sequence per option): how to score ``options`` as the model would write them
    right after the rendered prompt ``text``.

    Each sequence is ``text + option`` tokenised at once, exactly the ids a model reading that text
    sees; the option's log-probability is the sum over the ids from ``start`` on. An option tokenised
    on its own and appended can differ from that: a SentencePiece (Metaspace) tokenizer writes "A"
    alone as "▁A", while after "Answer: (" the text continues with a bare "A"; a byte-level BPE merges
    a trailing space of the prompt into " A". ``start`` is where every sequence still agrees with the
    prompt's own ids; when the last prompt token merges with an option, it lies before the prompt's
    end, and the shared tokens up to it count the same for every option, so normalising over the pool
    cancels them.
    """
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    seqs = [tokenizer(text + o, add_special_tokens=False)["input_ids"] for o in options]
    start = min(_shared_start(prompt, s) for s in seqs)
    # Every option must add at least one token of its own past the shared start.
    if any(len(s) <= start for s in seqs):
        raise BackendError(f"options {list(options)!r} add no token to the prompt; cannot score them")
    return start, seqs


def split_options(tokenizer, requests: Sequence[Messages], options: Sequence[str], max_single: int | None = None,
                  ) -> tuple[list[tuple[int, list[int], list[int]]], list[tuple[int, int, int, list[int]]]]:
    """How a backend scores ``options`` for each request (``option_sequences``), in two lists.

    ``single``: (request, the shared ids, one next id per option), where every option adds exactly
    one id after ids all options share: all are read from one next-token distribution (one forward
    pass, or one prefill). ``multi``: (request, option, start, ids) for every other request, each
    option's ``ids[start:]`` scored after ``ids[:start]``. ``max_single`` caps the distinct ids a
    single read may ask for (vLLM returns at most ``max_logprobs`` of them).
    """
    single: list[tuple[int, list[int], list[int]]] = []
    multi: list[tuple[int, int, int, list[int]]] = []
    for i, r in enumerate(requests):
        start, seqs = option_sequences(tokenizer, chat_text(tokenizer, r), options)
        ids = [s[start] for s in seqs]
        if start > 0 and all(len(s) == start + 1 for s in seqs) and (max_single is None or len(set(ids)) <= max_single):
            single.append((i, seqs[0][:start], ids))
        else:
            multi += [(i, k, start, s) for k, s in enumerate(seqs)]
    return single, multi


def normalise(scores: dict[str, float]) -> dict[str, float]:
    """Log-softmax over the pool: turn raw sequence log-probabilities into a distribution."""
    top = max(scores.values())
    if top == -math.inf:
        raise BackendError("every option has probability zero")
    total = top + math.log(sum(math.exp(v - top) for v in scores.values()))
    return {k: v - total for k, v in scores.items()}


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` before the earliest stop string; say whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
