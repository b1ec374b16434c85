"""transformers backend, CPU or CUDA; the home of the embedded default model.

Requests are rendered with the model's chat template, sorted by length so each
batch carries little padding, left-padded, and generated together: on 2 CPU cores
a batch of 64 makes ~10x the tokens/s of one sequence. ``option_logprobs`` scores
every (request, option) pair in one forward pass per batch, reading only the
logits of the option tokens.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch

from factory.llm.base import (
    BackendError,
    Completion,
    GenParams,
    Messages,
    chat_text,
    check_options,
    cut_at_stop,
    end_of_turn_ids,
    normalise,
    split_options,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIN_SHARED_PREFIX = 16  # tokens; below this a separate prefix pass costs more than it saves


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    return n


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
"""weight files that torch reads by unpickling"""


def pickle_refusal(path: str) -> str | None:
    """Why the model folder ``path`` cannot load without unpickling (it holds pickle-based weights
    and no safetensors), or None. Hub ids and folders with safetensors get None: for them
    ``use_safetensors=True`` is enough."""
    folder = Path(path)
    # transformers' names for safetensors weights, one file or shards (a reward model's head is beside them)
    if not folder.is_dir() or any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return None
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickles:
        return None
    return (f"{folder}: pickle-based weights refused ({', '.join(pickles)}): unpickling a file can run any code "
            "hidden in it. Convert the model to safetensors once, where you trust it: "
            "AutoModelForCausalLM.from_pretrained(FOLDER).save_pretrained(FOLDER, safe_serialization=True); "
            "or, if you trust this file, pass --allow-pickle (config key allow_pickle = true)")


def weight_options(path: str, allow_pickle: bool) -> dict:
    """``from_pretrained`` keywords: safetensors only, unless the user allowed pickles. Raises
    ``ValueError`` with ``pickle_refusal``'s message for a folder of pickled weights alone."""
    if allow_pickle:
        return {}
    why = pickle_refusal(path)
    if why:
        raise ValueError(why)
    return {"use_safetensors": True}


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device {device!r} asked for, but torch sees no CUDA device (use device = 'cpu' or 'auto')")
    return dev


class HFBackend:
    def __init__(self, model: str = "embedded", device: str = "auto", dtype: str = "auto", batch_size: int = 64,
                 allow_pickle: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from factory.llm.embedded import resolve_model

        path, self.model_id = resolve_model(model, "hf")
        self.device = _resolve_device(device)
        if dtype == "auto":
            dtype = "bfloat16" if self.device.type == "cuda" else "float32"
        self.batch_size = batch_size
        try:
            safe = weight_options(path, allow_pickle)
        except ValueError as e:
            raise BackendError(str(e)) from None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **safe).to(self.device)
        except OSError as e:
            raise BackendError(f"cannot load model {model!r}: {e}") from None
        self.model.eval()  # dropout off: sampling and scoring must not be noisy
        if self.tokenizer.chat_template is None:
            raise BackendError(f"model {model!r} has no chat template; factory sends chat messages")
        # Generation stops at the end of the assistant's turn, which is not always EOS (Gemma's
        # <end_of_turn>, ChatML's <|im_end|> beside an <|endoftext|> EOS).
        self.eos_ids = end_of_turn_ids(self.tokenizer, self.model.generation_config)
        if not self.eos_ids:
            raise BackendError(f"model {model!r} declares no end-of-sequence token")
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        self.info = {"path": path, "device": str(self.device), "dtype": dtype}

    # -- rendering --------------------------------------------------------------------------

    def encode(self, messages: Messages) -> list[int]:
        """Token ids of a conversation, ending where the model's text begins (see ``chat_text``)."""
        text = chat_text(self.tokenizer, messages)
        # The template already wrote the special tokens; adding them again would double the BOS.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_pad(self, seqs: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # -- generate ---------------------------------------------------------------------------

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        encoded = [self.encode(r) for r in requests]
        # Longest first: similar lengths share a batch (less padding), and a batch too big
        # for memory fails on the first step rather than after an hour.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        per_batch = max(1, self.batch_size // params.n)  # n samples of a prompt occupy n rows
        out: list[list[Completion]] = [[] for _ in requests]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        for start in range(0, len(order), per_batch):
            chunk = order[start : start + per_batch]
            for i, completions in zip(chunk, self._generate_batch([encoded[i] for i in chunk], params)):
                out[i] = completions
        return out

    @torch.inference_mode()
    def _generate_batch(self, seqs: list[list[int]], params: GenParams) -> list[list[Completion]]:
        ids, mask = self._left_pad(seqs)
        kwargs: dict = dict(
            max_new_tokens=params.max_tokens,
            num_return_sequences=params.n,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_ids,
        )
        if params.temperature > 0:
            # top_k=0 turns off the library's default top-k of 50: an API user expects
            # temperature and top_p alone to shape the distribution.
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        new = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :].tolist()
        ends = set(self.eos_ids) | {self.pad_id}
        results: list[list[Completion]] = []
        for row, tokens in enumerate(new):
            length = next((j for j, t in enumerate(tokens) if t in ends), len(tokens))
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            text, stopped = cut_at_stop(text, params.stop)
            ended = stopped or length < len(tokens)
            completion = Completion(text=text, finish_reason="stop" if ended else "length", tokens=length)
            if row % params.n == 0:
                results.append([])
            results[-1].append(completion)
        return results

    # -- option_logprobs --------------------------------------------------------------------

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        opts = check_options(options)
        # Each option is scored as the ids of prompt + option tokenised at once (``option_sequences``):
        # the ids the model would emit in context, not the option tokenised on its own.
        scores = [[0.0] * len(opts) for _ in requests]
        single, multi = split_options(self.tokenizer, requests, opts)
        pairs = [(i, k, s[:start], s[start:]) for i, k, start, s in multi]  # (request, option, prefix, option ids)
        # Single-token options (A/B, Yes/No): one row per prompt, all options read from its last
        # logits; a row per (prompt, option) would run every prompt k times.
        single.sort(key=lambda row: -len(row[1]))
        for b in range(0, len(single), self.batch_size):
            chunk = single[b : b + self.batch_size]
            last = self._forward([p for _, p, _ in chunk], keep=1)[:, -1]
            for row, (i, _, ids) in enumerate(chunk):
                scores[i] = last[row, ids].tolist()
        # Longest first, as in generate: similar lengths share a batch.
        pairs.sort(key=lambda pk: -len(pk[2]))
        for b in range(0, len(pairs), self.batch_size):
            chunk = pairs[b : b + self.batch_size]
            logps = self._score_batch([p for _, _, p, _ in chunk], [o for _, _, _, o in chunk])
            for (i, k, _, _), lp in zip(chunk, logps):
                scores[i][k] = lp
        return [normalise(dict(zip(opts, row))) for row in scores]

    def _score_batch(self, prompts: list[list[int]], options: list[list[int]]) -> list[float]:
        """Sum of log p(option tokens | prompt) for each pair, in one forward pass."""
        keep = max(len(o) for o in options) + 1
        logprobs = self._forward([p + o for p, o in zip(prompts, options)], keep, min(len(p) for p in prompts) - 1)
        out = []
        for row, o in enumerate(options):
            # logits at position t predict token t+1; the option occupies the last len(o) slots.
            preds = logprobs[row, keep - 1 - len(o) : keep - 1]
            target = torch.tensor(o, device=preds.device).unsqueeze(-1)
            out.append(preds.gather(-1, target).sum().item())
        return out

    @torch.inference_mode()
    def _forward(self, seqs: list[list[int]], keep: int, max_shared: int | None = None) -> torch.Tensor:
        """Log-probabilities at the last ``keep`` positions of each sequence, one forward pass.

        Rows of one batch often share a long start (a system turn, few-shot examples, the
        same prompt under every option). That shared prefix is run once, and its key/value
        cache serves every row, so each row costs only its own tail. ``max_shared`` keeps the
        positions whose logits are read out of the prefix.
        """
        shared = min(_common_prefix(seqs), min(len(s) for s in seqs) - keep)
        if max_shared is not None:
            shared = min(shared, max_shared)
        cache = None
        if shared >= MIN_SHARED_PREFIX:
            prefix = torch.tensor([seqs[0][:shared]], device=self.device)
            cache = self.model(input_ids=prefix, use_cache=True).past_key_values
            cache.batch_repeat_interleave(len(seqs))
        else:
            shared = 0
        ids, tail_mask = self._left_pad([s[shared:] for s in seqs])
        # Padding sits between the prefix and each tail; the mask hides it and positions
        # continue from the prefix as if it were not there.
        mask = torch.cat([torch.ones((len(seqs), shared), dtype=torch.long, device=self.device), tail_mask], dim=1)
        positions = shared + (tail_mask.cumsum(-1) - 1).clamp(min=0)
        # Left padding puts every sequence's end at the right edge, so only the last ``keep``
        # positions' logits matter; skipping the rest saves a B x T x vocab tensor.
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, logits_to_keep=keep
        ).logits
        return torch.log_softmax(logits.float(), dim=-1)

    def close(self) -> None:
        # Dropping the reference frees nothing while a cycle still holds the model: collect first,
        # then hand the cached blocks back so the next engine or trainer finds the GPU empty.
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
