"""Data-parallel copies of a backend as Ray actors (``pip install 'factory[ray]'``), one node or many.

``backend.workers = N`` (N > 1) wraps the configured backend in a ``RayPool``: N actors each
build the real backend from the same config, and every ``generate`` / ``option_logprobs``
call the stage makes is cut into contiguous shards, one per actor, run at the same time and
put back in request order. The stage itself is unchanged: its process keeps the work keys,
skips what is done and appends each batch to the resumable store, so a crash of a worker or
of the whole run loses at most the batch in flight. A stage's batch (``backend.batch_size``)
is what gets split, so each copy sees about ``batch_size / N`` requests per call.

Ray is imported only when a pool is built; this module imports without it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from typing import TYPE_CHECKING, Any, Sequence

from factory.llm.base import BackendError, Completion, GenParams, Messages, check_options

if TYPE_CHECKING:
    from factory.llm.settings import BackendConfig

INSTALL_HINT = "pip install 'factory[ray]'"
# Requests and replies are a few kB each; Ray's default store (30% of RAM) would only take memory from the model.
OBJECT_STORE_BYTES = 128 * 1024 * 1024
CONNECT_TIMEOUT_S = 10.0


class _Worker:
    """One copy of the real backend, inside a Ray actor. The backend is built in ``load``, not in
    ``__init__``: an error there comes back as itself (a missing model folder stays a
    FileNotFoundError) instead of as a dead actor."""

    def __init__(self) -> None:
        self.backend = None
        self.requests = 0

    def load(self, cfg: "BackendConfig", allow_pickle: bool = False) -> dict[str, Any]:
        import ray

        from factory.llm import load_backend

        self.backend = load_backend(cfg, allow_pickle)
        node = ray.get_runtime_context().get_node_id()
        return {"model_id": self.backend.model_id, "info": getattr(self.backend, "info", {}), "node": node}

    def generate(self, requests: list[Messages], params: GenParams) -> list[list[Completion]]:
        self.requests += len(requests)
        return self.backend.generate(requests, params)

    def option_logprobs(self, requests: list[Messages], options: list[str]) -> list[dict[str, float]]:
        self.requests += len(requests)
        return self.backend.option_logprobs(requests, options)

    def served(self) -> int:
        """Requests this copy has answered (both calls), for tests and load checks."""
        return self.requests


def shards(count: int, parts: int) -> list[tuple[int, int]]:
    """Cut ``range(count)`` into at most ``parts`` contiguous, non-empty slices whose sizes differ by at most one."""
    parts = min(parts, count)
    if parts == 0:
        return []
    size, extra = divmod(count, parts)
    bounds, start = [], 0
    for k in range(parts):
        end = start + size + (k < extra)
        bounds.append((start, end))
        start = end
    return bounds


def shard_params(params: GenParams, shard: int, workers: int) -> GenParams:
    """Each shard samples from its own seed: with one seed everywhere, row j of every shard would
    draw the same random numbers. ``seed * workers + shard`` keeps a seeded call reproducible for
    a given pool size and never hands two shards of two calls the same seed."""
    if params.seed is None:
        return params
    return params.model_copy(update={"seed": params.seed * workers + shard})


def _check(cfg: "BackendConfig") -> "BackendConfig":
    """Refuse pool settings that cannot work, before Ray starts; return the config each copy loads."""
    kind = cfg.spec.partition(":")[0]
    if kind == "openai":
        raise BackendError("backend.workers > 1 copies a local model; the openai backend already sends "
                           "backend.max_concurrency requests at once: raise that instead")
    if kind == "vllm" and cfg.worker_gpus == 0:
        raise BackendError("backend.workers > 1 with a vllm spec needs GPUs for each copy: set backend.worker_gpus "
                           "(e.g. backend.worker_gpus = backend.tensor_parallel_size)")
    if cfg.worker_gpus == 0 and cfg.device.startswith("cuda"):
        raise BackendError(f"backend.device = {cfg.device!r} but backend.worker_gpus = 0: Ray reserves no GPU for "
                           "the copies; set backend.worker_gpus = 1 to give each copy its own GPU")
    # Ray hides no GPU from an actor that reserved none, so "auto" would pile every copy onto GPU 0.
    device = "cpu" if cfg.worker_gpus == 0 and cfg.device == "auto" else cfg.device
    return cfg.model_copy(update={"workers": 1, "device": device})


def _check_reachable(given: str) -> None:
    """Ray retries an address where nothing listens for minutes on end; a typo (or the address of a
    cluster that is gone, which is what "auto" finds after a crash) should fail in seconds."""
    address = given
    if address == "auto":
        try:  # Ray's own lookup (RAY_ADDRESS, then the last `ray start`); private, so optional
            from ray._private.services import canonicalize_bootstrap_address_or_die
        except ImportError:
            return
        try:
            address = canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError) as e:
            raise BackendError(f"backend.ray_address = 'auto': {e}") from None
        except Exception:  # the private helper changed: leave the lookup to ray.init
            return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: let Ray judge it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise BackendError(f"backend.ray_address = {given!r}: no Ray cluster answers at {address} ({e}); "
                           "start one with `ray start --head`, or fix the address") from None


class RayPool:
    """``cfg.workers`` copies of the backend ``cfg.spec`` names, as Ray actors, behind the Backend protocol."""

    def __init__(self, cfg: "BackendConfig", allow_pickle: bool = False):
        inner = _check(cfg)
        try:
            import ray
        except ImportError:
            raise BackendError(f"backend.workers = {cfg.workers} runs the model copies on Ray, which is not "
                               f"installed: {INSTALL_HINT} (or set backend.workers = 1)") from None
        self._ray = ray
        self._owns_ray = False
        self.actors: list = []
        try:
            self._connect(cfg)
            self._check_room(cfg)
            actor = ray.remote(_Worker).options(num_cpus=cfg.worker_cpus, num_gpus=cfg.worker_gpus)
            self.actors = [actor.remote() for _ in range(cfg.workers)]
            loaded = self._gather([a.load.remote(inner, allow_pickle) for a in self.actors])
        except BaseException:
            self.close()
            raise
        ids = sorted({w["model_id"] for w in loaded})
        if len(ids) > 1:
            self.close()
            raise BackendError(f"the {cfg.workers} Ray workers loaded different models {ids}: "
                               "every node must hold the same model (and the same embedded-model cache)")
        self.model_id = ids[0]
        self.info = {
            **loaded[0]["info"],
            "workers": cfg.workers,
            "nodes": len({w["node"] for w in loaded}),
            "ray_address": cfg.ray_address or ("local" if self._owns_ray else "this process's Ray session"),
            "worker_cpus": cfg.worker_cpus,
            "worker_gpus": cfg.worker_gpus,
        }

    def _connect(self, cfg: "BackendConfig") -> None:
        ray = self._ray
        if ray.is_initialized():
            return  # the caller's own Ray session: use it, and leave it running at close()
        quiet = dict(log_to_driver=False, logging_level=logging.WARNING)
        if cfg.ray_address is None:
            # A local instance for this run only: no dashboard, a small object store, exactly the
            # CPUs the copies reserve, and no usage report (a laptop run should not phone home).
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(
                address="local",
                num_cpus=max(1, math.ceil(cfg.workers * cfg.worker_cpus)),
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                **quiet,
            )
        else:
            _check_reachable(cfg.ray_address)
            try:
                ray.init(address=cfg.ray_address, **quiet)
            except ImportError as e:  # ray:// addresses go through Ray Client, an extra of its own
                raise BackendError(f"backend.ray_address = {cfg.ray_address!r} needs Ray Client: "
                                   f"pip install 'ray[client]' ({e})") from None
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise BackendError(f"backend.ray_address = {cfg.ray_address!r}: cannot join the Ray cluster: {e}") from None
        self._owns_ray = True

    def _check_room(self, cfg: "BackendConfig") -> None:
        """An actor that can never be placed waits forever; say so now instead."""
        have = self._ray.cluster_resources()
        for name, per in (("CPU", cfg.worker_cpus), ("GPU", cfg.worker_gpus)):
            need = cfg.workers * per
            if need > have.get(name, 0):
                raise BackendError(
                    f"backend.workers = {cfg.workers} x backend.worker_{name.lower()}s = {per} needs {need:g} {name}s, "
                    f"but the Ray cluster has {have.get(name, 0):g}: lower one of them, or add nodes"
                )

    def _gather(self, refs: list) -> list:
        """The results of one call per actor, in actor order. Waits on whichever finishes first, so a
        dead worker is reported at once rather than after its neighbours finish."""
        ray = self._ray
        index = {ref: k for k, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                k = index[ref]
                try:
                    results[k] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    if isinstance(e.cause, Exception) and not isinstance(e.cause, ray.exceptions.RayError):
                        # The backend's own error (BackendError, ValueError, FileNotFoundError...), as
                        # the single-process backend would raise it; the remote traceback is chained.
                        raise e.cause from e
                    raise BackendError(f"Ray worker {k + 1} of {len(self.actors)} failed: {e}") from None
                except ray.exceptions.RayActorError as e:
                    reason = (getattr(e, "error_msg", None) or str(e)).strip()
                    raise BackendError(f"Ray worker {k + 1} of {len(self.actors)} died: {reason}\n"
                                       "(the batches already written are kept: run again to resume)") from None
                except ray.exceptions.RayError as e:
                    raise BackendError(f"Ray worker {k + 1} of {len(self.actors)} failed: {e}") from None
        return results

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        requests = list(requests)
        refs = [
            actor.generate.remote(requests[a:b], shard_params(params, k, len(self.actors)))
            for k, (actor, (a, b)) in enumerate(zip(self.actors, shards(len(requests), len(self.actors))))
        ]
        return [row for part in self._gather(refs) for row in part]

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        opts = check_options(options)  # a bad pool fails here, not once per worker
        requests = list(requests)
        refs = [
            actor.option_logprobs.remote(requests[a:b], opts)
            for actor, (a, b) in zip(self.actors, shards(len(requests), len(self.actors)))
        ]
        return [row for part in self._gather(refs) for row in part]

    def served(self) -> list[int]:
        """Requests each copy has answered so far, in actor order."""
        return self._gather([a.served.remote() for a in self.actors])

    def close(self) -> None:
        """Kill the copies (their memory, GPU included, goes with the processes); stop Ray if this pool started it."""
        for actor in self.actors:
            try:
                self._ray.kill(actor)
            except Exception:  # already dead: nothing left to free
                pass
        self.actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
