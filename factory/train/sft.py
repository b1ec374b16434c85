"""`factory train sft`: supervised fine-tuning on chat records, loss on the assistant's tokens only.

The config is ``SFTConfig`` (factory/train/settings.py, ``[sft]`` in a run config). The data is
the run's ``sft.jsonl`` (the critique stage's final revisions, Constitutional AI's SL stage) or any
JSONL of ``{"messages": [...]}``, e.g. a ``rerank.jsonl`` of best-of-n responses.

Each conversation is rendered with the model's chat template; only the assistant's tokens, their
end-of-turn token included, carry loss (as InstructGPT's SFT and TRL's assistant-only loss), and
the loss is the mean over all of a batch's assistant tokens, so a long reply weighs by its length.
A share of the conversations is held out for an eval loss after every epoch.

Several processes (``accelerate launch --multi_gpu --num_processes N``, or torchrun): ``batch_size``
stays the batch of one optimiser step; each process takes its share of it, and a share's loss is
its summed token losses over the whole batch's assistant-token count, so the summed gradients are
those of the batch's token mean, as one process computes it (``distributed.Dist``).

Output in the run layout's ``layout.sft`` (``<run>/<sft.output>/``): ``checkpoint/`` (after every
epoch; the run resumes from it exactly), ``metrics.jsonl``, ``summary.json`` and, last, ``model/``: a
causal LM folder with its tokenizer, LoRA merged in, which the hf backend loads as ``hf:<run>/sft/model``.
"""

from __future__ import annotations

import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from factory.layout import RunLayout
from factory.records import file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.train import TrainError
from factory.train.chat import chat_ids, length_mask, pad_right, read_messages
from factory.train.checkpoints import load_checkpoint, save_checkpoint
from factory.train.distributed import SOLO, Dist, processes
from factory.train.finish import finished, save_final
from factory.train.metrics import Metrics
from factory.train.models import add_lora, end_ids, load_causal_lm, load_tokenizer, resolve_model
from factory.train.optim import make_optimizer, seed_all
from factory.train.precision import autocast, checkpoint_activations, releases_memory
from factory.train.settings import SFTConfig

if TYPE_CHECKING:
    from factory.config import RunConfig

MEGABATCH = 50
"""Batches per length-sorted window: transformers' length-grouped sampler uses the same 50."""

Example = tuple[list[int], list[int]]
"""(token ids, loss mask: 1 on the assistant's tokens)"""


# -- data (pure) ----------------------------------------------------------------------------------


def cut(ids: list[int], mask: list[int], max_length: int) -> Example | None:
    """A conversation cut to ``max_length`` tokens; None if nothing is left to learn from.

    The cut keeps the start: the system and user turns and the beginning of the reply. A reply
    that runs past the cut loses its end and its end-of-turn token, which is right: the model
    must not learn to stop where the cut happens to fall. Token 0 predicts nothing (labels are
    shifted), so a conversation needs an assistant token after position 0 to carry loss.
    """
    ids, mask = ids[:max_length], mask[:max_length]
    return (ids, mask) if any(mask[1:]) else None


def split(n: int, held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded draw of ``held_out`` of them, at least one when there are two or more."""
    order = list(range(n))
    random.Random(f"split:{seed}").shuffle(order)
    k = round(n * held_out)
    if held_out > 0 and n >= 2:
        k = min(max(k, 1), n - 1)  # one conversation for the eval loss, one at least to train on
    return sorted(order[k:]), sorted(order[:k])


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The training set's indices, batch by batch, for one epoch.

    A seeded shuffle; then within windows of ``MEGABATCH`` batches the conversations are sorted
    by length, so that a batch holds similar lengths and little padding; then the batches are
    shuffled so that lengths do not come in order. The order depends on (seed, epoch) alone:
    a resumed run rebuilds it instead of storing it.
    """
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * MEGABATCH
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# -- loss -----------------------------------------------------------------------------------------


def assistant_tokens(batch: list[Example]) -> int:
    """Tokens that carry loss: assistant tokens after position 0 (token 0 predicts nothing)."""
    return sum(sum(mask[1:]) for _, mask in batch)


def batch_loss(model, batch: list[Example], pad_id: int, device: torch.device,
               tokens: int | None = None, amp=nullcontext) -> tuple[torch.Tensor, int, int]:
    """(mean cross entropy over the batch's assistant tokens, assistant tokens, real tokens).

    ``tokens``: the mean's denominator when ``batch`` is one process's share of a larger batch
    (that batch's assistant tokens), so the shares' losses add up to the whole batch's mean.
    ``amp``: the forward pass's precision context (``precision.autocast``); the loss is float32.
    """
    rows = [ids for ids, _ in batch]
    ids = pad_right(rows, pad_id).to(device)
    attention = length_mask(rows).to(device)
    weight = pad_right([mask for _, mask in batch], 0).to(device)
    with amp():
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
    # Position t predicts token t + 1: logits drop their last position, labels their first.
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
    w = weight[:, 1:].flatten().float()
    n = int(w.sum().item())
    return (nll * w).sum() / (tokens or n), n, int(attention.sum().item())


@torch.no_grad()
def eval_loss(model, data: list[Example], batch_size: int, pad_id: int, device: torch.device,
              dist: Dist = SOLO, amp=nullcontext) -> float | None:
    """Token-weighted mean loss over ``data`` (None when there is none); each process scores its share."""
    if not data:
        return None
    model.eval()
    total, tokens = 0.0, 0
    ordered = dist.shard(sorted(data, key=lambda ex: len(ex[0])))
    for start in range(0, len(ordered), batch_size):
        loss, n, _ = batch_loss(model, ordered[start : start + batch_size], pad_id, device, amp=amp)
        total, tokens = total + loss.item() * n, tokens + n
    total, tokens = dist.total(total, tokens)
    model.train()
    return total / tokens


# -- the trainer ----------------------------------------------------------------------------------


@releases_memory
def run_sft(settings: SFTConfig, layout: RunLayout, allow_pickle: bool = False,
            echo: Callable[[str], None] = print) -> dict:
    """Fine-tune ``settings.model`` on ``settings.data`` (default: the run's SFT data) into ``layout.sft``;
    returns the summary (also in ``layout.sft.summary``). A finished run returns its summary at once."""
    sc = settings
    dist, device = processes(sc.device)
    echo = dist.main_only(echo)
    folder = layout.sft
    final, ckpt = folder.model, folder.checkpoint
    done = finished(folder)
    if done is not None:
        echo(f"sft: already finished; the model is in {final} (remove {folder.root} to train again)")
        return {**done, "already_finished": True}

    data_path = sc.data if sc.data is not None else layout.sft_data
    if not Path(data_path).is_file():
        raise TrainError(f"{data_path}: no SFT data; run the critique stage first, or set sft.data "
                         "(a JSONL of {'messages': [...]})")
    conversations = read_messages(Path(data_path))
    path, model_id = resolve_model(sc.model)
    tok = load_tokenizer(path)

    # 1. Tokenise: assistant tokens carry loss; cut at max_length; drop what has nothing left to learn.
    examples: list[Example] = []
    truncated = unended = 0
    ends = set(end_ids(tok, path))
    for msgs in conversations:
        ids, mask = chat_ids(tok, msgs)
        # The model learns to stop from the end-of-turn token in the loss mask; a template that
        # writes none after a reply leaves nothing to learn it from.
        unended += not any(m and i in ends for i, m in zip(ids, mask))
        truncated += len(ids) > sc.max_length
        ex = cut(ids, mask, sc.max_length)
        if ex is not None:
            examples.append(ex)
    dropped = len(conversations) - len(examples)
    if unended:
        echo(f"sft: warning: in {unended} of {len(conversations)} conversations the chat template of {path} writes "
             "no token that ends the assistant's turn after the reply; the model will not learn to stop there")
    if not examples:
        raise TrainError(f"{data_path}: no conversation has an assistant token within max_length={sc.max_length}")
    train_idx, eval_idx = split(len(examples), sc.held_out, sc.seed)
    train = [examples[i] for i in train_idx]
    held = [examples[i] for i in eval_idx]
    lengths = [len(ids) for ids, _ in train]
    per_epoch = math.ceil(len(train) / sc.batch_size)
    total_steps = per_epoch * sc.epochs

    # 2. Model (LoRA adapters if asked), optimiser and schedule.
    # Weights in float32; forward passes in bf16 on CUDA (`dtype`, precision.autocast).
    seed_all(sc.seed)
    amp = autocast(sc.dtype, device)
    model = load_causal_lm(path, device, tok, allow_pickle=allow_pickle)
    if sc.gradient_checkpointing:
        checkpoint_activations(model)
    model = add_lora(model, sc.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, sc, total_steps)

    # 3. Resume: the checkpoint must come from this data and these settings, or the run would mix two
    # (where it runs and in what precision may change, as between a laptop and a GPU).
    fingerprint = work_key({"data": file_sha256(Path(data_path)), "model": model_id},
                           sc.model_dump(mode="json", exclude={"device", "data", "output", "dtype",
                                                               "gradient_checkpointing"}))
    state = load_checkpoint(ckpt, {"model": model}, {"optimizer": opt, "scheduler": sched}, dist,
                            allow_pickle=allow_pickle)
    dist.broadcast({"model": model})
    if state is not None and state["fingerprint"] != fingerprint:
        raise TrainError(f"{ckpt}: this checkpoint was made from other data or settings; "
                         f"remove {folder.root} to start again, or restore what it was made with")
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "epoch": 0, "position": 0,
                 "loss_sum": 0.0, "loss_tokens": 0, "train_loss": None, "eval_loss": None}
    else:
        echo(f"sft: resuming from {ckpt} at step {state['step']} (epoch {state['epoch'] + 1}, "
             f"batch {state['position']} of {per_epoch})")
    metrics = Metrics(folder.metrics, state["step"], write=dist.is_main)
    every = sc.checkpoint_every

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": model}, {"optimizer": opt, "scheduler": sched}, state, dist)

    started, seen_tokens, train_s = time.time(), 0, 0.0
    bar = tqdm(total=total_steps, initial=state["step"], desc="sft", unit="step", disable=not dist.is_main)
    for epoch in range(state["epoch"], sc.epochs):
        batches = epoch_batches(lengths, sc.batch_size, sc.seed, epoch)
        for position in range(state["position"], len(batches)):
            # 4. Forward: cross entropy on the assistant tokens, mean over the batch's. With several
            # processes, this one's share of the batch, its loss divided by the whole batch's tokens.
            tick = time.time()
            mine = dist.shard([train[i] for i in batches[position]])
            n = int(dist.total(assistant_tokens(mine))[0])  # the whole batch's
            opt.zero_grad(set_to_none=True)
            share, real = torch.zeros((), device=device), 0  # an empty share: a last batch smaller than N
            if mine:
                share, _, real = batch_loss(model, mine, tok.pad_token_id, device, tokens=n, amp=amp)
            loss, real = dist.total(share.item(), real)
            real = int(real)
            if not math.isfinite(loss):
                raise TrainError(f"sft: the loss is {loss} at step {state['step'] + 1}; "
                                 "lower sft.lr or check the data")
            # 5. Backward, sum the processes' gradients, clip, step.
            if mine:
                share.backward()
            dist.sum_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, sc.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            train_s += time.time() - tick
            # 6. Log; checkpoint every so often within an epoch.
            state.update(step=state["step"] + 1, position=position + 1, loss_sum=state["loss_sum"] + loss * n,
                         loss_tokens=state["loss_tokens"] + n)
            seen_tokens += real
            metrics.log(state["step"], epoch=epoch + 1, **{"train/loss": loss, "lr": lr, "tokens": real,
                                                           "assistant_tokens": n, "grad_norm": grad_norm.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if every and state["step"] % every == 0 and position + 1 < len(batches):
                checkpoint()
        # 7. Epoch end: the held-out loss, then a checkpoint the next epoch starts from.
        state["eval_loss"] = eval_loss(model, held, sc.batch_size, tok.pad_token_id, device, dist, amp)
        state["train_loss"] = state["loss_sum"] / max(1, state["loss_tokens"])
        held_out = {} if state["eval_loss"] is None else {"eval/loss": state["eval_loss"]}
        metrics.log(state["step"], epoch=epoch + 1, **held_out, **{"train/epoch_loss": state["train_loss"]})
        state.update(epoch=epoch + 1, position=0, loss_sum=0.0, loss_tokens=0)
        checkpoint()
    bar.close()
    seconds = time.time() - started

    # 8. The final model: LoRA merged into the weights, so it loads as a plain causal LM.
    summary = {
        "model": str(final), "base_model": model_id, "data": str(data_path),
        "conversations": {"train": len(train), "held_out": len(held), "truncated": truncated, "dropped": dropped},
        "epochs": sc.epochs, "steps": state["step"], "train_loss": state["train_loss"], "eval_loss": state["eval_loss"],
        "seconds": round(seconds, 1), "tokens_per_s": round(seen_tokens / train_s, 1) if train_s > 0 else None,
    }

    def write_model(tmp: Path) -> None:
        merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    save_final(folder, summary, write_model, dist)  # model/ last: a model/ folder means the run finished
    echo(f"sft: {state['step']} steps, train loss {summary['train_loss']:.4f}"
         + (f", eval loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "") + f" -> {final}")
    return summary


class SFT(Stage):
    name = section = "sft"
    trains = True

    def user_files(self, cfg: RunConfig) -> list[Path]:
        return [Path(cfg.sft.data)] if cfg.sft.data is not None else []

    def needs(self, cfg: RunConfig, layout: RunLayout) -> list[Need]:
        if cfg.sft.data is not None:
            return []
        return [Need(layout.sft_data, "nothing to fine-tune on", "run the critique stage first, or set sft.data")]

    def writes(self, cfg: RunConfig, layout: RunLayout) -> list[Path]:
        return [layout.sft_model]

    def run(self, ctx: Context) -> dict:
        return run_sft(ctx.cfg.sft, ctx.layout, ctx.cfg.allow_pickle, ctx.echo)


STAGE = SFT()
