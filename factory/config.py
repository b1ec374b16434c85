"""Config models, one per stage, loaded from TOML or YAML and overridable from the CLI.

Every model forbids unknown keys, so a typo fails at start-up, before any model is
loaded. ``load_config`` turns every problem into a ``ConfigError`` that names the
file, the key path and what was expected.
"""

from __future__ import annotations

import re
import reprlib
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from factory.constitution import _duplicate_keys
from factory.llm.base import GenParams
from factory.train.settings import PPOConfig, RerankConfig, RewardConfig, SFTConfig

SPEC_KINDS = ("hf", "openai", "vllm", "scripted")
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ConfigError(ValueError):
    """A config file or override is malformed; the message says where and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


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


class GenerateConfig(Strict):
    """The `generate` stage: answer seed-task instructions with the model (the smallest useful job)."""

    seeds: list[Path] = Field([Path("seeds/seed_tasks.jsonl")], description="seed task files (Self-Instruct JSONL)")
    limit: int | None = Field(8, ge=1, description="use only the first N seed tasks (None: all)")
    params: GenParams = Field(GenParams(max_tokens=96), description="sampling settings")


DEFAULT_BLACKLIST = [
    "image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "diagram", "diagrams",
    "file", "files", "map", "maps", "draw", "drawing", "plot", "plotting", "audio", "video", "videos",
]  # tasks a text-only model cannot do


class BootstrapConfig(Strict):
    """The `bootstrap` stage: grow a pool of new instructions from the seeds (Self-Instruct)."""

    seeds: list[Path] = Field([Path("seeds/seed_tasks.jsonl")], description="seed task files (Self-Instruct JSONL)")
    target: int = Field(100, ge=1, description="stop once this many new instructions are accepted")
    max_requests: int | None = Field(None, ge=1, description="give up after this many requests (None: 20 x target)")
    requests_per_batch: int = Field(16, ge=1, description="prompts generated together; the pool grows between batches")
    human_examples: int = Field(6, ge=0, description="seed instructions shown in each prompt")
    machine_examples: int = Field(2, ge=0, description="machine-made instructions shown (seeds fill in while there are too few)")
    min_words: int = Field(4, ge=1, description="reject instructions with fewer words")
    max_words: int = Field(150, ge=1, description="reject instructions with more words")
    blacklist: list[str] = Field(DEFAULT_BLACKLIST, description="reject instructions with any of these words (whole words, any case)")
    rouge_threshold: float = Field(0.7, gt=0, le=1, description="reject when ROUGE-L F1 with any pool instruction exceeds this")
    seed: int = Field(0, description="sampling seed for the prompts' examples and the model")
    params: GenParams = Field(GenParams(temperature=0.7, top_p=0.95, max_tokens=200), description="sampling settings")

    @model_validator(mode="after")
    def _bounds(self) -> "BootstrapConfig":
        if self.min_words > self.max_words:
            raise ValueError(f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})")
        if self.human_examples + self.machine_examples == 0:
            raise ValueError("human_examples + machine_examples must be at least 1")
        return self


class InstancesConfig(Strict):
    """The `instances` stage: decide whether each instruction is classification, then write instances."""

    max_instances: int = Field(5, ge=1, description="keep at most this many instances per task")
    classification_threshold: float | Literal["auto"] = Field(
        "auto",
        description="p(Yes) at or above which a task is classification; auto: the cut that best separates "
        "the seed tasks' own labels (small models say Yes too rarely for 0.5 to work)",
    )
    calibration_size: int = Field(20, ge=1, description="auto: seed tasks of each kind scored to place the cut")
    few_shot: int = Field(2, ge=0, description="seed tasks shown as worked examples in each prompt")
    seed: int = Field(0, description="sampling seed for the examples and the model")
    params: GenParams = Field(GenParams(temperature=0.7, top_p=0.95, max_tokens=256), description="sampling settings")

    @field_validator("classification_threshold")
    @classmethod
    def _open_unit(cls, v: float | str) -> float | str:
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("must be between 0 and 1 (exclusive), or 'auto'")
        return v


class CritiqueConfig(Strict):
    """The `critique` stage: answer, critique under a sampled principle, revise; R rounds (Constitutional AI)."""

    constitution: Path = Field(Path("principles/harmless.yaml"), description="principle file (YAML or JSON)")
    prompts: Path | None = Field(
        None, description="JSONL of {'prompt': ...} (e.g. seeds/red_team_prompts.jsonl); none: the run's tasks"
    )
    limit: int | None = Field(None, ge=1, description="use only the first N prompts")
    rounds: int = Field(1, ge=1, description="critique -> revision rounds per prompt; a principle is drawn for each")
    few_shot: int = Field(2, ge=0, description="the constitution's examples shown before each critique, as chat turns")
    skip_unchanged: bool = Field(False, description="skip the revision when the model says its critique asks for no change")
    skip_threshold: float = Field(0.5, gt=0, lt=1, description="skip when p(Yes, it needs to change) is below this")
    pairs: bool = Field(False, description="also write critique_pairs.jsonl: final revision preferred over the first answer")
    seed: int = Field(0, description="seed for principle draws and sampling")
    params: GenParams = Field(GenParams(temperature=0.7, top_p=0.95, max_tokens=192), description="sampling settings")


class JudgeConfig(Strict):
    """The `judge` stage: compare responses under principles and write soft-labelled preference pairs (RLAIF)."""

    constitution: Path = Field(Path("principles/harmless.yaml"), description="principle file whose judge questions are asked")
    candidates: Literal["critique", "samples", "file"] = Field(
        "critique",
        description="critique: each prompt's first answer vs its final revision (revisions.jsonl); "
        "samples: n sampled responses per prompt; file: a JSONL of {'prompt', 'responses'}",
    )
    responses: Path | None = Field(None, description="candidates = file: JSONL of {'prompt': text or messages, 'responses': [...]}")
    prompts: Path | None = Field(None, description="candidates = samples: JSONL of {'prompt': ...}; none: the run's tasks")
    limit: int | None = Field(None, ge=1, description="judge only the first N prompts")
    n: int = Field(2, ge=2, description="candidates = samples: responses sampled per prompt")
    principles: int | Literal["all"] = Field(
        1, description="principles drawn by weight (without repeats) to judge each prompt under; their labels are averaged"
    )
    kway: Literal["pairs", "choice"] = Field(
        "pairs", description="more than 2 responses: judge every pair, or one choice among all the letters"
    )
    cot: bool = Field(False, description="the judge reasons first, then its letter is scored; labels clamped to cot_band")
    cot_band: tuple[float, float] = Field((0.4, 0.6), description="chain-of-thought labels are clamped into [low, high]")
    cot_max_tokens: int = Field(128, ge=1, description="tokens of reasoning per comparison")
    min_confidence: float = Field(0.6, ge=0.5, le=1, description="pairs with p_chosen below this are kept but flagged")
    seed: int = Field(0, description="seed for principle draws and sampling")
    params: GenParams = Field(GenParams(temperature=0.9, top_p=0.95, max_tokens=128),
                              description="candidates = samples: sampling settings (n comes from judge.n)")

    @field_validator("principles")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1, or 'all'")
        return v

    @field_validator("cot_band")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= 0.5 <= v[1] <= 1:
            raise ValueError(f"must be [low, high] with 0 <= low <= 0.5 <= high <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _source(self) -> "JudgeConfig":
        if self.candidates == "file" and self.responses is None:
            raise ValueError("candidates = 'file' needs judge.responses (a JSONL of {'prompt', 'responses'})")
        return self


STAGES = ("generate", "bootstrap", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo")
TRAIN_STAGES = ("sft", "rm", "ppo")  # trainers: they load their own models, not the run's backend
Stage = Literal["generate", "bootstrap", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo"]


class RunConfig(Strict):
    """One run: where it writes, which model it uses, which stages it runs."""

    name: str = Field("demo", description="run folder name under output_dir")
    output_dir: Path = Field(Path("outputs"), description="parent folder of run folders")
    backend: BackendConfig = BackendConfig()
    stages: list[Stage] = Field(
        ["generate"], description="stages to run, in order: generate, bootstrap, instances, critique, judge, "
        "rerank, and the trainers sft, rm, ppo"
    )
    rounds: int = Field(
        1, ge=1, description="RLAIF rounds: after PPO, the trained policy answers and revises the next round's "
        "prompts (the judge stays the backend's model); with more than 1, round N lives in round-N/"
    )
    allow_pickle: bool = Field(
        False, description="load pickle-based model weights (pytorch_model.bin) and old pickle checkpoints; "
        "unpickling runs any code a file hides, so only for files you made or trust (default: safetensors only)"
    )
    generate: GenerateConfig = GenerateConfig()
    bootstrap: BootstrapConfig = BootstrapConfig()
    instances: InstancesConfig = InstancesConfig()
    critique: CritiqueConfig = CritiqueConfig()
    judge: JudgeConfig = JudgeConfig()
    sft: SFTConfig = SFTConfig()
    rm: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    rerank: RerankConfig = RerankConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not RUN_NAME.match(v) or v in (".", ".."):
            raise ValueError("run name must be 1-100 letters, digits, '.', '_' or '-', not starting with '.' (no paths)")
        return v

    @model_validator(mode="after")
    def _inside_output_dir(self) -> "RunConfig":
        # A plain name can still leave output_dir through a symlink already there; refuse that too.
        if "\0" in str(self.output_dir):
            raise ValueError(f"output_dir: a NUL byte in the path {str(self.output_dir)!r}")
        if not self.run_dir.resolve().is_relative_to(self.output_dir.resolve()):
            raise ValueError(f"name: the run folder {self.run_dir} resolves to {self.run_dir.resolve()}, outside "
                             f"output_dir {self.output_dir.resolve()}; pick another name")
        return self

    @model_validator(mode="after")
    def _stages_once(self) -> "RunConfig":
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages must not repeat, got {self.stages}")
        if self.rounds > 1 and "ppo" not in self.stages:
            raise ValueError(f"rounds = {self.rounds} needs the ppo stage: each round's policy answers the next round")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def _read(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")  # a BOM, as some Windows editors write, is not part of the first key
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: expected a .toml, .yaml or .yml file")
    duplicates = []
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)  # data only: never constructs Python objects
            duplicates = list(_duplicate_keys(yaml.compose(text, Loader=yaml.SafeLoader)))  # TOML refuses them itself
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    except RecursionError:  # both parsers build nested tables and lists recursively
        raise ConfigError(f"{path}: nested too deeply to read") from None
    except ValueError:  # an integer past Python's 4300-digit limit for reading integers
        raise ConfigError(f"{path}: a number with too many digits") from None
    for line, loc, first in duplicates:
        raise ConfigError(f"{path}:{line}: {_where(loc)}: duplicate key (first at line {first})")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top level, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is read as a YAML scalar or list."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. generate.limit=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: cannot read the value: {e}") from None
    if isinstance(value, dict) and not raw.lstrip().startswith("{"):
        value = raw  # `hf:` reads as a YAML mapping; a table must be written in braces
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {p!r} is not a table")
        node = child
    node[parts[-1]] = value


_SHORT = reprlib.Repr()  # a value quoted back in a message: a huge or deeply nested one is cut short
_SHORT.maxstring = 80


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def load_config(path: Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config; every failure is a ``ConfigError``."""
    data = _read(Path(path)) if path is not None else {}
    for item in overrides:
        apply_override(data, item)
    source = str(path) if path is not None else "(defaults)"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            quiet = err["type"] in ("extra_forbidden", "missing", "value_error")
            got = "" if quiet else f" (got {_SHORT.repr(err.get('input'))})"
            lines.append(f"  {_where(err['loc'])}: {msg}{got}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None
