"""Run the stages a config names, in order, in one run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from factory.config import RunConfig
from factory.bootstrap import run_bootstrap
from factory.constitution import load_constitution
from factory.critique import run_critique
from factory.generate import run_generate
from factory.instances import run_instances
from factory.judge import run_judge
from factory.llm import load_backend
from factory.llm.base import Backend
from factory.manifest import write_manifest
from factory.rerank import run_rerank
from factory.seeds import load_seeds
from factory.summary import StageSummary

StageFn = Callable[[RunConfig, Backend, Path], StageSummary]
STAGE_FNS: dict[str, StageFn] = {
    "generate": run_generate,
    "bootstrap": run_bootstrap,
    "instances": run_instances,
    "critique": run_critique,
    "judge": run_judge,
    "rerank": run_rerank,
}


def seed_files(cfg: RunConfig) -> list[Path]:
    """The seed files the configured stages read."""
    files: list[Path] = []
    if "generate" in cfg.stages:
        files += cfg.generate.seeds
    if "bootstrap" in cfg.stages or "instances" in cfg.stages:
        files += cfg.bootstrap.seeds  # instances take their worked examples from the seeds too
    return files


def input_files(cfg: RunConfig) -> list[Path]:
    """Every file the configured stages read, for the manifest's hashes."""
    files = seed_files(cfg)
    if "critique" in cfg.stages:
        files.append(cfg.critique.constitution)
        if cfg.critique.prompts is not None:
            files.append(cfg.critique.prompts)
    if "judge" in cfg.stages:
        files.append(cfg.judge.constitution)
        files += [f for f in (cfg.judge.responses, cfg.judge.prompts) if f is not None]
    if "rerank" in cfg.stages and cfg.rerank.prompts is not None:
        files.append(cfg.rerank.prompts)
    return files


def check_inputs(cfg: RunConfig) -> None:
    """Fail before a model is loaded when an input file is missing or malformed."""
    for path in input_files(cfg):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: input file not found (named in the config)")
    for path in dict.fromkeys(seed_files(cfg)):
        load_seeds(path)
    if "critique" in cfg.stages:
        load_constitution(cfg.critique.constitution)  # nothing runs on a half-valid constitution
    if "judge" in cfg.stages:
        load_constitution(cfg.judge.constitution)
    made_here = cfg.run_dir / "instructions.jsonl"
    if "instances" in cfg.stages and "bootstrap" not in cfg.stages and not made_here.is_file():
        raise FileNotFoundError(f"{made_here}: no instructions to write instances for; run the bootstrap stage first")
    tasks_here = cfg.run_dir / "tasks.jsonl"
    needs_tasks = "critique" in cfg.stages and cfg.critique.prompts is None and "instances" not in cfg.stages
    if needs_tasks and not tasks_here.is_file():
        raise FileNotFoundError(f"{tasks_here}: no prompts to critique; run instances first, or set critique.prompts")
    jc = cfg.judge
    if "judge" in cfg.stages and jc.candidates == "critique" and "critique" not in cfg.stages:
        if not (cfg.run_dir / "revisions.jsonl").is_file():
            raise FileNotFoundError(f"{cfg.run_dir / 'revisions.jsonl'}: nothing to judge; run the critique stage "
                                    "first, or set judge.candidates to samples or file")
    if "judge" in cfg.stages and jc.candidates == "samples" and jc.prompts is None and "instances" not in cfg.stages:
        if not tasks_here.is_file():
            raise FileNotFoundError(f"{tasks_here}: no prompts to sample responses for; run instances first, "
                                    "or set judge.prompts")
    if "rerank" in cfg.stages:
        rm = cfg.rerank.reward_model or cfg.run_dir / "rm" / "model"
        if not Path(rm).is_dir():
            raise FileNotFoundError(f"{rm}: no reward model to rerank with; run `factory train rm` first, "
                                    "or set rerank.reward_model")
        if cfg.rerank.prompts is None and "instances" not in cfg.stages and not tasks_here.is_file():
            raise FileNotFoundError(f"{tasks_here}: no prompts to rerank; run instances first, or set rerank.prompts")


def run_stages(cfg: RunConfig, backend: Backend | None = None, echo: Callable[[str], None] = print) -> list[StageSummary]:
    check_inputs(cfg)
    own = backend is None
    if backend is None:
        backend = load_backend(cfg.backend)
    try:
        run_dir = cfg.run_dir
        info = {"spec": cfg.backend.spec, "model_id": backend.model_id, **getattr(backend, "info", {})}
        write_manifest(run_dir, cfg, info, input_files(cfg))
        summaries = []
        for stage in cfg.stages:
            summary = STAGE_FNS[stage](cfg, backend, run_dir)
            echo(summary.line())
            summaries.append(summary)
        return summaries
    finally:
        if own:
            backend.close()
