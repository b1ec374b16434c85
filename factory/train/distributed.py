"""Several training processes (``accelerate launch --multi_gpu``, torchrun, MPI): ``Dist``, this
process's rank and the few collectives the trainers use, and ``processes``, which joins them.
One process is ``SOLO``: every collective returns at once, and nothing changes.
"""

from __future__ import annotations

import atexit
import os
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from factory.train import TrainError
from factory.train.models import pick_device

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
