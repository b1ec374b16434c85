"""`factory train rm`: a reward model, Bradley-Terry on soft-labelled preference pairs.

The config is ``RewardConfig`` (factory/train/settings.py, ``[rm]`` in a run config). The pairs are
the run's ``preferences.jsonl`` (the judge's output; a K-way group appears as all its pairs) or any
file of factory's ``Preference`` records, e.g. human pairs imported with ``factory pairs import``.

The model is ``ScalarModel``: the causal LM's backbone and a linear head, read at the last token of
the response (its end-of-turn token, where PPO and rerank read it too). The loss is the Bradley-Terry
cross entropy against the judge's soft label p = P(chosen is better), with d = r_chosen - r_rejected:

    loss = -(p * log sigmoid(d) + (1 - p) * log sigmoid(-d))

so a 0.55 pair pulls the scores together far less than a 0.95 pair, and p = 1 (human labels, or
``soft_labels = false``) is the usual loss of Stiennon et al. 2020 / Ouyang et al. 2022. The pairs of
a share of the prompts are held out; pairwise accuracy and mean margin on them are logged each epoch.

Doing less work (``share_prompt``, on by default): a pair's chosen and rejected replies follow the
same prompt, and plain reward-model training (TRL's RewardTrainer) runs that prompt through the model
twice, padded to the batch's longest row. Here each prompt is run once: a row holds the prompt and
then every distinct reply to it in the batch (both of a pair; all of a K-way group), each reply
attending to the prompt and to itself but not to the other replies, with position ids that restart
after the prompt. That is the same computation as separate rows, token for token (a test checks the
scores against the plain path), on fewer tokens. Batches are also built from pairs of similar length,
so little padding is computed.

After training, the reward is normalised: the mean raw score of a reference set (the run's SFT data,
by default) is stored as the model's bias, so references score 0 on average and PPO's rewards are
centred (Stiennon et al. 2020, "normalize the reward model so that the reference summaries have a
mean score of 0").

Several processes (``accelerate launch --multi_gpu --num_processes N``, or torchrun): ``batch_size``
stays the pairs of one optimiser step; each process takes a share of the batch, and its loss is its
pairs' summed loss over the whole batch's pair count, so the summed gradients are those of the batch
mean (``distributed.Dist``). Held-out evaluation and the normalisation are split between them too.

Output under ``<run>/<rm.output>/``: ``checkpoint/`` (every ``checkpoint_every`` steps and each epoch
end; the run resumes from it exactly), ``metrics.jsonl``, ``eval.json`` and ``model/`` (a ScalarModel
folder with its tokenizer, LoRA merged in).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from factory.layout import RunLayout
from factory.inputs import load_preferences
from factory.records import file_sha256, work_key
from factory.stage import Context, Need, Stage
from factory.train import TrainError
from factory.train.chat import read_messages
from factory.train.checkpoints import load_checkpoint, save_checkpoint, saved_state
from factory.train.distributed import SOLO, Dist, processes
from factory.train.finish import finished, save_final
from factory.train.metrics import Metrics
from factory.train.models import SCALAR_META, ScalarModel, add_lora, load_tokenizer, resolve_model
from factory.train.optim import make_optimizer, seed_all
from factory.train.pairs import Pair, epoch_batches, make_pairs, split_by_prompt
from factory.train.precision import autocast, checkpoint_activations, releases_memory
from factory.train.scoring import score, seq_scores
from factory.train.settings import RewardConfig

if TYPE_CHECKING:
    from factory.config import RunConfig

def bt_loss(d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry cross entropy against soft labels, mean over the batch.

    d = r_chosen - r_rejected, p = P(chosen is better). logsigmoid keeps it finite for large |d|.
    """
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d)).mean()


def batch_loss(model: ScalarModel, batch: list[Pair], pad_id: int, device: torch.device, share_prompt: bool,
               limit: int, amp=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """(the batch's loss, d = r_chosen - r_rejected per pair), in float32 whatever ``amp``."""
    n = len(batch)
    scores = seq_scores(model, [x.chosen for x in batch] + [x.rejected for x in batch], pad_id, device,
                        share_prompt, limit, amp)
    d = scores[:n] - scores[n:]
    p = torch.tensor([x.p for x in batch], dtype=d.dtype, device=device)
    return bt_loss(d, p), d


@torch.no_grad()
def evaluate(model: ScalarModel, pairs: list[Pair], batch_size: int, pad_id: int, device: torch.device,
             share_prompt: bool, limit: int, dist: Dist = SOLO, amp=nullcontext) -> dict | None:
    """Held-out pairwise accuracy (r_chosen > r_rejected), mean margin and loss; None with no pairs.
    Each process scores its share of the batches."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    ds, ps = [], []
    for batch in dist.shard(epoch_batches(pairs, batch_size, share_prompt, 0, 0)):
        _, d = batch_loss(model, [pairs[i] for i in batch], pad_id, device, share_prompt, limit, amp)
        ds.append(d)
        ps += [pairs[i].p for i in batch]
    means = [0.0, 0.0, 0.0]
    if ds:
        d = torch.cat(ds)
        loss = bt_loss(d, torch.tensor(ps, dtype=d.dtype, device=d.device))
        means = [(d > 0).float().mean().item(), d.mean().item(), loss.item()]
    # Means over this process's pairs, weighted by their count into means over all the pairs.
    *sums, count = dist.total(*(m * len(ps) for m in means), len(ps))
    model.train(was_training)
    return dict(zip(("accuracy", "margin", "loss"), (v / count for v in sums)))


# -- the trainer ----------------------------------------------------------------------------------


@releases_memory
def run_reward(settings: RewardConfig, layout: RunLayout, allow_pickle: bool = False,
               echo: Callable[[str], None] = print) -> dict:
    """Train a reward model on ``settings.pairs`` (default: the run's preference pairs) into
    ``layout.rm``; returns the summary (also in ``layout.rm.summary``). A finished run returns its
    summary at once."""
    rc = settings
    dist, device = processes(rc.device)
    echo = dist.main_only(echo)
    folder = layout.rm
    final, ckpt, eval_file = folder.model, folder.checkpoint, folder.evaluation

    def legacy() -> dict:  # a run finished before trainers wrote summary.json: its summary is in eval.json
        return json.loads(eval_file.read_text())["summary"] if eval_file.is_file() else {"model": str(final)}

    done = finished(folder, SCALAR_META, legacy)
    if done is not None:
        echo(f"rm: already finished; the model is in {final} (remove {folder.root} to train again)")
        return {**done, "already_finished": True}

    pairs_path = Path(rc.pairs) if rc.pairs is not None else layout.preferences
    if not pairs_path.is_file():
        raise TrainError(f"{pairs_path}: no preference pairs; run the judge stage first, or set rm.pairs "
                         "(a JSONL of factory's preference records)")
    prefs = load_preferences(pairs_path, TrainError)
    if not prefs:
        raise TrainError(f"{pairs_path}: no preference pairs in the file; run the judge stage first, "
                         "or set rm.pairs")
    path, model_id = resolve_model(rc.model)
    tok = load_tokenizer(path)
    # A row of packed replies holds at most two full pairs' worth: a pair always fits in one row.
    limit = 2 * rc.max_length

    # 1. Tokenise (prompt end and reply start kept at max_length) and hold out whole prompts.
    pairs, truncated = make_pairs(tok, prefs, rc.max_length, rc.soft_labels)
    train_idx, held_idx = split_by_prompt(pairs, rc.held_out, rc.seed)
    train = [pairs[i] for i in train_idx]
    held = [pairs[i] for i in held_idx]
    per_epoch = math.ceil(len(train) / rc.batch_size)
    total_steps = per_epoch * rc.epochs

    # 2. A checkpoint must come from these pairs and settings, or the run would mix two.
    fingerprint = work_key({"pairs": file_sha256(pairs_path), "model": model_id},
                           rc.model_dump(mode="json", exclude={"device", "pairs", "output", "reference",
                                                               "checkpoint_every", "dtype", "gradient_checkpointing"}))
    saved = saved_state(ckpt)
    if saved is not None and saved["fingerprint"] != fingerprint:
        raise TrainError(f"{ckpt}: this checkpoint was made from other pairs or settings; "
                         f"remove {folder.root} to start again, or restore what it was made with")
    trained_out = saved is not None and saved["epoch"] >= rc.epochs

    # 3. Model: backbone + fresh scalar head (seeded), LoRA on the backbone if asked (the head
    # is outside the adapters' wrapper, so it stays trainable); optimiser and schedule; resume.
    # Weights in float32; forward passes in bf16 on CUDA, the head in float32 (`dtype`, precision.autocast).
    seed_all(rc.seed)
    amp = autocast(rc.dtype, device)
    model = ScalarModel.from_pretrained(path, device, tok, allow_pickle=allow_pickle)
    if rc.gradient_checkpointing:
        checkpoint_activations(model.backbone)
    model.backbone = add_lora(model.backbone, rc.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = make_optimizer(params, rc, total_steps)
    state = load_checkpoint(ckpt, {"model": model}, {} if trained_out else {"optimizer": opt, "scheduler": sched},
                            dist, allow_pickle=allow_pickle)
    dist.broadcast({"model": model})
    if state is None:
        state = {"fingerprint": fingerprint, "step": 0, "epoch": 0, "position": 0, "evals": []}
    elif trained_out:
        echo(f"rm: training had finished at step {state['step']} ({ckpt}); normalising and saving the model")
    else:
        echo(f"rm: resuming from {ckpt} at step {state['step']} (epoch {state['epoch'] + 1}, "
             f"batch {state['position']} of {per_epoch})")
    metrics = Metrics(folder.metrics, state["step"], write=dist.is_main)
    echo(f"rm: {len(train)} train / {len(held)} held-out pairs ({truncated} cut to {rc.max_length} tokens), "
         f"{total_steps} steps on {model_id}")

    def checkpoint() -> None:
        save_checkpoint(ckpt, {"model": model}, {"optimizer": opt, "scheduler": sched}, state, dist)

    started, trained = time.time(), 0
    bar = tqdm(total=total_steps, initial=state["step"], desc="rm", unit="step", disable=not dist.is_main)
    for epoch in range(state["epoch"], rc.epochs):
        batches = epoch_batches(train, rc.batch_size, rc.share_prompt, rc.seed, epoch)
        for position in range(state["position"], len(batches)):
            batch = [train[i] for i in batches[position]]
            # 4. Forward: scores of both replies (prompt run once), soft Bradley-Terry loss. With several
            # processes, this one's share of the batch: its means weighted by its share of the pairs.
            mine = dist.shard(batch)
            weight = len(mine) / len(batch)
            opt.zero_grad(set_to_none=True)
            shares = [0.0, 0.0, 0.0]
            if mine:
                loss, d = batch_loss(model, mine, tok.pad_token_id, device, rc.share_prompt, limit, amp)
                loss = loss * weight
                shares = [loss.item(), (d > 0).float().mean().item() * weight, d.mean().item() * weight]
            train_loss, accuracy, margin = dist.total(*shares)  # shares of the batch's means add up to them
            if not math.isfinite(train_loss):
                raise TrainError(f"rm: the loss is {train_loss} at step {state['step'] + 1}; lower rm.lr")
            # 5. Backward, sum the processes' gradients, clip, step.
            if mine:
                loss.backward()
            dist.sum_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, rc.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            # 6. Log; checkpoint every so often within the epoch (its end checkpoints below).
            state.update(step=state["step"] + 1, position=position + 1)
            trained += len(batch)
            metrics.log(state["step"], epoch=epoch + 1, **{
                "train/loss": train_loss, "train/accuracy": accuracy, "train/margin": margin, "lr": lr,
                "grad_norm": grad_norm.item()})
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}")
            if state["step"] % rc.checkpoint_every == 0 and position + 1 < len(batches):
                checkpoint()
        # 7. Epoch end: held-out accuracy and margin, then the checkpoint the next epoch starts from.
        result = evaluate(model, held, rc.batch_size, tok.pad_token_id, device, rc.share_prompt, limit, dist, amp)
        state["evals"].append({"epoch": epoch + 1, "step": state["step"], **(result or {})})
        if result is not None:
            metrics.log(state["step"], epoch=epoch + 1, **{f"eval/{k}": v for k, v in result.items()})
            echo(f"rm: epoch {epoch + 1}: held-out accuracy {result['accuracy']:.3f}, margin {result['margin']:.3f}")
        state.update(epoch=epoch + 1, position=0)
        if epoch + 1 < rc.epochs:
            checkpoint()
        else:  # training is over: the optimiser is never needed again (and is 2/3 of the bytes)
            save_checkpoint(ckpt, {"model": model}, {}, state, dist)
    bar.close()
    seconds = time.time() - started

    # 8. Normalise: the references' mean raw score becomes the bias, so they score 0 on average.
    sft_file = layout.sft_data
    refs: list[list[dict[str, str]]] = []
    if rc.reference is not None:
        refs, normalised_on = read_messages(Path(rc.reference)), str(rc.reference)
        if not refs:
            raise TrainError(f"{rc.reference}: no conversations to normalise the reward on")
    elif sft_file.is_file():
        refs, normalised_on = read_messages(sft_file), str(sft_file)
    if not refs:
        # A K-way group's chosen replies repeat across its pairs: each counts once.
        unique = {json.dumps([*prefs[i].messages, {"role": "assistant", "content": prefs[i].chosen}]): None
                  for i in train_idx}
        refs, normalised_on = [json.loads(c) for c in unique], f"the chosen replies of {pairs_path}"
    model.bias = 0.0
    try:
        with amp():
            raw = score(model, tok, dist.shard(refs), 2 * rc.batch_size, rc.max_length, device)
    except TrainError as e:
        raise TrainError(f"{normalised_on}: {e}") from None
    raw_sum, count = dist.total(sum(raw), len(raw))  # each process scores its share of the references
    model.bias = raw_sum / count

    # 9. Save: eval.json and summary.json, then model/ (written aside, then renamed), so a model/ folder
    # means the run finished.
    last = state["evals"][-1] if state["evals"] else {}
    summary = {
        "model": str(final), "base_model": model_id, "pairs_file": str(pairs_path),
        "pairs": {"train": len(train), "held_out": len(held), "truncated": truncated},
        "epochs": rc.epochs, "steps": state["step"], "accuracy": last.get("accuracy"), "margin": last.get("margin"),
        "bias": model.bias, "normalised_on": normalised_on, "references": len(refs),
        "seconds": round(seconds, 1), "pairs_per_s": round(trained / seconds, 3) if trained and seconds > 0 else None,
    }

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp, normalised_on=normalised_on, references=len(refs), base_model=model_id,
                              pairs=str(pairs_path), max_length=rc.max_length)
        tok.save_pretrained(tmp)

    save_final(folder, summary, write_model, dist, {eval_file: {"epochs": state["evals"], "summary": summary}})
    acc = f"held-out accuracy {last['accuracy']:.3f}, " if last.get("accuracy") is not None else ""
    echo(f"rm: {state['step']} steps, {acc}bias {model.bias:.4f} -> {final}")
    return summary


class Reward(Stage):
    name = section = "rm"
    trains = True

    def user_files(self, cfg: RunConfig) -> list[Path]:
        return [Path(f) for f in (cfg.rm.pairs, cfg.rm.reference) if f is not None]

    def needs(self, cfg: RunConfig, layout: RunLayout) -> list[Need]:
        if cfg.rm.pairs is not None:
            return []
        return [Need(layout.preferences, "no preference pairs to train the reward model on",
                     "run the judge stage first, or set rm.pairs")]

    def writes(self, cfg: RunConfig, layout: RunLayout) -> list[Path]:
        return [layout.rm_model]

    def run(self, ctx: Context) -> dict:
        return run_reward(ctx.cfg.rm, ctx.layout, ctx.cfg.allow_pickle, ctx.echo)


STAGE = Reward()
