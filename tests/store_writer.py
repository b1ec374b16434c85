"""A stage in miniature, for the kill test in test_store.py: resumes, then appends N records.

    python tests/store_writer.py OUT LOG N BATCH

Each record's key and payload follow from its index alone, so the test can check every
byte that survived. The writer logs to LOG (one file per run, fsynced around each
append) which keys it is about to append ("A ...") and that the append returned
("W written"), so the test can tell that no record was ever written twice.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import warnings
from pathlib import Path

from factory.records import Generation, work_key
from factory.store import Store, StoreWarning

PAYLOAD_BYTES = 8192  # big enough that a write takes real time and a kill can land inside it
MODEL_CALL_S = 0.004  # stands in for the model call before each batch: paces the writer


def key_of(i: int) -> str:
    return work_key({"i": i}, {"stage": "kill-test"})


def payload_of(key: str) -> str:
    blocks, digest = [], key.encode()
    while len(blocks) * 64 < PAYLOAD_BYTES:
        digest = hashlib.sha256(digest).hexdigest().encode()
        blocks.append(digest.decode())
    return "".join(blocks)


def record_of(i: int) -> Generation:
    key = key_of(i)
    return Generation(
        key=key,
        task_id=f"t{i}",
        messages=[{"role": "user", "content": f"task {i}: ünïcødé ✓\nsecond line"}],
        text=payload_of(key),
        finish_reason="stop",
        model="kill-test",
        params={"i": i},
    )


def main(out: Path, log: Path, n: int, batch: int) -> int:
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def note(line: str) -> None:
        os.write(logfd, (line + "\n").encode())
        os.fsync(logfd)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StoreWarning)
        store = Store(out, Generation)
    for w in caught:
        note(f"T {w.message}")
    done = store.done_keys()
    note(f"S {len(done)}")
    todo = [i for i in range(n) if key_of(i) not in done]
    for start in range(0, len(todo), batch):
        time.sleep(MODEL_CALL_S)
        records = [record_of(i) for i in todo[start : start + batch]]
        note("A " + " ".join(r.key for r in records))
        written = store.append(records)
        note(f"W {written}")
        if written != len(records) or store.append(records) != 0:  # asking twice writes nothing
            return 3
    note("E")
    return 0


if __name__ == "__main__":
    out, log, n, batch = sys.argv[1:]
    sys.exit(main(Path(out), Path(log), int(n), int(batch)))
