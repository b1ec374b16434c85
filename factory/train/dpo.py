"""`factory train dpo`: direct preference optimisation on soft-labelled pairs, offline or online.

The config is ``DPOConfig`` (factory/train/settings.py, ``[dpo]`` in a run config). Offline, the pairs
are the run's ``preferences.jsonl`` (the judge's output) or any file of factory's ``Preference``
records; online (``dpo.online``), the policy makes its own pairs at every step and the judge labels
them (``feedback.Labeller``, Guo et al. 2024).

The loss takes the judge's soft label as its target. With the policy π, the reference π_ref (the
starting model) and the sums of log-probabilities over each reply's tokens (its end-of-turn token
included),

    h = beta * [(log π(y_c) - log π_ref(y_c)) - (log π(y_r) - log π_ref(y_r))]
    sigmoid: loss = -[p * log sigmoid(h) + (1 - p) * log sigmoid(-h)]
    ipo:     loss = (h / beta - (2p - 1) / (2 beta))^2

where p = P(chosen is better). With p = 1 the sigmoid loss is DPO's (Rafailov et al. 2023) and the
ipo loss is IPO's (Azar et al. 2023, its sums-of-log-probs form); a pair the judge barely prefers
pulls the two replies apart far less than a confident one. ``nll_coef`` adds the chosen reply's
per-token negative log-likelihood, against DPO's known drop of the chosen reply's likelihood.

Less work than the usual trainer:

- **The reference runs once.** Its log-probs of every pair are computed before training and
  written to ``<dpo.output>/reference.jsonl`` (a batch at a time, appended and fsynced: a killed
  run resumes the pass where it stopped), so no reference model is in memory while training.
  With LoRA the reference is the base model, adapters off (it is computed before they are added).
- **A pair's prompt runs once.** Its chosen and rejected replies share one row after the prompt,
  each attending to the prompt and to itself only, with position ids that restart after the prompt
  (``scoring.pack``, as the reward model packs them): the same log-probs as separate rows (a test
  checks values and gradients) on fewer tokens. The LM head runs only where a reply token is read.
- **Batches are bucketed by length** (pairs of similar size together, ``reward.epoch_batches``).

A share of the prompts is held out (whole prompts, as for the reward model); after each epoch the
held-out pairs give preference accuracy (h > 0), margins and rewards. ``metrics.jsonl`` holds
TRL's names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` (``eval/...`` for the held-out ones). Checkpoints every
``checkpoint_every`` steps and at each epoch's end resume exactly. ``model/`` is a causal LM folder
(LoRA merged) that loads as ``hf:<run>/dpo/model`` and is the next round's policy.

Online: each step takes ``batch_size`` prompts (a seeded stream of them), samples ``samples``
replies to each from the current policy (temperature sampling, seeded by the step), has the judge
compare every pair of a prompt's replies in both orders under principles drawn by weight, and
takes one DPO step on those pairs, each labelled with its soft P(i beats j). Every step's prompts,
samples and labels are written to ``online.jsonl`` before the update; a resumed run reads them
back instead of sampling and asking the judge again, so it repeats the same updates. The reference
is then needed at every step: a frozen copy of the starting policy (with LoRA, the adapters off).

Several processes: each takes its share of a batch (``distributed.Dist``), as the reward model's
trainer does; the main process computes the reference pass and writes it, the others read it. Online
DPO runs in one process.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from factory.layout import RunLayout, TrainerFolder
from factory.records import file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.train import TrainError
from factory.train.chat import length_mask, pad_right
from factory.train.checkpoints import load_checkpoint, save_checkpoint, saved_state
from factory.train.distributed import SOLO, Dist, processes
from factory.train.finish import finished, save_final
from factory.train.metrics import Metrics
from factory.train.models import add_lora, end_ids, is_model, load_causal_lm, load_tokenizer, resolve_model
from factory.train.optim import make_optimizer, seed_all
from factory.train.precision import autocast, checkpoint_activations, compute_dtype, float32_logits, releases_memory
from factory.train.pairs import Pair, epoch_batches, make_pairs, split_by_prompt
from factory.train.scoring import Seq, pack
from factory.train.settings import DPOConfig

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.feedback import Labeller

CONFIG = DPOConfig  # [dpo]: the settings of this trainer, each field documented there


# -- the loss (pure) ------------------------------------------------------------------------------


def dpo_loss(policy_c: torch.Tensor, policy_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             p: torch.Tensor, beta: float, kind: str = "sigmoid") -> tuple[torch.Tensor, torch.Tensor]:
    """(per-pair loss, h) from summed log-probs of the chosen and rejected replies under the policy
    and the reference, against the soft label ``p`` = P(chosen is better)."""
    h = beta * ((policy_c - ref_c) - (policy_r - ref_r))
    if kind == "ipo":
        target = (2 * p - 1) / (2 * beta)
        return (h / beta - target) ** 2, h
    return -(p * F.logsigmoid(h) + (1 - p) * F.logsigmoid(-h)), h


# -- log-probs of replies -------------------------------------------------------------------------


def lm_parts(model):
    """(decoder, LM head) of a causal LM, through a peft wrapper (its adapters stay in the decoder)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return lm.get_decoder(), lm.get_output_embeddings()


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def reply_logps(model, seqs: list[Seq], pad_id: int, device: torch.device, share_prompt: bool, limit: int,
                amp=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log π(reply token | prompt, earlier reply tokens) per Seq, reply token count per Seq).

    Packed (``share_prompt``): rows hold a prompt once and then its replies (``scoring.pack``);
    a reply's first token is read from the prompt's last position, each later one from the
    position before it. Plain: one right-padded row per prompt + reply. Either way the LM head
    runs only at the positions that predict a reply token.
    """
    decoder, head = lm_parts(model)
    rows_at, cols_at, targets, owner = [], [], [], []
    if share_prompt:
        packed = pack(seqs, pad_id, limit)
        for n, ((prompt, reply), r, end) in enumerate(zip(seqs, packed.row, packed.col)):
            start = end - len(reply) + 1
            cols = [len(prompt) - 1] + list(range(start, end))
            rows_at += [r] * len(reply)
            cols_at += cols
            targets += list(reply)
            owner += [n] * len(reply)
        with amp():
            mask = packed.mask.to(device, head.weight.dtype)
            if torch.is_autocast_enabled(device.type):  # the additive mask in autocast's dtype (scoring.seq_scores)
                low = torch.get_autocast_dtype(device.type)
                mask = torch.zeros_like(mask, dtype=low).masked_fill_(mask < 0, torch.finfo(low).min)
            hidden = decoder(input_ids=packed.ids.to(device), attention_mask=mask,
                             position_ids=packed.positions.to(device), use_cache=False).last_hidden_state
    else:
        rows = [list(p) + list(r) for p, r in seqs]
        for n, (prompt, reply) in enumerate(seqs):
            rows_at += [n] * len(reply)
            cols_at += list(range(len(prompt) - 1, len(prompt) + len(reply) - 1))
            targets += list(reply)
            owner += [n] * len(reply)
        with amp():
            hidden = decoder(input_ids=pad_right(rows, pad_id).to(device), attention_mask=length_mask(rows).to(device),
                             use_cache=False).last_hidden_state
    picked = hidden[torch.tensor(rows_at, device=device), torch.tensor(cols_at, device=device)]
    with amp():
        logps = _token_logps(head, picked, torch.tensor(targets, device=device))
    index = torch.tensor(owner, device=device)
    sums = torch.zeros(len(seqs), dtype=logps.dtype, device=device).index_add(0, index, logps)
    counts = torch.zeros(len(seqs), dtype=logps.dtype, device=device).index_add(0, index, torch.ones_like(logps))
    return sums, counts


def pair_logps(model, batch: list[Pair], pad_id: int, device, share_prompt: bool, limit: int, amp=nullcontext):
    """(chosen log-probs, rejected log-probs, chosen token counts) of a batch of pairs."""
    n = len(batch)
    sums, counts = reply_logps(model, [x.chosen for x in batch] + [x.rejected for x in batch], pad_id, device,
                               share_prompt, limit, amp)
    return sums[:n], sums[n:], counts[:n]


class Step:
    """A batch's loss and the statistics TRL logs, from its log-probs."""

    def __init__(self, dc: DPOConfig, batch: list[Pair], ref: torch.Tensor, policy_c, policy_r, count_c):
        p = torch.tensor([x.p for x in batch], dtype=policy_c.dtype, device=policy_c.device)
        ref_c, ref_r = ref[:, 0].to(policy_c), ref[:, 1].to(policy_c)
        losses, h = dpo_loss(policy_c, policy_r, ref_c, ref_r, p, dc.beta, dc.loss)
        if dc.nll_coef:
            losses = losses + dc.nll_coef * (-policy_c / count_c.clamp(min=1))
        self.losses = losses
        with torch.no_grad():
            chosen, rejected = dc.beta * (policy_c - ref_c), dc.beta * (policy_r - ref_r)
            self.stats = torch.stack([losses, chosen, rejected, h, (h > 0).to(h.dtype), policy_c, policy_r])

    NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
             "logps/chosen", "logps/rejected")


# -- the reference pass ---------------------------------------------------------------------------


def whole_rows(path: Path, cut_torn: bool, remove: Path) -> list[dict]:
    """The JSON rows of a file appended line by line (``reference.jsonl``, ``online.jsonl``); what follows
    its last newline is a torn line (a kill mid-write): never read, and cut off when ``cut_torn``.
    ``remove``: what to remove to start again, named when a whole line does not parse."""
    data = path.read_bytes() if path.is_file() else b""
    whole = data[: data.rfind(b"\n") + 1]
    rows = []
    for n, line in enumerate(whole.splitlines()):
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise TrainError(f"{path}:{n + 1}: not a JSON line; remove {remove} to start again") from None
    if cut_torn and len(whole) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(whole))
    return rows


def append_synced(path: Path, data: bytes, mode: str = "ab") -> None:
    """Append (or with ``mode="wb"`` write) ``data`` and fsync it before going on."""
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ReferenceFile:
    """``reference.jsonl``: a header with the fingerprint of what it was computed from, then one line per
    pair: ``{"i": index, "c": chosen log-prob, "r": rejected log-prob}``. Lines are appended a batch at a
    time and fsynced; a torn last line (a kill mid-write) is dropped and its pairs computed again."""

    def __init__(self, path: Path, fingerprint: str, write: bool = True):
        self.path, self.fingerprint, self.write = path, fingerprint, write
        self.values: dict[int, tuple[float, float]] = {}
        rows = whole_rows(path, cut_torn=write, remove=path)
        if rows and rows[0].get("fingerprint") != fingerprint:
            raise TrainError(f"{path}: these reference log-probs were computed from other pairs, model or "
                             f"settings; remove {path.parent} to start again")
        for row in rows[1:]:
            self.values[row["i"]] = (row["c"], row["r"])
        if write and not rows:
            append_synced(path, (json.dumps({"fingerprint": fingerprint}) + "\n").encode(), "wb")

    def add(self, index: list[int], chosen: list[float], rejected: list[float]) -> None:
        rows = [{"i": i, "c": c, "r": r} for i, c, r in zip(index, chosen, rejected)]
        for row in rows:
            self.values[row["i"]] = (row["c"], row["r"])
        if self.write:
            append_synced(self.path, "".join(json.dumps(row) + "\n" for row in rows).encode())


@torch.no_grad()
def reference_pass(model, pairs: list[Pair], ref: ReferenceFile, batch_size: int, pad_id: int, device,
                   share_prompt: bool, limit: int, amp, echo) -> float:
    """Fill ``ref`` with the reference log-probs of every pair it lacks; returns the seconds taken."""
    todo = [i for i in range(len(pairs)) if i not in ref.values]
    if not todo:
        return 0.0
    started = time.time()
    model.eval()
    sub = [pairs[i] for i in todo]
    batches = epoch_batches(sub, batch_size, share_prompt, 0, 0)
    for batch in tqdm(batches, desc="dpo: reference", unit="batch", disable=not ref.write):
        chosen, rejected, _ = pair_logps(model, [sub[i] for i in batch], pad_id, device, share_prompt, limit, amp)
        ref.add([todo[i] for i in batch], chosen.tolist(), rejected.tolist())
    echo(f"dpo: reference log-probs of {len(todo)} pairs in {time.time() - started:.1f}s -> {ref.path}")
    return time.time() - started


@torch.no_grad()
def evaluate(model, pairs: list[Pair], ref: torch.Tensor, dc: DPOConfig, pad_id: int, device, limit: int,
             dist: Dist = SOLO, amp=nullcontext) -> dict | None:
    """Held-out means of the loss, rewards, margins, accuracy and log-probs; None with no pairs."""
    if not pairs:
        return None
    model.eval()
    total = torch.zeros(len(Step.NAMES), dtype=torch.float64)
    count = 0
    for batch in dist.shard(epoch_batches(pairs, dc.batch_size, dc.share_prompt, 0, 0)):
        chosen, rejected, counts = pair_logps(model, [pairs[i] for i in batch], pad_id, device, dc.share_prompt,
                                              limit, amp)
        step = Step(dc, [pairs[i] for i in batch], ref[batch], chosen, rejected, counts)
        total += step.stats.sum(dim=1).double().cpu()
        count += len(batch)
    *sums, count = dist.total(*total.tolist(), count)
    model.train()
    return {name: v / count for name, v in zip(Step.NAMES, sums)}


# -- the trainer ----------------------------------------------------------------------------------


def _start_model(dc: DPOConfig, layout: RunLayout) -> tuple[str, str]:
    if dc.model == "auto":
        sft = layout.sft_model
        return resolve_model(str(sft) if is_model(sft) else "embedded")
    return resolve_model(dc.model)


def _prepare(dc: DPOConfig, device, path: str, tok, allow_pickle: bool):
    model = load_causal_lm(path, device, tok, allow_pickle=allow_pickle)
    if compute_dtype(dc.dtype, device) != torch.float32:
        float32_logits(model)
    return model


def _finish(folder: TrainerFolder, model, tok, dc: DPOConfig, summary: dict, dist: Dist, echo) -> dict:
    def write_model(tmp: Path) -> None:
        (model.merge_and_unload() if dc.lora.r else model).save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    save_final(folder, summary, write_model, dist)
    echo(f"dpo: {summary['steps']} steps; the policy is in {folder.model} (hf:{folder.model})")
    return summary


@releases_memory
def run_dpo(settings: DPOConfig, layout: RunLayout, allow_pickle: bool = False, echo: Callable[[str], None] = print,
            labeller: "Labeller | None" = None) -> dict:
    """Train ``settings.model`` (auto: the run's SFT model, else embedded) by DPO into ``layout.dpo``;
    returns the summary (also in ``layout.dpo.summary``). Online (``settings.online``) the ``labeller``
    judges the policy's samples. A finished run returns its summary at once."""
    dc = settings
    dist, device = processes(dc.device)
    echo = dist.main_only(echo)
    folder = layout.dpo
    done = finished(folder)
    if done is not None:
        echo(f"dpo: already finished; the model is in {folder.model} (remove {folder.root} to train again)")
        return {**done, "already_finished": True}
    folder.root.mkdir(parents=True, exist_ok=True)
    if dc.online:
        if labeller is None:
            raise TrainError("dpo.online needs a judge to label the samples (the run's judge.backend)")
        if dist.world > 1:
            raise TrainError("dpo.online runs in one process; launch it without accelerate/torchrun")
        return _run_online(dc, layout, allow_pickle, echo, labeller, device)
    return _run_offline(dc, layout, allow_pickle, echo, dist, device)


def _run_offline(dc: DPOConfig, layout: RunLayout, allow_pickle: bool, echo, dist: Dist, device) -> dict:
    from factory.inputs import load_preferences

    folder = layout.dpo
    pairs_path = Path(dc.pairs) if dc.pairs is not None else layout.preferences
    if not pairs_path.is_file():
        raise TrainError(f"{pairs_path}: no preference pairs; run the judge stage first, or set dpo.pairs "
                         "(a JSONL of factory's preference records)")
    prefs = load_preferences(pairs_path, TrainError)
    if not prefs:
        raise TrainError(f"{pairs_path}: no preference pairs in the file; run the judge stage first, or set dpo.pairs")
    path, model_id = _start_model(dc, layout)
    tok = load_tokenizer(path)
    limit = 2 * dc.max_length  # a packed row holds a prompt and two replies: one pair always fits

    # 1. Tokenise and hold out whole prompts.
    pairs, truncated = make_pairs(tok, prefs, dc.max_length, dc.soft_labels)
    train_idx, held_idx = split_by_prompt(pairs, dc.held_out, dc.seed)
    train, held = [pairs[i] for i in train_idx], [pairs[i] for i in held_idx]
    per_epoch = math.ceil(len(train) / dc.batch_size)
    total_steps = per_epoch * dc.epochs
    amp = autocast(dc.dtype, device)
    seed_all(dc.seed)
    model = _prepare(dc, device, path, tok, allow_pickle)

    # 2. The reference log-probs of every pair, once, before any adapter or update (kept in the run).
    source = {"pairs": file_sha256(pairs_path), "model": model_id}
    ref_key = work_key({**source, "precision": str(compute_dtype(dc.dtype, device))},
                       dc.model_dump(mode="json", include={"max_length", "share_prompt"}))
    ref_seconds = 0.0
    if dist.is_main:  # the main process computes and writes it; the others read it once it is whole
        ref_seconds = reference_pass(model, pairs, ReferenceFile(folder.reference, ref_key), dc.batch_size,
                                     tok.pad_token_id, device, dc.share_prompt, limit, amp, echo)
    dist.barrier()
    ref_file = ReferenceFile(folder.reference, ref_key, write=False)
    ref_all = torch.tensor([ref_file.values[i] for i in range(len(pairs))], dtype=torch.float32)
    ref_train, ref_held = ref_all[train_idx], ref_all[held_idx]

    # 3. The policy: LoRA if asked, optimiser, schedule; resume from a checkpoint of the same work.
    fingerprint = work_key(source, dc.model_dump(mode="json", exclude={
        "device", "pairs", "output", "checkpoint_every", "dtype", "gradient_checkpointing", "online", "samples",
        "steps", "prompts", "response_length", "temperature"}))
    saved = saved_state(folder.checkpoint)
    if saved is not None and saved["fingerprint"] != fingerprint:
        raise TrainError(f"{folder.checkpoint}: this checkpoint was made from other pairs or settings; "
                         f"remove {folder.root} to start again, or restore what it was made with")
    # (the last epoch's checkpoint holds no optimiser: training is over, only the save is left)
    trained_out = saved is not None and saved["epoch"] >= dc.epochs
    if dc.gradient_checkpointing:
        checkpoint_activations(model)
    model = add_lora(model, dc.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, dc, total_steps)
    state = load_checkpoint(folder.checkpoint, {"model": model}, {} if trained_out else {"optimizer": opt,
                                                                                         "scheduler": sched},
                            dist, allow_pickle=allow_pickle)
    dist.broadcast({"model": model})
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "epoch": 0, "position": 0, "evals": []}
    elif trained_out:
        echo(f"dpo: training had finished at step {state['step']} ({folder.checkpoint}); saving the model")
    else:
        echo(f"dpo: resuming from {folder.checkpoint} at step {state['step']} (epoch {state['epoch'] + 1}, "
             f"batch {state['position']} of {per_epoch})")
    metrics = Metrics(folder.metrics, state["step"], write=dist.is_main)
    echo(f"dpo: {len(train)} train / {len(held)} held-out pairs ({truncated} cut to {dc.max_length} tokens), "
         f"{total_steps} steps on {model_id}, beta {dc.beta}, {dc.loss} loss")

    def checkpoint(optimiser: bool = True) -> None:
        save_checkpoint(folder.checkpoint, {"model": model},
                        {"optimizer": opt, "scheduler": sched} if optimiser else {}, state, dist)

    started, trained = time.time(), 0
    bar = tqdm(total=total_steps, initial=state["step"], desc="dpo", unit="step", disable=not dist.is_main)
    for epoch in range(state["epoch"], dc.epochs):
        batches = epoch_batches(train, dc.batch_size, dc.share_prompt, dc.seed, epoch)
        for position in range(state["position"], len(batches)):
            # 4. This process's share of the batch: its losses over the whole batch's pair count.
            batch = batches[position]
            mine = dist.shard(batch)
            opt.zero_grad(set_to_none=True)
            sums = [0.0] * len(Step.NAMES)
            if mine:
                chosen, rejected, counts = pair_logps(model, [train[i] for i in mine], tok.pad_token_id, device,
                                                      dc.share_prompt, limit, amp)
                step = Step(dc, [train[i] for i in mine], ref_train[mine], chosen, rejected, counts)
                loss = step.losses.sum() / len(batch)
                sums = step.stats.sum(dim=1).tolist()
            means = [v / len(batch) for v in dist.total(*sums)]
            row = dict(zip(Step.NAMES, means))
            if not math.isfinite(row["loss"]):
                raise TrainError(f"dpo: the loss is {row['loss']} at step {state['step'] + 1}; lower dpo.lr")
            # 5. Backward, sum the processes' gradients, clip, step.
            if mine:
                loss.backward()
            dist.sum_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, dc.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            state.update(step=state["step"] + 1, position=position + 1)
            trained += len(batch)
            metrics.log(state["step"], epoch=epoch + 1, **{"train/loss": row.pop("loss"), **row, "lr": lr,
                                                           "grad_norm": grad_norm.item()})
            bar.update(1)
            bar.set_postfix(acc=f"{row['rewards/accuracies']:.2f}")
            if state["step"] % dc.checkpoint_every == 0 and position + 1 < len(batches):
                checkpoint()
        # 6. Epoch end: the held-out pairs, then the checkpoint the next epoch starts from.
        result = evaluate(model, held, ref_held, dc, tok.pad_token_id, device, limit, dist, amp)
        state["evals"].append({"epoch": epoch + 1, "step": state["step"], **(result or {})})
        if result is not None:
            metrics.log(state["step"], epoch=epoch + 1, **{f"eval/{k}": v for k, v in result.items()})
            echo(f"dpo: epoch {epoch + 1}: held-out accuracy {result['rewards/accuracies']:.3f}, "
                 f"margin {result['rewards/margins']:.4f}")
        state.update(epoch=epoch + 1, position=0)
        model.train()
        checkpoint(optimiser=epoch + 1 < dc.epochs)  # after the last epoch the optimiser is never needed again
    bar.close()
    seconds = time.time() - started
    last = state["evals"][-1] if state["evals"] else {}
    summary = {
        "model": str(folder.model), "base_model": model_id, "pairs_file": str(pairs_path),
        "pairs": {"train": len(train), "held_out": len(held), "truncated": truncated},
        "epochs": dc.epochs, "steps": state["step"], "beta": dc.beta, "loss": dc.loss,
        "accuracy": last.get("rewards/accuracies"), "margin": last.get("rewards/margins"),
        "eval_loss": last.get("loss"), "reference_seconds": round(ref_seconds, 1), "seconds": round(seconds, 1),
        "pairs_per_s": round(trained / seconds, 3) if trained and seconds > 0 else None,
    }
    return _finish(folder, model, tok, dc, summary, dist, echo)


# -- online AI feedback ---------------------------------------------------------------------------


def _read_online(path: Path, fingerprint: str) -> dict[int, dict]:
    """The steps ``online.jsonl`` holds, by step number; a torn last line is cut off (its step is
    sampled and judged again), a line from other settings refused."""
    rows: dict[int, dict] = {}
    for n, row in enumerate(whole_rows(path, cut_torn=True, remove=path.parent)):
        if row.get("fingerprint") != fingerprint:
            raise TrainError(f"{path}:{n + 1}: written by a run with other prompts, model or settings; remove "
                             f"{path.parent} to start again, or restore what it was made with")
        rows[row["step"]] = row
    return rows


def online_pairs(matrix: list[list[float]], replies: list[str], soft: bool = True) -> list[tuple[int, int, float]]:
    """(chosen, rejected, p_chosen) for every pair of distinct replies of one prompt, the judge's
    favourite as chosen (p >= 0.5). Without soft labels (every pair then counts as sure) a tie is
    left out: it would become a certainty with an arbitrary winner."""
    out = []
    for i in range(len(replies)):
        for j in range(i + 1, len(replies)):
            if replies[i].strip() == replies[j].strip():
                continue  # identical replies teach nothing
            p = matrix[i][j]
            if not soft and p == 0.5:
                continue
            out.append((i, j, p) if p >= 0.5 else (j, i, 1 - p))
    return out


def _run_online(dc: DPOConfig, layout: RunLayout, allow_pickle: bool, echo, labeller: "Labeller", device) -> dict:
    from factory.inputs import load_prompts
    from factory.store import StoreError
    from factory.train.chat import prompt_ids
    from factory.train.rollout import batch_rows, left_pad, sample, truncate_after_eos

    folder = layout.dpo
    try:
        prompts = load_prompts(dc.prompts, None, tasks=layout.tasks)
    except (FileNotFoundError, StoreError) as e:
        raise TrainError(str(e)) from None
    if not prompts:
        raise TrainError("dpo.online: no prompts (set dpo.prompts, or run instances first)")
    path, model_id = _start_model(dc, layout)
    tok = load_tokenizer(path)
    ends = end_ids(tok, path)
    if not ends:
        raise TrainError(f"{path}: no token ends the assistant's turn; online DPO could not tell a finished reply")
    eos = torch.tensor(ends, device=device)
    messages = [[{"role": "user", "content": text}] for _, text in prompts]
    # The prompt keeps its end, so that prompt + reply fit max_length: the pairs are the sampled ids as they are.
    rows = [prompt_ids(tok, m)[-(dc.max_length - dc.response_length):] for m in messages]
    amp = autocast(dc.dtype, device)
    seed_all(dc.seed)
    policy = _prepare(dc, device, path, tok, allow_pickle)
    if dc.gradient_checkpointing:
        checkpoint_activations(policy)
    if dc.lora.r:
        policy = add_lora(policy, dc.lora)
        ref, as_ref = policy, policy.disable_adapter
    else:
        ref, as_ref = copy.deepcopy(policy).requires_grad_(False).eval(), nullcontext
    params = [p for p in policy.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, dc, dc.steps)
    fingerprint = work_key({"prompts": [t for _, t in prompts], "model": model_id,
                            "judge": labeller.backend.model_id, **labeller.settings()},
                           dc.model_dump(mode="json", exclude={"device", "output", "checkpoint_every", "dtype",
                                                               "gradient_checkpointing", "pairs", "epochs",
                                                               "held_out"}))
    saved = saved_state(folder.checkpoint)
    if saved is not None and saved.get("fingerprint") != fingerprint:
        raise TrainError(f"{folder.checkpoint}: this checkpoint was made from other prompts or settings; "
                         f"remove {folder.root} to start again, or restore what it was made with")
    state = load_checkpoint(folder.checkpoint, {"model": policy}, {"optimizer": opt, "scheduler": sched},
                            allow_pickle=allow_pickle)
    start = state["step"] if state else 0
    state = state or {"fingerprint": fingerprint, "step": 0, "judge_calls": 0, "pairs": 0}
    written = _read_online(folder.online, fingerprint)
    metrics = Metrics(folder.metrics, start if start else None)
    echo(f"dpo (online): {len(prompts)} prompts, {dc.batch_size} a step x {dc.samples} samples, {dc.steps} steps on "
         f"{model_id}; judge {labeller.backend.model_id}" + (f"; resuming after step {start}" if start else ""))
    limit = 2 * dc.max_length
    started = time.time()
    policy.train()
    bar = tqdm(range(start + 1, dc.steps + 1), desc="dpo (online)", unit="step", initial=start, total=dc.steps)
    for step in bar:
        tick = time.time()
        chosen_rows = batch_rows(len(prompts), dc.batch_size, step - 1, dc.seed)
        row = written.get(step)
        t_gen = t_judge = 0.0
        fresh = row is None
        if fresh:
            # 1. Sample `samples` replies per prompt from the current policy, seeded by the step.
            t0 = time.time()
            policy.eval()
            torch.manual_seed(dc.seed * 1_000_003 + step)
            repeated = [rows[i] for i in chosen_rows for _ in range(dc.samples)]
            with torch.no_grad(), amp():
                ids, mask = left_pad(repeated, tok.pad_token_id, device)
                out, _ = sample(policy, ids, mask, dc.response_length, dc.temperature, eos)
                out, lengths, _ = truncate_after_eos(out, eos, tok.pad_token_id)
            # DPO trains on the ids sampled (through the end-of-turn token, or cut at response_length as
            # they were), the judge reads their text.
            sampled = [r[: int(n)].tolist() for r, n in zip(out, lengths)]
            texts = [tok.decode(r, skip_special_tokens=True) for r in sampled]
            groups = [texts[k * dc.samples: (k + 1) * dc.samples] for k in range(len(chosen_rows))]
            id_groups = [sampled[k * dc.samples: (k + 1) * dc.samples] for k in range(len(chosen_rows))]
            policy.train()
            t_gen = time.time() - t0
            # 2. The judge compares every pair of each prompt's replies, both orders (one batched call).
            t0 = time.time()
            before = labeller.calls
            labels = labeller.compare([messages[i] for i in chosen_rows], groups,
                                      [f"online:{step}:{i}" for i in chosen_rows])
            t_judge = time.time() - t0
            row = {"fingerprint": fingerprint, "step": step, "prompts": [prompts[i][1] for i in chosen_rows],
                   "samples": groups, "ids": id_groups, "labels": labels, "judge_calls": labeller.calls - before}
            # written before the update: a resumed run asks nobody again
            append_synced(folder.online, (json.dumps(row) + "\n").encode())
            written[step] = row
        # 3. One DPO step on every labelled pair of this step's samples.
        t0 = time.time()
        batch: list[Pair] = []
        for k, i in enumerate(chosen_rows):
            replies, ids_ = row["samples"][k], row["ids"][k]
            prompt = tuple(rows[i])
            for c, r, p in online_pairs(row["labels"][k], replies, dc.soft_labels):
                batch.append(Pair((prompt, tuple(ids_[c])), (prompt, tuple(ids_[r])), p if dc.soft_labels else 1.0, i))
        # judge/calls: the requests this step made (0 when a resumed run read the step's labels back)
        values = {"train/loss": None, "judge/calls": row["judge_calls"] if fresh else 0, "pairs": len(batch)}
        opt.zero_grad(set_to_none=True)
        grad_norm = 0.0
        if batch:
            with torch.no_grad(), as_ref():
                ref.eval()
                ref_c, ref_r, _ = pair_logps(ref, batch, tok.pad_token_id, device, dc.share_prompt, limit, amp)
            policy.train()
            chosen, rejected, counts = pair_logps(policy, batch, tok.pad_token_id, device, dc.share_prompt, limit, amp)
            result = Step(dc, batch, torch.stack([ref_c, ref_r], dim=1), chosen, rejected, counts)
            result.losses.mean().backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, dc.max_grad_norm).item()
            values |= dict(zip(Step.NAMES, result.stats.mean(dim=1).tolist()))
            values["train/loss"] = values.pop("loss")
            values["label/confidence"] = sum(x.p for x in batch) / len(batch)
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        state.update(step=step, judge_calls=state["judge_calls"] + (row["judge_calls"] if fresh else 0),
                     pairs=state["pairs"] + len(batch))
        metrics.log(step, **values, lr=lr, grad_norm=grad_norm, **{
            "time/step_s": time.time() - tick, "time/generate_s": t_gen, "time/judge_s": t_judge,
            "time/update_s": time.time() - t0})
        bar.set_postfix(pairs=len(batch))
        if step % dc.checkpoint_every == 0 or step == dc.steps:
            save_checkpoint(folder.checkpoint, {"model": policy}, {"optimizer": opt, "scheduler": sched}, state)
    bar.close()
    logged = [json.loads(line) for line in folder.metrics.read_text(encoding="utf-8").splitlines() if line]
    summary = {
        "model": str(folder.model), "base_model": model_id, "online": True, "steps": state["step"],
        "pairs": state["pairs"], "judge_model": labeller.backend.model_id, "judge_calls": state["judge_calls"],
        "beta": dc.beta, "loss": dc.loss,
        "seconds": round(time.time() - started, 1),
        "seconds_per_step": round(sum(r["time/step_s"] for r in logged) / len(logged), 3) if logged else None,
        "accuracy_end": logged[-1].get("rewards/accuracies") if logged else None,
    }
    return _finish(folder, policy, tok, dc, summary, SOLO, echo)


# -- the stage ------------------------------------------------------------------------------------


class DPO(Stage):
    name = section = "dpo"
    trains = True

    def roles(self, cfg: RunConfig):
        return ("judge",) if cfg.dpo.online else ()

    def user_files(self, cfg: RunConfig) -> list[Path]:
        dc = cfg.dpo
        if dc.online:
            return [cfg.judge.constitution] + ([Path(dc.prompts)] if dc.prompts is not None else [])
        return [Path(dc.pairs)] if dc.pairs is not None else []

    def needs(self, cfg: RunConfig, layout: RunLayout) -> list[Need]:
        dc = cfg.dpo
        if dc.online:
            if dc.prompts is None:
                return [Need(layout.tasks, "no prompts for online DPO", "run instances first, or set dpo.prompts")]
            return []
        if dc.pairs is not None:
            return []
        return [Need(layout.preferences, "no preference pairs for DPO", "run the judge stage first, or set dpo.pairs")]

    def check(self, cfg: RunConfig) -> None:
        if cfg.dpo.online:
            from factory.constitution import load_constitution

            load_constitution(cfg.judge.constitution)

    def writes(self, cfg: RunConfig, layout: RunLayout) -> list[Path]:
        return [layout.dpo.model]

    def run(self, ctx: Context) -> dict:
        labeller = None
        if ctx.cfg.dpo.online:
            from factory.feedback import Labeller

            labeller = Labeller.of(ctx.model("judge", lazy=True), ctx.cfg.judge, seed=ctx.cfg.dpo.seed)
        return run_dpo(ctx.cfg.dpo, ctx.layout, ctx.cfg.allow_pickle, ctx.echo, labeller)


STAGE = DPO()
