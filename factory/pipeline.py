"""Run the stages a config names, in order, in one run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from factory.config import RunConfig
from factory.generate import StageSummary, run_generate
from factory.llm import load_backend
from factory.llm.base import Backend
from factory.manifest import write_manifest
from factory.seeds import load_seeds

StageFn = Callable[[RunConfig, Backend, Path], StageSummary]
STAGE_FNS: dict[str, StageFn] = {"generate": run_generate}


def input_files(cfg: RunConfig) -> list[Path]:
    """Every file the configured stages read, for the manifest's hashes."""
    files: list[Path] = []
    if "generate" in cfg.stages:
        files += cfg.generate.seeds
    return files


def check_inputs(cfg: RunConfig) -> None:
    """Fail before a model is loaded when an input file is missing or malformed."""
    for path in input_files(cfg):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: input file not found (named in the config)")
    if "generate" in cfg.stages:
        for path in cfg.generate.seeds:
            load_seeds(path)


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
