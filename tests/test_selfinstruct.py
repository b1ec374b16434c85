"""Self-Instruct end to end on the real embedded model: `factory bootstrap`, then `factory instances`."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from rouge_score import rouge_scorer

from factory.cli import cli
from factory.records import BootstrapRequest, Instruction, Task
from factory.seeds import load_seeds
from factory.store import read_jsonl

pytestmark = pytest.mark.slow


def test_bootstrap_then_instances_on_the_embedded_model(seeded_dir):
    tmp_path = seeded_dir
    (tmp_path / "si.toml").write_text(
        'name = "si"\n[backend]\ndevice = "cpu"\n'
        "[bootstrap]\ntarget = 20\nrequests_per_batch = 8\nseed = 3\n"
        "[bootstrap.params]\nmax_tokens = 128\ntemperature = 0.7\ntop_p = 0.95\n"
        "[instances.params]\nmax_tokens = 128\ntemperature = 0.7\ntop_p = 0.95\n",
        encoding="utf-8",
    )
    runner = CliRunner()
    result = runner.invoke(cli, ["bootstrap", "--config", "si.toml"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "outputs" / "si"
    accepted = read_jsonl(run / "instructions.jsonl", Instruction)  # validates every record
    assert len(accepted) >= 20
    assert "bootstrap: " in result.output and "rejected" in result.output

    # Independent check with rouge-score itself: nothing accepted is a near-duplicate of the
    # seeds or of an instruction accepted before it.
    seeds = [t.instruction for t in load_seeds(Path("seeds/seed_tasks.jsonl"))]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    pool = list(seeds)
    for a in accepted:
        best = max(scorer.score(p, a.instruction)["rougeL"].fmeasure for p in pool)
        assert best <= 0.7, a.instruction
        assert a.most_similar[0].score == pytest.approx(best, abs=1e-12)
        pool.append(a.instruction)
    requests = read_jsonl(run / "bootstrap_requests.jsonl", BootstrapRequest)
    assert {a.request_id for a in accepted} <= {r.key for r in requests}

    result = runner.invoke(cli, ["instances", "--config", "si.toml"])
    assert result.exit_code == 0, result.output
    tasks = read_jsonl(run / "tasks.jsonl", Task)
    assert [t.instruction for t in tasks] == [a.instruction for a in accepted]
    assert all(0.0 <= t.p_classification <= 1.0 for t in tasks)
    assert sum(len(t.instances) for t in tasks) > 0
    for t in tasks:
        assert (t.dropped is None) == bool(t.instances)
        assert len(t.instances) <= 5
        for inst in t.instances:
            assert inst.output.strip() and inst.input != inst.output and not inst.output.endswith(":")

    # Rerunning both does nothing new.
    again = runner.invoke(cli, ["instances", "--config", "si.toml"])
    assert f"instances: 0 written, {len(tasks)} already done" in again.output
