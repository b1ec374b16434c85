"""Bootstrap prompts, parsing and filters (exact, with hand-written replies), and its resume rules."""

from __future__ import annotations

import json
import random

import pytest

from factory.bootstrap import (
    blacklist_pattern,
    check_instruction,
    parse_reply,
    render_prompt,
    run_bootstrap,
    sample_shown,
)
from factory.config import BootstrapConfig, load_config
from factory.llm.base import Completion
from factory.llm.scripted import ScriptedBackend
from factory.records import BootstrapRequest, Instruction
from factory.store import read_jsonl
from factory.layout import RunLayout


def test_render_prompt_puts_the_list_in_the_models_mouth():
    messages = render_prompt(["Sort the list.", "Name a colour."])
    assert messages[0]["role"] == "user" and "numbered" in messages[0]["content"]
    assert messages[1] == {"role": "assistant", "content": "1. Sort the list.\n2. Name a colour.\n3."}


@pytest.mark.parametrize(
    "reply, cut_off, expected",
    [
        (" Write a haiku about rain.\n10. Explain tides to a child.\n", False,
         ["Write a haiku about rain.", "Explain tides to a child."]),
        # cut off by the token limit: the last item may be unfinished
        (" Write a haiku about rain.\n10. Explain tides to a", True, ["Write a haiku about rain."]),
        # a closing remark after a blank line is not an item, and a cut inside it loses nothing
        (" Write a haiku about rain.\n\nI hope these tasks help you", True, ["Write a haiku about rain."]),
        # continuation lines belong to their item; blank lines between items are fine
        (" Summarise the text\nin one sentence.\n\n10) List three uses of salt.", False,
         ["Summarise the text in one sentence.", "List three uses of salt."]),
        # a bare number is no item
        ("\n10. Give two synonyms for happy.\n11.", False, ["Give two synonyms for happy."]),
        ("", False, []),
        ("", True, []),
    ],
)
def test_parse_reply(reply, cut_off, expected):
    assert parse_reply(reply, 9, cut_off) == expected


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty"),
        ("Summarise this.", "too_short"),
        (" ".join(["word"] * 151), "too_long"),
        ("Écris un poème sur la mer et le vent.", "starts_non_ascii"),
        ("- Write a poem about the sea.", "starts_with_punctuation"),
        ("Write a program that sorts numbers quickly.", "write_a_program"),
        ("Describe the IMAGE you see in detail.", "blacklisted_word"),
        ("Plot the data points on a chart.", "blacklisted_word"),
        ("Explain what a mapping in mathematics is.", None),  # 'map' only as a whole word
        ("Give four tips for writing clearly.", None),
    ],
)
def test_check_instruction(text, reason):
    cfg = BootstrapConfig()
    assert check_instruction(text, cfg, blacklist_pattern(cfg.blacklist)) == reason


def test_sample_shown_fills_machine_slots_with_seeds():
    cfg = BootstrapConfig(human_examples=6, machine_examples=2)
    human = [f"human task number {i}" for i in range(20)]
    shown = sample_shown(random.Random(1), human, ["machine task one"], cfg)
    assert len(shown) == 8 and sum(s.startswith("machine") for s in shown) == 1
    shown = sample_shown(random.Random(1), human, [f"machine task {i}" for i in range(5)], cfg)
    assert sum(s.startswith("machine") for s in shown) == 2 and len(set(shown)) == 8


@pytest.fixture
def run_cfg(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    rows = [
        ("Write a short poem about autumn leaves.", False),
        ("Decide whether the review is positive or negative.", True),
        ("Explain how a rainbow forms in the sky.", False),
    ]
    seeds.write_text(
        "".join(
            json.dumps({"id": f"s{i}", "name": f"s{i}", "instruction": ins, "instances": [{"input": "", "output": "x"}],
                        "is_classification": clf}) + "\n"
            for i, (ins, clf) in enumerate(rows)
        ),
        encoding="utf-8",
    )
    return load_config(None, [f"output_dir={tmp_path / 'out'}", "name=t", f"bootstrap.seeds=[{seeds}]",
                              "bootstrap.target=3", "bootstrap.requests_per_batch=2", "bootstrap.human_examples=2",
                              "bootstrap.machine_examples=1"])


REPLIES = [
    # request 0: one good, one near-duplicate of a seed, one too short
    Completion(text=" Give three tips for staying focused while studying.\n"
                    "5. Write a short poem about autumn leaves falling.\n6. Translate it.\n", finish_reason="stop"),
    # request 1: a good one, and a near-duplicate of request 0's accepted instruction
    Completion(text=" Name the capital city of each country in the list.\n"
                    "5. Give three tips for staying focused when studying.", finish_reason="stop"),
    # request 2: two good ones (the second is over the target of 3), then cut off
    Completion(text=" Convert the temperature from Celsius to Fahrenheit.\n5. Suggest a title for a mystery novel.\n"
                    "6. Describe the", finish_reason="length"),
    Completion(text=" \n\nSorry, I cannot help.", finish_reason="stop"),
]
# (request 3 falls in the batch that reaches the target, and has no items anyway)


def test_run_bootstrap_verdicts_records_and_resume(run_cfg):
    backend = ScriptedBackend(REPLIES)
    summary = run_bootstrap(run_cfg, backend, RunLayout.of(run_cfg))
    assert summary.total == 3 and summary.written == 3
    assert summary.rejected == {"near_duplicate": 2, "too_short": 1, "no_items_in_reply": 1}
    assert "1 candidates left unchecked once the target was reached" in summary.note
    # two batches of two requests: the prompts were rendered from the pool as it stood
    assert [len(c[1]) for c in backend.calls] == [2, 2]
    first_prompt = backend.calls[0][1][0]
    assert first_prompt[1]["content"].endswith("\n4.") and first_prompt[1]["content"].count("\n") == 3

    requests = read_jsonl(RunLayout.of(run_cfg).bootstrap_requests, BootstrapRequest)
    assert [r.index for r in requests] == [0, 1, 2, 3]
    assert [c.verdict for c in requests[0].candidates] == ["accepted", "near_duplicate", "too_short"]
    assert requests[0].candidates[1].duplicate_of == "Write a short poem about autumn leaves."
    assert requests[0].candidates[1].score > 0.7
    assert requests[3].parse_error == "no numbered items in the reply"
    assert [c.verdict for c in requests[2].candidates] == ["accepted", "over_target"]  # cut-off item dropped

    accepted = read_jsonl(run_cfg.run_dir / "instructions.jsonl", Instruction)
    assert [a.instruction for a in accepted] == [
        "Give three tips for staying focused while studying.",
        "Name the capital city of each country in the list.",
        "Convert the temperature from Celsius to Fahrenheit.",
    ]
    first = accepted[0]
    assert first.request_id == requests[0].key and first.reply == REPLIES[0].text
    assert len(first.most_similar) == 3  # the pool held the three seeds
    assert first.most_similar[0].score >= first.most_similar[-1].score
    assert first.avg_similarity == pytest.approx(sum(s.score for s in first.most_similar) / 3)

    # Resume: nothing is asked again (the scripted backend has no replies left to give).
    again = run_bootstrap(run_cfg, ScriptedBackend([]), RunLayout.of(run_cfg))
    assert again.written == 0 and again.skipped == 3 and again.rejected == summary.rejected

    # A crash between the two appends: instructions.jsonl is completed from the requests.
    path = run_cfg.run_dir / "instructions.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    path.write_text(lines[0], encoding="utf-8")
    run_bootstrap(run_cfg, ScriptedBackend([]), RunLayout.of(run_cfg))
    assert [a.instruction for a in read_jsonl(path, Instruction)] == [a.instruction for a in accepted]


def test_run_bootstrap_gives_up_at_max_requests(run_cfg):
    cfg = run_cfg.model_copy(update={"bootstrap": run_cfg.bootstrap.model_copy(update={"max_requests": 2})})
    summary = run_bootstrap(cfg, ScriptedBackend(["\n\nNothing.", "\n\nNothing."]), RunLayout.of(cfg))
    assert summary.total == 0
    assert "STOPPED at max_requests=2 with 0 of the target 3" in summary.note


def test_changed_settings_start_a_new_sequence(run_cfg):
    run_bootstrap(run_cfg, ScriptedBackend(REPLIES), RunLayout.of(run_cfg))
    hotter = run_cfg.bootstrap.model_copy(update={"params": run_cfg.bootstrap.params.model_copy(update={"temperature": 1.0}),
                                                   "max_requests": 1})
    cfg = run_cfg.model_copy(update={"bootstrap": hotter})
    backend = ScriptedBackend(["\n\nNothing."])
    summary = run_bootstrap(cfg, backend, RunLayout.of(cfg))
    assert len(backend.calls) == 1 and summary.total == 0
    assert len(read_jsonl(RunLayout.of(cfg).bootstrap_requests, BootstrapRequest)) == 5
