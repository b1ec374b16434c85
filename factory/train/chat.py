"""Conversations: reading them from a user's JSONL, tokenising them with the model's chat
template (which tokens are the assistant's), and padding rows into tensors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from factory.train import TrainError


def _render(tok, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to where the assistant's reply begins."""
    return tok(_render(tok, messages, True), add_special_tokens=False)["input_ids"]


def chat_ids(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation; the mask is 1 on every assistant turn's tokens,
    including the end-of-turn token, so the model learns to stop.

    The conversation is rendered turn by turn and each assistant turn's text is what the
    template adds after the generation prompt, so no token is guessed from string offsets.
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise TrainError("the chat template does not render turn by turn; cannot find the assistant tokens")
        context = tok(before[len(done):], add_special_tokens=False)["input_ids"]
        reply = tok(upto[len(before):], add_special_tokens=False)["input_ids"]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
        done = upto
    if not ids:
        raise TrainError("a conversation has no assistant message to learn from")
    return ids, mask


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def length_mask(rows: list[list[int]]) -> torch.Tensor:
    return pad_right([[1] * len(r) for r in rows], 0)


def read_messages(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL of {'messages': [{'role', 'content'}, ...]} (sft.jsonl's shape)."""
    from factory.inputs import input_objects
    from factory.store import StoreError

    expected = "an object with 'messages': a list of {'role', 'content'} with an assistant turn"
    out = []
    try:
        for number, obj in input_objects(path, expected):
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            ok = isinstance(msgs, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
            )
            if not ok or not any(m["role"] == "assistant" for m in msgs):
                raise TrainError(f"{path}:{number}: expected {expected}")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    except StoreError as e:
        raise TrainError(str(e)) from None
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file") from None
    return out
