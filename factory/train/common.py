"""What the trainers share: loading models and tokenizer, chat tokenisation, the scalar-head
model (reward and value), LoRA, optimiser schedule, several processes (``Dist``), checkpoints
that resume exactly, metrics.

Nothing here unpickles: model weights load from safetensors only (``use_safetensors``) unless
the user passes ``allow_pickle``, and a checkpoint's optimiser, scheduler and RNG states are
safetensors plus JSON (``flatten_state``), so resuming never runs code from a file.
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import math
import os
import random
import shutil
import time
import warnings
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

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


# -- precision and memory -----------------------------------------------------------------------


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


# -- several processes --------------------------------------------------------------------------

BUCKET = 1 << 24
"""Gradient elements summed per collective: DDP's default bucket is 25 MB (~6.5M float32 values);
larger buckets mean fewer round trips and little extra memory next to the model's own."""


def _env_int(names: tuple[str, ...], default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


class Dist:
    """This process's place among the training processes, and the few collectives the trainers use.

    One process (plain ``factory train``): rank 0 of 1, and every method returns at once without
    touching its input, so a single-process run computes exactly what it did before. Several
    (``accelerate launch --multi_gpu --num_processes N``, or torchrun): each process trains on its
    share of every batch. A trainer divides each share's summed loss by the whole batch's count
    (tokens, pairs), so ``sum_grads``, which adds the processes' gradients, gives the gradient of
    the whole batch's mean, as one process computes it; every process then takes the same optimiser
    step and the weights stay identical. Rank 0 alone writes files; the others wait at a barrier.

    Gradients are summed here rather than by wrapping the models in DistributedDataParallel: DDP
    syncs only through the wrapper's own forward, while the trainers call submodules (the scalar
    head, the backbone), sample with a number of forward calls that differs between processes,
    and save checkpoints under their modules' own names.
    """

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def main_only(self, echo: Callable[..., None]) -> Callable[..., None]:
        """``echo`` on rank 0 and a no-op elsewhere: one progress report, not one per process."""
        return echo if self.is_main else (lambda *_, **__: None)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def shard(self, items: Sequence) -> list:
        """This process's contiguous share of ``items`` (sizes differ by one at most; a share may
        be empty). Contiguous, so a reward-model batch's pairs of one prompt mostly stay together."""
        size, extra = divmod(len(items), self.world)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start: start + size + (self.rank < extra)])

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` summed over the processes (a new tensor; ``x`` itself with one process)."""
        if self.world == 1:
            return x
        x = x.detach().clone()
        torch.distributed.all_reduce(x)
        return x

    def total(self, *values: float) -> list[float]:
        """Plain numbers summed over the processes, in one collective."""
        if self.world == 1:
            return list(values)
        # A CPU tensor: gloo carries it, even where NCCL carries the gradients.
        return self.sum(torch.tensor(values, dtype=torch.float64)).tolist()

    def sum_grads(self, params: Sequence[nn.Parameter]) -> None:
        """Replace every gradient by its sum over the processes, in buckets of ``BUCKET`` values.

        A process whose share did not reach a parameter (an empty share) has no gradient for it:
        zeros stand in; a parameter no process reached keeps none, so AdamW skips it as it would
        with one process.
        """
        if self.world == 1:
            return
        reached = self.sum(torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                                        device=params[0].device))
        bucket: list[torch.Tensor] = []
        size = 0
        for p, n in zip(params, reached.tolist()):
            if not n:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p.grad)
            size += p.numel()
            if size >= BUCKET:
                self._sum_in_place(bucket)
                bucket, size = [], 0
        if bucket:
            self._sum_in_place(bucket)

    def _sum_in_place(self, tensors: list[torch.Tensor]) -> None:
        flat = self.sum(torch.cat([t.reshape(-1) for t in tensors]))
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))

    def broadcast(self, modules: dict[str, nn.Module]) -> None:
        """Rank 0's weights to every process (as DDP does at start): the processes build their
        models from the same files and seed, and this makes their starting point one by construction."""
        if self.world > 1:
            for module in modules.values():
                for t in module.state_dict().values():
                    torch.distributed.broadcast(t, src=0)

    def gather(self, obj: Any) -> list | None:
        """Every process's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def check_same(self, modules: dict[str, nn.Module]) -> None:
        """Raise if the processes' weights differ: a checkpoint holds rank 0's alone, so it must be
        everyone's. One collective of a checksum per tensor, with a tolerance for processes that
        sum in a different order (other thread counts)."""
        if self.world == 1:
            return
        sums = torch.stack([t.detach().double().sum() for m in modules.values() for t in m.state_dict().values()
                            if t.is_floating_point()])
        both = torch.cat([sums, -sums])
        torch.distributed.all_reduce(both, op=torch.distributed.ReduceOp.MAX)
        high, low = both[: len(sums)], -both[len(sums):]
        if not torch.allclose(high, low, rtol=1e-9, atol=1e-9):
            raise TrainError("the training processes' weights have drifted apart; this is a bug in factory, "
                             "please report it")


SOLO = Dist()
"""A single process: what the trainers' helpers assume when no ``Dist`` is passed."""


def processes(device: str) -> tuple[Dist, torch.device]:
    """(this process's ``Dist``, its device), joining the other processes when it was launched as one
    of several: ``accelerate launch --multi_gpu`` and torchrun set RANK and WORLD_SIZE (with
    MASTER_ADDR/PORT); ``accelerate launch --cpu --mpirun_hostfile`` sets MPI's own variables."""
    for key, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(key, "").lower() in ("1", "true", "yes"):
            warnings.warn(f"accelerate asked for {name}, but factory's trainers keep a whole copy of each model "
                          "on every process (data parallel); the launch's sharding settings are not used", stacklevel=2)
    world = _env_int(("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"), 1)
    if world == 1:
        return SOLO, pick_device(device)
    rank = _env_int(("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"), 0)
    local_rank = _env_int(("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"), 0)
    dev = pick_device(device, local_rank)
    if not torch.distributed.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # NCCL for CUDA tensors; gloo for CPU ones (and for the pickled objects `gather` sends).
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, rank=rank, world_size=world)
        atexit.register(torch.distributed.destroy_process_group)
    return Dist(rank, world), dev


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

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
PICKLED_STATE = "trainer_state.pt"
"""the pickle (torch.save) file of checkpoints written before the safetensors + JSON format"""


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def flatten_state(obj: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """(JSON-able skeleton, tensors by name) of nested optimiser / scheduler / RNG state.

    Every tensor goes into the tensors dict under its path (``stateful/optimizer/state/0/exp_avg``)
    and the skeleton holds ``{"__tensor__": path}`` in its place. Python values JSON cannot tell
    apart are tagged: a tuple is ``{"__tuple__": [...]}`` (AdamW's ``betas``, ``random.getstate()``),
    a dict whose keys are not all plain strings is ``{"__dict__": [[key, value], ...]}`` (an
    optimiser's state is keyed by parameter index, and ``load_state_dict`` matches on the int).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            name = path
            while name in tensors:  # only if a key itself holds '/': keep both
                name += "+"
            tensors[name] = x.detach().to("cpu").contiguous()
            return {"__tensor__": name}
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, f"{path}/{k}") for k, v in x.items()}
            for k in x:
                if not (k is None or isinstance(k, (bool, int, float, str))):
                    raise TypeError(f"checkpoint state at {path or '/'}: a {type(k).__name__} key cannot be saved")
            return {"__dict__": [[k, walk(v, f"{path}/{k}")] for k, v in x.items()]}
        raise TypeError(f"checkpoint state at {path or '/'}: a {type(x).__name__} cannot be saved "
                        "(only tensors, numbers, strings, None, lists, tuples and dicts)")

    return walk(obj, ""), tensors


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The nested state ``flatten_state`` took apart, tuples and int keys as they were."""
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__dict__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    return skeleton


def save_checkpoint(folder: Path, modules: dict[str, nn.Module], stateful: dict[str, Any], state: dict,
                    dist: Dist = SOLO) -> None:
    """Write a resumable checkpoint atomically: a kill mid-write leaves the previous one whole.

    ``modules``: weights (only the trainable ones matter, but all are saved as safetensors);
    ``stateful``: objects with ``state_dict`` (optimiser, scheduler, KL controller);
    ``state``: JSON-able counters (step, epoch, position in the data). RNG states are added, one
    per process (PPO's processes sample from streams of their own). Every process calls this;
    rank 0 writes, the others wait until the checkpoint is whole.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file, save_model

    dist.check_same(modules)
    rngs = dist.gather(_rng_state())
    if dist.is_main:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            for name, module in modules.items():
                save_model(module, str(tmp / f"{name}.safetensors"))
            state_dicts = {k: v.state_dict() for k, v in stateful.items()}
            skeleton, tensors = flatten_state({"stateful": state_dicts, "rng": rngs})
            save_file(tensors, str(tmp / STATE_TENSORS))
            (tmp / STATE_JSON).write_text(json.dumps(skeleton) + "\n")
            (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        except (OSError, SafetensorError) as e:  # a full disk: safetensors reports it as its own error
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainError(f"{folder}: could not write the checkpoint ({e}); the previous one is kept: free some "
                             "space and run the same command again to resume from it") from e
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def _read_state(folder: Path, allow_pickle: bool) -> dict:
    """The optimiser/scheduler/RNG state of a checkpoint folder: safetensors + JSON; a pickle
    (``trainer_state.pt``, the old format) only when ``allow_pickle`` says the user trusts it."""
    from safetensors.torch import load_file

    if (folder / STATE_JSON).is_file():
        skeleton = json.loads((folder / STATE_JSON).read_text())
        return unflatten_state(skeleton, load_file(str(folder / STATE_TENSORS)))
    pickled = folder / PICKLED_STATE
    if pickled.is_file() and allow_pickle:
        # weights_only: even a trusted pickle is read with torch's restricted unpickler.
        try:
            return torch.load(pickled, weights_only=True)
        except Exception as e:  # the unpickler's refusals come as several types; all mean "not plain state"
            raise TrainError(f"{pickled}: not a plain checkpoint, refused even with --allow-pickle ({e}); "
                             f"delete the folder {folder} to start this trainer over") from None
    if pickled.is_file():
        raise TrainError(f"{pickled}: a checkpoint in the old pickle-based format (torch.save); pickle-based "
                         "checkpoints are refused, since unpickling can run code. Delete the folder "
                         f"{folder} to start this trainer over (its finished model/ is not affected), or, if "
                         "you made this checkpoint yourself, resume with --allow-pickle (config key "
                         "allow_pickle = true); the next checkpoint is then written in the safe format")
    raise TrainError(f"{folder}: checkpoint has state.json but no {STATE_JSON}; it is incomplete. Delete "
                     f"{folder} to start this trainer over")


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], stateful: dict[str, Any],
                    dist: Dist = SOLO, allow_pickle: bool = False) -> dict | None:
    """Restore a checkpoint written by ``save_checkpoint``; None when there is none. Every process
    loads it; each takes back its own RNG state (a process the checkpoint has none for, when it
    was written by fewer processes, keeps its own seeded one)."""
    from safetensors.torch import load_model

    if not (folder / "state.json").is_file():
        old = folder.with_name(folder.name + ".old")  # a kill between the two renames
        if not (old / "state.json").is_file():
            return None
        folder = old
    saved = _read_state(folder, allow_pickle)  # first: an old checkpoint is refused before any weight changes
    for name, module in modules.items():
        load_model(module, str(folder / f"{name}.safetensors"))
    for k, v in stateful.items():
        v.load_state_dict(saved["stateful"][k])
    rngs = saved["rng"] if isinstance(saved["rng"], list) else [saved["rng"]]  # one dict: a single process's
    if dist.rank < len(rngs):
        rng = rngs[dist.rank]
        torch.set_rng_state(rng["torch"])
        py = rng["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((folder / "state.json").read_text())


class Metrics:
    """metrics.jsonl: one line per logged step. On resume, lines past the checkpoint's step
    are dropped (they will be logged again), so the file never holds a step twice. With
    ``write=False`` (every process but rank 0) the file is left alone."""

    def __init__(self, path: Path, resume_step: int | None, write: bool = True):
        self.path, self.write = path, write
        self.start = time.time()
        if not write:  # not rank 0: the row is computed, rank 0 writes it
            return
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

    def log(self, step: int, **values: Any) -> dict:
        row = {"step": step, "elapsed_s": round(time.time() - self.start, 3), **values}
        if self.write:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row


def read_messages(path: Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL of {'messages': [{'role', 'content'}, ...]} (sft.jsonl's shape)."""
    from factory.inputs import input_objects
    from factory.store import StoreError

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
