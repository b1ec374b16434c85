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
    eval_prompts: int = Field(8, ge=0, description="prompts held out; scored greedily at every eval")
    eval_every: int = Field(10, ge=1, description="steps between evals (sample generations saved)")
    checkpoint_every: int = Field(10, ge=1, description="steps between resumable checkpoints")

    @model_validator(mode="after")
    def _minibatches(self) -> "PPOConfig":
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                             f"({self.mini_batch_size})")
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
