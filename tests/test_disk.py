"""A full disk and a read-only output folder: a clear error, and the records already written intact.

The store test caps the file size with RLIMIT_FSIZE (works anywhere). The CLI tests put the
run folder on a small tmpfs, really filled up or remounted read-only; mounting needs root
(as on CI), so they are skipped where it is not allowed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.records import ChatExample, Generation
from factory.store import Store, read_jsonl

REPO = Path(__file__).resolve().parents[1]
TRIED = {"disk_full": 0, "read_only": 0}


def test_a_write_past_the_size_limit_fails_clearly_and_leaves_whole_lines(tmp_path):
    """The file may grow to 5000 bytes; batches of records are appended until a write fails."""
    out = tmp_path / "gens.jsonl"
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from factory.records import Generation
        from factory.store import Store, StoreError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
        resource.setrlimit(resource.RLIMIT_FSIZE, (5000, 5000))
        store = Store({str(out)!r}, Generation)
        for b in range(100):
            batch = [Generation(key=f"k{{b}}-{{i}}", task_id="t", messages=[], text="x" * 150, finish_reason="stop",
                                model="m", params={{}}) for i in range(3)]
            try:
                store.append(batch)
            except StoreError as e:
                print(e)
                sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert str(out) in proc.stdout and "File too large" in proc.stdout and "records before it are intact" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    data = out.read_bytes()
    assert data.endswith(b"\n") and len(data) <= 5000  # the partial batch was cut back at once
    records = read_jsonl(out, Generation)
    assert len(records) % 3 == 0 and len(records) >= 3  # whole batches only
    assert [r.key for r in records] == [f"k{b}-{i}" for b in range(len(records) // 3) for i in range(3)]
    TRIED["disk_full"] += 1


@contextmanager
def tmpfs(folder: Path, size_kb: int):
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full; return it (deleting it frees the space)."""
    filler = folder / f"filler-{uuid.uuid4().hex}"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: close() must not fail flushing a rest
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    return filler


def config(tmp_path: Path, out: Path, limit: int) -> Path:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'name = "r"\noutput_dir = "{out}"\nstages = ["generate"]\n[backend]\nbatch_size = 2\n'
                   f'[generate]\nseeds = ["{REPO / "seeds" / "seed_tasks.jsonl"}"]\nlimit = {limit}\n'
                   f"[generate.params]\nmax_tokens = 8\ntemperature = 0.0\n", encoding="utf-8")
    return cfg


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output
    return result


def check_whole(path: Path) -> list[Generation]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "a torn last line was left behind"
    records = read_jsonl(path, Generation)
    assert len({r.key for r in records}) == len(records)
    return records


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_full_disk_stops_the_run_clearly_and_a_rerun_after_freeing_space_finishes(tmp_path):
    with tmpfs(tmp_path / "fs", 256) as fs:
        cfg = config(tmp_path, fs, 2)
        assert invoke("generate", "--config", str(cfg)).exit_code == 0
        gens = fs / "r" / "generations.jsonl"
        before = gens.read_bytes()
        filler = fill(fs)

        # Full to the last byte: the manifest cannot be rewritten; the old one and the data stay.
        manifest = (fs / "r" / "manifest.json").read_bytes()
        full = invoke("generate", "--config", str(cfg), "--set", "generate.limit=40")
        assert full.exit_code == 2 and "No space left on device" in full.output, full.output
        assert "manifest.json" in full.output
        assert (fs / "r" / "manifest.json").read_bytes() == manifest and gens.read_bytes() == before
        assert not [p.name for p in (fs / "r").iterdir() if "tmp" in p.name]

        # Three pages free: the manifest fits, a few batches fit, then an append fails half-way.
        with open(filler, "r+b") as f:
            f.truncate(filler.stat().st_size - 3 * 4096)
        part = invoke("generate", "--config", str(cfg), "--set", "generate.limit=40")
        assert part.exit_code == 2, part.output
        assert f"{gens}: write failed, the records before it are intact" in part.output
        assert "the disk is full" in part.output
        records = check_whole(gens)
        assert gens.read_bytes().startswith(before) and 2 <= len(records) < 40

        # Space again: the rerun does the rest, nothing twice.
        filler.unlink()
        done = invoke("generate", "--config", str(cfg), "--set", "generate.limit=40")
        assert done.exit_code == 0, done.output
        final = check_whole(gens)
        assert len(final) == 40 and [r.key for r in final[: len(records)]] == [r.key for r in records]
    TRIED["disk_full"] += 2
    print(f"FIGURES disk: full-disk writes refused=2 records_before={len(records)} final={len(final)} lost=0")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_read_only_output_folder_is_a_clear_error_and_changes_nothing(tmp_path):
    with tmpfs(tmp_path / "fs", 1024) as fs:
        cfg = config(tmp_path, fs, 2)
        assert invoke("generate", "--config", str(cfg)).exit_code == 0
        Store(fs / "r" / "sft.jsonl", ChatExample).append([ChatExample(  # something to export
            key="k", source="k", constitution="c", principles=[],
            messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])])
        snapshot = {p: p.read_bytes() for p in (fs / "r").rglob("*") if p.is_file()}
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        try:
            again = invoke("generate", "--config", str(cfg), "--set", "generate.limit=4")
            assert again.exit_code == 2 and "Read-only file system" in again.output, again.output
            report = invoke("report", str(fs / "r"))
            assert report.exit_code == 2 and "Read-only file system" in report.output, report.output
            export = invoke("export", str(fs / "r"), "--format", "trl-sft", "-o", str(fs / "sft.jsonl"))
            assert export.exit_code == 2 and "Read-only file system" in export.output, export.output
            assert {p: p.read_bytes() for p in (fs / "r").rglob("*") if p.is_file()} == snapshot
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
        done = invoke("generate", "--config", str(cfg), "--set", "generate.limit=4")
        assert done.exit_code == 0 and len(check_whole(fs / "r" / "generations.jsonl")) == 4
    TRIED["read_only"] += 3
    print(f"FIGURES disk: read-only commands refused=3 (generate, report, export) changed_files=0 "
          f"totals={json.dumps(TRIED)}")
