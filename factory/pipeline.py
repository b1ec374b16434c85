"""Run the stages a config names, in order, in one run folder."""

from __future__ import annotations

import gc
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Sequence

from factory.config import TRAIN_STAGES, RunConfig
from factory.bootstrap import run_bootstrap
from factory.constitution import load_constitution
from factory.critique import load_prompts, run_critique
from factory.generate import run_generate
from factory.instances import run_instances
from factory.judge import file_items, run_judge
from factory.layout import RunLayout
from factory.llm import load_backend
from factory.llm.base import Backend, Completion, GenParams, Messages
from factory.manifest import write_manifest
from factory.rerank import run_rerank
from factory.seeds import load_seeds
from factory.summary import StageSummary

StageFn = Callable[[RunConfig, Backend, Path], StageSummary]
STAGE_FNS: dict[str, StageFn] = {  # the data stages; the trainers (TRAIN_STAGES) run through run_train
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
    named = {"sft": [cfg.sft.data], "rm": [cfg.rm.pairs, cfg.rm.reference], "ppo": [cfg.ppo.prompts, cfg.ppo.sft_data]}
    for stage in TRAIN_STAGES:
        if stage in cfg.stages:
            files += [Path(f) for f in named[stage] if f is not None]
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
        if cfg.critique.prompts is not None:
            load_prompts(cfg.critique.prompts, None, cfg.run_dir)
    if "judge" in cfg.stages:
        load_constitution(cfg.judge.constitution)
        if cfg.judge.candidates == "file":
            file_items(cfg.judge.responses)
        elif cfg.judge.candidates == "samples" and cfg.judge.prompts is not None:
            load_prompts(cfg.judge.prompts, None, cfg.run_dir)
    if "rerank" in cfg.stages and cfg.rerank.prompts is not None:
        load_prompts(cfg.rerank.prompts, None, cfg.run_dir)
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
    if "sft" in cfg.stages and cfg.sft.data is None and "critique" not in cfg.stages:
        if not (cfg.run_dir / "sft.jsonl").is_file():
            raise FileNotFoundError(f"{cfg.run_dir / 'sft.jsonl'}: nothing to fine-tune on; run the critique stage "
                                    "first, or set sft.data")
    if "rm" in cfg.stages and cfg.rm.pairs is None and "judge" not in cfg.stages:
        if not (cfg.run_dir / "preferences.jsonl").is_file():
            raise FileNotFoundError(f"{cfg.run_dir / 'preferences.jsonl'}: no preference pairs to train the reward "
                                    "model on; run the judge stage first, or set rm.pairs")
    if "ppo" in cfg.stages:
        rm = cfg.ppo.reward_model or RunLayout.of(cfg).rm_model
        if "rm" not in cfg.stages and not Path(rm).is_dir():
            raise FileNotFoundError(f"{rm}: no reward model for PPO; add the rm stage, run `factory train rm`, "
                                    "or set ppo.reward_model")
        if cfg.ppo.prompts is None and "instances" not in cfg.stages and not tasks_here.is_file():
            raise FileNotFoundError(f"{tasks_here}: no prompts for PPO; run instances first, or set ppo.prompts")
    if "rerank" in cfg.stages:
        rm = cfg.rerank.reward_model or RunLayout.of(cfg).rm_model
        rm_first = "rm" in cfg.stages and cfg.stages.index("rm") < cfg.stages.index("rerank")
        if not rm_first and not Path(rm).is_dir():
            raise FileNotFoundError(f"{rm}: no reward model to rerank with; run `factory train rm` first, "
                                    "or set rerank.reward_model")
        if cfg.rerank.prompts is None and "instances" not in cfg.stages and not tasks_here.is_file():
            raise FileNotFoundError(f"{tasks_here}: no prompts to rerank; run instances first, or set rerank.prompts")


GENERATOR_STAGES = ("generate", "bootstrap", "instances", "critique", "rerank")
"""stages whose text the policy writes; the judge stage asks the backend's model, every round"""
FIRST_ROUND_ONLY = ("generate", "bootstrap", "instances")
"""later rounds reuse round 1's tasks: the prompts stay, the answers change"""


def round_dirs(run_dir: Path) -> list[Path]:
    """The folders of a run's rounds, in order: round-1, round-2, ... or the run folder itself."""
    rounds = [p for p in Path(run_dir).glob("round-*") if p.is_dir() and p.name[6:].isdigit()]
    return sorted(rounds, key=lambda p: int(p.name[6:])) or [Path(run_dir)]


def round_config(cfg: RunConfig, r: int) -> RunConfig:
    """Round r's own config: its folder, its stages, and where its policy starts."""
    if cfg.rounds == 1:
        return cfg
    update: dict = {"output_dir": cfg.run_dir, "name": f"round-{r}", "rounds": 1}
    if r > 1:
        previous = str(RunLayout.of(cfg, cfg.run_dir / f"round-{r - 1}").policy_model)
        update["stages"] = [s for s in cfg.stages if s not in FIRST_ROUND_ONLY]
        # The loop: round r fine-tunes (sft) and optimises (ppo) the policy round r-1 ended with,
        # which is also the KL reference of its PPO.
        update["sft"] = cfg.sft.model_copy(update={"model": previous})
        update["ppo"] = cfg.ppo.model_copy(update={"policy": "auto" if "sft" in cfg.stages else previous})
    return cfg.model_copy(update=update)


def policy_spec(cfg: RunConfig, r: int) -> str:
    """The backend spec that generates round r's text: the configured model, then each round's policy."""
    if r == 1:
        return cfg.backend.spec
    kind = "vllm" if cfg.backend.spec.startswith("vllm:") else "hf"
    return f"{kind}:{RunLayout.of(cfg, cfg.run_dir / f'round-{r - 1}').policy_model}"


def carry_tasks(cfg: RunConfig, r: int) -> None:
    """Give round r (> 1) round 1's tasks, copied whole (a copy interrupted half-way is never seen)."""
    source = cfg.run_dir / "round-1" / "tasks.jsonl"
    target = cfg.run_dir / f"round-{r}" / "tasks.jsonl"
    if source.is_file() and not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".tasks.jsonl.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)


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


def run_train(stage: str, cfg: RunConfig, echo: Callable[[str], None]) -> dict:
    # The trainers import torch and peft; imported here, a run without them never pays for it.
    if stage == "sft":
        from factory.train.sft import run_sft as fn
    elif stage == "rm":
        from factory.train.reward import run_reward as fn
    else:
        from factory.train.ppo import run_ppo as fn
    return fn(cfg, echo=echo)


def run_round(cfg: RunConfig, r: int, backends: Backends, echo: Callable[[str], None]) -> list[StageSummary | dict]:
    rcfg = round_config(cfg, r)
    gen_spec, judge_spec = policy_spec(cfg, r), cfg.backend.spec
    judge_samples = "judge" in rcfg.stages and rcfg.judge.candidates == "samples"  # the generator samples for it
    needs = [gen_spec] * (judge_samples or any(s in GENERATOR_STAGES for s in rcfg.stages))
    needs += [judge_spec] * ("judge" in rcfg.stages)
    info: dict = {"spec": judge_spec}
    if needs:  # the manifest records the model actually used: remembered from an earlier load, loaded now
        # when the round's first stage loads it anyway, else named from the config (no engine starts for it)
        first_loads_it = len(set(needs)) == 1 and rcfg.stages[0] not in TRAIN_STAGES
        info |= backends.describe(needs[-1], load=first_loads_it)
    if gen_spec != judge_spec:
        info["generator"] = gen_spec
    write_manifest(rcfg.run_dir, rcfg, info, input_files(rcfg))
    results: list[StageSummary | dict] = []
    for stage in rcfg.stages:
        if stage in TRAIN_STAGES:
            backends.release()
            summary = run_train(stage, rcfg, echo)  # a trainer says what it did itself
            free_memory()  # the trainer's model and optimiser, before the next engine loads
        elif stage == "judge":
            if judge_samples and gen_spec != judge_spec:
                # The policy samples every prompt, then the judge loads (letting the policy go) and judges.
                summary = run_judge(rcfg, OnFirstCall(backends, judge_spec), rcfg.run_dir,
                                    generator=OnFirstCall(backends, gen_spec))
            else:  # one model samples and judges: one engine
                summary = run_judge(rcfg, backends.get(judge_spec), rcfg.run_dir)
            echo(summary.line())
        else:
            summary = STAGE_FNS[stage](rcfg, backends.get(gen_spec), rcfg.run_dir)
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
                echo(f"round {r} of {cfg.rounds}: {cfg.run_dir / f'round-{r}'}")
            if r > 1:
                carry_tasks(cfg, r)
                check_inputs(round_config(cfg, r))
            summaries += run_round(cfg, r, backends, echo)
        return summaries
    finally:
        backends.release()
