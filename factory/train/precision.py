"""Precision and memory: the forward passes' dtype (``autocast``), float32 where it matters
(``float32_logits``), activation checkpointing, and handing memory back when a trainer returns.
"""

from __future__ import annotations

import functools
import gc
from contextlib import AbstractContextManager, nullcontext
from typing import Callable

import torch
from torch import nn


def compute_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype of a trainer's forward passes for its ``dtype`` setting: auto is bfloat16 on
    CUDA and float32 elsewhere (bfloat16 on the CPU only when asked for by name)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


def autocast(setting: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """The context a trainer runs its forward passes in: ``with amp(): ...``.

    bfloat16 is mixed precision as transformers' Trainer and accelerate do it (``bf16=True``):
    the weights stay float32 "master" copies and ``torch.autocast`` runs the matrix products in
    bf16. Weights stored in bf16 would halve their memory, but AdamW's updates at the learning
    rates used here (PPO's 3e-6 on weights of ~0.02) are far below bf16's resolution (0.4% to
    0.8% between neighbours) and would round away. Only activations are bf16; float32 stays
    where precision matters: gradients and optimiser state, every loss (logits are cast with
    ``.float()`` before log_softmax / cross entropy), the scalar head (``ScalarModel.head_scores``),
    and PPO's logits (its LM heads run in float32: ``float32_logits``), log-probs, their differences
    and ratios. float32 is no context at all, so the
    CPU runs exactly the ops it always did.
    """
    dtype = compute_dtype(setting, device)
    if dtype == torch.float32:
        return nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def float32_logits(model: nn.Module) -> nn.Module:
    """Make ``model``'s output projection (the LM head) run in float32 with autocast off, so its
    logits are float32 products of float32 hidden states and weights, not bf16 ones cast up.

    PPO takes differences of log-probs from two forward passes (the rollout with its KV cache, the
    update without): at logits of 20 to 30, bf16's spacing is about 0.125, so bf16 logits would put
    noise of that size into every ratio. The head runs for the response tokens only
    (``logits_to_keep``), so the float32 product costs little. Call it on each model object
    (after any ``deepcopy``: a copy would call the original's head). Without autocast it changes
    nothing: float32 in, float32 out.
    """
    head = model.get_output_embeddings()
    forward = head.forward

    def float32_forward(hidden: torch.Tensor) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            return forward(hidden.float())

    head.forward = float32_forward
    return model


def checkpoint_activations(model: nn.Module) -> None:
    """``gradient_checkpointing``: each decoder layer keeps only its input and recomputes the
    rest in the backward pass. Call it on the transformers model (a peft wrapper passes it on). The
    non-reentrant form of torch.utils.checkpoint gives gradients to LoRA adapters even though
    the frozen embeddings' output needs none (the reentrant form needs
    ``enable_input_require_grads`` for that). transformers checkpoints only in train mode and
    with gradients on, so sampling (eval mode, no_grad) keeps its KV cache; the trainers'
    training forwards pass ``use_cache=False``."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name; the old one warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def releases_memory(run: Callable) -> Callable:
    """Decorates a trainer's entry point: when it returns, its models, optimiser and last autograd
    graph (which holds the parameters) go with its frame, but only once nothing refers to that
    frame. A reference cycle may: a caught exception kept by a library holds its traceback, whose
    frames lead back to the trainer's (transformers' lazy imports do this on a process's first
    model load). Reference counting alone leaves that to the next garbage collection, so it runs
    here, and CUDA's cached blocks are handed back: the next stage in the process (a backend,
    another trainer) finds the GPU as the trainer found it. After an exception the traceback still
    holds the frame, and what it holds is freed when the exception is."""

    @functools.wraps(run)
    def trainer(*args, **kwargs):
        try:
            return run(*args, **kwargs)
        finally:
            gc.collect()
            torch.cuda.empty_cache()  # a no-op where CUDA was never used

    return trainer
