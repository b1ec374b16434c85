"""Model backends behind one small protocol (see ``base.py``), chosen by a spec string.

``hf:embedded``, ``hf:/path/to/model``, ``hf:org/name``, ``openai:http://127.0.0.1:8000/v1#model``,
``vllm:org/name``. Each backend module is imported only when chosen, so vLLM and
the HTTP client cost nothing to a user who does not pick them. ``workers > 1`` in the
config runs that many copies of the chosen backend as Ray actors (``raypool.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from factory.llm.base import Backend, BackendError, Completion, GenParams, Messages

if TYPE_CHECKING:
    from factory.llm.settings import BackendConfig

__all__ = ["Backend", "BackendError", "Completion", "GenParams", "Messages", "load_backend"]


def load_backend(cfg: "BackendConfig", allow_pickle: bool = False) -> Backend:
    """The backend ``cfg.spec`` names; ``allow_pickle`` lets hf load pickle-based weights (the user's explicit choice)."""
    if cfg.workers > 1:
        # Each Ray actor calls back into load_backend with workers = 1 to build its own copy.
        from factory.llm.raypool import RayPool

        return RayPool(cfg, allow_pickle)
    kind, _, rest = cfg.spec.partition(":")
    if kind == "hf":
        from factory.llm.hf import HFBackend

        return HFBackend(rest, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
                         allow_pickle=allow_pickle)
    if kind == "openai":
        from factory.llm.openai import OpenAIBackend

        base_url, _, model = rest.partition("#")
        return OpenAIBackend(
            base_url,
            model,
            api_key_env=cfg.api_key_env,
            max_concurrency=cfg.max_concurrency,
            timeout_s=cfg.timeout_s,
            max_retries=cfg.max_retries,
            backoff_s=cfg.backoff_s,
            max_backoff_s=cfg.max_backoff_s,
            stop_after_failures=cfg.stop_after_failures,
        )
    if kind == "vllm":
        from factory.llm.vllm import VLLMBackend

        return VLLMBackend(
            rest,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            allow_pickle=allow_pickle,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            seed=cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
        )
    if kind == "scripted":
        raise BackendError("the scripted backend replays queued replies for unit tests; build it in code, not from a config")
    raise BackendError(f"unknown backend kind {kind!r} in spec {cfg.spec!r}")
