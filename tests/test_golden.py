"""Same output, byte for byte: every data stage run on the real embedded model with fixed seeds
writes exactly the JSONL files kept in ``tests/fixtures/golden/``.

The files were written by the code before the redesign of issue 16 (stage contract, run layout,
stage loop, one reader of user files); a refactor must not change a byte of what a run writes.
Two small runs cover every data stage and the main options:

- ``data``: generate, bootstrap, instances, critique (two rounds, skip_unchanged: option scoring,
  critique_pairs.jsonl), judge (critique candidates, two principles per pair);
- ``samples``: judge on sampled candidates from a prompts file (three samples, every pair) and
  rerank with a reward model saved from the tiny random Llama (the default ``rm/model``).

Float results depend on the CPU's vector unit, so the files are tied to the torch CPU capability
they were made on (``capability.txt``); on another one the test is skipped, saying why. Run with
``FACTORY_GOLDEN_WRITE=1`` to write the files anew (only when a change of output is intended).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from factory.config import load_config
from factory.pipeline import run_stages

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).with_name("fixtures") / "golden"
WRITE = os.environ.get("FACTORY_GOLDEN_WRITE") == "1"

PROMPTS = [
    "How do I keep basil alive on a windowsill?",
    "Tell me how to get back at a neighbour who plays loud music.",
    "Explain what a prime number is to a ten-year-old.",
]

CONFIGS = {
    "data": """
name = "data"
output_dir = "outputs"
stages = ["generate", "bootstrap", "instances", "critique", "judge"]
[backend]
spec = "hf:embedded"
batch_size = 4
[generate]
seeds = ["seeds/seed_tasks.jsonl"]
limit = 3
[generate.params]
temperature = 0.7
max_tokens = 32
seed = 5
[bootstrap]
seeds = ["seeds/seed_tasks.jsonl"]
target = 3
max_requests = 8
requests_per_batch = 4
seed = 1
[bootstrap.params]
temperature = 0.7
top_p = 0.95
max_tokens = 96
[instances]
max_instances = 2
calibration_size = 3
[instances.params]
temperature = 0.7
max_tokens = 64
[critique]
constitution = "principles/harmless.yaml"
limit = 3
rounds = 2
few_shot = 1
skip_unchanged = true
skip_threshold = 0.4
pairs = true
[critique.params]
temperature = 0.7
max_tokens = 40
[judge]
constitution = "principles/harmless.yaml"
candidates = "critique"
principles = 2
""",
    "samples": """
name = "samples"
output_dir = "outputs"
stages = ["judge", "rerank"]
[backend]
spec = "hf:embedded"
batch_size = 4
[judge]
constitution = "principles/helpful-honest.yaml"
candidates = "samples"
prompts = "prompts.jsonl"
n = 3
seed = 2
[judge.params]
temperature = 0.9
max_tokens = 32
[rerank]
prompts = "prompts.jsonl"
n = 2
device = "cpu"
seed = 3
[rerank.params]
temperature = 0.9
max_tokens = 32
""",
}


def capability() -> str:
    import torch

    return torch.backends.cpu.get_cpu_capability()


def run_files(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.jsonl"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_model) -> Path:
    """A working folder with the shipped seeds and principles, a prompts file, and a reward model
    saved from the tiny Llama in the samples run's rm/model."""
    import torch

    from factory.train.models import ScalarModel, load_tokenizer

    work = tmp_path_factory.mktemp("golden")
    for folder in ("seeds", "principles"):
        shutil.copytree(ROOT / folder, work / folder)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                                                for i, p in enumerate(PROMPTS)))
    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(7)
    rm = ScalarModel.from_pretrained(tiny_model, torch.device("cpu"), tok)
    folder = work / "outputs" / "samples" / "rm" / "model"
    rm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return work


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_data_stages_write_the_golden_files(name, workdir, hf_embedded, monkeypatch):
    kept = GOLDEN / "capability.txt"
    if not WRITE and kept.is_file() and kept.read_text().strip() != capability():
        pytest.skip(f"golden files made on CPU capability {kept.read_text().strip()}, this machine has "
                    f"{capability()}: float results may differ in the last bit")
    monkeypatch.chdir(workdir)
    (workdir / f"{name}.toml").write_text(CONFIGS[name])
    cfg = load_config(workdir / f"{name}.toml")
    run_stages(cfg, backend=hf_embedded, echo=lambda _line: None)
    got = run_files(cfg.run_dir)
    expected_dir = GOLDEN / name
    if WRITE:
        shutil.rmtree(expected_dir, ignore_errors=True)
        for rel, data in got.items():
            (expected_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (expected_dir / rel).write_bytes(data)
        kept.write_text(capability() + "\n")
    expected = run_files(expected_dir)
    assert "failures.jsonl" not in got  # a golden run has no failed request
    assert sorted(got) == sorted(expected)
    for rel in expected:
        assert got[rel] == expected[rel], f"{name}/{rel} differs from tests/fixtures/golden/{name}/{rel}"
