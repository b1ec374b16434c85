import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import pytest

from factory.records import Generation, Record
from factory.store import Store, StoreError, StoreWarning, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
WRITER = Path(__file__).with_name("store_writer.py")


def gen(key: str, text: str = "answer") -> Generation:
    return Generation(
        key=key,
        task_id="t",
        messages=[{"role": "user", "content": "say ✓\nplease"}],
        text=text,
        finish_reason="stop",
        model="m",
        params={"temperature": 0.7},
    )


def test_append_and_read_back(tmp_path):
    path = tmp_path / "run" / "stage" / "out.jsonl"  # parent folders are made
    store = Store(path, Generation)
    assert store.records() == [] and len(store) == 0 and not path.exists()
    batch = [gen("a", "x\ny"), gen("b", "ünï ✓\u2028")]
    assert store.append(batch) == 2
    assert store.records() == batch
    assert read_jsonl(path, Generation) == batch
    assert path.read_bytes().count(b"\n") == 2 and "ünï".encode() in path.read_bytes()
    assert store.done_keys() == {"a", "b"} and "a" in store and len(store) == 2


def test_reopened_store_resumes_with_every_key(tmp_path):
    path = tmp_path / "out.jsonl"
    first = Store(path, Generation)
    first.append([gen("a"), gen("b")])
    first.append([gen("c")])
    again = Store(path, Generation)
    assert again.done_keys() == {"a", "b", "c"}
    assert [r.key for r in again.records()] == ["a", "b", "c"]


def test_known_keys_are_skipped_in_the_file_and_in_the_batch(tmp_path):
    path = tmp_path / "out.jsonl"
    store = Store(path, Generation)
    assert store.append([gen("a", "first")]) == 1
    assert store.append([gen("a", "second"), gen("b"), gen("b", "again")]) == 1
    assert store.append([gen("a"), gen("b")]) == 0
    assert Store(path, Generation).append([gen("a")]) == 0  # also after a restart
    assert [(r.key, r.text) for r in read_jsonl(path, Generation)] == [("a", "first"), ("b", "answer")]


def test_duplicate_keys_in_the_file_keep_the_first(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(gen("a", "first").model_dump_json() + "\n" + gen("a", "second").model_dump_json() + "\n")
    with pytest.warns(StoreWarning, match="1 records repeat an earlier key"):
        store = Store(path, Generation)
    assert [r.text for r in store.records()] == ["first"]
    assert store.done_keys() == {"a"} and len(store) == 1


def test_torn_last_line_is_dropped_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "out.jsonl"
    Store(path, Generation).append([gen("a"), gen("b")])
    good = path.read_bytes()
    torn = gen("c").model_dump_json().encode()[:40]  # a write cut short: no newline
    path.write_bytes(good + torn)

    with pytest.warns(StoreWarning, match=f"{path}: dropped a torn last line \\(40 bytes"):
        assert [r.key for r in read_jsonl(path, Generation)] == ["a", "b"]
    with pytest.warns(StoreWarning, match="40 bytes"):
        store = Store(path, Generation)
    assert store.done_keys() == {"a", "b"}
    assert path.read_bytes() == good + torn  # opening alone changes nothing

    assert store.append([gen("c", "whole")]) == 1
    assert path.read_bytes() == good + gen("c", "whole").model_dump_json().encode() + b"\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing torn is left to warn about
        assert [r.key for r in Store(path, Generation).records()] == ["a", "b", "c"]


def test_a_file_holding_only_a_torn_line_is_cut_to_empty(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"key": "a", "te')
    with pytest.warns(StoreWarning, match="16 bytes"):
        store = Store(path, Generation)
    assert len(store) == 0
    store.append([gen("b")])
    assert read_jsonl(path, Generation) == [gen("b")]


def test_corrupt_complete_line_raises_with_path_and_line_number(tmp_path):
    path = tmp_path / "out.jsonl"
    lines = [gen("a").model_dump_json(), '{"key": "b", "text": ', gen("c").model_dump_json()]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(StoreError) as err:
        Store(path, Generation)
    assert str(err.value) == (
        f"{path}, line 2: not a valid Generation: Invalid JSON: EOF while parsing a value at line 1 column 21"
    )
    with pytest.raises(StoreError, match="line 2"):
        read_jsonl(path, Generation)


def test_blank_line_and_bad_utf8_are_corruption_too(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_bytes(gen("a").model_dump_json().encode() + b"\n\n")
    with pytest.raises(StoreError, match=f"^{path}, line 2: not a valid Generation: Invalid JSON"):
        Store(path, Generation)
    path.write_bytes(b'{"key": "\xff"}\n')
    with pytest.raises(StoreError, match=f"^{path}, line 1: not a valid Generation"):
        Store(path, Generation)


def test_record_failing_validation_raises_with_path_line_and_field(tmp_path):
    path = tmp_path / "out.jsonl"
    bad = gen("b").model_dump() | {"finish_reason": "eos", "score": 3}
    path.write_text(gen("a").model_dump_json() + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(StoreError) as err:
        Store(path, Generation)
    message = str(err.value)
    assert message.startswith(f"{path}, line 2: not a valid Generation: ")
    assert "finish_reason: Input should be 'stop' or 'length'" in message
    assert "score: Extra inputs are not permitted" in message
    assert "Record" not in message and len(message) < 300  # the kilobytes of the line are not echoed


def test_records_of_another_type_or_that_would_not_read_back_are_refused(tmp_path):
    class Scored(Record):
        score: float

    path = tmp_path / "out.jsonl"
    with pytest.raises(TypeError, match="stores Generation, got Record"):
        Store(path, Generation).append([Record(key="a")])
    store = Store(path, Scored)
    with pytest.raises(StoreError, match="record a would not read back: score"):
        store.append([Scored(key="a", score=float("nan"))])  # pydantic dumps NaN as null
    assert not path.exists() and len(store) == 0


def test_failed_write_raises_store_error_and_keeps_what_was_written(tmp_path):
    path = tmp_path / "out.jsonl"
    store = Store(path, Generation)
    store.append([gen("a")])
    good = path.read_bytes()
    path.chmod(0o444)
    try:
        if os.access(path, os.W_OK):
            pytest.skip("running as root: a read-only file is still writable")
        with pytest.raises(StoreError, match=f"^{path}: write failed, the records before it are intact: .*Permission denied"):
            store.append([gen("b")])
    finally:
        path.chmod(0o644)
    assert path.read_bytes() == good and store.done_keys() == {"a"}
    assert store.append([gen("b")]) == 1  # the key was not taken as done
    assert [r.key for r in read_jsonl(path, Generation)] == ["a", "b"]


def test_unwritable_folder_raises_store_error_naming_the_file(tmp_path):
    path = tmp_path / "run" / "out.jsonl"
    store = Store(path, Generation)
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(StoreError, match=f"^{path}: write failed, the records before it are intact: "):
        store.append([gen("a")])
    assert len(store) == 0
    with pytest.raises(StoreError, match=f"^{path}: cannot read: .*Not a directory"):
        Store(path, Generation)


def test_a_write_cut_short_is_cut_off_by_the_next_append(tmp_path, monkeypatch):
    # What a full disk does: part of the batch lands, then the write fails.
    path = tmp_path / "out.jsonl"
    store = Store(path, Generation)
    store.append([gen("a")])
    good = path.read_bytes()

    def fsync_after_a_partial_write(fd):
        os.write(fd, b'{"key": "b", "ta')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_after_a_partial_write)
    with pytest.raises(StoreError, match="No space left on device"):
        store.append([gen("b")])
    monkeypatch.undo()
    assert store.done_keys() == {"a"}
    assert store.append([gen("b"), gen("c")]) == 2
    assert path.read_bytes().startswith(good + gen("b").model_dump_json().encode() + b"\n")
    assert [r.key for r in read_jsonl(path, Generation)] == ["a", "b", "c"]


# --- the kill test: SIGKILL a writer at random moments, restart it, check nothing was lost or doubled ---


def _load_writer():
    spec = importlib.util.spec_from_file_location("store_writer", WRITER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _complete_lines(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    return data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]


def _log(path: Path) -> list[list[str]]:
    # A kill can tear the log's own last line: keep complete lines only.
    return [line.decode().split(" ") for line in _complete_lines(path)]


def test_killed_and_restarted_writer_loses_nothing_and_doubles_nothing(tmp_path):
    writer = _load_writer()
    n, batch, kills = 400, 4, 12
    out = tmp_path / "out.jsonl"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rng = random.Random(1234)
    durable_at_start = []  # per run: the keys in the file when it started
    injected = 0
    deadline = time.monotonic() + 120

    for run in range(kills + 1):
        done = {json.loads(line)["key"] for line in _complete_lines(out)}
        durable_at_start.append(done)
        if run % 3 == 1 and out.read_bytes().endswith(b"\n"):
            # A kill rarely lands inside write() itself (the copy takes microseconds), so
            # also leave what it would: the first bytes of a record still to be written.
            line = writer.record_of(min(i for i in range(n) if writer.key_of(i) not in done)).model_dump_json()
            with open(out, "ab") as f:
                f.write(line.encode()[: rng.randrange(1, len(line))])
            injected += 1
        log = tmp_path / f"log{run}.txt"
        proc = subprocess.Popen([sys.executable, str(WRITER), str(out), str(log), str(n), str(batch)], env=env)
        if run == kills:  # the last run is left to finish
            assert proc.wait(timeout=60) == 0
            break
        # Kill only once this run has begun an append, so every run makes progress and
        # the kills land amid the writing, not in the interpreter's start-up.
        while not any(entry[0] == "A" for entry in _log(log)):
            assert proc.poll() is None, f"writer run {run} exited early with {proc.returncode}"
            assert time.monotonic() < deadline, "writer too slow to start"
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL, f"run {run} finished before its kill: make n larger"

    # 1. The file: no torn tail, every line parses, each key exactly once, payloads intact.
    data = out.read_bytes()
    assert data.endswith(b"\n")
    lines = data.split(b"\n")[:-1]
    records = [Generation.model_validate_json(line) for line in lines]
    expected = {writer.key_of(i): writer.record_of(i) for i in range(n)}
    assert sorted(r.key for r in records) == sorted(expected)  # each key exactly once
    for r in records:
        assert r == expected[r.key]

    # 2. The logs: no run attempted a key that was already in the file when it started
    #    (no model call repeated for a written result), and no append was confirmed twice.
    logs = [_log(tmp_path / f"log{run}.txt") for run in range(kills + 1)]
    confirmed, interrupted, torn_recoveries = Counter(), 0, 0
    for run, entries in enumerate(logs):
        attempts = [entry[1:] for entry in entries if entry[0] == "A"]
        attempted = [k for keys in attempts for k in keys]
        assert len(attempted) == len(set(attempted)), f"run {run} attempted a key twice"
        assert not set(attempted) & durable_at_start[run], f"run {run} redid work already in the file"
        for i, entry in enumerate(entries):
            if entry[0] == "A" and i + 1 < len(entries) and entries[i + 1][0] == "W":
                assert entries[i + 1][1] == str(len(entry) - 1)
                confirmed.update(entry[1:])
            elif entry[0] == "A":
                interrupted += 1
        torn_recoveries += sum(entry[0] == "T" for entry in entries)
    assert max(confirmed.values()) == 1
    assert set(confirmed) <= set(expected)
    assert logs[-1][-1] == ["E"]
    assert torn_recoveries >= injected >= 4
    print(f"\nkill test: {kills} kills, {interrupted} between the log's A and W lines, "
          f"{torn_recoveries} torn lines recovered ({injected} of them injected), "
          f"{n - len(durable_at_start[-1])} records left to the last run")
