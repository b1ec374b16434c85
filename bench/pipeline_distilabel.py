"""The distilabel side of bench/pipeline.py: answer -> critique -> revise as a distilabel 1.5.3 pipeline.

Three tasks, each on its own ``TransformersLLM`` (transformers' text-generation pipeline) over the
same model folder. The answer is distilabel's ``TextGeneration`` with the template ``{{ prompt }}``;
the critique and the revision are two small ``Task``s whose ``format_input`` calls factory's own
prompt functions on the columns the earlier steps wrote (the critique step reads ``answer``, the
revision step reads ``answer`` and ``critique``). So every step sends the model exactly the
conversation factory sends, few-shot turns included: a ``TextGeneration`` template can only make a
single user message, which would change the prompts and their length.

bench/pipeline.py runs this file as a child process with a job file, and reads back its results:
distilabel forks its step workers, and a fork from a process whose torch has already run its
OpenMP threads (as the benchmark's own process has) hangs in the first parallel region. A fresh
process, as any distilabel user's script is, does not. Needs the benchmark's environment
(distilabel is not a factory dependency).

    python bench/pipeline_distilabel.py JOB.json     # writes JOB.json's "out" file
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from distilabel.models.llms import TransformersLLM
from distilabel.pipeline import Pipeline
from distilabel.steps import LoadDataFromDicts
from distilabel.steps.tasks import Task, TextGeneration
from pydantic import PrivateAttr

from factory.constitution import Constitution, load_constitution
from factory.critique import critique_messages, few_shot_turns, revision_messages


class BatchedTransformersLLM(TransformersLLM):
    """``TransformersLLM`` whose text-generation pipeline runs ``batch_size`` prompts per forward pass.

    distilabel 1.5.3 hands a whole step batch to the transformers pipeline but never sets that
    pipeline's batch size, which then defaults to 1: one sequence at a time, ~10x slower on the
    CPU. Setting it is what a user who wants batching has to do, and what a fair comparison needs.
    It also notes its load and generate times in ``timing_dir`` (one file per worker process),
    so the report can tell model time from orchestration time.
    """

    batch_size: int = 1
    timing_dir: str | None = None

    def load(self) -> None:
        t0 = time.perf_counter()
        super().load()
        self._pipeline._batch_size = self.batch_size
        self._note("load", time.perf_counter() - t0)

    def generate_outputs(self, inputs: list, num_generations: int = 1, **kwargs: Any) -> list:
        t0 = time.perf_counter()
        out = super().generate_outputs(inputs, num_generations, **kwargs)
        self._note("generate", time.perf_counter() - t0)
        return out

    def _note(self, what: str, seconds: float) -> None:
        if self.timing_dir:
            import torch

            with open(Path(self.timing_dir) / f"{os.getpid()}.txt", "a") as f:
                f.write(f"{what} {seconds} {torch.get_num_threads()}\n")


class _ConstitutionTask(Task):
    """A task that builds factory's conversations; the constitution is read once per worker."""

    constitution: str
    few_shot: int = 2
    _constitution: Constitution | None = PrivateAttr(None)

    def load(self) -> None:
        super().load()
        self._constitution = load_constitution(Path(self.constitution))

    def _critique_messages(self, row: dict[str, Any]) -> list[dict[str, str]]:
        c = self._constitution
        p = c.get(row["principle"])
        return critique_messages(few_shot_turns(c, self.few_shot, p), row["prompt"], row["answer"], p)


class Critique(_ConstitutionTask):
    @property
    def inputs(self) -> list[str]:
        return ["prompt", "answer", "principle"]

    @property
    def outputs(self) -> list[str]:
        return ["critique", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        return self._critique_messages(input)

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"critique": output}


class Revise(_ConstitutionTask):
    @property
    def inputs(self) -> list[str]:
        return ["prompt", "answer", "principle", "critique"]

    @property
    def outputs(self) -> list[str]:
        return ["revision", "model_name"]

    def format_input(self, input: dict[str, Any]) -> list[dict[str, str]]:
        p = self._constitution.get(input["principle"])
        asks = self._critique_messages(input)
        return revision_messages(asks, input["critique"], input["prompt"], input["answer"], p)

    def format_output(self, output: str | None, input: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"revision": output}


def build_pipeline(rows: list[dict[str, str]], model_dir: str, constitution: str, few_shot: int, batch_size: int,
                   gen: dict[str, Any], cache_dir: Path, timing_dir: Path) -> Pipeline:
    """rows: {"prompt", "principle"} each; the principle is the one factory drew for that prompt."""

    def llm() -> BatchedTransformersLLM:
        return BatchedTransformersLLM(model=model_dir, torch_dtype="float32", device="cpu", batch_size=batch_size,
                                      timing_dir=str(timing_dir), generation_kwargs=gen)

    with Pipeline(name="factory-critique-bench", cache_dir=cache_dir) as pipeline:
        load = LoadDataFromDicts(name="prompts", data=rows, batch_size=batch_size)
        answer = TextGeneration(name="answer", llm=llm(), template="{{ prompt }}", columns=["prompt"],
                                output_mappings={"generation": "answer"}, input_batch_size=batch_size)
        critique = Critique(name="critique", llm=llm(), constitution=constitution, few_shot=few_shot,
                            input_batch_size=batch_size)
        revise = Revise(name="revise", llm=llm(), constitution=constitution, few_shot=few_shot,
                        input_batch_size=batch_size)
        load >> answer >> critique >> revise
    return pipeline


def run(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The pipeline's output rows, in input order; nothing is taken from a previous run's cache."""
    distiset = pipeline.run(use_cache=False)
    return list(distiset["default"]["train"])


def timings(timing_dir: Path) -> dict[str, float]:
    """Seconds spent loading models and inside generate, over all worker processes, and their threads."""
    out = {"load": 0.0, "generate": 0.0, "threads": 0.0}
    for f in timing_dir.glob("*.txt"):
        for line in f.read_text().splitlines():
            what, seconds, threads = line.split()
            out[what] += float(seconds)
            out["threads"] = max(out["threads"], float(threads))
    return out


def main(job_file: str) -> None:
    """Warm up on the job's few warm-up rows, then time one whole ``pipeline.run`` on its rows."""
    job = json.loads(Path(job_file).read_text())
    work = Path(job["work"])
    results = {}
    for name, rows, gen in (("warmup", job["warmup_rows"], job["warmup_gen"]), ("timed", job["rows"], job["gen"])):
        timing_dir = work / name / "timing"
        timing_dir.mkdir(parents=True)
        pipeline = build_pipeline(rows, job["model_dir"], job["constitution"], job["few_shot"], job["batch_size"], gen,
                                  work / name / "cache", timing_dir)
        t0 = time.perf_counter()
        out = run(pipeline)
        seconds = time.perf_counter() - t0
        results[name] = {"seconds": seconds, "rows": [{k: row.get(k) for k in ("prompt", "answer", "critique", "revision")}
                                                      for row in out], **timings(timing_dir)}
    Path(job["out"]).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
