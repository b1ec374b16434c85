"""The `generate` stage: answer seed-task instructions with the chosen model.

The smallest useful job, and the template every stage follows (``factory/stage.py``): declare
what it reads and writes, build work items keyed by their inputs and the settings that shape
their output, and let the stage loop skip the keys already written, cut fixed batches, call the
backend and append each batch as it comes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from factory.llm.base import Backend
from factory.records import Generation, work_key
from factory.seeds import check_seeds, load_seeds, task_prompt
from factory.stage import Context, Stage
from factory.stageloop import StageLoop
from factory.store import Store
from factory.summary import StageSummary

if TYPE_CHECKING:
    from factory.config import RunConfig
    from factory.layout import RunLayout


def run_generate(cfg: "RunConfig", backend: Backend, layout: "RunLayout") -> StageSummary:
    gen = cfg.generate
    tasks = [t for path in gen.seeds for t in load_seeds(path)]
    if gen.limit is not None:
        tasks = tasks[: gen.limit]
    settings = {"model": backend.model_id, "params": gen.params.model_dump(mode="json")}
    # 1. One work item per (task, sample): with n > 1 each sample resumes on its own.
    items = []
    for task in tasks:
        messages = [{"role": "user", "content": task_prompt(task)}]
        for sample in range(gen.params.n):
            key = work_key({"messages": messages, "sample": sample}, settings)
            items.append((key, task, messages))
    store = Store(layout.generations, Generation)
    loop = StageLoop("generate", layout, items, key=lambda it: it[0], store=store, batch_size=cfg.backend.batch_size)
    params_one = gen.params.model_copy(update={"n": 1})
    for _, batch in loop.batches():
        # 2. Each sample is its own request (n=1): a half-done task asks only for what is missing.
        completions = loop.ask(backend.generate, batch, [m for _, _, m in batch], params_one)
        # 3. Append what came back; an item whose request failed for good is asked again next run.
        loop.append([
            Generation(key=key, task_id=task.id, messages=messages, text=c[0].text, finish_reason=c[0].finish_reason,
                       model=backend.model_id, params=settings["params"])
            for (key, task, messages), c in completions
        ])
    return loop.summary()


class Generate(Stage):
    name = section = "generate"
    first_round_only = True

    def roles(self, cfg):
        return ("generator",)

    def user_files(self, cfg) -> list[Path]:
        return list(cfg.generate.seeds)

    def writes(self, cfg, layout) -> list[Path]:
        return [layout.generations]

    def check(self, cfg) -> None:
        check_seeds(cfg.generate.seeds)

    def run(self, ctx: Context) -> StageSummary:
        return run_generate(ctx.cfg, ctx.model("generator"), ctx.layout)


STAGE = Generate()
