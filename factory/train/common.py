"""What the trainers share: loading models and tokenizer, chat tokenisation, the scalar-head
model (reward and value), LoRA, optimiser schedule, checkpoints that resume exactly, metrics.

Checkpoints never hold pickled objects a loader must trust: weights are safetensors, and the
optimiser, scheduler and RNG states are read back with ``torch.load(weights_only=True)``,
which only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.train import TrainError
from factory.train.settings import Common, LoraSettings

HEAD_FILE = "scalar_head.safetensors"
SCALAR_META = "scalar_model.json"


# -- models and tokenizer -----------------------------------------------------------------------


def resolve_model(model: str) -> tuple[str, str]:
    """(folder or hub id to load, model id for the records) of ``embedded`` or a path."""
    from factory.llm.embedded import resolve_model as resolve

    try:
        return resolve(model, "hf")
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {device!r} asked for, but torch sees no CUDA device (use 'cpu' or 'auto')")
    return dev


def load_tokenizer(path: str):
    """The model's tokenizer with a pad token that is not EOS, padding on the right.

    Masks are always built from lengths, but a pad id equal to EOS would still make
    every "find the first EOS" scan stop on padding; so pad gets its own id: the
    unknown-token id when the model has one (SmolLM2's ``<|endoftext|>``), else a new
    token (``fit_embeddings`` then grows the model's embedding table).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise TrainError(f"model {path!r} has no chat template; factory trains on chat messages")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        if tok.unk_token_id is not None and tok.unk_token_id != tok.eos_token_id:
            tok.pad_token = tok.unk_token
        else:
            tok.add_special_tokens({"pad_token": "<|pad|>"})
    tok.padding_side = "right"
    return tok


def fit_embeddings(model, tok) -> None:
    if model.get_input_embeddings().weight.shape[0] < len(tok):
        model.resize_token_embeddings(len(tok))


def no_dropout(model: nn.Module) -> nn.Module:
    """Dropout off everywhere: with it, the log-probs of a PPO rollout and of its update differ
    for the same weights, and the ratio is no longer 1 at the first step (Huang et al. 2022)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    return model


def add_lora(model: nn.Module, lora: LoraSettings, adapter: str = "default"):
    """Wrap ``model`` with LoRA adapters (frozen base) when ``lora.r`` > 0; else return it as is."""
    if lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=lora.target_modules)
    return get_peft_model(model, config, adapter_name=adapter)


def load_causal_lm(path: str, device: torch.device, tok=None):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise TrainError(f"cannot load model {path!r}: {e}") from None
    if tok is not None:
        fit_embeddings(model, tok)
    return no_dropout(model).to(device)


class ScalarModel(nn.Module):
    """A causal LM's backbone with a linear head: one number per token.

    The reward model reads it at the last real token of a response; the PPO value model
    (initialised from the reward model) reads it at every response token. ``bias`` is the
    reward model's normalisation: the mean raw score of a reference set, subtracted so
    that the references score 0 on average.
    """

    def __init__(self, backbone: nn.Module, bias: float = 0.0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        # A small head so the first scores are near zero (std 1/sqrt(d+1), as in Stiennon et al. 2020).
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(hidden + 1))
        nn.init.zeros_(self.head.bias)
        self.bias = bias

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device, tok=None) -> "ScalarModel":
        """A saved scalar model (its head and bias too), or any causal LM (a fresh head)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        local = Path(str(path))
        try:
            backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32)
        except OSError as e:
            raise TrainError(f"cannot load model {str(path)!r}: {e}") from None
        if tok is not None:
            fit_embeddings(backbone, tok)
        model = cls(no_dropout(backbone))
        if (local / HEAD_FILE).is_file():
            model.head.load_state_dict(load_file(str(local / HEAD_FILE)))
            model.bias = json.loads((local / SCALAR_META).read_text())["bias"]
        return model.to(device)

    def save_pretrained(self, path: Path, **meta: Any) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        backbone = self.backbone.merge_and_unload() if hasattr(self.backbone, "merge_and_unload") else self.backbone
        backbone.save_pretrained(path, safe_serialization=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, str(path / HEAD_FILE))
        (path / SCALAR_META).write_text(json.dumps({"bias": self.bias, **meta}, indent=2) + "\n")

    def token_scores(self, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
        """(batch, length) raw scores, one per position (no bias)."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask, use_cache=False, **kw).last_hidden_state
        return self.head(hidden).squeeze(-1)

    def last_scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch,) normalised scores at each row's last real token (rows padded on the right)."""
        scores = self.token_scores(ids, mask)
        last = mask.sum(dim=1) - 1
        return scores[torch.arange(ids.shape[0], device=ids.device), last] - self.bias


# -- chat tokenisation --------------------------------------------------------------------------


def _render(tok, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)


def prompt_ids(tok, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation up to where the assistant's reply begins."""
    return tok(_render(tok, messages, True), add_special_tokens=False)["input_ids"]


def chat_ids(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, mask) of a whole conversation; the mask is 1 on every assistant turn's tokens,
    including the end-of-turn token, so the model learns to stop.

    The conversation is rendered turn by turn and each assistant turn's text is what the
    template adds after the generation prompt, so no token is guessed from string offsets.
    """
    ids: list[int] = []
    mask: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tok, messages[:i], True)
        upto = _render(tok, messages[: i + 1], False)
        if not before.startswith(done) or not upto.startswith(before):
            raise TrainError("the chat template does not render turn by turn; cannot find the assistant tokens")
        context = tok(before[len(done):], add_special_tokens=False)["input_ids"]
        reply = tok(upto[len(before):], add_special_tokens=False)["input_ids"]
        ids += context + reply
        mask += [0] * len(context) + [1] * len(reply)
        done = upto
    if not ids:
        raise TrainError("a conversation has no assistant message to learn from")
    return ids, mask


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def length_mask(rows: list[list[int]]) -> torch.Tensor:
    return pad_right([[1] * len(r) for r in rows], 0)


# -- optimiser ----------------------------------------------------------------------------------


def make_optimizer(params, cfg: Common, total_steps: int):
    params = [p for p in params if p.requires_grad]
    # The fused kernel: one pass per tensor instead of several (~5x faster on CPU for a 135M model);
    # transformers' Trainer, hence TRL, uses it by default since torch 2.8.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        left = max(1, total_steps - cfg.warmup_steps)
        done = min(1.0, (step - cfg.warmup_steps) / left)
        return 1.0 - done if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * done))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# -- checkpoints --------------------------------------------------------------------------------

STATE_FILE = "trainer_state.pt"


def save_checkpoint(folder: Path, modules: dict[str, nn.Module], stateful: dict[str, Any], state: dict) -> None:
    """Write a resumable checkpoint atomically: a kill mid-write leaves the previous one whole.

    ``modules``: weights (only the trainable ones matter, but all are saved as safetensors);
    ``stateful``: objects with ``state_dict`` (optimiser, scheduler, KL controller);
    ``state``: JSON-able counters (step, epoch, position in the data). RNG states are added.
    """
    from safetensors.torch import save_model

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        save_model(module, str(tmp / f"{name}.safetensors"))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"stateful": {k: v.state_dict() for k, v in stateful.items()}, "rng": rng}, tmp / STATE_FILE)
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], stateful: dict[str, Any]) -> dict | None:
    """Restore a checkpoint written by ``save_checkpoint``; None when there is none."""
    from safetensors.torch import load_model

    if not (folder / "state.json").is_file():
        old = folder.with_name(folder.name + ".old")  # a kill between the two renames
        if not (old / "state.json").is_file():
            return None
        folder = old
    for name, module in modules.items():
        load_model(module, str(folder / f"{name}.safetensors"))
    saved = torch.load(folder / STATE_FILE, weights_only=True)
    for k, v in stateful.items():
        v.load_state_dict(saved["stateful"][k])
    torch.set_rng_state(saved["rng"]["torch"])
    py = saved["rng"]["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return json.loads((folder / "state.json").read_text())


class Metrics:
    """metrics.jsonl: one line per logged step. On resume, lines past the checkpoint's step
    are dropped (they will be logged again), so the file never holds a step twice."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a kill
                if row.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, path)
        self.start = time.time()

    def log(self, step: int, **values: Any) -> dict:
        row = {"step": step, "elapsed_s": round(time.time() - self.start, 3), **values}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        return row


def read_messages(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL of {'messages': [{'role', 'content'}, ...]} (sft.jsonl's shape)."""
    from factory.store import StoreError, input_objects

    expected = "an object with 'messages': a list of {'role', 'content'} with an assistant turn"
    out = []
    try:
        for number, obj in input_objects(path, expected):
            msgs = obj.get("messages") if isinstance(obj, dict) else None
            ok = isinstance(msgs, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
            )
            if not ok or not any(m["role"] == "assistant" for m in msgs):
                raise TrainError(f"{path}:{number}: expected {expected}")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
    except StoreError as e:
        raise TrainError(str(e)) from None
    except FileNotFoundError:
        raise TrainError(f"{path}: no such file") from None
    return out
