"""Loading what the trainers train: the tokenizer, causal LMs, LoRA adapters, the device, and
``ScalarModel`` (a backbone with a linear head: the reward model and PPO's value model).

Nothing here unpickles: weights load from safetensors only (``use_safetensors``) unless the user
passes ``allow_pickle``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.train import TrainError
from factory.train.settings import LoraSettings

CONFIG_FILE = "config.json"
"""a transformers model folder's config: a folder holding one holds a model"""
HEAD_FILE = "scalar_head.safetensors"
SCALAR_META = "scalar_model.json"


def is_model(folder: str | Path) -> bool:
    """Whether ``folder`` holds a saved model (a transformers model folder: its config is written with it)."""
    return (Path(folder) / CONFIG_FILE).is_file()


def resolve_model(model: str) -> tuple[str, str]:
    """(folder or hub id to load, model id for the records) of ``embedded`` or a path."""
    from factory.llm.embedded import resolve_model as resolve

    try:
        return resolve(model, "hf")
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None


def pick_device(device: str, local_rank: int | None = None) -> torch.device:
    """The torch device of a ``device`` setting; with ``local_rank`` (one of several processes on
    this machine), CUDA means this process's own GPU, as ``accelerate launch`` and torchrun expect."""
    if device == "auto":
        # `accelerate launch --cpu` asks for the CPU even where there is a GPU.
        cpu_asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        device = "cuda" if torch.cuda.is_available() and not cpu_asked else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {device!r} asked for, but torch sees no CUDA device (use 'cpu' or 'auto')")
    if dev.type == "cuda" and local_rank is not None:
        if dev.index is not None:
            raise TrainError(f"device {device!r} names one GPU, but several processes were launched; "
                             "use 'auto' or 'cuda' (each process takes the GPU of its local rank)")
        dev = torch.device("cuda", local_rank)
    return dev


def end_ids(tok, path: str | Path | None = None) -> list[int]:
    """The ids that end an assistant turn for this tokenizer (and the generation config saved in
    the model folder ``path``, if any): see ``factory.llm.base.end_of_turn_ids``."""
    from factory.llm.base import end_of_turn_ids

    gen = None
    if path is not None:
        from transformers import GenerationConfig

        try:  # a folder's generation_config.json, or a hub id's in the local cache
            gen = GenerationConfig.from_pretrained(str(path))
        except (OSError, ValueError):  # the model has none
            gen = None
    return end_of_turn_ids(tok, gen)


def load_tokenizer(path: str):
    """The model's tokenizer with a pad token that ends no turn, padding on the right.

    Masks are always built from lengths, but a pad id equal to EOS (or to another token that
    ends a turn, such as ``<|im_end|>``) would still make every "find the first end" scan stop
    on padding; so pad gets its own id: the unknown-token id when the model has one (SmolLM2's
    ``<|endoftext|>``), else a new token (``fit_embeddings`` then grows the model's embedding table).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.chat_template is None:
        raise TrainError(f"model {path!r} has no chat template; factory trains on chat messages")
    ends = set(end_ids(tok, path))
    if tok.pad_token_id is None or tok.pad_token_id in ends:
        if tok.unk_token_id is not None and tok.unk_token_id not in ends:
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


def _weight_options(path: str, allow_pickle: bool) -> dict:
    from factory.llm.hf import weight_options

    try:
        return weight_options(path, allow_pickle)
    except ValueError as e:
        raise TrainError(str(e)) from None


def load_causal_lm(path: str, device: torch.device, tok=None, allow_pickle: bool = False):
    """A causal LM for training, from safetensors (pickled weights only with ``allow_pickle``); its
    weights in float32 whatever the ``dtype`` setting (``autocast`` says why)."""
    from transformers import AutoModelForCausalLM

    safe = _weight_options(path, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **safe)
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
    def from_pretrained(cls, path: str | Path, device: torch.device, tok=None,
                        allow_pickle: bool = False) -> "ScalarModel":
        """A saved scalar model (its head and bias too), or any causal LM (a fresh head); weights
        from safetensors (pickled ones only with ``allow_pickle``)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        local = Path(str(path))
        safe = _weight_options(str(path), allow_pickle)
        try:
            backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32, **safe)
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
        return self.head_scores(hidden).squeeze(-1)

    def head_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head on hidden states, in float32 even under bf16 autocast: a reward is read as a
        difference of two scores (Bradley-Terry) or of values (GAE), and bf16's 8 bits of
        mantissa would round a score of 5 to a multiple of 1/32. On float32 hidden states with no
        autocast this is exactly ``self.head(hidden)``."""
        with torch.autocast(hidden.device.type, enabled=False):
            return self.head(hidden.float())

    def last_scores(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(batch,) normalised scores at each row's last real token (rows padded on the right)."""
        scores = self.token_scores(ids, mask)
        last = mask.sum(dim=1) - 1
        return scores[torch.arange(ids.shape[0], device=ids.device), last] - self.bias
