"""The `generate` stage: answer seed-task instructions with the chosen model.

The smallest useful job, and the template every stage follows: build work items,
key each one by its inputs and the settings that shape its output, skip the keys
already written, call the backend in batches, append each batch as it comes.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from factory.config import RunConfig
from factory.failures import Failures
from factory.llm.base import Backend
from factory.records import Generation, work_key
from factory.seeds import load_seeds, task_prompt
from factory.store import Store
from factory.summary import StageSummary

OUTPUT = "generations.jsonl"


def run_generate(cfg: RunConfig, backend: Backend, run_dir: Path) -> StageSummary:
    gen = cfg.generate
    tasks = [t for path in gen.seeds for t in load_seeds(path)]
    if gen.limit is not None:
        tasks = tasks[: gen.limit]
    settings = {"model": backend.model_id, "params": gen.params.model_dump(mode="json")}
    # One work item per (task, sample): with n > 1 each sample resumes on its own.
    items = []
    for task in tasks:
        messages = [{"role": "user", "content": task_prompt(task)}]
        for sample in range(gen.params.n):
            key = work_key({"messages": messages, "sample": sample}, settings)
            items.append((key, task, messages))
    store = Store(run_dir / OUTPUT, Generation)
    done = store.done_keys()
    todo = [it for it in items if it[0] not in done]
    params_one = gen.params.model_copy(update={"n": 1})
    failures = Failures(run_dir, "generate")
    written = 0
    with tqdm(total=len(items), initial=len(items) - len(todo), desc="generate", unit="item") as bar:
        for start in range(0, len(todo), cfg.backend.batch_size):
            batch = todo[start : start + cfg.backend.batch_size]
            # Each sample is its own request (n=1): a half-done task asks only for what is missing.
            # An item whose request failed for good is logged and left out; the next run asks again.
            completions = failures.kept(backend.generate, batch, [k for k, _, _ in batch], [m for _, _, m in batch],
                                        params_one)
            records = [
                Generation(
                    key=key,
                    task_id=task.id,
                    messages=messages,
                    text=c[0].text,
                    finish_reason=c[0].finish_reason,
                    model=backend.model_id,
                    params=settings["params"],
                )
                for (key, task, messages), c in completions
            ]
            written += store.append(records)
            failures.flush()
            bar.update(len(batch))
    return StageSummary("generate", len(items), len(items) - len(todo), written, store.path,
                        failed=failures.counts())
