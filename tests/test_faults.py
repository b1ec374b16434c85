"""The HTTP backend and the stages against a misbehaving OpenAI-compatible server (tests/faulty_server.py).

Each fault the server can inject is tried on a batch where one request meets it once, one
meets it every time and one never does: retries are bounded, the flaky request gets through,
the persistent one fails alone with the reason, and the rest of the batch comes back. Then
whole stages run through the CLI: failed items are logged and left out, the command exits 3
with a summary, and a rerun against a healthy server asks only for the failed items.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.llm.base import BatchIncomplete, GenParams
from factory.llm.openai import OpenAIBackend
from factory.records import Failure, Generation, Judgment, Revision
from factory.store import read_jsonl
from tests.faulty_server import FAULTS, HANG_S, FaultyServer

pytestmark = pytest.mark.slow  # the good replies come from the real embedded model

EXPECTED = {  # what the reason of a request that never got past the fault says
    "429": "HTTP 429",
    "429-retry-after": "HTTP 429",
    "500": "HTTP 500",
    "503": "HTTP 503",
    "reset": "Error",  # ReadError / RemoteProtocolError: the connection was reset
    "hang": "ReadTimeout",
    "malformed-json": "not JSON",
    "truncated": "RemoteProtocolError",
    "empty-choices": "no choices",
}
TRIED: dict[str, int] = {"faults": 0, "requests": 0, "injected": 0, "failed_items": 0}


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def marked(messages: list[dict[str, str]], marker: str) -> bool:
    return any(marker in m["content"] for m in messages)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_is_retried_a_bounded_number_of_times_and_fails_only_its_item(fault, hf_embedded):
    def plan(messages, attempt):
        if marked(messages, "ALWAYS"):
            return fault
        if marked(messages, "ONCE") and attempt == 0:
            return fault
        return None

    requests = [user("Name a colour. ONCE"), user("Name a fruit. ALWAYS"), user("Name a tree.")]
    with FaultyServer(hf_embedded, plan) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_retries=2, backoff_s=0.01, max_backoff_s=0.05,
                                timeout_s=HANG_S / 2, max_concurrency=3)
        t0 = time.monotonic()
        with pytest.raises(BatchIncomplete) as err:
            backend.generate(requests, GenParams(max_tokens=8, temperature=0.0))
        elapsed = time.monotonic() - t0
        backend.close()
    results, reasons = err.value.results, err.value.reasons
    attempts = [sum(h.messages == r for h in srv.hits) for r in requests]
    TRIED["faults"] += 1
    TRIED["requests"] += len(srv.hits)
    TRIED["injected"] += sum(h.fault is not None for h in srv.hits)
    TRIED["failed_items"] += len(reasons)
    assert attempts == [2, 3, 1], "ONCE: one fault then success; ALWAYS: 1 try + max_retries, then it gives up"
    assert list(reasons) == [1]
    assert "gave up after 3 attempts" in reasons[1] and EXPECTED[fault] in reasons[1], reasons[1]
    assert results[1] is None
    assert [len(r) for r in (results[0], results[2])] == [1, 1]  # the others came back, each a real completion
    assert all(c.finish_reason in ("stop", "length") for r in (results[0], results[2]) for c in r)
    if fault == "429-retry-after":
        assert elapsed >= 2.0, "two retries of the ALWAYS request each waited out Retry-After: 1"
    print(f"FIGURES http: fault={fault} attempts={attempts} elapsed={elapsed:.1f}s reason={reasons[1][-90:]!r}")


@pytest.mark.timeout(60)
def test_a_refused_request_fails_alone_without_retries_and_a_dead_server_stops_the_batch(hf_embedded):
    with FaultyServer(hf_embedded, lambda m, a: "400" if marked(m, "TOO LONG") else None) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_retries=3, backoff_s=0.01)
        with pytest.raises(BatchIncomplete) as err:
            backend.generate([user("TOO LONG"), user("Say hi.")], GenParams(max_tokens=4, temperature=0.0))
        backend.close()
    assert [sum(h.messages == user(t) for h in srv.hits) for t in ("TOO LONG", "Say hi.")] == [1, 1]
    assert list(err.value.reasons) == [0] and "HTTP 400" in err.value.reasons[0]
    TRIED["requests"] += len(srv.hits)
    TRIED["injected"] += 1

    # Every request failing: after stop_after_failures in a row the whole batch stops (the server is down).
    with FaultyServer(hf_embedded, lambda m, a: "503") as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_retries=0, backoff_s=0.0, stop_after_failures=3,
                                max_concurrency=1)
        with pytest.raises(Exception) as err:
            backend.generate([user(f"q{i}") for i in range(10)], GenParams(max_tokens=4))
        backend.close()
    assert not isinstance(err.value, BatchIncomplete) and "3 requests in a row failed" in str(err.value)
    assert len(srv.hits) <= 4  # it stopped, instead of failing all ten one by one
    TRIED["requests"] += len(srv.hits)
    TRIED["injected"] += len(srv.hits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("status", ["401", "404"])
def test_a_wrong_key_or_model_stops_the_batch_without_waiting_for_retries(status, hf_embedded):
    # Two requests are told to come back in a minute (and may retry 5 times); the others meet a
    # refusal no request gets past. The batch must stop at the first refusal, not after the retries.
    # (No request here reaches the model: one still generating in a server thread when the process
    # exits would abort it.)
    def plan(messages, attempt):
        return "503-retry-later" if marked(messages, "WAIT") else status

    requests = [user("WAIT 0"), user("WAIT 1")] + [user(f"Name a number. {i}") for i in range(20)]
    outcome = {}

    def run():
        try:
            backend.generate(requests, GenParams(max_tokens=4, temperature=0.0))
        except Exception as e:
            outcome["error"] = e

    with FaultyServer(hf_embedded, plan) as srv:
        backend = OpenAIBackend(srv.base_url, "m", max_retries=5, backoff_s=30.0, max_backoff_s=60.0,
                                max_concurrency=3)
        t0 = time.monotonic()
        worker = threading.Thread(target=run, daemon=True)  # so an old, waiting client cannot hold the test up
        worker.start()
        worker.join(20.0)
        elapsed = time.monotonic() - t0
        time.sleep(0.5)  # a retry or a queued request the stop failed to cancel would show up now
        hits = list(srv.hits)
        backend.close()
    assert not worker.is_alive(), "the batch waited for the other request's Retry-After"
    assert f"HTTP {status}" in str(outcome["error"]) and "batch stopped" in str(outcome["error"]), outcome
    assert elapsed < 10.0, f"took {elapsed:.1f} s"
    assert [sum(h.messages == user(f"WAIT {i}") for h in hits) for i in (0, 1)] == [1, 1], "retried after the stop"
    assert len(hits) <= 6, f"the server saw {len(hits)} of {len(requests)} requests: queued ones were not cancelled"
    TRIED["requests"] += len(hits)
    TRIED["injected"] += sum(h.fault is not None for h in hits)


# ---- whole stages through the CLI ---------------------------------------------------------------


def write_config(folder: Path, base_url: str, stages: list[str], extra: str = "") -> Path:
    cfg = folder / "faults.toml"
    cfg.write_text(
        f'name = "faulty"\noutput_dir = "{folder / "outputs"}"\nstages = {json.dumps(stages)}\n'
        f'[backend]\nspec = "openai:{base_url}#m"\nmax_retries = 1\nbackoff_s = 0.01\ntimeout_s = 60.0\n'
        f"batch_size = 4\n{extra}",
        encoding="utf-8",
    )
    return cfg


def run_cli(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


@pytest.mark.timeout(300)
def test_generate_logs_failed_items_exits_3_and_a_rerun_asks_only_for_them(tmp_path, hf_embedded):
    tasks = [("calm", "Say one calm word."), ("broken-503", "Say one loud word."), ("ok-2", "Say one short word."),
             ("broken-reset", "Say one long word."), ("ok-3", "Say one kind word."), ("flaky", "Say one odd word.")]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps({"id": i, "name": i, "instruction": t, "instances": [{"input": "", "output": "Word."}],
                                         "is_classification": False})
                             + "\n" for i, t in tasks), encoding="utf-8")

    faults = {"loud": "503", "long": "reset"}

    def plan(messages, attempt):
        text = messages[-1]["content"]
        if "odd" in text and attempt == 0:
            return "500"  # flaky: the retry gets through
        return next((f for word, f in faults.items() if word in text), None)

    with FaultyServer(hf_embedded, plan) as srv:
        cfg = write_config(tmp_path, srv.base_url, ["generate"],
                           f'[generate]\nseeds = ["{seeds}"]\n[generate.params]\nmax_tokens = 6\ntemperature = 0.0\n')
        first = run_cli("generate", "--config", str(cfg))
        run_dir = tmp_path / "outputs" / "faulty"
        assert first.exit_code == 3, first.output
        assert "FAILED 2" in first.output and "HTTP 503 1" in first.output
        assert "2 items failed for good (generate 2)" in first.output and "failures.jsonl" in first.output
        written = {g.task_id for g in read_jsonl(run_dir / "generations.jsonl", Generation)}
        assert written == {"calm", "ok-2", "ok-3", "flaky"}
        failed = read_jsonl(run_dir / "failures.jsonl", Failure)
        assert sorted(f.stage for f in failed) == ["generate", "generate"]
        assert any("HTTP 503" in f.reason for f in failed) and all("gave up after 2 attempts" in f.reason for f in failed)
        before = (run_dir / "generations.jsonl").read_bytes()
        TRIED["requests"] += len(srv.hits)
        TRIED["injected"] += sum(h.fault is not None for h in srv.hits)

        # The server recovers: the rerun asks for the two failed items only, and appends them.
        faults.clear()
        srv.hits.clear()
        again = run_cli("generate", "--config", str(cfg))
        assert again.exit_code == 0, again.output
        asked = sorted(h.messages[-1]["content"] for h in srv.hits)
        assert asked == ["Say one long word.", "Say one loud word."]
        after = (run_dir / "generations.jsonl").read_bytes()
        assert after.startswith(before)  # nothing written before was touched
        assert {g.task_id for g in read_jsonl(run_dir / "generations.jsonl", Generation)} == {i for i, _ in tasks}
        TRIED["requests"] += len(srv.hits)
        TRIED["failed_items"] += len(failed)
    print("FIGURES http: stage=generate failed=2 retried_on_rerun=2 extra_requests=0 lost=0")


@pytest.mark.timeout(400)
def test_critique_and_judge_drop_an_item_failing_midway_and_the_rerun_redoes_only_it(tmp_path, hf_embedded):
    texts = ["Give one tip for sleeping well.", "Name a good habit for study.", "Suggest a name for a cat."]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)),
                       encoding="utf-8")
    responses = tmp_path / "responses.jsonl"
    responses.write_text("".join(json.dumps({"id": f"r{i}", "prompt": t, "responses": ["Yes.", f"About: {t}"]})
                                 + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    broken = {"critique": True, "judge": True}

    def plan(messages, attempt):
        # Only later requests fail: the critique request of the cat prompt (its first answer got
        # through), and every judge request (a logprobs one) about the study prompt.
        judging = messages[-1]["content"] == "Answer: ("  # the judge's prefill
        if broken["critique"] and marked(messages, "name for a cat") and len(messages) > 1 and not judging:
            return "503"
        if broken["judge"] and marked(messages, "habit for study") and judging:
            return "empty-choices"
        return None

    with FaultyServer(hf_embedded, plan) as srv:
        extra = (f'[critique]\nprompts = "{prompts}"\nrounds = 1\nfew_shot = 0\n'
                 f"[critique.params]\nmax_tokens = 8\ntemperature = 0.0\n"
                 f'[judge]\ncandidates = "file"\nresponses = "{responses}"\n')
        cfg = write_config(tmp_path, srv.base_url, ["critique", "judge"], extra)
        first = run_cli("run", str(cfg), "--no-report", "--show", "0")
        run_dir = tmp_path / "outputs" / "faulty"
        assert first.exit_code == 3, first.output
        assert "3 items failed for good" not in first.output and "(critique 1, judge 1)" in first.output
        revisions = read_jsonl(run_dir / "revisions.jsonl", Revision)
        assert sorted(r.prompt for r in revisions) == sorted(texts[:2])  # the cat prompt failed at its critique
        judged = read_jsonl(run_dir / "judgments.jsonl", Judgment)
        assert sorted(j.prompt for j in judged) == sorted([texts[0], texts[2]])  # the study prompt's judge failed
        failed = {f.stage: f.reason for f in read_jsonl(run_dir / "failures.jsonl", Failure)}
        assert "HTTP 503" in failed["critique"] and "no choices" in failed["judge"], failed
        cat_hits = [h for h in srv.hits if marked(h.messages, "name for a cat") and not h.logprobs]
        assert [h.fault for h in cat_hits] == [None, "503", "503"]  # first answer, then the critique twice; no revision
        TRIED["requests"] += len(srv.hits)
        TRIED["injected"] += sum(h.fault is not None for h in srv.hits)
        TRIED["failed_items"] += len(failed)

        broken.update(critique=False, judge=False)
        srv.hits.clear()
        again = run_cli("run", str(cfg), "--no-report", "--show", "0")
        assert again.exit_code == 0, again.output
        # The rerun redoes the cat prompt's critique (first answer, critique, revision) and the study
        # prompt's judgment (both orders), and nothing else.
        critique_hits = [h for h in srv.hits if not h.logprobs]
        assert len(critique_hits) == 3 and all(h.messages[0]["content"] == texts[2] for h in critique_hits)
        judge_hits = [h for h in srv.hits if h.logprobs]
        assert len(judge_hits) == 2 and all(marked(h.messages, texts[1]) for h in judge_hits)
        assert sorted(r.prompt for r in read_jsonl(run_dir / "revisions.jsonl", Revision)) == sorted(texts)
        assert sorted(j.prompt for j in read_jsonl(run_dir / "judgments.jsonl", Judgment)) == sorted(texts)
        TRIED["requests"] += len(srv.hits)
    print("FIGURES http: stages=critique,judge failed=2 retried_on_rerun=2 extra_requests=0 lost=0")


def test_zz_print_http_fault_totals():
    """Runs last in this file (pytest keeps file order): the totals the README quotes."""
    print(f"FIGURES http-total: fault_kinds={len(FAULTS)}+400 tried={TRIED['faults']} requests={TRIED['requests']} "
          f"injected={TRIED['injected']} failed_items={TRIED['failed_items']} (each test asserts none was lost)")
    assert TRIED["faults"] in (0, len(FAULTS))  # 0 when run alone with -k
