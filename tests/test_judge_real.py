"""The judge on the real embedded model: critique output in, pairs in both TRL formats out;
killed and restarted; judge-eval on the human-labelled fixture."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.config import load_config
from factory.critique import run_critique
from factory.judge import run_judge
from factory.records import Judgment, Preference
from conftest import kill_once_written
from factory.store import read_jsonl
from factory.layout import RunLayout

REPO = Path(__file__).parents[1]
PROMPTS = 4

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def critiqued(tmp_path_factory, hf_embedded) -> Path:
    """revisions.jsonl from a real critique run on a few red-team prompts."""
    out = tmp_path_factory.mktemp("critiqued")
    cfg = load_config(None, [f"output_dir={out}", "name=c", f"critique.constitution={REPO / 'principles/harmless.yaml'}",
                             f"critique.prompts={REPO / 'seeds/red_team_prompts.jsonl'}", f"critique.limit={PROMPTS}",
                             "critique.few_shot=1", "critique.params.max_tokens=32"])
    run_critique(cfg, hf_embedded, RunLayout.of(cfg))
    return cfg.run_dir / "revisions.jsonl"


def test_judge_on_critique_output_writes_pairs_in_both_formats(tmp_path, critiqued, hf_embedded):
    import datasets

    run_dir = tmp_path / "j"
    run_dir.mkdir()
    shutil.copy(critiqued, run_dir / "revisions.jsonl")
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=j", "stages=[judge]", "judge.principles=2",
                             f"judge.constitution={REPO / 'principles/harmless.yaml'}"])
    summary = run_judge(cfg, hf_embedded, RunLayout.of(cfg, run_dir))
    judgments = read_jsonl(run_dir / "judgments.jsonl", Judgment)
    assert summary.written == len(judgments) == PROMPTS
    pairs = read_jsonl(run_dir / "preferences.jsonl", Preference)
    judged = [j for j in judgments if not j.dropped]
    assert len(pairs) == len(judged) >= PROMPTS - 1  # only a revision equal to its first answer is dropped
    for j in judged:
        assert len(j.principles) == 2 and len(j.comparisons) == 2  # one comparison per principle
        for c in j.comparisons:
            assert len(c.p_orders) == 2 and all(0 < q < 1 for q in c.p_orders)
            assert c.p == pytest.approx(sum(c.p_orders) / 2)
    for p in pairs:
        assert 0.5 <= p.p_chosen < 1 and p.margin == pytest.approx(2 * p.p_chosen - 1)
        assert {p.chosen, p.rejected} <= set(next(j.responses for j in judgments if j.key == p.source))
        assert p.judge_model == hf_embedded.model_id and p.low_confidence == (p.p_chosen < 0.6)

    standard = datasets.load_dataset("json", data_files=str(run_dir / "pairs_standard.jsonl"), split="train")
    assert standard.column_names == ["prompt", "chosen", "rejected"] and len(standard) == len(pairs)
    assert standard[0] == {"prompt": pairs[0].prompt, "chosen": pairs[0].chosen, "rejected": pairs[0].rejected}
    chat = datasets.load_dataset("json", data_files=str(run_dir / "pairs_conversational.jsonl"), split="train")
    assert chat[0]["prompt"] == [{"role": "user", "content": pairs[0].prompt}]
    assert chat[0]["chosen"] == [{"role": "assistant", "content": pairs[0].chosen}]
    assert chat[0]["rejected"] == [{"role": "assistant", "content": pairs[0].rejected}]


def test_judge_killed_and_restarted_repeats_no_written_judgment(tmp_path, critiqued):
    """`factory judge` with chain of thought (slow enough to kill mid-run), SIGKILLed once a
    judgment is written, then run again."""
    run_dir = tmp_path / "outputs" / "k"
    run_dir.mkdir(parents=True)
    shutil.copy(critiqued, run_dir / "revisions.jsonl")
    (tmp_path / "k.toml").write_text(
        'name = "k"\nstages = ["judge"]\n[backend]\ndevice = "cpu"\nbatch_size = 4\n'
        f'[judge]\nconstitution = "{REPO / "principles" / "harmless.yaml"}"\ncot = true\ncot_max_tokens = 32\n',
        encoding="utf-8",
    )
    out = run_dir / "judgments.jsonl"
    cmd = [str(Path(sys.executable).with_name("factory")), "judge", "--config", "k.toml"]
    before = kill_once_written(cmd, tmp_path, out, lines=1, poll_s=0.05)
    written_before = before.count(b"\n")
    assert 1 <= written_before < PROMPTS

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"judge: {PROMPTS - written_before} written, {written_before} already done, {PROMPTS} in all" in again.stdout
    assert out.read_bytes().startswith(before)  # what was written stays, byte for byte
    judgments = read_jsonl(out, Judgment)
    assert len({j.key for j in judgments}) == len(judgments) == PROMPTS
    for j in judgments:
        for c in j.comparisons:
            assert 0.4 <= c.p <= 0.6 and len(c.reasoning) == 2 and all(r.strip() for r in c.reasoning)
    pairs = read_jsonl(run_dir / "preferences.jsonl", Preference)
    assert len({p.key for p in pairs}) == len(pairs) == sum(not j.dropped for j in judgments)
    assert all(0.5 <= p.p_chosen <= 0.6 for p in pairs)
    rows = [json.loads(x) for x in (run_dir / "pairs_standard.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == len(pairs)


def test_judge_eval_reports_agreement_on_the_human_fixture(tmp_path):
    report = tmp_path / "agreement.json"
    result = CliRunner().invoke(cli, [
        "judge-eval", str(REPO / "tests/fixtures/human_pairs.jsonl"), "--limit", "8", "--batch-size", "8",
        "--constitution", str(REPO / "principles/helpful-honest.yaml"), "--report", str(report),
    ])
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text(encoding="utf-8"))
    assert figures["pairs"] == 8 and figures["judge_model"].startswith("hf:embedded/SmolLM2-135M")
    lo, hi = figures["ci95"]
    assert 0 <= lo <= figures["accuracy"] <= hi <= 1
    assert 0 <= figures["position_flip_rate"] <= 1 and 0 <= figures["ece"] <= 0.5
    assert sum(r["pairs"] for r in figures["per_principle"].values()) == 8
    for line in ("accuracy", "position-flip rate", "ECE", "principle"):
        assert line in result.output
