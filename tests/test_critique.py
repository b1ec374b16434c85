"""Critique -> revise: exact prompts and records with scripted replies; a real run killed and resumed."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from factory.config import load_config
from factory.constitution import Constitution, Example, Principle
from factory.critique import (
    CHANGE_QUESTION,
    critique_messages,
    few_shot_turns,
    revision_messages,
    run_critique,
)
from factory.llm.scripted import ScriptedBackend
from factory.records import ChatExample, PreferencePair, Revision
from conftest import kill_once_written
from factory.store import StoreError, read_jsonl
from factory.layout import RunLayout

REPO = Path(__file__).parents[1]

CONSTITUTION = """\
name: tiny
description: two principles for tests
principles:
  - id: kind
    critique: 'Point out anything unkind in your last response to "{prompt}".'
    revision: 'Rewrite your response to be kind. Your critique was: {critique}'
    judge: Which response is kinder?
    weight: 3
  - id: brief
    critique: Point out anything that could be shorter.
    revision: Rewrite it shorter.
    judge: Which response is shorter?
examples:
  - prompt: Say hi.
    response: HI!!! WHAT DO YOU WANT
    critique: It shouts.
    revision: Hi there!
    principle: kind
"""


@pytest.fixture
def constitution_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(CONSTITUTION, encoding="utf-8")
    return p


def tiny() -> Constitution:
    kind = Principle(id="kind", critique='Point out anything unkind in your last response to "{prompt}".',
                     revision="Rewrite your response to be kind. Your critique was: {critique}",
                     judge="Which response is kinder?", weight=3)
    brief = Principle(id="brief", critique="Point out anything that could be shorter.",
                      revision="Rewrite it shorter.", judge="Which response is shorter?")
    ex = Example(prompt="Say hi.", response="HI!!! WHAT DO YOU WANT", critique="It shouts.", revision="Hi there!",
                 principle="kind")
    return Constitution(name="tiny", description="d", principles=[kind, brief], examples=[ex])


def test_prompts_are_exact_chat_turns():
    c = tiny()
    few = few_shot_turns(c, 1, c.get("brief"))
    assert few == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "HI!!! WHAT DO YOU WANT"},
        {"role": "user", "content": 'Point out anything unkind in your last response to "Say hi.".'},
        {"role": "assistant", "content": "It shouts."},
        {"role": "user", "content": "Rewrite your response to be kind. Your critique was: It shouts."},
        {"role": "assistant", "content": "Hi there!"},
    ]
    assert few_shot_turns(c, 0, c.get("brief")) == []
    ask = critique_messages(few, "Tell me {prompt}", "No.", c.get("kind"))
    # a placeholder-like text inside the user's prompt is inserted literally, never expanded
    assert ask[-3:] == [
        {"role": "user", "content": "Tell me {prompt}"},
        {"role": "assistant", "content": "No."},
        {"role": "user", "content": 'Point out anything unkind in your last response to "Tell me {prompt}".'},
    ]
    rev = revision_messages(ask, "Too curt.", "Tell me {prompt}", "No.", c.get("kind"))
    assert rev[-2:] == [{"role": "assistant", "content": "Too curt."},
                        {"role": "user", "content": "Rewrite your response to be kind. Your critique was: Too curt."}]


def test_run_critique_records_every_round_and_resumes(tmp_path, constitution_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "p1", "prompt": "Insult my neighbour."}\n\n{"prompt": "Is the sky green?"}\n',
                       encoding="utf-8")
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "name=t", f"critique.constitution={constitution_file}",
                             f"critique.prompts={prompts}", "critique.rounds=2", "critique.skip_unchanged=true",
                             "critique.few_shot=1", "critique.pairs=true"])
    lp = math.log
    backend = ScriptedBackend(
        ["first answer 1", "first answer 2",  # initial responses
         "crit 1a", "crit 2a", "revised 1a",  # round 1: prompt 2's revision is skipped
         "crit 1b", "crit 2b", "revised 1b", "revised 2b"],  # round 2
        option_scores=[{"Yes": lp(0.9), "No": lp(0.1)}, {"Yes": lp(0.2), "No": lp(0.8)},
                       {"Yes": lp(0.7), "No": lp(0.3)}, {"Yes": lp(0.6), "No": lp(0.4)}],
    )
    summary = run_critique(cfg, backend, RunLayout.of(cfg))
    assert summary.written == 2
    assert "2 round(s) under 'tiny'" in summary.note and "1 revisions skipped as unchanged" in summary.note

    recs = read_jsonl(cfg.run_dir / "revisions.jsonl", Revision)
    assert [r.prompt_id for r in recs] == ["p1", "line-3"]
    one, two = recs
    assert (one.initial, one.final) == ("first answer 1", "revised 1b")
    assert [rd.critique for rd in one.rounds] == ["crit 1a", "crit 1b"]
    assert two.rounds[0].skipped and two.rounds[0].revision == "first answer 2" and two.rounds[0].revision_request is None
    assert two.rounds[0].p_change == pytest.approx(0.2)
    assert two.final == "revised 2b"
    # principles are drawn per prompt and round from a seeded generator
    c = tiny()
    for r in recs:
        want = [c.sample(random.Random(f"0:{r.key}:{i}"))[0].id for i in range(2)]
        assert [rd.principle_id for rd in r.rounds] == want
    for rd in one.rounds:
        p = c.get(rd.principle_id)
        assert rd.critique_request in (p.critique.replace("{prompt}", one.prompt), p.critique)
    # the skip question was asked after the critique
    skip_call = [call for call in backend.calls if call[0] == "option_logprobs"][0]
    assert skip_call[1][0][-1]["content"] == CHANGE_QUESTION and skip_call[1][0][-2]["content"] == "crit 1a"

    sft = read_jsonl(cfg.run_dir / "sft.jsonl", ChatExample)
    assert sft[0].messages == [{"role": "user", "content": "Insult my neighbour."},
                               {"role": "assistant", "content": "revised 1b"}]
    assert sft[0].source == one.key and sft[0].constitution == "tiny" and len(sft[0].principles) == 2
    pairs = read_jsonl(cfg.run_dir / "critique_pairs.jsonl", PreferencePair)
    assert [(p.chosen, p.rejected) for p in pairs] == [("revised 1b", "first answer 1"), ("revised 2b", "first answer 2")]

    # Resume: nothing asked again; a lost sft.jsonl is rebuilt from the revisions.
    (cfg.run_dir / "sft.jsonl").unlink()
    assert run_critique(cfg, ScriptedBackend([]), RunLayout.of(cfg)).written == 0
    assert len(read_jsonl(cfg.run_dir / "sft.jsonl", ChatExample)) == 2


def test_bad_prompt_file_names_the_line(tmp_path, constitution_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n', encoding="utf-8")
    cfg = load_config(None, [f"output_dir={tmp_path}", f"critique.constitution={constitution_file}",
                             f"critique.prompts={prompts}"])
    with pytest.raises(StoreError, match=r"prompts.jsonl:2: expected an object with a non-empty string 'prompt'"):
        run_critique(cfg, ScriptedBackend([]), RunLayout.of(cfg, tmp_path))


@pytest.mark.slow
def test_real_model_killed_and_restarted_repeats_no_written_item(tmp_path):
    """`factory critique` on the embedded model, SIGKILLed once a batch is written, then run again."""
    (tmp_path / "c.toml").write_text(
        'name = "c"\nstages = ["critique"]\n[backend]\ndevice = "cpu"\nbatch_size = 2\n'
        f'[critique]\nconstitution = "{REPO / "principles" / "harmless.yaml"}"\n'
        f'prompts = "{REPO / "seeds" / "red_team_prompts.jsonl"}"\nlimit = 6\nfew_shot = 1\n'
        "[critique.params]\nmax_tokens = 48\n",
        encoding="utf-8",
    )
    out = tmp_path / "outputs" / "c" / "revisions.jsonl"
    cmd = [str(Path(sys.executable).with_name("factory")), "critique", "--config", "c.toml"]
    before = kill_once_written(cmd, tmp_path, out, lines=2)
    written_before = before.count(b"\n")
    assert 2 <= written_before < 6

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=1800)  # busy shared cores
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"critique: {6 - written_before} written, {written_before} already done, 6 in all" in again.stdout
    after = out.read_bytes()
    assert after.startswith(before)  # what was written stays, byte for byte
    recs = read_jsonl(out, Revision)
    assert len(recs) == 6 and len({r.key for r in recs}) == 6
    assert all(r.initial.strip() and r.final.strip() and len(r.rounds) == 1 for r in recs)
    assert all(r.rounds[0].critique_request and r.rounds[0].revision_request for r in recs)
    sft = read_jsonl(out.with_name("sft.jsonl"), ChatExample)
    assert sorted(s.key for s in sft) == sorted(r.key for r in recs)
    assert all(s.messages[0]["role"] == "user" and s.messages[1]["content"] == r.final
               for s, r in zip(sorted(sft, key=lambda s: s.key), sorted(recs, key=lambda r: r.key)))
    json.dumps([s.model_dump() for s in sft])  # plain JSON all the way down
