"""Shared fixtures. ``ServeProcess`` runs a real OpenAI-compatible server (``transformers serve``)
on the embedded model, for the HTTP backend's integration tests and anyone else who needs one."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    """A port nothing listens on right now (another process could take it; good enough on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``transformers serve`` pinned to one model folder on 127.0.0.1, startable, killable and
    restartable on the same port (to test clients through a server crash).

    The server only accepts requests that name the pinned model exactly (the folder path as
    given) or no model at all, and replies with ``"<path>@main"`` as the model.
    """

    def __init__(
        self, model_dir: Path | str, port: int | None = None, threads: int = 1, startup_timeout_s: float = 120.0
    ):
        self.model = str(model_dir)
        self.port = port or free_port()
        # One torch thread: on 2 shared cores, 2 threads that wait on each other while a test
        # process (or a neighbour) holds a core made generation ~4x slower than one thread.
        self.threads = threads
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None
        # Output goes to a file, not a pipe: a pipe nobody reads fills up and blocks the server.
        fd, log_path = tempfile.mkstemp(prefix=f"transformers-serve-{self.port}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(log_path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "ServeProcess":
        """Start the server and wait until ``/health`` answers; fail with its log tail if it does not."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"server on port {self.port} is already running (pid {self.proc.pid})")
        cli = Path(sys.executable).with_name("transformers")  # the console script of this venv
        cmd = [str(cli), "serve", self.model, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--device", "cpu", "--log-level", "warning"]
        env = os.environ | {
            "HF_HUB_OFFLINE": "1",  # never reach for the network
            "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": str(self.threads),
        }
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        late = f"transformers serve did not answer /health within {self.startup_timeout_s:.0f}s"
        raise RuntimeError(f"{late}:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL, as in a crash: no graceful shutdown, in-flight requests are torn."""
        self._signal(signal.SIGKILL, wait_s=30.0)

    def stop(self) -> None:
        """Graceful stop (SIGTERM), then SIGKILL if it lingers."""
        if not self._signal(signal.SIGTERM, wait_s=10.0):
            self.kill()

    def restart(self) -> "ServeProcess":
        self.kill()
        return self.start()

    def _signal(self, sig: int, wait_s: float) -> bool:
        """Send ``sig`` to the server's process group; say whether it has exited."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        try:
            os.killpg(self.proc.pid, sig)  # its own session: the group is the server and nothing else
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=wait_s)
            return True
        except subprocess.TimeoutExpired:
            return False

    def log_tail(self, chars: int = 4000) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""
        return text[-chars:]


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The converted embedded model folder (cached after the first conversion, ~1 s)."""
    from factory.llm.embedded import embedded_model_dir

    # No skip when it is missing: `make test` installs it, and a skip would hide a broken setup.
    return embedded_model_dir(progress=False)


@pytest.fixture(scope="session")
def serve(embedded_dir: Path):
    """One ``transformers serve`` on the embedded model, shared by the whole session."""
    server = ServeProcess(embedded_dir).start()
    try:
        yield server
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)


@pytest.fixture
def make_server(embedded_dir: Path):
    """Start extra ``transformers serve`` processes of one's own (e.g. to kill them); all stop at teardown."""
    started: list[ServeProcess] = []

    def make(**kwargs) -> ServeProcess:
        server = ServeProcess(embedded_dir, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in started:
            server.stop()
            server.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def hf_embedded():
    """The hf backend on the real embedded model, loaded once for the session."""
    from factory.llm.hf import HFBackend

    backend = HFBackend("embedded", device="cpu", batch_size=16)
    yield backend
    backend.close()


@pytest.fixture
def seeded_dir(tmp_path, monkeypatch) -> Path:
    """A temporary working folder holding a copy of the shipped seeds/seed_tasks.jsonl."""
    import shutil

    monkeypatch.chdir(tmp_path)
    (tmp_path / "seeds").mkdir()
    shutil.copy(Path(__file__).parents[1] / "seeds" / "seed_tasks.jsonl", tmp_path / "seeds" / "seed_tasks.jsonl")
    return tmp_path


def kill_once_written(cmd: list[str], cwd: Path, out: Path, lines: int, poll_s: float = 0.2,
                      timeout_s: float = 600) -> bytes:
    """Start ``cmd``, SIGKILL its process group as soon as ``out`` holds ``lines`` complete lines,
    and return the bytes of ``out`` at that moment (for kill-and-restart tests)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while not (out.is_file() and out.read_bytes().count(b"\n") >= lines):
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, f"{out.name}: {lines} line(s) not written within {timeout_s:.0f}s"
        time.sleep(poll_s)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return out.read_bytes()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (mark them ``pytest.mark.usefixtures("one_thread")``): a
    tiny model's ops are too small to share, and on 2 busy cores two torch threads waiting on each
    other made its runs ~5x slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model(embedded_dir: Path, tmp_path_factory) -> Path:
    """A tiny randomly initialised Llama (2 layers, width 32) with the embedded model's tokenizer
    and chat template, saved as a folder: trainer tests run on it in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


# ---- figures: the counts the reliability tests print, gathered at the end of every run -------------

FIGURES: list[str] = []


def pytest_runtest_logreport(report):
    """Keep the ``FIGURES ...`` lines a test printed (kill points, HTTP faults, malformed inputs tried)."""
    if report.when == "call":
        FIGURES.extend(line for line in report.capstdout.splitlines() if line.startswith("FIGURES"))


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures (what the reliability tests tried)")
        for line in FIGURES:
            terminalreporter.write_line(line.removeprefix("FIGURES "))
