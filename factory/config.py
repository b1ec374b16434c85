"""Config models, one per stage, loaded from TOML or YAML and overridable from the CLI.

Every model forbids unknown keys, so a typo fails at start-up, before any model is
loaded. ``load_config`` turns every problem into a ``ConfigError`` that names the
file, the key path and what was expected.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from factory.inputs import TOO_DEEP, TOO_MANY_DIGITS, ParseError, decode, duplicate_keys, load_yaml, read_bytes
from factory.llm.base import GenParams
from factory.llm.settings import BackendConfig  # the run config's backend table; importable from here too
from factory.records import Strict, error_text, got, key_path
from factory.train.settings import DPOConfig, PPOConfig, RerankConfig, RewardConfig, SFTConfig

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class ConfigError(ValueError):
    """A config file or override is malformed; the message says where and what was expected."""


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
    backend: str | None = Field(
        None, description="the judge's own model (a backend spec: hf:..., vllm:..., openai:URL#model); none: the run's "
        "backend.spec. It stays fixed over rounds and while online DPO or PPO (reward = judge) train the policy")
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


class HeldoutConfig(Strict):
    """The heldout stage: what the loop did to the model, on prompts no stage trained on."""

    prompts: Path = Field(Path("seeds/heldout_prompts.jsonl"), description="JSONL of {'prompt': ...} that no stage "
                          "of the run trains on (the shipped file is written apart from the seed tasks)")
    limit: int | None = Field(48, ge=1, description="use only the first N prompts (none: all)")
    axis: Literal["words", "lists"] = Field(
        "words", description="what is measured on each reply: words = its length in words; lists = whether it has two "
        "or more list lines (the share of replies in list form)")
    models: Literal["auto"] | Annotated[list[Literal["base", "sft", "dpo", "ppo"]], Field(min_length=1)] = Field(
        "auto", description="who answers: base (the model the round starts from) and the trained models; auto = base "
        "and every trainer among the run's stages (sft, dpo, ppo)")
    kl: bool = Field(True, description="also the mean per-token KL of each trained model to the base, on its own "
                     "replies (hf backends: both models loaded with torch)")
    device: str = Field("auto", description="torch device of the KL pass")
    params: GenParams = Field(GenParams(temperature=0.0, max_tokens=256), description="decoding: greedy, with room "
                              "for length to move")


STAGES = ("generate", "bootstrap", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo", "dpo", "heldout")
Stage = Literal["generate", "bootstrap", "instances", "critique", "judge", "rerank", "sft", "rm", "ppo", "dpo",
                "heldout"]
POLICY_TRAINERS = ("ppo", "dpo")
"""the stages whose trained model is the next round's policy (PPO's when a run has both)"""


class RunConfig(Strict):
    """One run: where it writes, which model it uses, which stages it runs."""

    name: str = Field("demo", description="run folder name under output_dir")
    output_dir: Path = Field(Path("outputs"), description="parent folder of run folders")
    backend: BackendConfig = BackendConfig()
    stages: list[Stage] = Field(
        ["generate"], description="stages to run, in order: generate, bootstrap, instances, critique, judge, "
        "rerank, the trainers sft, rm, ppo, dpo, and heldout (measure the trained models on held-out prompts)"
    )
    rounds: int = Field(
        1, ge=1, description="RLAIF rounds: after PPO (or DPO), the trained policy answers and revises the next round's "
        "prompts (the judge stays judge.backend, by default the run's backend); with more than 1, round N lives in "
        "round-N/"
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
    dpo: DPOConfig = DPOConfig()
    rerank: RerankConfig = RerankConfig()
    heldout: HeldoutConfig = HeldoutConfig()

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
        if self.rounds > 1 and not any(s in self.stages for s in POLICY_TRAINERS):
            raise ValueError(f"rounds = {self.rounds} needs the ppo or dpo stage: each round's policy answers the "
                             "next round")
        return self

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


def _read(path: Path) -> dict[str, Any]:
    raw = read_bytes(path, ConfigError, missing="no such config file")
    text = decode(path, raw, ConfigError, "; save the file as UTF-8")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise ConfigError(f"{path}: expected a .toml, .yaml or .yml file")
    root = None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data, root = load_yaml(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None
    except ParseError as e:
        if e.syntax:
            raise ConfigError(f"{f'{path}:{e.line}' if e.line else path}: invalid YAML: {e}") from None
        raise ConfigError(f"{path}: {e.detail}{' to read' if e.detail == TOO_DEEP else ''}") from None
    except RecursionError:  # tomllib builds nested tables and lists recursively
        raise ConfigError(f"{path}: {TOO_DEEP} to read") from None
    except ValueError:  # an integer past Python's 4300-digit limit for reading integers
        raise ConfigError(f"{path}: {TOO_MANY_DIGITS}") from None
    for line, loc, first in duplicate_keys(root) if root is not None else ():  # TOML refuses them itself
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


def _where(loc: tuple[Any, ...]) -> str:
    return key_path(loc) or "(top level)"


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
            msg = "unknown key" if err["type"] == "extra_forbidden" else error_text(err)
            quiet = err["type"] in ("extra_forbidden", "missing", "value_error")
            lines.append(f"  {_where(err['loc'])}: {msg}{'' if quiet else got(err.get('input'))}")
        raise ConfigError(f"{source}: invalid config\n" + "\n".join(lines)) from None
