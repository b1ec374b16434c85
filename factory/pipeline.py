"""Run the stages a config names, in order, in one run folder (or one per round).

The pipeline knows no stage by heart: each stage module exposes a ``STAGE`` object (the contract
is ``factory/stage.py``) declaring the files it reads and writes. From those declarations the
pipeline checks a run's inputs before any model loads, orders the rounds, hands out backends (at
most one engine alive at a time) and writes the manifest. ``factory run`` and each stage's and
trainer's own command come through ``run_stages``.
"""

from __future__ import annotations

import gc
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from factory.atomic import copy_atomic
from factory.config import RunConfig
from factory.layout import RunLayout
from factory.llm import load_backend
from factory.llm.base import Backend, Completion, GenParams, Messages
from factory.manifest import write_manifest
from factory.stage import Context, Role, Stage
from factory.summary import StageSummary

STAGES: dict[str, str] = {
    "generate": "factory.generate",
    "bootstrap": "factory.bootstrap",
    "instances": "factory.instances",
    "critique": "factory.critique",
    "judge": "factory.judge",
    "rerank": "factory.rerank",
    "sft": "factory.train.sft",
    "rm": "factory.train.reward",
    "ppo": "factory.train.ppo",
    "dpo": "factory.train.dpo",
    "heldout": "factory.heldout",
}
"""every stage by name, and the module that holds its ``STAGE`` (imported when a run lists it:
a run without trainers never imports torch's training stack)"""


def stage(name: str) -> Stage:
    return importlib.import_module(STAGES[name]).STAGE


def input_files(cfg: RunConfig) -> list[Path]:
    """Every file the config names for its stages to read, for the manifest's hashes."""
    return [Path(f) for name in cfg.stages for f in stage(name).user_files(cfg)]


def check_inputs(cfg: RunConfig) -> None:
    """Fail before a model is loaded when an input is missing or malformed.

    Derived from the stages' declarations: every file the config names exists and passes its
    stage's ``check``; every run file a stage needs exists, or an earlier stage in the list writes it.
    """
    stages = [stage(name) for name in cfg.stages]
    for path in input_files(cfg):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: input file not found (named in the config)")
    for st in stages:
        st.check(cfg)
    layout = RunLayout.of(cfg)
    made: set[Path] = set()  # resolved: a path the config names may be absolute, the layout's relative
    for st in stages:
        for need in st.needs(cfg, layout):
            if need.path.resolve() not in made and not need.there():
                raise FileNotFoundError(need.message())
        made.update(p.resolve() for p in st.writes(cfg, layout))


def main_process() -> bool:
    """Not one of the other processes of a multi-process launch (torchrun or accelerate set RANK)."""
    return os.environ.get("RANK", "0") in ("", "0")


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """Round r's own config: its folder, its stages, and where its policy starts."""
    if cfg.rounds == 1:
        return cfg
    update: dict = {"output_dir": cfg.run_dir, "name": RunLayout.of(cfg).round(r).root.name, "rounds": 1}
    if r > 1:
        previous = str(RunLayout.of(cfg).round(r - 1).trained_policy(cfg.stages))
        # Later rounds reuse round 1's tasks: the prompts stay, the answers change.
        update["stages"] = [s for s in cfg.stages if not stage(s).first_round_only]
        # The loop: round r fine-tunes (sft) and optimises (ppo, dpo) the policy round r-1 ended with,
        # which is also the KL reference of its PPO and the reference of its DPO.
        update["sft"] = cfg.sft.model_copy(update={"model": previous})
        start = "auto" if "sft" in cfg.stages else previous
        update["ppo"] = cfg.ppo.model_copy(update={"policy": start})
        update["dpo"] = cfg.dpo.model_copy(update={"model": start})
    return cfg.model_copy(update=update)


def policy_spec(cfg: RunConfig, r: int) -> str:
    """The backend spec that generates round r's text: the configured model, then each round's policy."""
    if r == 1:
        return cfg.backend.spec
    kind = "vllm" if cfg.backend.spec.startswith("vllm:") else "hf"
    return f"{kind}:{RunLayout.of(cfg).round(r - 1).trained_policy(cfg.stages)}"


def judge_spec(cfg: RunConfig) -> str:
    """The judge's backend spec: ``judge.backend``, else the run's; the same in every round."""
    return cfg.judge.backend or cfg.backend.spec


def carry_tasks(cfg: RunConfig, r: int) -> None:
    """Give round r (> 1) round 1's tasks, copied whole (a copy interrupted half-way is never seen)."""
    layout = RunLayout.of(cfg)
    source, target = layout.round(1).tasks, layout.round(r).tasks
    if source.is_file() and not target.is_file():
        copy_atomic(source, target)


ENGINE_KINDS = ("hf", "vllm")
"""backends that hold a model in this process (on a GPU, vLLM takes most of its memory up front);
at most one is alive at a time. openai and scripted hold nothing worth freeing."""


def holds_engine(spec: str) -> bool:
    return spec.partition(":")[0] in ENGINE_KINDS


class Backends:
    """Backends by spec, each loaded on first use; at most one engine (hf or vLLM) alive at a time.

    Loading an engine lets go of the other one first (on a GPU two engines do not fit: vLLM
    reserves most of it), and all are let go before a trainer runs. ``given`` stands for the
    configured spec (tests pass a scripted backend this way); it belongs to the caller and is
    never closed here. ``described`` remembers each loaded spec's model id and info, so the
    manifest can name the judge without loading it again.
    """

    def __init__(self, cfg: RunConfig, given: Backend | None = None):
        self.cfg, self.given = cfg, given
        self.live: dict[str, Backend] = {}
        self.described: dict[str, dict] = {}

    def get(self, spec: str) -> Backend:
        if self.given is not None and spec == self.cfg.backend.spec:
            return self.given
        if spec not in self.live:
            if holds_engine(spec):
                self.release(engines_only=True)
            backend = load_backend(self.cfg.backend.model_copy(update={"spec": spec}),
                                   allow_pickle=self.cfg.allow_pickle)
            self.live[spec] = backend
            self.described[spec] = {"model_id": backend.model_id, **getattr(backend, "info", {})}
        return self.live[spec]

    def describe(self, spec: str, load: bool = False) -> dict:
        """The model id and info of ``spec``'s backend, remembered from its load if it was loaded.

        If not, an engine (hf, vllm) is loaded only when ``load`` says it is needed next anyway:
        otherwise its model id is the one the backend reports (``resolve_model``) and its settings
        are as configured, marked ``"loaded": False``. No engine starts only to be named.
        """
        if self.given is not None and spec == self.cfg.backend.spec:
            return {"model_id": self.given.model_id, **getattr(self.given, "info", {})}
        if spec in self.described:
            return self.described[spec]
        if load or not holds_engine(spec):  # openai holds nothing: loading it costs nothing
            self.get(spec)
            return self.described[spec]
        from factory.llm.embedded import resolve_model

        kind, _, model = spec.partition(":")
        path, model_id = resolve_model(model, kind)
        bc = self.cfg.backend
        return {"model_id": model_id, "path": path, **({"device": bc.device} if kind == "hf" else {}),
                "dtype": bc.dtype, **({"workers": bc.workers} if bc.workers > 1 else {}), "loaded": False}

    def release(self, engines_only: bool = False) -> None:
        """Close the live backends (all, or the engines only) and free their memory."""
        going = [s for s in self.live if holds_engine(s) or not engines_only]
        for spec in going:
            self.live.pop(spec).close()
        if going:
            free_memory()


class OnFirstCall:
    """``spec``'s backend, loaded from ``backends`` on its first call (which lets any other engine
    go); its model id is known before, without loading it. The judge stage sampling with one model
    and judging with another gets both this way: all samples are drawn before the first judgment
    (judge.py), so the generator's engine is let go as the judge's loads, and neither loads when
    the run folder already holds its work."""

    def __init__(self, backends: Backends, spec: str):
        self.backends, self.spec = backends, spec
        self.model_id = backends.describe(spec)["model_id"]

    def generate(self, requests: Sequence[Messages], params: GenParams) -> list[list[Completion]]:
        return self.backends.get(self.spec).generate(requests, params)

    def option_logprobs(self, requests: Sequence[Messages], options: Sequence[str]) -> list[dict[str, float]]:
        return self.backends.get(self.spec).option_logprobs(requests, options)

    def close(self) -> None:
        pass  # ``backends`` closes what it loaded


def free_memory() -> None:
    """Hand what closed models and a finished trainer held back to the system, so the next
    engine finds the GPU empty (vLLM sizes its cache from the free memory it sees at start-up)."""
    gc.collect()
    torch = sys.modules.get("torch")  # a run that never loaded torch does not pay for importing it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_round(cfg: RunConfig, r: int, backends: Backends, echo: Callable[[str], None]) -> list[StageSummary | dict]:
    rcfg = round_config(cfg, r)
    layout = RunLayout.of(rcfg)
    specs: dict[Role, str] = {"generator": policy_spec(cfg, r), "judge": judge_spec(cfg)}
    stages = [stage(name) for name in rcfg.stages]
    used = {role for st in stages for role in st.roles(rcfg)}
    info: dict = {"spec": specs["judge"]}
    if used:  # the manifest records the model actually used: remembered from an earlier load, loaded now
        # when the round's first stage loads it anyway, else named from the config (no engine starts for it)
        named = specs["judge"] if "judge" in used else specs["generator"]
        first_loads_it = len({specs[role] for role in used}) == 1 and not stages[0].trains
        info |= backends.describe(named, load=first_loads_it)
    if specs["generator"] != specs["judge"]:
        info["generator"] = specs["generator"]
    if main_process():  # several training processes (accelerate launch): one writes the manifest
        write_manifest(layout.manifest, rcfg, info, input_files(rcfg))
    lazy: dict[str, OnFirstCall] = {}  # one per spec: two roles of one model are one backend

    def models(role: Role, on_first_call: bool) -> Backend:
        spec = specs[role]
        if not on_first_call:
            return backends.get(spec)
        if spec not in lazy:
            lazy[spec] = OnFirstCall(backends, spec)
        return lazy[spec]

    ctx = Context(rcfg, layout, models, echo, specs=specs, load=backends.get, release=backends.release)
    results: list[StageSummary | dict] = []
    for st in stages:
        if st.trains:
            backends.release()
            summary = st.run(ctx)  # a trainer says what it did itself
            free_memory()  # the trainer's model and optimiser, before the next engine loads
        else:
            summary = st.run(ctx)
            echo(summary.line())
        results.append(summary)
    return results


def run_stages(cfg: RunConfig, backend: Backend | None = None, echo: Callable[[str], None] = print) -> list:
    """Run every round of the config's stages; what is already done is skipped, stage by stage.

    Returns each stage's summary in order: a ``StageSummary`` for data stages, a dict for trainers.
    """
    check_inputs(round_config(cfg, 1))
    backends = Backends(cfg, backend)
    summaries: list = []
    try:
        for r in range(1, cfg.rounds + 1):
            if cfg.rounds > 1:
                echo(f"round {r} of {cfg.rounds}: {RunLayout.of(cfg).round(r).root}")
            if r > 1:
                carry_tasks(cfg, r)
                check_inputs(round_config(cfg, r))
            summaries += run_round(cfg, r, backends, echo)
        return summaries
    finally:
        backends.release()
