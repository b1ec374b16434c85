"""Checkpoints that resume exactly: weights, optimiser, scheduler, RNG states and counters.

Nothing here unpickles: a checkpoint's optimiser, scheduler and RNG states are safetensors plus
JSON (``flatten_state``), so resuming never runs code from a file. A checkpoint folder is written
whole (``factory.atomic.atomic_folder``): a kill mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.atomic import atomic_folder, folder_replaced
from factory.train import TrainError
from factory.train.distributed import SOLO, Dist

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
PICKLED_STATE = "trainer_state.pt"
"""the pickle (torch.save) file of checkpoints written before the safetensors + JSON format"""
STATE = "state.json"
"""the trainer's counters (step, epoch, position in the data, fingerprint of its inputs)"""


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
        try:
            with atomic_folder(folder) as tmp:
                for name, module in modules.items():
                    save_model(module, str(tmp / f"{name}.safetensors"))
                state_dicts = {k: v.state_dict() for k, v in stateful.items()}
                skeleton, tensors = flatten_state({"stateful": state_dicts, "rng": rngs})
                save_file(tensors, str(tmp / STATE_TENSORS))
                (tmp / STATE_JSON).write_text(json.dumps(skeleton) + "\n")
                (tmp / STATE).write_text(json.dumps(state, indent=2) + "\n")
        except (OSError, SafetensorError) as e:  # a full disk: safetensors reports it as its own error
            raise TrainError(f"{folder}: could not write the checkpoint ({e}); the previous one is kept: free some "
                             "space and run the same command again to resume from it") from e
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
    raise TrainError(f"{folder}: checkpoint has {STATE} but no {STATE_JSON}; it is incomplete. Delete "
                     f"{folder} to start this trainer over")


def load_checkpoint(folder: Path, modules: dict[str, nn.Module], stateful: dict[str, Any],
                    dist: Dist = SOLO, allow_pickle: bool = False) -> dict | None:
    """Restore a checkpoint written by ``save_checkpoint``; None when there is none. Every process
    loads it; each takes back its own RNG state (a process the checkpoint has none for, when it
    was written by fewer processes, keeps its own seeded one)."""
    from safetensors.torch import load_model

    found = _written(folder)
    if found is None:
        return None
    folder = found
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
    return json.loads((folder / STATE).read_text())


def _written(folder: Path) -> Path | None:
    """The folder holding the checkpoint ``folder`` names: itself, or where ``atomic_folder`` parked
    it after a kill between its two renames; None when there is none."""
    for place in (folder, folder_replaced(folder)):
        if (place / STATE).is_file():
            return place
    return None


def saved_state(folder: Path) -> dict | None:
    """The counters of the checkpoint ``load_checkpoint`` would read, read before any model is loaded."""
    found = _written(folder)
    return None if found is None else json.loads((found / STATE).read_text())
