"""The trainers' config objects: one per trainer, every field described.

They live apart from the trainers so that loading a run config (``factory.config``) does
not import torch; each trainer file starts by naming its config from here. Paths left
empty mean "the run folder's own file" (``sft.jsonl``, ``preferences.jsonl``, ``rm/model``…).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from factory.llm.base import GenParams
from factory.records import Strict


class LoraSettings(Strict):
    """Low-rank adapters (peft) instead of full fine-tuning: the base weights stay frozen."""

    r: int = Field(0, ge=0, description="adapter rank; 0 = no LoRA, train every weight")
    alpha: int = Field(16, ge=1, description="adapter scale numerator (scale = alpha / r)")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="which linear layers get adapters")


class Common(Strict):
    device: str = Field("auto", description="auto (CUDA when there is one), cpu, cuda or cuda:N "
                        "(several processes: auto and cuda are each one's own GPU)")
    seed: int = Field(0, description="seed for shuffling, splits, initialisation and sampling")
    lr: float = Field(1e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the schedule")
    schedule: Literal["linear", "cosine", "constant"] = Field("linear", description="learning-rate decay after warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping norm")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="precision of the forward passes: bfloat16 = autocast to bf16, with weights, optimiser "
        "state, losses, scalar heads and PPO's log-prob ratios in float32; auto = bfloat16 on CUDA, float32 on the "
        "CPU (bfloat16 on the CPU works, but most CPUs run it slower than float32)")
    gradient_checkpointing: bool = Field(
        False, description="recompute each layer's activations in the backward pass instead of keeping them: "
        "much less activation memory for about a third more compute; same results")
    lora: LoraSettings = LoraSettings()


class SFTConfig(Common):
    """`factory train sft`: fine-tune on chat records, loss on the assistant's tokens only."""

    data: Path | None = Field(None, description="JSONL of {'messages': [...]} (none: the run's sft.jsonl)")
    model: str = Field("embedded", description="embedded, or a causal LM folder / hub id")
    output: str = Field("sft", description="folder under the run folder: checkpoint/, model/, metrics.jsonl")
    epochs: int = Field(1, ge=1, description="passes over the data; a checkpoint is written after each")
    batch_size: int = Field(8, ge=1, description="conversations per optimiser step (over all processes, when several)")
    max_length: int = Field(512, ge=8, description="tokens per conversation; longer ones are cut at the end")
    held_out: float = Field(0.1, ge=0, lt=1, description="share of the data kept for the eval loss each epoch")
    lr: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    checkpoint_every: int | None = Field(None, ge=1, description="optimiser steps between resumable checkpoints "
                                         "within an epoch (none: at each epoch's end only)")


class RewardConfig(Common):
    """`factory train rm`: a scalar head on a causal LM, Bradley-Terry loss on soft-labelled pairs."""

    pairs: Path | None = Field(None, description="preference JSONL (factory's format; none: the run's preferences.jsonl)")
    model: str = Field("embedded", description="backbone: embedded, or a causal LM folder / hub id")
    output: str = Field("rm", description="folder under the run folder: checkpoint/, model/, metrics.jsonl, eval.json")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    batch_size: int = Field(8, ge=1, description="pairs per optimiser step (over all processes, when several)")
    max_length: int = Field(512, ge=8, description="tokens per prompt + response; longer ones keep their end")
    held_out: float = Field(0.1, ge=0, lt=1, description="share of the prompts kept out for accuracy and margin")
    soft_labels: bool = Field(True, description="cross-entropy against p_chosen; false: every pair counts as p = 1")
    share_prompt: bool = Field(True, description="run a pair's shared prompt through the model once (faster, same loss)")
    reference: Path | None = Field(None, description="JSONL of {'messages'} whose mean reward is set to 0 after training "
                                   "(none: the run's sft.jsonl if there is one, else the chosen responses)")
    checkpoint_every: int = Field(50, ge=1, description="optimiser steps between resumable checkpoints")


class PPOConfig(Common):
    """`factory train ppo`: optimise a policy against the reward model with PPO (RLHF)."""

    policy: str = Field("auto", description="auto: the run's sft/model if trained, else embedded; or a folder")
    reward_model: Path | None = Field(None, description="a reward-model folder (none: the run's rm/model)")
    prompts: Path | None = Field(None, description="JSONL of {'prompt': ...} (none: the run's tasks)")
    output: str = Field("policy", description="folder under the run folder: checkpoint/, model/, metrics.jsonl, samples.jsonl")
    steps: int = Field(50, ge=1, description="PPO steps; each samples batch_size responses")
    batch_size: int = Field(8, ge=1, description="prompts (rollouts) per step, over all processes when several "
                            "(then a multiple of their number)")
    mini_batch_size: int = Field(4, ge=1, description="rollouts per gradient step within a PPO epoch, over all "
                                 "processes when several (then a multiple of their number)")
    ppo_epochs: int = Field(4, ge=1, description="passes over each step's rollouts")
    response_length: int = Field(48, ge=1, description="tokens sampled per response")
    max_prompt_length: int = Field(256, ge=8, description="prompt tokens kept (the end, where the question is)")
    temperature: float = Field(0.7, gt=0, description="sampling temperature for rollouts")
    lr: float = Field(3e-6, gt=0, description="peak learning rate (AdamW) for policy and value")
    kl_coef: float = Field(0.05, ge=0, description="per-token KL penalty coefficient (initial, if adaptive)")
    adaptive_kl: bool = Field(False, description="adapt kl_coef toward target_kl (Ziegler et al. 2019)")
    target_kl: float = Field(6.0, gt=0, description="adaptive: the KL per response to steer toward")
    kl_horizon: int = Field(10000, ge=1, description="adaptive: how fast the coefficient moves")
    no_eos_score: float | None = Field(-1.0, description="score given to responses that never end (none: keep the RM's)")
    whiten_rewards: bool = Field(False, description="whiten the per-token rewards before GAE")
    gamma: float = Field(1.0, ge=0, le=1, description="discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip")
    cliprange_value: float = Field(0.2, gt=0, description="value prediction clip")
    vf_coef: float = Field(0.1, ge=0, description="value loss weight")
    ptx_coef: float = Field(0.0, ge=0, description="SFT loss mixed into each update (PPO-ptx); 0 = off")
    sft_data: Path | None = Field(None, description="ptx: JSONL of {'messages'} (none: the run's sft.jsonl)")
    reward: Literal["model", "judge", "judge-score"] = Field(
        "model", description="model: the reward model (ppo.reward_model); judge: no reward model, the judge "
        "(judge.backend, judge.constitution) compares each rollout with the starting policy's greedy reply to the "
        "same prompt in both orders, reward = 2p - 1 (with rloo/grpo: its mean win probability against the rest "
        "of its group); judge-score: the judge's expected 1-10 rating, mapped onto [-1, 1]")
    advantage: Literal["gae", "rloo", "grpo"] = Field(
        "gae", description="gae: a value model and GAE; rloo: each sample's KL-penalised return minus the mean of "
        "the other samples of its prompt; grpo: the return normalised within its prompt's group (no value model "
        "for either)")
    samples: int = Field(1, ge=1, le=16, description="rollouts per prompt each step; rloo and grpo need at least "
                         "2 (default then 4); batch_size and mini_batch_size count rollouts")
    eval_prompts: int = Field(8, ge=0, description="prompts held out; scored greedily at every eval")
    eval_every: int = Field(10, ge=1, description="steps between evals (sample generations saved)")
    checkpoint_every: int = Field(10, ge=1, description="steps between resumable checkpoints")

    @model_validator(mode="after")
    def _minibatches(self) -> "PPOConfig":
        given = "samples" in self.model_fields_set
        if self.advantage != "gae" and self.samples == 1 and not given:
            self.samples = 4
        if self.advantage != "gae" and self.samples < 2:
            raise ValueError(f"advantage = {self.advantage!r} needs samples >= 2 (a group to take the baseline from)")
        if self.advantage != "gae" and self.whiten_rewards:
            raise ValueError(f"whiten_rewards whitens the per-token rewards GAE reads; advantage = {self.advantage!r} "
                             "has no GAE: set whiten_rewards = false")
        if self.batch_size % self.samples:
            default = "" if given else f", the default with advantage = {self.advantage!r}"
            raise ValueError(f"batch_size ({self.batch_size}) counts rollouts: it must be a multiple of samples "
                             f"({self.samples}{default})")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size})")
        return self


class DPOConfig(Common):
    """`factory train dpo`: direct preference optimisation on soft-labelled pairs, offline or online."""

    pairs: Path | None = Field(None, description="preference JSONL (factory's format; none: the run's preferences.jsonl)")
    model: str = Field("auto", description="the policy to start from: auto = the run's sft/model if trained, else "
                       "embedded; or a causal LM folder / hub id. It is also the reference")
    output: str = Field("dpo", description="folder under the run folder: reference.jsonl, checkpoint/, model/, "
                        "metrics.jsonl (online: online.jsonl)")
    beta: float = Field(0.1, gt=0, description="strength of the pull toward the reference (DPO's beta)")
    loss: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: DPO's logistic loss against the soft label p (p = 1: Rafailov et al. 2023); "
        "ipo: squared loss of the log-ratio margin toward (2p - 1) / (2 beta) (Azar et al. 2023)")
    soft_labels: bool = Field(True, description="train toward p_chosen; false: every pair counts as p = 1")
    nll_coef: float = Field(0.0, ge=0, description="weight of an NLL term on the chosen reply (per token), against "
                            "the drop of the chosen reply's likelihood; 0 = off")
    epochs: int = Field(1, ge=1, description="offline: passes over the training pairs")
    batch_size: int = Field(8, ge=1, description="pairs per optimiser step (online: prompts per step)")
    max_length: int = Field(512, ge=8, description="tokens per prompt + response; the prompt keeps its end, the reply its start")
    held_out: float = Field(0.1, ge=0, lt=1, description="share of the prompts kept out for preference accuracy")
    share_prompt: bool = Field(True, description="run a pair's shared prompt through the model once for both replies")
    lr: float = Field(5e-6, gt=0, description="peak learning rate (AdamW)")
    checkpoint_every: int = Field(50, ge=1, description="optimiser steps between resumable checkpoints")
    online: bool = Field(False, description="online AI feedback: each step the policy samples `samples` replies per "
                         "prompt, the judge labels every pair of them in both orders, and DPO steps on those pairs")
    samples: int = Field(2, ge=2, le=8, description="online: replies sampled per prompt each step")
    steps: int = Field(20, ge=1, description="online: optimiser steps")
    prompts: Path | None = Field(None, description="online: JSONL of {'prompt': ...} (none: the run's tasks)")
    response_length: int = Field(64, ge=1, description="online: tokens sampled per reply")
    temperature: float = Field(0.9, gt=0, description="online: sampling temperature")

    @model_validator(mode="after")
    def _room_for_the_prompt(self) -> "DPOConfig":
        if self.online and self.response_length > self.max_length // 2:
            raise ValueError(f"online: response_length ({self.response_length}) must be at most half of max_length "
                             f"({self.max_length}), so that the prompt keeps room before the reply")
        return self


class RerankConfig(Strict):
    """`factory rerank`: sample n responses per prompt, keep the one the reward model scores highest."""

    prompts: Path | None = Field(None, description="JSONL of {'prompt': ...} (none: the run's tasks)")
    reward_model: Path | None = Field(None, description="a reward-model folder (none: the run's rm/model)")
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    n: int = Field(4, ge=2, description="responses sampled per prompt")
    batch_size: int = Field(16, ge=1, description="responses scored per reward-model batch")
    max_length: int = Field(512, ge=8, description="tokens per prompt + response when scoring")
    device: str = Field("auto", description="where the reward model runs: auto, cpu, cuda or cuda:N")
    seed: int = Field(0, description="sampling seed")
    params: GenParams = Field(GenParams(temperature=0.9, top_p=0.95, max_tokens=128), description="sampling settings")
