"""Sampling a policy's replies: what PPO's rollouts and online DPO's samples share.

Prompts are left-padded (``left_pad``) so every reply starts at the same column, with position ids
that count real tokens only (``positions``); ``sample`` draws replies with the KV cache, by plain
temperature sampling (so the log-probs it returns are those the update recomputes);
``truncate_after_eos`` cuts each reply after its first end-of-turn token; ``batch_rows`` is a
seeded, resumable stream of prompt batches.
"""

from __future__ import annotations

import torch


def truncate_after_eos(responses: torch.Tensor, eos_ids: torch.Tensor, pad_id: int):
    """(responses with every token after the first end-of-turn token replaced by pad, lengths incl.
    that token, whether each row has one). ``eos_ids``: every id that ends a turn (EOS, and Gemma's
    ``<end_of_turn>`` or ChatML's ``<|im_end|>`` where they differ; ``models.end_ids``). A row
    without one keeps its full length."""
    width = responses.shape[1]
    is_eos = torch.isin(responses, eos_ids)
    has_eos = is_eos.any(dim=1)
    first = torch.where(has_eos, is_eos.int().argmax(dim=1), width - 1)
    lengths = first + 1
    keep = torch.arange(width, device=responses.device)[None, :] < lengths[:, None]
    return torch.where(keep, responses, pad_id), lengths, has_eos


def batch_rows(n: int, size: int, index: int, seed: int) -> list[int]:
    """Rows of the ``index``-th batch of ``size`` from an endless stream of seeded permutations of
    ``range(n)``: a pure function of the step, so a resumed run draws the same batches."""
    rows: list[int] = []
    start = index * size
    while len(rows) < size:
        epoch, offset = divmod(start + len(rows), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        rows += perm[offset: offset + size - len(rows)]
    return rows


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long, device=device)
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    # Left padding shifts every row; position ids count real tokens only, so a prompt sees the
    # same positions whatever its padding (TRL's `forward` does the same).
    return (mask.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def sample(model, ids, mask, n_tokens: int, temperature: float, eos_ids: torch.Tensor, greedy: bool = False):
    """(responses, log-probs of the sampled tokens) of left-padded prompts, with the KV cache.

    Pure temperature sampling: no top-k, no top-p, no minimum length (as summarize_from_feedback_details
    and TRL sample: any other processing makes the rollout's log-probs differ from what the update
    recomputes). Every row samples up to ``n_tokens``; the loop stops early only once every
    row has produced an end-of-turn token (one of ``eos_ids``), since later tokens are cut by step 2 anyway. Log-probs are of the
    temperature-scaled distribution, as in the update.
    """
    pos = positions(mask)
    # logits_to_keep=1: the prompt's other positions need no vocabulary projection.
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    next_pos = pos[:, -1:] + 1
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    tokens, logps = [], []
    for t in range(n_tokens):
        logp = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
        tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)
        tokens.append(tok)
        logps.append(logp.gather(1, tok[:, None]).squeeze(1))
        done |= torch.isin(tok, eos_ids)
        if t == n_tokens - 1 or bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                    past_key_values=out.past_key_values, use_cache=True)
        next_pos = next_pos + 1
    return torch.stack(tokens, 1), torch.stack(logps, 1)
