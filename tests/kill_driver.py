"""Runs one stage of a run config, logging every model call, for the SIGKILL tests (test_kill_stages.py).

    python tests/kill_driver.py STAGE CONFIG RUN_DIR CALL_LOG
    python tests/kill_driver.py --serve        (the fork server, below)

A data stage (its ``STAGE`` object) gets the configured backend wrapped in ``CountingBackend``: before
each ``generate`` / ``option_logprobs`` it appends one JSON line to CALL_LOG, fsynced, with this
process's pid, the method, the sha256 of each request's messages, and ``complete``: the byte
length, up to its last newline, of the stage's primary output file (its source of truth) at that
moment. A trainer runs through its ``STAGE`` with its metrics rows logged the same way (one
``step`` line after each row is written). Every run logs a ``start`` line (``complete`` then, and
for a trainer the step of the checkpoint it will resume from) and, if it gets there, an ``end``
line. RUN_DIR replaces the config's output_dir/name, so one config serves several run folders.

The fork server pays for the imports once (torch, transformers and factory take ~3 s, more than
most runs' work): it reads one JSON request per line on stdin, forks a child that runs the stage
as above, optionally SIGKILLs it a given number of seconds after its ``start`` line, and answers
one JSON line on stdout. It never runs a torch operation itself, so no thread pool exists before
a fork; OMP_NUM_THREADS=1 in its environment keeps the children on one thread each.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

TRAINERS = ("sft", "rm", "ppo", "dpo")


def primary_file(stage: str, cfg) -> Path:
    """The file whose complete lines say what the stage has durably done: its source of truth."""
    from factory.layout import RunLayout

    layout = RunLayout.of(cfg)
    names = {
        "generate": layout.generations,
        "bootstrap": layout.bootstrap_requests,  # instructions.jsonl is completed from it on resume
        "instances": layout.tasks,
        "critique": layout.revisions,  # sft.jsonl and critique_pairs.jsonl derive from it
        "judge": layout.judgments,  # judgments.jsonl; preferences.jsonl derives from it
        "rerank": layout.rerank,
    }
    if stage in names:
        return names[stage]
    if stage == "dpo" and cfg.dpo.online:
        return layout.dpo.online  # the judge's labels: a call is written once its step's line is
    return {"sft": layout.sft, "rm": layout.rm, "ppo": layout.policy, "dpo": layout.dpo}[stage].metrics


def complete_bytes(path: Path) -> int:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return data.rfind(b"\n") + 1


def request_hash(messages) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode("utf-8")).hexdigest()


class CallLog:
    """CALL_LOG: one JSON line per event, each written with one ``write`` and fsynced before the
    event's work goes on, so a line on disk always precedes what it announces."""

    def __init__(self, path: Path, primary: Path):
        self.primary = primary
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def event(self, ev: str, **fields) -> None:
        row = {"ev": ev, "pid": os.getpid(), "t": time.time(), "complete": complete_bytes(self.primary), **fields}
        os.write(self.fd, (json.dumps(row) + "\n").encode("utf-8"))
        os.fsync(self.fd)


class CountingBackend:
    """The real backend, with every call logged first; everything else passes through."""

    def __init__(self, backend, log: CallLog):
        self.backend, self.log = backend, log
        self.model_id = backend.model_id

    def generate(self, requests, params):
        self.log.event("call", method="generate", hashes=[request_hash(r) for r in requests])
        return self.backend.generate(requests, params)

    def option_logprobs(self, requests, options):
        self.log.event("call", method="option_logprobs", hashes=[request_hash(r) for r in requests])
        return self.backend.option_logprobs(requests, options)

    def close(self) -> None:
        self.backend.close()

    def __getattr__(self, name):
        return getattr(self.backend, name)


def checkpoint_step(out: Path) -> int:
    """The step of the checkpoint a trainer in ``out`` would resume from (it falls back to
    ``checkpoint.old`` after a kill between save_checkpoint's two renames); 0 for none."""
    for folder in (out / "checkpoint", out / "checkpoint.old"):
        state = folder / "state.json"
        if state.is_file():
            return int(json.loads(state.read_text())["step"])
    return 0


def log_metrics(log: CallLog) -> None:
    """Make each trainer's metrics rows also log a ``step`` event, once the row is written."""
    from factory.train import dpo, ppo, reward, sft

    for module in (sft, reward, ppo, dpo):
        real = module.Metrics
        if getattr(real, "logged_for_kill_test", False):
            continue

        class Logged(real):
            logged_for_kill_test = True

            def log(self, step, **values):
                row = super().log(step, **values)
                kind = "train" if any(k in values for k in ("train/loss", "objective/kl")) else "other"
                log.event("step", step=step, kind=kind)
                return row

        module.Metrics = Logged


def run(stage: str, config: Path, run_dir: Path, call_log: Path) -> int:
    from factory.config import load_config
    from factory.layout import RunLayout
    from factory.llm import load_backend
    from factory.pipeline import STAGES, stage as stage_object
    from factory.stage import Context

    cfg = load_config(config)
    cfg = cfg.model_copy(update={"output_dir": run_dir.parent, "name": run_dir.name})
    run_dir.mkdir(parents=True, exist_ok=True)
    log = CallLog(call_log, primary_file(stage, cfg))
    if stage not in STAGES:
        print(f"unknown stage {stage!r}", file=sys.stderr)
        return 2
    st = stage_object(stage)
    if st.trains:
        log_metrics(log)
        backend = load_backend(cfg.backend) if st.roles(cfg) else None  # a trainer that asks the judge
        counting = CountingBackend(backend, log) if backend is not None else None
        log.event("start", ckpt_step=checkpoint_step(run_dir / getattr(cfg, stage).output))
        try:
            st.run(Context(cfg, RunLayout.of(cfg), models=lambda role, lazy: counting, echo=print))
        finally:
            if backend is not None:
                backend.close()
    else:
        backend = load_backend(cfg.backend)
        counting = CountingBackend(backend, log)  # one model for every role: one backend
        log.event("start")
        try:
            st.run(Context(cfg, RunLayout.of(cfg), models=lambda role, lazy: counting, echo=lambda _line: None))
        finally:
            backend.close()
    log.event("end")
    return 0


# -- the fork server ------------------------------------------------------------------------------


def started(call_log: Path, pid: int, offset: int) -> tuple[bool, int]:
    """Whether CALL_LOG holds ``pid``'s start line past ``offset``; the offset read up to."""
    try:
        with open(call_log, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return False, offset
    end = data.rfind(b"\n") + 1
    for line in data[:end].split(b"\n")[:-1]:
        row = json.loads(line)
        if row["ev"] == "start" and row["pid"] == pid:
            return True, offset + end
    return False, offset + end


def supervise(req: dict) -> dict:
    """Start one run (forked, or spawned as a fresh interpreter when ``spawn``), kill it
    ``kill_after_s`` seconds after its start line if it is still running, and say how it ended."""
    stage, config, run_dir, call_log, out = (req[k] for k in ("stage", "config", "run_dir", "call_log", "out"))
    offset = os.path.getsize(call_log) if os.path.exists(call_log) else 0
    t0 = time.time()
    proc = None
    if req.get("spawn"):
        with open(out, "ab") as f:
            proc = subprocess.Popen([sys.executable, __file__, stage, config, run_dir, call_log],
                                    stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        pid = proc.pid
    else:
        pid = os.fork()
        if pid == 0:  # the child: its output goes to its own file, never to the server's protocol
            code = 1
            try:
                fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                code = run(stage, Path(config), Path(run_dir), Path(call_log))
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
    pidfd = os.pidfd_open(pid)
    ready_at = None
    killed = False
    deadline = None
    while True:
        # The child's exit makes its pidfd readable; until then it stays a child of ours (even
        # as a zombie), so its pid cannot be reused before we kill it.
        readable, _, _ = select.select([pidfd], [], [], 0.005)
        if readable:
            break
        now = time.time()
        if ready_at is None:
            ok, offset = started(Path(call_log), pid, offset)
            if ok:
                ready_at = now
                if req.get("kill_after_s") is not None:
                    deadline = now + req["kill_after_s"]
        if deadline is not None and now >= deadline:
            os.kill(pid, signal.SIGKILL)
            killed = True
            deadline = None
    code = proc.wait() if proc is not None else os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    os.close(pidfd)
    end = time.time()
    return {"pid": pid, "code": code, "killed": killed and code == -signal.SIGKILL,
            "ready_s": None if ready_at is None else ready_at - t0, "seconds": end - t0,
            "after_ready_s": None if ready_at is None else end - ready_at}


def serve() -> int:
    # Everything a run imports, imported once here; nothing here runs a torch op (see the docstring).
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (transformers imports models lazily)

    import factory.llm.hf  # noqa: F401
    import factory.pipeline  # noqa: F401
    import factory.train.ppo  # noqa: F401
    import factory.train.reward  # noqa: F401
    import factory.train.sft  # noqa: F401

    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        print(json.dumps(supervise(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        sys.exit(serve())
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    stage_, config_, run_dir_, call_log_ = sys.argv[1:]
    sys.exit(run(stage_, Path(config_), Path(run_dir_), Path(call_log_)))
