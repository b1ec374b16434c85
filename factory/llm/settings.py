"""The backend's settings: which model to talk to, and how (the run config's ``backend`` table).

They live in the llm package so that the backends read their settings without importing the
run config (``factory.config`` imports them from here, and ``factory.config.BackendConfig`` is
this same class).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from factory.records import Strict

SPEC_KINDS = ("hf", "openai", "vllm", "scripted")


class BackendConfig(Strict):
    """Which model to talk to, and how. Only the fields of the chosen kind are used."""

    spec: str = Field(
        "hf:embedded",
        description="hf:embedded | hf:/path/or/hub-id | openai:http://host:port/v1#model | vllm:model | scripted",
    )
    batch_size: int = Field(
        64, ge=1, description="about how many requests a stage hands the backend per call and appends to disk at "
        "once (a crash loses at most one such batch). hf: also its forward batch (a prompt's n samples take n rows); "
        "vllm ignores it (the engine schedules its own batches); workers > 1: each call is split across the copies; "
        "openai: max_concurrency sets what is in flight"
    )
    device: str = Field("auto", description="hf: auto, cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="hf/vllm: auto = bfloat16 on a GPU, float32 on the CPU"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="openai: the environment variable holding the key (the key is never stored)"
    )
    max_concurrency: int = Field(8, ge=1, description="openai: requests in flight at once")
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds before one request is abandoned")
    max_retries: int = Field(5, ge=0, description="openai: retries on 429, 5xx and connection errors")
    backoff_s: float = Field(0.5, ge=0, description="openai: first retry delay; doubles each retry, with jitter")
    max_backoff_s: float = Field(30.0, ge=0, description="openai: the longest wait between retries (Retry-After "
                                 "from the server is obeyed up to 120 s)")
    stop_after_failures: int = Field(
        16, ge=1, description="openai: a request that fails after its retries fails its item alone (logged in "
        "failures.jsonl, retried by the next run); this many such failures in a row stop the stage: the server is down"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vllm: GPUs to shard the model over")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm: share of GPU memory to use")
    max_model_len: int | None = Field(
        None, ge=1, description="vllm: the longest prompt + reply in tokens (None: the model's own context length); "
        "a smaller one lets a long-context model start on a GPU whose KV cache cannot hold its full length. vLLM "
        "schedules its own batches by tokens: batch_size only sizes the stages' batches, never a forward pass"
    )
    enforce_eager: bool = Field(
        False, description="vllm: run the model eagerly, without CUDA graphs (starts faster and uses less memory, "
        "generates slower)"
    )
    seed: int = Field(0, description="vllm: the engine's seed (a request's own seed, from the stage, takes precedence)")
    trust_remote_code: bool = Field(
        False, description="vllm: run the Python code a model repository ships for its architecture or tokenizer; "
        "that code can do anything this process can, so only for models you trust (also --trust-remote-code). "
        "Off, a model that needs it is refused"
    )
    workers: int = Field(
        1, ge=1, description="hf/vllm: data-parallel copies of the model, each a Ray actor (pip install 'factory[ray]'); "
        "1 = one copy in this process, no Ray. Each stage batch (batch_size) is split across the copies"
    )
    ray_address: str | None = Field(
        None, description="workers > 1: none starts a local Ray instance; 'auto' or 'ray://host:port' joins a cluster"
    )
    worker_cpus: float = Field(1.0, ge=0, description="workers > 1: CPUs Ray reserves for each copy (its torch threads)")
    worker_gpus: float = Field(0.0, ge=0, description="workers > 1: GPUs Ray reserves for each copy (1: a GPU of its own)")

    @field_validator("spec")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        kind = v.split(":", 1)[0]
        if kind not in SPEC_KINDS:
            raise ValueError(f"backend spec must start with one of {', '.join(SPEC_KINDS)} (e.g. hf:embedded), got {v!r}")
        if kind == "openai" and "#" not in v:
            raise ValueError(f"openai spec needs the model after '#': openai:http://127.0.0.1:8000/v1#model, got {v!r}")
        if kind in ("hf", "vllm") and not v.partition(":")[2]:
            raise ValueError(f"{kind} spec needs a model: {kind}:embedded or {kind}:/path/or/hub-id, got {v!r}")
        return v
