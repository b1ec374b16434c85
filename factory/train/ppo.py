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
from typing import TYPE_CHECKING, Callable, Literal, Sequence

import torch
from torch import nn

from factory.feedback import Labeller, rating_reward, win_rates
from factory.layout import RunLayout, TrainerFolder
from factory.records import Record, work_key
from factory.stage import Context, Need, Role, Stage
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
from factory.store import Store, fixed_batches
from factory.train.rollout import batch_rows, left_pad, positions, sample, truncate_after_eos
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


def rloo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024): each return
    minus the mean return of the other ``k - 1`` samples of its prompt. ``returns``: (n,), the ``k``
    samples of a prompt adjacent (n a multiple of k, k >= 2)."""
    groups = returns.view(-1, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(-1)


def grpo_advantages(returns: torch.Tensor, k: int) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024): (R - mean) / (std + 1e-8) within the
    ``k`` adjacent samples of each prompt.

    The std is the group's population std (divided by k, not k - 1): the group is all there is to
    normalise, not a sample of a larger one, and two samples then get exactly +1 and -1 whatever
    their gap. (TRL's GRPOTrainer takes torch's unbiased std, which only scales every advantage by
    sqrt((k - 1) / k).) A group whose returns are all equal gets 0."""
    groups = returns.view(-1, k)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, unbiased=False, keepdim=True)
    return ((groups - mean) / (std + 1e-8)).reshape(-1)


# -- the judge as the reward -----------------------------------------------------------------------


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def pairwise_rewards(labeller: Labeller, prompts: Sequence[str], replies: Sequence[str],
                     references: Sequence[str], draw_keys: Sequence[str]) -> list[float]:
    """2p - 1 for each reply, p = P(reply beats the reference reply to its prompt), judged in both
    orders under the principles drawn for its ``draw_keys`` entry (one batched judge call)."""
    matrices = labeller.compare([_user(p) for p in prompts], [[r, ref] for r, ref in zip(replies, references)],
                                draw_keys)
    return [2 * m[0][1] - 1 for m in matrices]


def group_rewards(labeller: Labeller, prompts: Sequence[str], replies: Sequence[str], k: int,
                  draw_keys: Sequence[str]) -> list[float]:
    """2p - 1 for each reply, p = its mean P(beats) against the other replies of its group (every
    pair, both orders: ``feedback.win_rates``). ``replies``: ``k`` adjacent replies per entry of
    ``prompts`` and ``draw_keys`` (one per group)."""
    groups = [list(replies[g * k: (g + 1) * k]) for g in range(len(prompts))]
    matrices = labeller.compare([_user(p) for p in prompts], groups, draw_keys)
    return [2 * p - 1 for m in matrices for p in win_rates(m)]


def rating_rewards(labeller: Labeller, prompts: Sequence[str], replies: Sequence[str],
                   draw_keys: Sequence[str]) -> list[float]:
    """The judge's expected 1-10 rating of each reply, mapped onto [-1, 1] (``feedback.rating_reward``)."""
    return [rating_reward(r) for r in labeller.rate([_user(p) for p in prompts], replies, draw_keys)]


class JudgeReward:
    """The judge as PPO's reward (``ppo.reward`` = judge or judge-score), and what asking it cost.

    Called with one prompt, reply and draw key per rollout: ``judge-score`` rates each reply;
    ``judge`` compares each with its reference reply when ``references`` are given, else each group of
    ``group`` adjacent replies (the samples of one prompt) among themselves. ``take`` returns the
    judge requests and seconds spent since it was last called (``judge/calls``, ``time/judge_s``)."""

    def __init__(self, labeller: Labeller, kind: Literal["judge", "judge-score"], group: int = 1):
        self.labeller, self.kind, self.group = labeller, kind, group
        self.seconds, self.seen = 0.0, labeller.calls

    def __call__(self, prompts: Sequence[str], replies: Sequence[str], draw_keys: Sequence[str],
                 references: Sequence[str] | None = None) -> list[float]:
        t0 = time.time()
        try:
            if self.kind == "judge-score":
                return rating_rewards(self.labeller, prompts, replies, draw_keys)
            if references is not None:
                return pairwise_rewards(self.labeller, prompts, replies, references, draw_keys)
            k = self.group
            return group_rewards(self.labeller, prompts[::k], replies, k, draw_keys[::k])
        finally:
            self.seconds += time.time() - t0

    def take(self) -> dict:
        out = {"time/judge_s": self.seconds, "judge/calls": self.labeller.calls - self.seen}
        self.seconds, self.seen = 0.0, self.labeller.calls
        return out


class ReferenceReply(Record):
    """One line of ``reference.jsonl``: the starting policy's greedy reply to a prompt (reward = judge)."""

    prompt: str
    reply: str


# -- model calls --------------------------------------------------------------------------------


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
            echo: Callable[[str], None] = print, labeller: Labeller | None = None) -> dict:
    """Optimise a policy (default: the run's SFT model) into ``layout.policy`` against a reward
    model (default: the run's, ``reward = model``) or the judge (``reward = judge | judge-score``:
    ``labeller`` asks it, and is required then); returns the summary (also in ``layout.policy.summary``).
    A run that finished its ``steps`` returns its summary at once; more steps than it ran continue
    it from its checkpoint. A judge reward and the group baselines (``advantage = rloo | grpo``) run
    on a single process only for now."""
    from tqdm import tqdm

    pc = settings
    dist, device = processes(pc.device)
    echo = dist.main_only(echo)
    if pc.batch_size % dist.world or pc.mini_batch_size % dist.world:
        raise TrainError(f"ppo.batch_size ({pc.batch_size}) and ppo.mini_batch_size ({pc.mini_batch_size}) must be "
                         f"multiples of the number of processes ({dist.world}): each process takes an equal share")
    judged, grouped = pc.reward != "model", pc.advantage != "gae"
    if dist.world > 1 and (judged or grouped):
        raise TrainError(f"ppo.reward = {pc.reward!r} with ppo.advantage = {pc.advantage!r} runs on a single process "
                         f"only for now ({dist.world} were launched): run one process, or set ppo.reward = 'model' "
                         "and ppo.advantage = 'gae'")
    folder = layout.policy
    saved = saved_state(folder.checkpoint)
    # (a run finished before trainers wrote summary.json: its summary comes from its metrics)
    done = finished(folder, legacy=lambda: _summary(folder)) if saved and saved["step"] >= pc.steps else None
    if done is not None:
        echo(f"ppo: {folder.root} already holds a finished run of {pc.steps} steps; nothing to do")
        return done
    # What a checkpoint's modules and prompt stream depend on (a checkpoint from before these settings
    # existed was made with the reward model, GAE and one rollout per prompt).
    setup = {"reward": pc.reward, "advantage": pc.advantage, "samples": pc.samples}
    if saved is not None:
        made = {k: saved.get(k, v) for k, v in {"reward": "model", "advantage": "gae", "samples": 1}.items()}
        if made != setup:
            raise TrainError(f"{folder.checkpoint}: this checkpoint was made with "
                             + ", ".join(f"ppo.{k} = {v!r}" for k, v in made.items())
                             + f"; remove {folder.root} to start again, or set those back to resume it")
    rm_path = None
    if judged:
        if labeller is None:
            raise TrainError(f"ppo.reward = {pc.reward!r} needs the judge, but no labeller was given (the ppo stage "
                             "of `factory run` / `factory train ppo` passes judge.backend's); or set ppo.reward = 'model'")
    else:
        rm_path = Path(pc.reward_model) if pc.reward_model else layout.rm_model
        if not is_model(rm_path):
            raise TrainError(f"no reward model at {rm_path}: run `factory train rm` first (or set ppo.reward_model)")
    seed_all(pc.seed)

    # -- models: policy, reference, reward (reward = model), value (gae) (dropout off in all: models.no_dropout) --
    policy_path, policy_id = _policy_path(pc, layout)
    tok = load_tokenizer(policy_path)
    if rm_path is not None and (rm_path / "tokenizer.json").is_file() \
            and load_tokenizer(str(rm_path)).get_vocab() != tok.get_vocab():
        raise TrainError(f"the reward model {rm_path} and the policy {policy_path} use different tokenizers")
    policy = load_causal_lm(policy_path, device, tok, allow_pickle=allow_pickle).eval()
    rm: ScalarModel | None = None
    value: ScalarModel | None = None
    as_rm = nullcontext
    if rm_path is not None:
        rm = ScalarModel.from_pretrained(rm_path, device, tok, allow_pickle=allow_pickle).eval()
        rm.requires_grad_(False)
    if pc.lora.r:
        # One frozen base per backbone: the policy's adapters off = the reference; the value
        # model's adapters (on the reward model's backbone) off = the reward model.
        policy = add_lora(policy, pc.lora, "policy")
        if rm is not None and not grouped:
            value = ScalarModel(add_lora(rm.backbone, pc.lora, "value"), bias=rm.bias).to(device).eval()
            value.head.load_state_dict(rm.head.state_dict())
            as_rm = value.backbone.disable_adapter
        ref, as_ref = policy, policy.disable_adapter
    else:
        ref = copy.deepcopy(policy).requires_grad_(False)
        if rm is not None and not grouped:
            value = ScalarModel.from_pretrained(rm_path, device, tok, allow_pickle=allow_pickle).eval()  # the value model starts as the RM
        as_ref = nullcontext
    if value is None and not grouped:
        # A judge reward has no reward model to start the value model from: the starting policy's
        # backbone with a fresh head (a plain causal LM folder has none: ScalarModel.from_pretrained).
        value = ScalarModel.from_pretrained(policy_path, device, tok, allow_pickle=allow_pickle)
        if pc.lora.r:
            value.backbone = add_lora(value.backbone, pc.lora, "value")
        value = value.to(device).eval()
    if pc.gradient_checkpointing:
        # What gets gradients: the policy and the value model's backbone (with LoRA, the shared bases
        # of the reference and the reward model too, which run without gradients: nothing changes there).
        checkpoint_activations(policy)
        if value is not None:
            checkpoint_activations(value.backbone)
    # Weights in float32; forward passes in bf16 on CUDA; heads, log-probs and losses in float32
    # (`dtype`, precision.autocast). The policy's and reference's LM heads run in float32 under bf16:
    # the ratio and the KL are differences of their log-probs (precision.float32_logits).
    amp = autocast(pc.dtype, device)
    if compute_dtype(pc.dtype, device) != torch.float32:
        for lm in {id(policy): policy, id(ref): ref}.values():
            float32_logits(lm)
    trainable = [p for m in (policy, value) if m is not None for p in m.parameters() if p.requires_grad]
    opt, sched = make_optimizer(trainable, pc, pc.steps)
    kl_ctl = KLController(pc.kl_coef, pc.adaptive_kl, pc.target_kl, pc.kl_horizon)
    modules = {"policy": policy} | ({"value": value} if value is not None else {})  # rloo, grpo: no value model
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
    if judged:
        against = ("each other" if grouped else "the starting policy's greedy replies") if pc.reward == "judge" \
            else "a 1-10 rating"
        reward_text = f"reward: the judge ({against}), advantage {pc.advantage}"
    else:
        reward_text = f"reward model {rm_path}" + (f", advantage {pc.advantage}" if grouped else "")
    echo(f"ppo: policy {policy_id}, {reward_text}, {len(train)} train / {len(held)} eval prompts"
         + (f"; resuming after step {start}" if state else ""))

    # The end of a reply: every id that ends the assistant's turn, not only EOS (a template whose
    # turn ends with <end_of_turn> would otherwise get no_eos_score on every rollout).
    ends = end_ids(tok, policy_path)
    if not ends:
        raise TrainError(f"{policy_path}: neither its tokenizer, its generation config nor its chat template names "
                         "a token that ends the assistant's turn; PPO could not tell a finished reply from a cut one")
    eos = torch.tensor(ends, device=device)
    pad = tok.pad_token_id

    def decode(responses: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        """The truncated responses as text, as the judge and samples.jsonl read them."""
        return [tok.decode(r[: int(n)], skip_special_tokens=True) for r, n in zip(responses, lengths)]

    def reference_replies(*parts: list[tuple[str, list[int]]]) -> dict[str, str]:
        """The starting policy's greedy reply to each prompt of ``parts`` (prompt text -> reply), from
        ``reference.jsonl``; the prompts not there yet are sampled, in fixed batches of ``batch_size``
        cut from each part (the held-out part in the eval's batches), each batch appended as soon as
        it is made. They are sampled from the frozen reference model, which is the starting policy
        even when a resumed run's policy has moved on."""
        store = Store(folder.reference, ReferenceReply)
        # (a reply sampled by another starting policy, or cut at another length, is not reused)
        setting = {"policy": policy_id, "response_length": pc.response_length, "max_prompt_length": pc.max_prompt_length}
        keys: dict[str, str] = {}  # prompt text -> key
        made = 0
        for part in parts:
            items = [(work_key(text, setting), text, ids) for text, ids in part]
            for _, batch in fixed_batches(items, pc.batch_size, lambda item: item[0] in store):
                ids, mask = left_pad([p for _, _, p in batch], pad, device)
                with as_ref():
                    responses, _ = sample(ref, ids, mask, pc.response_length, 1.0, eos, greedy=True)
                responses, lengths, _ = truncate_after_eos(responses, eos, pad)
                # (a prompt given twice is written once: the store skips a key it holds)
                made += store.append([ReferenceReply(key=key, prompt=text, reply=reply)
                                      for (key, text, _), reply in zip(batch, decode(responses, lengths))])
            keys |= {text: key for key, text, _ in items}
        if made:
            echo(f"ppo: {made} reference replies (the starting policy's, greedy) -> {folder.reference}")
        replies = {r.key: r.reply for r in store.records()}
        return {text: replies[key] for text, key in keys.items()}

    n_mb = pc.batch_size // pc.mini_batch_size
    rollouts, mini = pc.batch_size // dist.world, pc.mini_batch_size // dist.world  # this process's

    def score(prompt_rows: list[list[int]], responses: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # The reward model reads right-padded rows (its last_scores takes the last real token),
        # so each prompt + truncated response is packed to the left again.
        rows = [p + r[: int(n)].tolist() for p, r, n in zip(prompt_rows, responses, lengths)]
        with as_rm():
            return rm.last_scores(pad_right(rows, pad).to(device), length_mask(rows).to(device))

    judge = JudgeReward(labeller, pc.reward, pc.samples if grouped else 1) if judged else None
    refs: dict[str, str] = {}
    if pc.reward == "judge":
        # The reference replies: the held-out prompts' in the eval's batches (the step-0 eval's greedy
        # replies are these very replies, judged even: about 0), then the training prompts' unless
        # the rollouts are compared with each other (rloo, grpo).
        with amp():
            refs = reference_replies(held, *([] if grouped else [train]))

    def evaluate(step: int) -> dict:
        t0, results = time.time(), []
        mine = dist.shard(held)
        for i in range(0, len(mine), pc.batch_size):
            chunk = mine[i: i + pc.batch_size]
            ids, mask = left_pad([p for _, p in chunk], pad, device)
            responses, _ = sample(policy, ids, mask, pc.response_length, 1.0, eos, greedy=True)
            responses, lengths, has_eos = truncate_after_eos(responses, eos, pad)
            texts = decode(responses, lengths)
            if judge is None:
                scores = score([p for _, p in chunk], responses, lengths).tolist()
            else:  # each held-out prompt is judged under the same principle(s) at every eval
                prompts = [text for text, _ in chunk]
                scores = judge(prompts, texts, [f"eval:{i + n}" for n in range(len(chunk))],
                               [refs[text] for text in prompts] if pc.reward == "judge" else None)
            for (text, _), reply, s in zip(chunk, texts, scores):
                results.append({"step": step, "prompt": text, "response": reply, "score": s})
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
            row = evaluate(0)
        metrics.log(0, **row, **(judge.take() if judge is not None else {}))

    bar = tqdm(range(start + 1, pc.steps + 1), desc="ppo", unit="step", initial=start, total=pc.steps,
               disable=not dist.is_main)
    for step in bar:
        t_step = time.time()
        with torch.no_grad(), amp():
            # batch_size / samples prompts, each repeated `samples` times (a prompt's rows adjacent)
            picked = batch_rows(len(train), pc.batch_size // pc.samples, step - 1, pc.seed)
            picked = dist.shard([i for i in picked for _ in range(pc.samples)])  # this process's rollouts
            chunk = [train[i] for i in picked]
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
            values = response_values(value, ids, mask, width_r) if value is not None else None
            # The policy's entropy over each response (objective/entropy), of the temperature-scaled
            # distribution it sampled from: one more forward pass of the policy, for the exact value.
            # Rows go in chunks of a mini-batch: the (rows, tokens, vocabulary) float32 tensors stay small.
            entropies = torch.cat([
                response_entropy(response_logprobs(policy, ids[r: r + mini], mask[r: r + mini], width_r,
                                                   pc.temperature)[1], resp_mask[r: r + mini])
                for r in range(0, len(ids), mini)])

            # 3. score: the reward model at the last real token, or the judge on the decoded response
            # (against the reference reply, the rest of its group, or rated alone; the principles drawn
            # per prompt and step); a response with no EOS gets no_eos_score instead.
            if judge is None:
                raw_scores = score(prompt_rows, responses, lengths)
            else:
                prompts = [text for text, _ in chunk]
                raw_scores = torch.tensor(
                    judge(prompts, decode(responses, lengths), [f"{step}:{i}" for i in picked],
                          [refs[text] for text in prompts] if pc.reward == "judge" and not grouped else None),
                    dtype=torch.float32, device=device)
            scores = apply_no_eos_score(raw_scores, has_eos, pc.no_eos_score)

            # 4. KL-penalised reward: -kl_coef * (logp - ref_logp) at every token, the score at the last.
            rewards, kl, non_score = kl_penalised_rewards(logprobs, ref_logprobs, scores, lengths, kl_ctl.value)

            if grouped:
                # 5-6 for rloo / grpo: a sequence return R = score - kl_coef * sum of the per-token KL,
                # the group baseline within each prompt's samples, and that advantage at every response
                # token (already centred, and scaled for grpo: not whitened again).
                seq_advantages = (rloo_advantages if pc.advantage == "rloo" else grpo_advantages)(
                    scores + non_score.sum(1), pc.samples)
                advantages = torch.where(resp_mask, seq_advantages[:, None], 0)
            else:
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
        # loss clipping"; none with rloo / grpo), PPO-ptx SFT loss (Ouyang et al. 2022, eq. 2: it
        # keeps the policy near its SFT data, limiting the "alignment tax"). Gradients are clipped to max_grad_norm. With several
        # processes a mini-batch is every process's `mini` rollouts; its means are over all their
        # tokens, so each loss and statistic here is this process's share, summed over processes below.
        t0 = time.time()
        if pc.gradient_checkpointing:  # transformers checkpoints in train mode only (dropout is off in both)
            policy.train()
            if value is not None:
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

                if value is not None:
                    with amp():
                        v_new = response_values(value, mb_ids, mb_mask, w)
                    v_old, ret = values[mb, :w], returns[mb, :w]
                    v_clip = v_old + torch.clamp(v_new - v_old, -pc.cliprange_value, pc.cliprange_value)
                    vf1, vf2 = (v_new - ret) ** 2, (v_clip - ret) ** 2
                    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), m, tokens)
                    loss = pg_loss + pc.vf_coef * vf_loss
                else:
                    loss = pg_loss

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
                    stats["ratio"].append(masked_mean(ratio, m, tokens).item())
                    stats["approxkl"].append(0.5 * masked_mean(diff**2, m, tokens).item())
                    stats["clip"].append(masked_mean((pg2 > pg1).float(), m, tokens).item())
                    if value is not None:
                        stats["vf"].append(vf_loss.item())
                        stats["vclip"].append(masked_mean((vf2 > vf1).float(), m, tokens).item())
        if pc.gradient_checkpointing:
            policy.eval()
            if value is not None:
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
                "loss/value": avg.get("vf"),
                "val/ratio": avg["ratio"],
                "val/num_eos_tokens": int(n_eos),
                "val/clipfrac_avg": avg.get("vclip"),
                "lr": lr,
                "kl_coef": kl_ctl.value,
            }
            if value is None:  # rloo, grpo: no value model, no value loss
                del row["loss/value"], row["val/clipfrac_avg"]
        if sft:
            row["loss/ptx"] = avg["ptx"]
        # Ziegler et al. 2019: the coefficient follows the KL of the batch just sampled.
        kl_ctl.update(mean_kl, pc.batch_size)
        row |= {"time/step_s": time.time() - t_step, "time/generate_s": t_gen, "time/score_s": t_score,
                "time/update_s": t_update}
        if step % pc.eval_every == 0 or step == pc.steps:
            with amp():
                row |= evaluate(step)
        if judge is not None:  # the judge's requests and time this step, its eval's included
            row |= judge.take()
        metrics.log(step, **row)
        bar.set_postfix(kl=f"{mean_kl:.2f}", score=f"{row['objective/scores']:.3f}")
        if step % pc.checkpoint_every == 0 or step == pc.steps:
            save_checkpoint(folder.checkpoint, modules, stateful, {"step": step, **setup}, dist)
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

    def roles(self, cfg: RunConfig) -> tuple[Role, ...]:
        """The judge, when it is the reward (``ppo.reward`` = judge or judge-score)."""
        return ("judge",) if cfg.ppo.reward != "model" else ()

    def user_files(self, cfg: RunConfig) -> list[Path]:
        files = [Path(f) for f in (cfg.ppo.prompts, cfg.ppo.sft_data) if f is not None]
        return files + ([Path(cfg.judge.constitution)] if cfg.ppo.reward != "model" else [])

    def needs(self, cfg: RunConfig, layout: RunLayout) -> list[Need]:
        pc = cfg.ppo
        needs = []
        if pc.reward == "model":
            needs.append(Need(Path(pc.reward_model) if pc.reward_model else layout.rm_model, "no reward model for PPO",
                              "add the rm stage, run `factory train rm`, set ppo.reward_model, or set ppo.reward = "
                              "'judge'", folder=True))
        if pc.prompts is None:
            needs.append(Need(layout.tasks, "no prompts for PPO", "run instances first, or set ppo.prompts"))
        return needs

    def writes(self, cfg: RunConfig, layout: RunLayout) -> list[Path]:
        return [layout.policy_model]

    def check(self, cfg: RunConfig) -> None:
        if cfg.ppo.reward != "model":  # the judge's principles, before any model loads
            from factory.constitution import load_constitution

            load_constitution(cfg.judge.constitution)

    def run(self, ctx: Context) -> dict:
        pc = ctx.cfg.ppo
        labeller = None
        if pc.reward != "model":  # the judge loads on its first request, once the policy is loaded
            labeller = Labeller.of(ctx.model("judge", lazy=True), ctx.cfg.judge, seed=pc.seed)
        return run_ppo(pc, ctx.layout, ctx.cfg.allow_pickle, ctx.echo, labeller=labeller)


STAGE = PPO()
