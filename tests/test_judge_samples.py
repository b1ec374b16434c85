"""The judge stage with sampled candidates: every sample is drawn (and written) before the first
judgment, with the batches and seeds the interleaved stage used, so the model that samples can be
let go before the judge loads; a resumed run asks neither model again for what is written.

The backends are deterministic stand-ins for seeded models (``Seeded``): a sample's text is a
function of its prompt, the call's seed, its row in the call and its index, as a real batch's is;
a letter's score a function of the request. A kill is a ``Killed`` raised at a chosen call.
"""

from __future__ import annotations

from pathlib import Path
import hashlib
import json
import math

import pytest

from factory.config import load_config
from factory.judge import Sampled, run_judge
from factory.layout import RunLayout
from factory.llm.base import BatchIncomplete, Completion, normalise
from factory.records import Failure, Judgment
from factory.store import read_jsonl
from tests.test_judge import CONSTITUTION

OUTPUT, PAIRS, SAMPLES = (p.name for p in (RunLayout(Path()).judgments, RunLayout(Path()).preferences,
                                             RunLayout(Path()).judge_samples))

PROMPTS = [f"Say something about {t}." for t in ("tea", "rain", "maps", "bread", "owls")]


class Killed(Exception):
    pass


def prompt_of(request) -> str:
    """The prompt a request is about: the user's message, or the one a judge request shows."""
    user = next(m["content"] for m in request if m["role"] == "user")
    return user.removeprefix("User message: ").split("\n\n")[0]


class Seeded:
    """Deterministic replies; ``log`` gets (model id, method, requests, seed) of every call, ``crash_at``
    raises ``Killed`` at that call (1-based) before doing it, and a request that mentions a string of
    ``fail`` fails for good (``BatchIncomplete``), as an HTTP server's can."""

    def __init__(self, model_id: str, log: list, crash_at: int | None = None, fail: tuple[str, ...] = ()):
        self.model_id, self.log, self.crash_at, self.fail = model_id, log, crash_at, fail
        self.calls = 0

    def _called(self, method: str, requests, seed=None) -> None:
        self.calls += 1
        if self.calls == self.crash_at:
            raise Killed(f"{self.model_id}: killed at call {self.calls}")
        self.log.append((self.model_id, method, [prompt_of(r) for r in requests], seed))

    def _results(self, requests, results: list) -> list:
        failed = {i: "HTTP 503 (retries spent)" for i, r in enumerate(requests)
                  if any(f in m["content"] for f in self.fail for m in r)}
        if failed:
            raise BatchIncomplete([None if i in failed else x for i, x in enumerate(results)], failed)
        return results

    def generate(self, requests, params):
        self._called("generate", requests, params.seed)
        return self._results(requests, [
            [Completion(text=f"{r[-1]['content']} (seed {params.seed}, row {i}, sample {j})", finish_reason="stop")
             for j in range(params.n)] for i, r in enumerate(requests)])

    def option_logprobs(self, requests, options):
        self._called("option_logprobs", requests)

        def score(r, option) -> float:
            digest = hashlib.sha256(json.dumps([r, option]).encode()).digest()
            return math.log(0.05 + digest[0] / 255)

        return self._results(requests, [normalise({o: score(r, o) for o in options}) for r in requests])

    def close(self) -> None:
        pass


def config(folder, name: str, n: int = 2):
    (folder / "tiny.yaml").write_text(CONSTITUTION, encoding="utf-8")
    prompts = folder / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS), encoding="utf-8")
    # batch_size 4 with n = 2: 4 // (2 * 1) = 2 prompts a batch, at offsets 0, 2 and 4; seeds 3, 5, 7.
    return load_config(None, [f"output_dir={folder}", f"name={name}", "stages=[judge]", "judge.candidates=samples",
                              f"judge.prompts={prompts}", f"judge.constitution={folder / 'tiny.yaml'}", f"judge.n={n}",
                              "judge.seed=3", "backend.batch_size=4", "judge.principles=all"])


def files(run_dir) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in (SAMPLES, OUTPUT, PAIRS)}


def digests(run_dir) -> dict[str, str]:
    """The start of the sha256 of the judgments and the pairs."""
    return {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()[:16] for name in (OUTPUT, PAIRS)}


def run(cfg, log: list, gen_crash=None, judge_crash=None, gen_fail=(), judge_fail=()):
    generator = Seeded("policy", log, gen_crash, gen_fail)
    judge = Seeded("judge", log, judge_crash, judge_fail)
    return run_judge(cfg, judge, RunLayout.of(cfg), generator=generator)


def test_every_sample_is_drawn_first_with_the_batches_and_seeds_of_the_interleaved_stage(tmp_path):
    cfg = config(tmp_path, "r")
    log: list = []
    summary = run(cfg, log)
    assert summary.written == len(PROMPTS)
    # The policy samples every batch (its prompts, the seed of its offset), then the judge scores each batch.
    gen = [(prompts, seed) for who, method, prompts, seed in log if who == "policy"]
    assert gen == [(PROMPTS[0:2], 3), (PROMPTS[2:4], 5), (PROMPTS[4:], 7)]
    assert {(who, method) for who, method, _, _ in log} == {("policy", "generate"), ("judge", "option_logprobs")}
    assert [who for who, *_ in log] == ["policy"] * 3 + ["judge"] * 3
    # Each batch's judge call holds its two prompts' requests: 2 principles x 2 orders each.
    assert [len(prompts) for who, _, prompts, _ in log if who == "judge"] == [8, 8, 4]
    judged = read_jsonl(cfg.run_dir / OUTPUT, Judgment)
    drawn = {s.key: s.responses for s in read_jsonl(cfg.run_dir / SAMPLES, Sampled)}
    assert [j.key for j in judged] == list(drawn) and all(j.responses == drawn[j.key] for j in judged)
    assert judged[2].responses == [f"{PROMPTS[2]} (seed 5, row 0, sample {j})" for j in range(2)]
    assert {j.judge_model for j in judged} == {"judge"}
    # Byte for byte what the interleaved stage (judge.py of commit 8190909, each batch sampled then judged)
    # wrote for the same calls.
    assert digests(cfg.run_dir) == {OUTPUT: "a20fc419f7d7413f", PAIRS: "5c4fe6640e819824"}


def test_one_backend_that_samples_and_judges_draws_every_sample_first_too(tmp_path):
    cfg = config(tmp_path, "r", n=3)  # 4 // (3 * 2) = 0: one prompt a batch
    log: list = []
    one = Seeded("one", log)
    run_judge(cfg, one, RunLayout.of(cfg))
    assert [(method, seed) for _, method, _, seed in log] == (
        [("generate", 3 + start) for start in range(len(PROMPTS))] + [("option_logprobs", None)] * len(PROMPTS))
    assert len(read_jsonl(cfg.run_dir / OUTPUT, Judgment)) == len(PROMPTS)
    assert digests(cfg.run_dir) == {OUTPUT: "60af8adec5e18e5a", PAIRS: "830d44102d0b3fda"}  # as at commit 8190909


@pytest.mark.parametrize("kill", ["while sampling", "while judging"])
def test_a_killed_run_resumes_without_asking_again_and_writes_the_same_bytes(tmp_path, kill):
    reference = config(tmp_path, "reference")
    run(reference, [])
    cfg = config(tmp_path, "killed")
    first: list = []
    with pytest.raises(Killed):
        # killed at the policy's second batch (the first is written), or at the judge's second batch
        # (every sample and the first batch's judgments are written)
        run(cfg, first, gen_crash=2 if kill == "while sampling" else None,
            judge_crash=2 if kill == "while judging" else None)
    again: list = []
    run(cfg, again)
    asked_before = {(who, p) for who, _, prompts, _ in first for p in prompts}
    asked_again = {(who, p) for who, _, prompts, _ in again for p in prompts}
    assert not asked_before & asked_again  # whatever was asked was written, and is not asked again
    if kill == "while judging":
        assert not [c for c in again if c[0] == "policy"]  # the samples were all written: none drawn again
    else:
        assert [(prompts, seed) for who, _, prompts, seed in again if who == "policy"] == [
            (PROMPTS[2:4], 5), (PROMPTS[4:], 7)]  # the batches left, with their own seeds
    assert files(cfg.run_dir) == files(reference.run_dir)


def test_an_item_that_failed_is_the_only_one_asked_again_and_keeps_its_samples(tmp_path):
    reference = config(tmp_path, "reference")
    run(reference, [])
    cfg = config(tmp_path, "failing")
    # The policy fails "maps" for good; the judge fails every request about "owls".
    log: list = []
    summary = run(cfg, log, gen_fail=("maps",), judge_fail=("owls",))
    assert summary.written == 3 and sum(summary.failed.values()) == 2
    assert [prompts for who, _, prompts, _ in log if who == "judge"][1] == [PROMPTS[3]] * 4  # "maps" never judged
    failed = {f.item for f in read_jsonl(cfg.run_dir / "failures.jsonl", Failure)}
    sampled = {s.key for s in read_jsonl(cfg.run_dir / SAMPLES, Sampled)}
    assert len(failed) == 2 and len(sampled) == 4 and len(failed - sampled) == 1  # "owls" kept its samples
    again: list = []
    run(cfg, again)
    # "maps" is sampled again in its own batch's call (offset 2, seed 5), "owls" is judged from its kept samples.
    assert [(prompts, seed) for who, _, prompts, seed in again if who == "policy"] == [([PROMPTS[2]], 5)]
    assert [prompts for who, _, prompts, _ in again if who == "judge"] == [[PROMPTS[2]] * 4, [PROMPTS[4]] * 4]
    # The same judgments as a run without failures, in another order ("maps" was row 0 of its batch's call
    # both times, so the stand-in gave it the same samples).
    judged = {j.key: j for j in read_jsonl(cfg.run_dir / OUTPUT, Judgment)}
    assert judged == {j.key: j for j in read_jsonl(reference.run_dir / OUTPUT, Judgment)}
