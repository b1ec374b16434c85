"""PPO against a reward model (RLHF) or against the AI judge (RLAIF), in one file, after cleanrl
and summarize_from_feedback_details.

The config is ``PPOConfig`` (``[ppo]`` in a run config, factory/train/settings.py), every field described there.
The loop follows Huang et al. 2024, "The N+ implementation details of RLHF with PPO" (its
reference code is summarize_from_feedback_details; TRL's PPOTrainer is a port of it), and is
commented in the same numbered steps: 1 generate, 2 truncate at EOS, 3 score, 4 KL-penalised
reward, 5 whiten, 6 GAE (or a group baseline), 7 update.

Three rewards (``ppo.reward``), each a score per response:

- ``model``: a frozen reward model (``ScalarModel``) read at the response's last token.
- ``judge``: no reward model; the judge (``feedback.Labeller``: ``judge.backend``, ``judge.constitution``)
  compares the rollout with a reference reply to the same prompt, in both orders (its position bias
  cancelled) under principle(s) drawn per prompt and step, and the score is 2p - 1, p = P(rollout
  beats reference): "direct RLAIF" (Lee et al. 2023) made pairwise. The reference reply is the
  starting policy's greedy reply, computed once for every prompt before step 1 and kept in
  ``reference.jsonl`` (appended a batch at a time: a resumed or killed run keeps what is written,
  and it is always sampled from the frozen reference model, which is the starting policy). With
  ``rloo``/``grpo`` the rollouts of a prompt are compared with each other instead (every pair, both
  orders), and a rollout's score is 2p - 1 of its mean win probability against the rest of its group;
  no reference reply is needed for training then (the held-out prompts still get one, for evals).
- ``judge-score``: the judge's expected 1-10 rating of the response (read from its option
  log-probabilities), mapped onto [-1, 1].

A response cut off by ``response_length`` gets ``no_eos_score`` whatever the reward. The judge reads
the decoded response (special tokens skipped). Evals score each held-out prompt's greedy reply with
the same reward (``eval/score``; with ``judge``, against the reference reply: 0 at step 0, since
the reply is then the reference itself).

Three advantage estimators (``ppo.advantage``):

- ``gae``: a value model and generalised advantage estimation over the response tokens, whitened
  over the batch. The value model is a ``ScalarModel`` initialised from the reward model, or, with a
  judge reward, from the starting policy's backbone with a fresh head.
- ``rloo``: REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024): each step samples
  ``samples`` rollouts of each of ``batch_size / samples`` prompts; a rollout's return is its
  score minus kl_coef times its summed per-token KL, and its advantage is that return minus the
  mean return of the other rollouts of its prompt.
- ``grpo``: group-relative (Shao et al. 2024): the return minus the group's mean, over the
  group's standard deviation.

With rloo and grpo there is no value model at all (none built, trained or checkpointed); the
sequence advantage is given to every token of the response and the clipped policy loss is the only
PPO loss (plus ptx when asked); the advantages are not whitened again.

Four models with ``gae`` and a reward model: the policy (trained); the reference, a frozen copy of
the starting policy; the reward model, a frozen ``ScalarModel`` read at a response's last token;
the value model, a ``ScalarModel`` initialised from the reward model and read at every response
token. With LoRA, policy and reference are one frozen base with the policy's adapters switched on
or off, and reward and value models likewise share the reward model's backbone (value = adapters on;
with a judge reward the value model has a frozen base and adapters of its own).

Rollouts are laid out as ``[left padding][prompt][response][padding after EOS]``: the response
block starts at the same column in every row, so one slice takes every row's response logits.
Masks are always built from lengths, never from a token being the pad token.

Several processes (``accelerate launch --multi_gpu --num_processes N``, or torchrun): ``batch_size``
and ``mini_batch_size`` stay global (multiples of N). Each process samples its share of a step's
rollouts from a random stream of its own; whitening statistics, the KL controller's KL and the
logged means are taken over all the rollouts, and every loss is a token mean over the whole
mini-batch (each process's token sums over the mini-batch's token count), so the summed gradients
are those of one process holding every rollout (``distributed.Dist``). Rank 0 evaluates its share of
the held-out prompts like the others and writes every file. For now only ``reward = model`` with
``advantage = gae`` runs on several processes: a judge reward or a group baseline is single process
only (a TrainError says so).
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from factory.layout import RunLayout, TrainerFolder
from factory.stage import Context, Need, Stage
from factory.train import TrainError
from factory.train.chat import chat_ids, length_mask, pad_right, prompt_ids, read_messages
from factory.train.checkpoints import load_checkpoint, save_checkpoint, saved_state
from factory.train.distributed import SOLO, Dist, processes
from factory.train.finish import finished, save_final
from factory.train.metrics import Metrics, keep_steps
from factory.train.models import (
    ScalarModel,
    add_lora,
    end_ids,
    is_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from factory.train.optim import make_optimizer, seed_all
from factory.train.precision import (
    autocast,
    checkpoint_activations,
    compute_dtype,
    float32_logits,
    releases_memory,
)
from factory.train.settings import PPOConfig

if TYPE_CHECKING:
    from factory.config import RunConfig

CONFIG = PPOConfig  # [ppo]: the settings of this trainer, each field documented there

# -- pure pieces (unit-tested on hand-computed values) -------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, count: float | torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the mask; ``count``: the denominator instead of the mask's size, when the
    mean runs over the tokens of several processes (this one's sum is then its share of the mean)."""
    return torch.where(mask, x, 0).sum() / (mask.sum().clamp(min=1) if count is None else count)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, dist: Dist = SOLO) -> torch.Tensor:
    """(x - mean) / std over the masked entries, unbiased variance (as summarize_from_feedback's
    ``whiten``); with ``shift_mean=False`` the mean is added back (used for rewards). Entries
    outside the mask come out 0. With several processes, mean and variance are over every
    process's entries: the result is what one process holding them all computes."""
    n = dist.sum(mask.sum())
    mean = dist.sum(torch.where(mask, x, 0).sum()) / n.clamp(min=1)
    var = dist.sum(torch.where(mask, (x - mean) ** 2, 0).sum()) / n.clamp(min=1) * n / (n - 1).clamp(min=1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, 0)


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


def apply_no_eos_score(scores: torch.Tensor, has_eos: torch.Tensor, no_eos_score: float | None) -> torch.Tensor:
    """A response cut off by the length limit gets a fixed score instead of the reward model's
    (the "EOS trick" of Huang et al. 2024; ``penalty_reward_value`` in summarize_from_feedback_details):
    the reward model never saw unfinished answers, so its score for them means little."""
    if no_eos_score is None:
        return scores
    return torch.where(has_eos, scores, torch.full_like(scores, no_eos_score))


def kl_penalised_rewards(logprobs, ref_logprobs, scores, lengths, kl_coef: float):
    """(per-token rewards, per-token KL, per-token non-score reward) of a batch of responses.

    The KL to the reference is a penalty at every token, -kl_coef * (logp - ref_logp) (the k1
    estimator of Ziegler et al. 2019 and Stiennon et al. 2020), and the reward model's score is
    added at each response's last real token (its EOS, or the last token when it has none).
    """
    width = logprobs.shape[1]
    mask = torch.arange(width, device=logprobs.device)[None, :] < lengths[:, None]
    kl = torch.where(mask, logprobs - ref_logprobs, 0)
    non_score = -kl_coef * kl
    rewards = non_score.clone()
    rewards[torch.arange(len(lengths), device=logprobs.device), lengths - 1] += scores
    return rewards, kl, non_score


def response_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(batch,) entropy of each response in nats: the sum over its tokens (``mask``) of the entropy
    of the next-token distribution ``logits`` give (divided by the sampling temperature, as
    ``response_logprobs`` returns them). The sampled tokens' -log-probs, which TRL logs under
    objective/entropy, are only a one-sample estimate of it (unbiased, but as noisy as the samples)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    per_token = -torch.where(p > 0, p * logp, 0).sum(-1)  # p = 0 (a -inf logit) adds 0, not 0 * -inf
    return torch.where(mask, per_token, 0).sum(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """(advantages, returns) by generalised advantage estimation (Schulman et al. 2016) over the
    response tokens. Values past a response's end count as 0: the episode ends at its last token."""
    rewards = torch.where(mask, rewards, 0)
    values = torch.where(mask, values, 0)
    width = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(width)):
        next_value = values[:, t + 1] if t + 1 < width else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return torch.where(mask, advantages, 0), torch.where(mask, advantages + values, 0)


class KLController:
    """The KL coefficient: fixed, or adaptive toward a target KL (Ziegler et al. 2019, and their
    lm-human-preferences code's AdaptiveKLController, which TRL copied):
    coef <- coef * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon), where n_steps is
    the number of episodes (responses) the KL was measured on."""

    def __init__(self, coef: float, adaptive: bool, target: float, horizon: int):
        self.value, self.adaptive, self.target, self.horizon = coef, adaptive, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1, -0.2), 0.2)
            self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


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


# -- model calls --------------------------------------------------------------------------------


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


def response_logprobs(model, ids, mask, n_resp: int, temperature: float):
    """(log-probs of the last ``n_resp`` tokens of each row, their logits)."""
    # Only the response positions need logits: logits_to_keep skips the vocabulary projection of
    # the prompt. Logits are divided by the sampling temperature, as when sampling (Huang et al.
    # 2024, "scale the logits by the temperature"), or the ratio starts away from 1.
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=False,
                   logits_to_keep=n_resp + 1).logits[:, :-1].float() / temperature
    targets = ids[:, -n_resp:, None]
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1), logits


def response_values(value: ScalarModel, ids, mask, n_resp: int) -> torch.Tensor:
    # The value of the state before each response token: the score at the token before it.
    return value.token_scores(ids, mask, position_ids=positions(mask))[:, -n_resp - 1: -1]


def ptx_loss(policy, tok, batch: list[tuple[list[int], list[int]]], device, tokens: int | None = None) -> torch.Tensor:
    """Mean next-token loss on the assistant tokens of a batch of SFT conversations (``tokens``:
    the denominator when ``batch`` is this process's share of a larger one, as in ``masked_mean``)."""
    ids = pad_right([r[0] for r in batch], tok.pad_token_id).to(device)
    mask = length_mask([r[0] for r in batch]).to(device)
    target = pad_right([r[1] for r in batch], 0).to(device).bool()
    logits = policy(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return masked_mean(nll, target[:, 1:], tokens)


# -- the run ------------------------------------------------------------------------------------


def _prompts(pc: PPOConfig, layout: RunLayout, tok) -> list[tuple[str, list[int]]]:
    from factory.inputs import load_prompts
    from factory.store import StoreError

    try:
        pairs = load_prompts(pc.prompts, None, tasks=layout.tasks)
    except (FileNotFoundError, StoreError) as e:
        raise TrainError(str(e)) from None
    if len(pairs) <= pc.eval_prompts:
        raise TrainError(f"ppo: {len(pairs)} prompt(s), but eval_prompts = {pc.eval_prompts} are held out; "
                         "give more prompts or lower ppo.eval_prompts")
    # The end of a long prompt is kept: that is where the question is.
    return [(text, prompt_ids(tok, [{"role": "user", "content": text}])[-pc.max_prompt_length:]) for _, text in pairs]


def _ptx_data(pc: PPOConfig, layout: RunLayout, tok) -> list[tuple[list[int], list[int]]]:
    path = pc.sft_data or layout.sft_data
    if not path.is_file():
        raise TrainError(f"ppo.ptx_coef > 0 needs SFT data: no {path} (run critique, or set ppo.sft_data)")
    cap = pc.max_prompt_length + pc.response_length
    rows = []
    for messages in read_messages(path):
        ids, mask = chat_ids(tok, messages)
        if any(mask[1:cap]):
            rows.append((ids[:cap], mask[:cap]))
    if not rows:
        raise TrainError(f"{path}: no conversation with an assistant turn within {cap} tokens")
    return rows


def _policy_path(pc: PPOConfig, layout: RunLayout) -> tuple[str, str]:
    if pc.policy == "auto":
        sft = layout.sft_model
        return resolve_model(str(sft) if is_model(sft) else "embedded")
    return resolve_model(pc.policy)


def _summary(folder: TrainerFolder) -> dict:
    """What PPO reports, from its metrics: steps, eval scores at the start and end, last KL."""
    rows = [json.loads(line) for line in folder.metrics.read_text(encoding="utf-8").splitlines() if line]
    evals = [r for r in rows if "eval/score" in r]
    steps = [r for r in rows if "objective/kl" in r]
    return {
        "steps": steps[-1]["step"] if steps else 0,
        "eval_score_start": evals[0]["eval/score"] if evals else None,
        "eval_score_end": evals[-1]["eval/score"] if evals else None,
        "kl_final": steps[-1]["objective/kl"] if steps else None,
        "seconds_per_step": round(sum(r["time/step_s"] for r in steps) / len(steps), 3) if steps else None,
        "model": str(folder.model),
    }


@releases_memory
def run_ppo(settings: PPOConfig, layout: RunLayout, allow_pickle: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """Optimise a policy against a reward model (default: the run's SFT model and reward model) into
    ``layout.policy``; returns the summary (also in ``layout.policy.summary``). A run that finished
    its ``steps`` returns its summary at once; more steps than it ran continue it from its checkpoint."""
    from tqdm import tqdm

    pc = settings
    dist, device = processes(pc.device)
    echo = dist.main_only(echo)
    if pc.batch_size % dist.world or pc.mini_batch_size % dist.world:
        raise TrainError(f"ppo.batch_size ({pc.batch_size}) and ppo.mini_batch_size ({pc.mini_batch_size}) must be "
                         f"multiples of the number of processes ({dist.world}): each process takes an equal share")
    folder = layout.policy
    saved = saved_state(folder.checkpoint)
    # (a run finished before trainers wrote summary.json: its summary comes from its metrics)
    done = finished(folder, legacy=lambda: _summary(folder)) if saved and saved["step"] >= pc.steps else None
    if done is not None:
        echo(f"ppo: {folder.root} already holds a finished run of {pc.steps} steps; nothing to do")
        return done
    rm_path = Path(pc.reward_model) if pc.reward_model else layout.rm_model
    if not is_model(rm_path):
        raise TrainError(f"no reward model at {rm_path}: run `factory train rm` first (or set ppo.reward_model)")
    seed_all(pc.seed)

    # -- models: policy, reference, reward, value (dropout off in all: models.no_dropout) --
    policy_path, policy_id = _policy_path(pc, layout)
    tok = load_tokenizer(policy_path)
    if (rm_path / "tokenizer.json").is_file() and load_tokenizer(str(rm_path)).get_vocab() != tok.get_vocab():
        raise TrainError(f"the reward model {rm_path} and the policy {policy_path} use different tokenizers")
    policy = load_causal_lm(policy_path, device, tok, allow_pickle=allow_pickle).eval()
    rm = ScalarModel.from_pretrained(rm_path, device, tok, allow_pickle=allow_pickle).eval()
    rm.requires_grad_(False)
    if pc.lora.r:
        # One frozen base per backbone: the policy's adapters off = the reference; the value
        # model's adapters (on the reward model's backbone) off = the reward model.
        policy = add_lora(policy, pc.lora, "policy")
        value = ScalarModel(add_lora(rm.backbone, pc.lora, "value"), bias=rm.bias).to(device).eval()
        value.head.load_state_dict(rm.head.state_dict())
        ref, as_ref, as_rm = policy, policy.disable_adapter, value.backbone.disable_adapter
    else:
        ref = copy.deepcopy(policy).requires_grad_(False)
        value = ScalarModel.from_pretrained(rm_path, device, tok, allow_pickle=allow_pickle).eval()  # the value model starts as the RM
        as_ref = as_rm = nullcontext
    if pc.gradient_checkpointing:
        # What gets gradients: the policy and the value model's backbone (with LoRA, the shared bases
        # of the reference and the reward model too, which run without gradients: nothing changes there).
        checkpoint_activations(policy)
        checkpoint_activations(value.backbone)
    # Weights in float32; forward passes in bf16 on CUDA; heads, log-probs and losses in float32
    # (`dtype`, precision.autocast). The policy's and reference's LM heads run in float32 under bf16:
    # the ratio and the KL are differences of their log-probs (precision.float32_logits).
    amp = autocast(pc.dtype, device)
    if compute_dtype(pc.dtype, device) != torch.float32:
        for lm in {id(policy): policy, id(ref): ref}.values():
            float32_logits(lm)
    trainable = [p for m in (policy, value) for p in m.parameters() if p.requires_grad]
    opt, sched = make_optimizer(trainable, pc, pc.steps)
    kl_ctl = KLController(pc.kl_coef, pc.adaptive_kl, pc.target_kl, pc.kl_horizon)
    modules = {"policy": policy, "value": value}
    stateful = {"optimizer": opt, "scheduler": sched, "kl": kl_ctl}

    # -- data: prompts (a seeded held-out set for evals), SFT batches for PPO-ptx --
    prompts = _prompts(pc, layout, tok)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(pc.seed)).tolist()
    held = [prompts[i] for i in order[: pc.eval_prompts]]
    train = [prompts[i] for i in order[pc.eval_prompts:]]
    sft = _ptx_data(pc, layout, tok) if pc.ptx_coef > 0 else []

    # Every process starts from the same weights (LoRA's random A matrices included), then samples
    # from a stream of its own: the same stream would draw the same tokens wherever two processes'
    # prompts coincide. Rank 0 keeps the stream one process uses; a checkpoint restores each's.
    if dist.rank:
        seed_all(pc.seed + dist.rank)
    state = load_checkpoint(folder.checkpoint, modules, stateful, dist, allow_pickle=allow_pickle)
    dist.broadcast(modules)
    start = state["step"] if state else 0
    metrics = Metrics(folder.metrics, start if state else None, write=dist.is_main)
    if dist.is_main and folder.samples.is_file():
        keep_steps(folder.samples, start if state else None)
    echo(f"ppo: policy {policy_id}, reward model {rm_path}, {len(train)} train / {len(held)} eval prompts"
         + (f"; resuming after step {start}" if state else ""))

    # The end of a reply: every id that ends the assistant's turn, not only EOS (a template whose
    # turn ends with <end_of_turn> would otherwise get no_eos_score on every rollout).
    ends = end_ids(tok, policy_path)
    if not ends:
        raise TrainError(f"{policy_path}: neither its tokenizer, its generation config nor its chat template names "
                         "a token that ends the assistant's turn; PPO could not tell a finished reply from a cut one")
    eos = torch.tensor(ends, device=device)
    pad = tok.pad_token_id
    n_mb = pc.batch_size // pc.mini_batch_size
    rollouts, mini = pc.batch_size // dist.world, pc.mini_batch_size // dist.world  # this process's

    def score(prompt_rows: list[list[int]], responses: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # The reward model reads right-padded rows (its last_scores takes the last real token),
        # so each prompt + truncated response is packed to the left again.
        rows = [p + r[: int(n)].tolist() for p, r, n in zip(prompt_rows, responses, lengths)]
        with as_rm():
            return rm.last_scores(pad_right(rows, pad).to(device), length_mask(rows).to(device))

    def evaluate(step: int) -> dict:
        t0, results = time.time(), []
        mine = dist.shard(held)
        for i in range(0, len(mine), pc.batch_size):
            chunk = mine[i: i + pc.batch_size]
            ids, mask = left_pad([p for _, p in chunk], pad, device)
            responses, _ = sample(policy, ids, mask, pc.response_length, 1.0, eos, greedy=True)
            responses, lengths, has_eos = truncate_after_eos(responses, eos, pad)
            scores = score([p for _, p in chunk], responses, lengths)
            for (text, _), r, n, s in zip(chunk, responses, lengths, scores.tolist()):
                results.append({"step": step, "prompt": text,
                                "response": tok.decode(r[: int(n)], skip_special_tokens=True), "score": s})
        shares = dist.gather(results)
        if not dist.is_main:
            return {}
        results = [r for share in shares for r in share]  # rank order: the held-out prompts' order
        with open(folder.samples, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
        if not results:
            return {}
        return {"eval/score": sum(r["score"] for r in results) / len(results), "time/eval_s": time.time() - t0}

    if not state:
        with amp():
            metrics.log(0, **evaluate(0))

    bar = tqdm(range(start + 1, pc.steps + 1), desc="ppo", unit="step", initial=start, total=pc.steps,
               disable=not dist.is_main)
    for step in bar:
        t_step = time.time()
        with torch.no_grad(), amp():
            chunk = [train[i] for i in batch_rows(len(train), pc.batch_size, step - 1, pc.seed)]
            chunk = dist.shard(chunk)  # this process's rollouts
            prompt_rows = [p for _, p in chunk]
            query, query_mask = left_pad(prompt_rows, pad, device)
            width_q = query.shape[1]

            # 1. generate: temperature sampling from the policy, batched, KV cache.
            t0 = time.time()
            responses, logprobs = sample(policy, query, query_mask, pc.response_length, pc.temperature, eos)
            t_gen = time.time() - t0

            # 2. truncate after the first EOS: later tokens become pad and are masked (Huang et al.
            # 2024's "EOS trick"; TRL's truncate_response). The block is cut to the longest response left.
            t0 = time.time()
            responses, lengths, has_eos = truncate_after_eos(responses, eos, pad)
            width_r = int(lengths.max())
            responses, logprobs = responses[:, :width_r], logprobs[:, :width_r]
            resp_mask = torch.arange(width_r, device=device)[None, :] < lengths[:, None]
            ids = torch.cat([query, responses], dim=1)
            mask = torch.cat([query_mask, resp_mask.long()], dim=1)
            with as_ref():
                ref_logprobs, _ = response_logprobs(ref, ids, mask, width_r, pc.temperature)
            values = response_values(value, ids, mask, width_r)
            # The policy's entropy over each response (objective/entropy), of the temperature-scaled
            # distribution it sampled from: one more forward pass of the policy, for the exact value.
            # Rows go in chunks of a mini-batch: the (rows, tokens, vocabulary) float32 tensors stay small.
            entropies = torch.cat([
                response_entropy(response_logprobs(policy, ids[r: r + mini], mask[r: r + mini], width_r,
                                                   pc.temperature)[1], resp_mask[r: r + mini])
                for r in range(0, len(ids), mini)])

            # 3. score: the reward model at the last real token; a response with no EOS gets
            # no_eos_score instead.
            raw_scores = score(prompt_rows, responses, lengths)
            scores = apply_no_eos_score(raw_scores, has_eos, pc.no_eos_score)

            # 4. KL-penalised reward: -kl_coef * (logp - ref_logp) at every token, the score at the last.
            rewards, kl, non_score = kl_penalised_rewards(logprobs, ref_logprobs, scores, lengths, kl_ctl.value)

            # 5. whiten rewards (optional; summarize_from_feedback_details' `whiten_rewards`, mean kept).
            if pc.whiten_rewards:
                rewards = masked_whiten(rewards, resp_mask, shift_mean=False, dist=dist)

            # 6. GAE over the response tokens, then advantages whitened over the batch's real
            # tokens only (summarize_from_feedback_details' masked_whiten of the advantages), every
            # process's rollouts together.
            advantages, returns = gae(rewards, values, resp_mask, pc.gamma, pc.lam)
            advantages = masked_whiten(advantages, resp_mask, dist=dist)
            t_score = time.time() - t0

        # 7. update: ppo_epochs passes over shuffled mini-batches; clipped policy loss (Schulman et
        # al. 2017), clipped value loss (OpenAI baselines' PPO2; Huang et al. 2022, "value function
        # loss clipping"), PPO-ptx SFT loss (Ouyang et al. 2022, eq. 2: it keeps the policy near its
        # SFT data, limiting the "alignment tax"). Gradients are clipped to max_grad_norm. With several
        # processes a mini-batch is every process's `mini` rollouts; its means are over all their
        # tokens, so each loss and statistic here is this process's share, summed over processes below.
        t0 = time.time()
        if pc.gradient_checkpointing:  # transformers checkpoints in train mode only (dropout is off in both)
            policy.train()
            value.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "ptx", "ratio", "approxkl", "clip", "vclip")}
        for epoch in range(pc.ppo_epochs):
            for j, mb in enumerate(torch.randperm(rollouts).view(n_mb, mini).tolist()):
                # Trim the columns no row of this mini-batch uses: left padding and the tail
                # after its longest response.
                mb_len = lengths[mb]
                w = int(mb_len.max())
                lead = int(query_mask[mb].argmax(dim=1).min())
                mb_ids, mb_mask = ids[mb, lead: width_q + w], mask[mb, lead: width_q + w]
                m = resp_mask[mb, :w]
                batch = []
                if sft:
                    index = ((step - 1) * pc.ppo_epochs + epoch) * n_mb + j
                    batch = [sft[i] for i in batch_rows(len(sft), pc.mini_batch_size, index, pc.seed + 1)]
                    batch = dist.shard(batch)
                # the whole mini-batch's response tokens and SFT assistant tokens (the loss means' denominators)
                tokens, sft_tokens = dist.total(int(m.sum()), sum(sum(loss_mask[1:]) for _, loss_mask in batch))
                with amp():  # the forward pass; log-probs (float32 logits), their difference and ratio in float32
                    new_logprobs, _ = response_logprobs(policy, mb_ids, mb_mask, w, pc.temperature)
                diff = new_logprobs - logprobs[mb, :w]
                ratio = torch.exp(diff)
                adv = advantages[mb, :w]
                pg1 = -adv * ratio
                pg2 = -adv * torch.clamp(ratio, 1 - pc.cliprange, 1 + pc.cliprange)
                pg_loss = masked_mean(torch.max(pg1, pg2), m, tokens)

                with amp():
                    v_new = response_values(value, mb_ids, mb_mask, w)
                v_old, ret = values[mb, :w], returns[mb, :w]
                v_clip = v_old + torch.clamp(v_new - v_old, -pc.cliprange_value, pc.cliprange_value)
                vf1, vf2 = (v_new - ret) ** 2, (v_clip - ret) ** 2
                vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), m, tokens)
                loss = pg_loss + pc.vf_coef * vf_loss

                if sft:
                    with amp():
                        lm_loss = ptx_loss(policy, tok, batch, device, sft_tokens)
                    loss = loss + pc.ptx_coef * lm_loss
                    stats["ptx"].append(lm_loss.item())

                opt.zero_grad(set_to_none=True)
                loss.backward()
                dist.sum_grads(trainable)
                nn.utils.clip_grad_norm_(trainable, pc.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    stats["pg"].append(pg_loss.item())
                    stats["vf"].append(vf_loss.item())
                    stats["ratio"].append(masked_mean(ratio, m, tokens).item())
                    stats["approxkl"].append(0.5 * masked_mean(diff**2, m, tokens).item())
                    stats["clip"].append(masked_mean((pg2 > pg1).float(), m, tokens).item())
                    stats["vclip"].append(masked_mean((vf2 > vf1).float(), m, tokens).item())
        if pc.gradient_checkpointing:
            policy.eval()
            value.eval()
        lr = sched.get_last_lr()[0]
        sched.step()
        t_update = time.time() - t0

        # Each statistic is this process's share of a mean over all processes' tokens: they add up.
        names = [k for k, v in stats.items() if v]
        avg = dict(zip(names, dist.total(*(sum(stats[k]) / len(stats[k]) for k in names))))

        with torch.no_grad():
            # Means over this process's rollouts; every process has as many, so the mean of their means
            # is the mean over all rollouts, the same on every process (the KL controller stays in step).
            entropy = entropies.mean().item()
            *sums, n_eos = dist.total(kl.sum(1).mean().item(), entropy, scores.mean().item(),
                                      non_score.sum(1).mean().item(), int(has_eos.sum()))
            mean_kl, entropy, score_mean, non_score_sum = (v / dist.world for v in sums)
            row = {
                "objective/kl": mean_kl,
                "objective/entropy": entropy,
                "objective/scores": score_mean,
                "objective/rlhf_reward": non_score_sum + score_mean,
                "objective/non_score_reward": non_score_sum,
                "policy/approxkl_avg": avg["approxkl"],
                "policy/clipfrac_avg": avg["clip"],
                "loss/policy": avg["pg"],
                "loss/value": avg["vf"],
                "val/ratio": avg["ratio"],
                "val/num_eos_tokens": int(n_eos),
                "val/clipfrac_avg": avg["vclip"],
                "lr": lr,
                "kl_coef": kl_ctl.value,
            }
        if sft:
            row["loss/ptx"] = avg["ptx"]
        # Ziegler et al. 2019: the coefficient follows the KL of the batch just sampled.
        kl_ctl.update(mean_kl, pc.batch_size)
        row |= {"time/step_s": time.time() - t_step, "time/generate_s": t_gen, "time/score_s": t_score,
                "time/update_s": t_update}
        if step % pc.eval_every == 0 or step == pc.steps:
            with amp():
                row |= evaluate(step)
        metrics.log(step, **row)
        bar.set_postfix(kl=f"{mean_kl:.2f}", score=f"{row['objective/scores']:.3f}")
        if step % pc.checkpoint_every == 0 or step == pc.steps:
            save_checkpoint(folder.checkpoint, modules, stateful, {"step": step}, dist)
    bar.close()

    # The final policy as a causal LM folder (adapters merged), loadable as `hf:<folder>/model`. Its
    # summary comes from rank 0's metrics; the other processes read it once the model is whole.
    summary = _summary(folder) if dist.is_main else {}

    def write_model(tmp: Path) -> None:
        (policy.merge_and_unload() if pc.lora.r else policy).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    save_final(folder, summary, write_model, dist)
    summary = summary or _summary(folder)
    echo(f"ppo: {summary['steps']} steps, eval score {summary['eval_score_start']} -> {summary['eval_score_end']}, "
         f"KL {summary['kl_final']}; policy saved to {folder.model}")
    return summary


class PPO(Stage):
    name = section = "ppo"
    trains = True

    def user_files(self, cfg: RunConfig) -> list[Path]:
        return [Path(f) for f in (cfg.ppo.prompts, cfg.ppo.sft_data) if f is not None]

    def needs(self, cfg: RunConfig, layout: RunLayout) -> list[Need]:
        pc = cfg.ppo
        needs = [Need(Path(pc.reward_model) if pc.reward_model else layout.rm_model, "no reward model for PPO",
                      "add the rm stage, run `factory train rm`, or set ppo.reward_model", folder=True)]
        if pc.prompts is None:
            needs.append(Need(layout.tasks, "no prompts for PPO", "run instances first, or set ppo.prompts"))
        return needs

    def writes(self, cfg: RunConfig, layout: RunLayout) -> list[Path]:
        return [layout.policy_model]

    def run(self, ctx: Context) -> dict:
        return run_ppo(ctx.cfg.ppo, ctx.layout, ctx.cfg.allow_pickle, ctx.echo)


STAGE = PPO()
