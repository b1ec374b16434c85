"""How a reward model reads a reply and scores it: one way for training, PPO's rewards and rerank.

A reply is tokenised after its prompt through the chat template and kept through its end-of-turn
token (``reply_ids``), cut to the length budget keeping that token (``cut``), and scored at its
last token; replies to the same prompt share the prompt's computation (``pack``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Collection, NamedTuple

import torch

from factory.train import TrainError
from factory.train.chat import length_mask, pad_right
from factory.train.models import ScalarModel, end_ids

Seq = tuple[tuple[int, ...], tuple[int, ...]]
"""What the reward model reads for one reply: (prompt ids kept, reply ids kept)."""


def reply_ids(tok, messages: list[dict[str, str]], reply: str, ends: Collection[int] | None = None,
              ) -> tuple[list[int], list[int]]:
    """(prompt ids up to the assistant's reply, the reply's ids through its end-of-turn token).

    The reply is what the chat template adds after the generation prompt, tokenised on its own,
    so the prompt's ids are the same for every reply and can be shared. Whatever the template puts
    after the end-of-turn token (SmolLM2's newline, Gemma's) is dropped: PPO scores its samples at
    the end-of-turn token it generates, so the reward model must learn to read exactly there.
    ``ends``: the ids that end a turn (``models.end_ids``; derived from ``tok`` when not given).
    """
    ends = set(end_ids(tok) if ends is None else ends)
    before = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = tok.apply_chat_template([*messages, {"role": "assistant", "content": reply}], tokenize=False)
    if not full.startswith(before):
        raise TrainError("the chat template does not render the reply after the generation prompt; "
                         "cannot tell the prompt's tokens from the reply's")
    prompt = tok(before, add_special_tokens=False)["input_ids"]
    ids = tok(full[len(before):], add_special_tokens=False)["input_ids"]
    last = next((j for j in range(len(ids) - 1, -1, -1) if ids[j] in ends), None)
    if last is not None:
        ids = ids[: last + 1]
    return prompt, ids


def cut(prompt: list[int], reply: list[int], max_length: int, ends: Collection[int] = ()) -> Seq:
    """Prompt + reply cut to ``max_length`` tokens.

    The prompt keeps its end (the question sits there; a long system prompt or early turns go
    first) and the reply its start; the reply keeps at least half the budget, more if the prompt
    leaves more. A reply that ends with an end-of-turn token (one of ``ends``) keeps it as its last
    token, as a PPO rollout that finished keeps its own: the score is read there, in training, in
    rerank and in PPO alike. Rerank scores through ``score``, which cuts the same way, so it
    scores what training saw.
    """
    if len(prompt) + len(reply) <= max_length:
        return tuple(prompt), tuple(reply)
    keep_reply = min(len(reply), max(max_length // 2, max_length - len(prompt)))
    keep_prompt = max_length - keep_reply
    if reply and reply[-1] in ends and 0 < keep_reply < len(reply):
        return tuple(prompt[len(prompt) - keep_prompt:]), (*reply[: keep_reply - 1], reply[-1])
    return tuple(prompt[len(prompt) - keep_prompt:]), tuple(reply[:keep_reply])


class Packed(NamedTuple):
    ids: torch.Tensor        # (rows, width) token ids, right-padded
    mask: torch.Tensor       # (rows, 1, width, width) additive attention mask: 0 or the dtype's min
    positions: torch.Tensor  # (rows, width) position ids: each reply continues from the end of its prompt
    row: list[int]           # for each Seq asked for: the row of its last token
    col: list[int]           # ... and its column


def pack(seqs: list[Seq], pad_id: int, limit: int) -> Packed:
    """Rows that hold each prompt once and then its distinct replies, up to ``limit`` tokens a row.

    Token t of reply j attends to the whole prompt before it and to reply j's tokens up to t,
    never to another reply; its position id is what it would be right after the prompt. For
    RoPE models (Llama, SmolLM2) attention depends on positions only through these ids, so each
    reply's hidden states are those of a row of its own. Padding attends to the prompt, so no
    attention row is empty (an all-masked softmax row is NaN).
    """
    rows: list[list[tuple[int, ...]]] = []  # a row: [prompt, reply, reply, ...]
    used: list[int] = []
    open_row: dict[tuple[int, ...], int] = {}
    where: dict[Seq, tuple[int, int]] = {}
    for prompt, reply in seqs:
        if (prompt, reply) in where:
            continue
        r = open_row.get(prompt)
        if r is None or used[r] + len(reply) > limit:
            r = open_row[prompt] = len(rows)
            rows.append([prompt])
            used.append(len(prompt))
        rows[r].append(reply)
        used[r] += len(reply)
        where[(prompt, reply)] = (r, used[r] - 1)
    width = max(used)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segment = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 pad, 0 prompt, j reply j
    for r, (prompt, *replies) in enumerate(rows):
        at = 0
        for j, part in enumerate([prompt, *replies]):
            n = len(part)
            ids[r, at: at + n] = torch.tensor(part, dtype=torch.long)
            start = 0 if j == 0 else len(prompt)
            positions[r, at: at + n] = torch.arange(start, start + n)
            segment[r, at: at + n] = j
            at += n
    q, k = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    rc = [where[s] for s in seqs]
    return Packed(ids, mask[:, None], positions, [r for r, _ in rc], [c for _, c in rc])


def seq_scores(model: ScalarModel, seqs: list[Seq], pad_id: int, device: torch.device, share_prompt: bool,
               limit: int, amp=nullcontext) -> torch.Tensor:
    """Raw scores (no normalising bias) of each prompt + reply, at the reply's last token.
    ``amp``: the backbone's precision context (``precision.autocast``); the head runs in float32."""
    if share_prompt:
        packed = pack(seqs, pad_id, limit)
        with amp():
            mask = packed.mask.to(device, model.head.weight.dtype)  # an additive mask must match the activations
            if torch.is_autocast_enabled(device.type):
                # ... which autocast computes in its dtype, where float32's min would round to -inf.
                low = torch.get_autocast_dtype(device.type)
                mask = torch.zeros_like(mask, dtype=low).masked_fill_(mask < 0, torch.finfo(low).min)
            hidden = model.backbone(input_ids=packed.ids.to(device), attention_mask=mask,
                                    position_ids=packed.positions.to(device), use_cache=False).last_hidden_state
        # The head only where a score is read: the one position per reply.
        return model.head_scores(hidden[packed.row, packed.col]).squeeze(-1)
    # The plain path: a row per prompt + reply, as TRL's RewardTrainer does.
    rows = [list(p) + list(r) for p, r in seqs]
    mask = length_mask(rows).to(device)
    with amp():
        scores = model.token_scores(pad_right(rows, pad_id).to(device), mask)
    return scores[torch.arange(len(rows), device=device), mask.sum(dim=1) - 1]


@torch.no_grad()
def score(model: ScalarModel, tok, conversations: list[list[dict[str, str]]], batch_size: int, max_length: int,
          device: torch.device) -> list[float]:
    """Normalised rewards (raw score minus the model's bias) of prompt + reply conversations.

    Each conversation ends with the assistant reply to score; it is tokenised and cut as in
    training. Replies to the same prompt are batched together and share the prompt's computation
    (``pack``), so rerank's n samples per prompt cost about one prompt plus n replies.
    """
    seqs = []
    ends = set(end_ids(tok))
    for i, msgs in enumerate(conversations):
        if not msgs or msgs[-1].get("role") != "assistant":
            raise TrainError(f"conversation {i} does not end with an assistant reply to score")
        prompt, ids = reply_ids(tok, msgs[:-1], msgs[-1]["content"], ends)
        seqs.append(cut(prompt, ids, max_length, ends))
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i][0]), seqs[i][0], len(seqs[i][1])))
    out = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        raw = seq_scores(model, [seqs[i] for i in idx], tok.pad_token_id, device, True, 2 * max_length)
        for i, v in zip(idx, raw.tolist()):
            out[i] = v - model.bias
    model.train(was_training)
    return out
