"""Preference pairs: HH-RLHF dialogues parse exactly; every bad line is refused with file:line and
why (or skipped and counted); vote scores become the documented soft labels; both TRL exports
load with the Hugging Face ``datasets`` JSON loader; the ``pairs`` commands round-trip."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from factory.cli import cli
from factory.preferences import (
    FORMATS,
    PreferenceFormatError,
    export_conversational,
    export_standard,
    import_hh,
    import_votes,
    parse_dialogue,
    prompt_text,
    vote_probability,
    write_jsonl,
)
from factory.records import Preference, work_key
from factory.store import read_jsonl


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def hh_line(chosen: str, rejected: str, **extra) -> str:
    return json.dumps({"chosen": chosen, "rejected": rejected, **extra})


GOOD_HH = hh_line("\n\nHuman: What is 2+2?\n\nAssistant: 4.", "\n\nHuman: What is 2+2?\n\nAssistant: 5.")
MULTI_HH = hh_line(
    "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke, please.\n\nAssistant: Why did the...",
    "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke, please.\n\nAssistant: No.",
    id=7,  # other keys are ignored
)
MULTI_MESSAGES = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "A joke, please."},
]


# -- parse_dialogue and prompt_text ------------------------------------------------------------


def test_parse_single_turn():
    assert parse_dialogue("\n\nHuman: What is 2+2?\n\nAssistant: 4.") == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
    ]


def test_parse_multi_turn_keeps_inner_text_and_tolerates_a_missing_lead():
    text = "  Human:  Write a poem.\n\nAssistant: Roses are red,\n\n  violets are blue. \n\nHuman: Shorter?\n\nAssistant:"
    assert parse_dialogue(text) == [
        {"role": "user", "content": "Write a poem."},
        {"role": "assistant", "content": "Roses are red,\n\n  violets are blue."},
        {"role": "user", "content": "Shorter?"},
        {"role": "assistant", "content": ""},  # an empty last turn parses; the importer refuses it
    ]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "no turns"),
        ("just some text", "no turns"),
        ("Hello\n\nHuman: a\n\nAssistant: b", "text before the first turn"),
        ("\n\nAssistant: a\n\nHuman: b\n\nAssistant: c", "turn 1 is Assistant, expected Human"),
        ("\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "turn 2 is Human, expected Assistant"),
        ("\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "ends with a Human turn"),
    ],
)
def test_parse_refuses_what_is_not_a_dialogue(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        parse_dialogue(text)


def test_prompt_text():
    assert prompt_text([{"role": "user", "content": "Hi there"}]) == "Hi there"
    assert prompt_text([{"role": "system", "content": "Be brief."}, *MULTI_MESSAGES]) == (
        "System: Be brief.\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke, please."
    )
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        prompt_text([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])


# -- import_hh ---------------------------------------------------------------------------------


def write(path: Path, *lines: str | bytes) -> Path:
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode("utf-8") for x in lines) + b"\n")
    return path


def test_import_hh_records(tmp_path):
    path = write(tmp_path / "hh.jsonl", GOOD_HH, "", "   ", MULTI_HH)
    records, skipped = import_hh(path)
    assert skipped == Counter()
    assert [r.source for r in records] == ["hh.jsonl:1", "hh.jsonl:4"]  # blank lines still count
    first, multi = records
    assert (first.prompt, first.messages, first.chosen, first.rejected) == (
        "What is 2+2?", [{"role": "user", "content": "What is 2+2?"}], "4.", "5.")
    assert (first.p_chosen, first.margin, first.judge_model, first.consistent) == (1.0, 1.0, "human", None)
    assert multi.messages == MULTI_MESSAGES
    assert multi.prompt == "Human: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke, please."
    assert (multi.chosen, multi.rejected) == ("Why did the...", "No.")
    assert multi.key == work_key({"messages": MULTI_MESSAGES, "chosen": "Why did the...", "rejected": "No."}, "human")


def test_import_hh_tolerates_a_bom_and_crlf(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + GOOD_HH.encode() + b"\r\n" + MULTI_HH.encode() + b"\r\n")
    records, skipped = import_hh(path)
    assert [r.chosen for r in records] == ["4.", "Why did the..."] and not skipped


DIALOGUE = "\n\nHuman: Hi\n\nAssistant: "
BAD_HH_LINES = [
    ('{"chosen": "x", ', "invalid_json", "invalid JSON"),
    ("[1, 2]", "not_an_object", 'expected an object with string keys "chosen" and "rejected", got a list'),
    (json.dumps({"chosen": DIALOGUE + "a"}), "missing_key", "'rejected' is missing"),
    (json.dumps({"chosen": DIALOGUE + "a", "rejected": 3}), "not_a_string", "'rejected' is a number; expected a string"),
    (hh_line("Hello there", DIALOGUE + "b"), "bad_dialogue", "'chosen': no turns"),
    (hh_line(DIALOGUE + "a\n\nHuman: more", DIALOGUE + "b"), "bad_dialogue", "'chosen': the dialogue ends with a Human"),
    (hh_line("\n\nHuman: Hi\n\nAssistant: a", "\n\nHuman: Hey\n\nAssistant: b"), "prompts_differ",
     "differ before their last Assistant turn"),
    (hh_line(DIALOGUE + "same", DIALOGUE + " same "), "identical_responses", "end with the same reply"),
    (hh_line(DIALOGUE + "a", DIALOGUE + "  "), "blank_response", "the last Assistant turn of 'rejected' is empty"),
    (b'{"chosen": "caf\xe9", "rejected": "x"}', "invalid_utf8", "invalid UTF-8 at byte 16 of the line"),
    ('{"chosen": "\\ud800", "rejected": "x"}', "invalid_unicode", "lone surrogate"),
]


@pytest.mark.parametrize("line, reason, fragment", BAD_HH_LINES, ids=[r for _, r, _ in BAD_HH_LINES])
def test_import_hh_names_file_line_and_reason(tmp_path, line, reason, fragment):
    path = write(tmp_path / "hh.jsonl", GOOD_HH, "", line, MULTI_HH)
    with pytest.raises(PreferenceFormatError) as info:
        import_hh(path)
    assert str(info.value).startswith(f"{path}:3: ")
    assert fragment in str(info.value)
    assert (info.value.line, info.value.reason) == (3, reason)

    records, skipped = import_hh(path, skip_bad=True)
    assert [r.source for r in records] == ["hh.jsonl:1", "hh.jsonl:4"]
    assert skipped == Counter({reason: 1})


def test_skip_bad_counts_every_reason_and_duplicates(tmp_path):
    lines = [GOOD_HH, *(line for line, _, _ in BAD_HH_LINES), GOOD_HH, BAD_HH_LINES[0][0]]
    records, skipped = import_hh(write(tmp_path / "hh.jsonl", *lines), skip_bad=True)
    assert len(records) == 1
    expected = Counter(reason for _, reason, _ in BAD_HH_LINES) + Counter(invalid_json=1, duplicate_pair=1)
    assert skipped == expected


# -- votes ---------------------------------------------------------------------------------------


def test_vote_probability_hand_computed():
    assert vote_probability(10, 0) == pytest.approx(sigmoid(math.log2(11)))
    assert vote_probability(10, 0) == pytest.approx(0.96951, abs=1e-5)  # 1 / (1 + e^-3.4594)
    assert vote_probability(-3, 0) == pytest.approx(sigmoid(-2))
    assert vote_probability(3, -3) == pytest.approx(sigmoid(4))
    assert vote_probability(5, 5) == 0.5
    assert vote_probability(1000, 900) == pytest.approx(sigmoid(math.log2(1001 / 901)))
    assert vote_probability(1000, 900) < vote_probability(10, 0)  # the point of the log
    assert vote_probability(1e308, -1e308) == 1.0 and vote_probability(-1e308, 1e308) == 0.0  # no overflow


@given(st.integers(-10**6, 10**6), st.integers(-10**6, 10**6))
def test_vote_probability_is_symmetric(a, b):
    assert vote_probability(a, b) + vote_probability(b, a) == pytest.approx(1.0, abs=1e-12)
    assert (vote_probability(a, b) > 0.5) == (a > b)


VOTES = [
    {"prompt": " How do I reverse a list in Python? ", "answers": [
        {"text": "xs[::-1]", "score": 10},
        {"text": "xs.reverse()", "score": 9, "author": "ignored"},
        {"text": "Use a loop.", "score": 0},
        {"text": "You can't.", "score": -3},
        {"text": "   ", "score": 50},  # blank: makes no pair
        {"text": " xs[::-1] ", "score": 9.5},  # the first text again: no pair with it, and its pairs repeat keys
    ]},
    {"prompt": "Tabs or spaces?", "answers": [{"text": "Tabs.", "score": 2}, {"text": "Spaces.", "score": 2}]},
]


def votes_file(path: Path) -> Path:
    return write(path, *(json.dumps(v) for v in VOTES))


@pytest.mark.parametrize("min_gap, pairs", [(1, 6), (2, 5), (5, 4), (11, 2), (13, 1), (14, 0)])
def test_import_votes_pairs_by_gap(tmp_path, min_gap, pairs):
    records, skipped = import_votes(votes_file(tmp_path / "votes.jsonl"), min_gap=min_gap)
    assert len(records) == pairs
    # the tie on line 2 makes no pair; the repeated " xs[::-1] " beats 'Use a loop.' (by 9.5) and
    # 'You can't.' (by 12.5) as the first copy does, so those pairs are dropped as duplicates
    duplicates = {1: 2, 2: 2, 5: 2, 11: 1, 13: 0, 14: 0}[min_gap]
    assert skipped == Counter(no_pairs=1 + (pairs == 0), duplicate_pair=duplicates) - Counter()


def test_import_votes_record(tmp_path):
    records, _ = import_votes(votes_file(tmp_path / "votes.jsonl"))
    rec = next(r for r in records if (r.chosen, r.rejected) == ("xs[::-1]", "You can't."))
    prompt = "How do I reverse a list in Python?"
    assert (rec.prompt, rec.messages, rec.source, rec.judge_model) == (
        prompt, [{"role": "user", "content": prompt}], "votes.jsonl:1", "votes")
    assert rec.p_chosen == pytest.approx(sigmoid(math.log2(11) + 2))
    assert rec.margin == pytest.approx(2 * rec.p_chosen - 1)
    assert rec.key == work_key({"prompt": prompt, "chosen": "xs[::-1]", "rejected": "You can't."}, "votes")
    assert all(r.p_chosen > 0.5 for r in records)


BAD_VOTE_LINES = [
    ({"prompt": "q", "answers": [{"text": "a", "score": 1}]}, "too_few_answers", "expected at least two answers"),
    ({"prompt": "q"}, "missing_key", "'answers' is missing"),
    ({"prompt": "q", "answers": "a, b"}, "not_a_list", "'answers' is a string"),
    ({"prompt": "  ", "answers": []}, "blank_prompt", "'prompt' is blank"),
    ({"prompt": "q", "answers": [{"text": "a", "score": 1}, "b"]}, "not_an_object", "answers[1] to be an object"),
    ({"prompt": "q", "answers": [{"text": "a", "score": 1}, {"score": 2}]}, "missing_key", "'text' is missing"),
    ({"prompt": "q", "answers": [{"text": "a", "score": True}, {"text": "b", "score": 0}]}, "bad_score",
     "answers[0].score is True; expected a finite number"),
    ({"prompt": "q", "answers": [{"text": "a", "score": "3"}, {"text": "b", "score": 0}]}, "bad_score",
     "answers[0].score is '3'"),
    ('{"prompt": "q", "answers": [{"text": "a", "score": 1}, {"text": "b", "score": NaN}]}', "bad_score",
     "answers[1].score is nan"),
]


@pytest.mark.parametrize("line, reason, fragment", BAD_VOTE_LINES, ids=[r for _, r, _ in BAD_VOTE_LINES])
def test_import_votes_names_file_line_and_reason(tmp_path, line, reason, fragment):
    path = write(tmp_path / "votes.jsonl", json.dumps(VOTES[0]), line if isinstance(line, str) else json.dumps(line))
    with pytest.raises(PreferenceFormatError) as info:
        import_votes(path)
    assert str(info.value).startswith(f"{path}:2: ") and fragment in str(info.value)
    records, skipped = import_votes(path, skip_bad=True)
    assert len(records) == 6 and skipped[reason] == 1


def test_import_votes_refuses_a_gap_of_zero(tmp_path):
    with pytest.raises(ValueError, match="min_gap must be > 0"):
        import_votes(votes_file(tmp_path / "votes.jsonl"), min_gap=0)


# -- exports -------------------------------------------------------------------------------------


@pytest.fixture
def mixed(tmp_path) -> list[Preference]:
    hh, _ = import_hh(write(tmp_path / "hh.jsonl", MULTI_HH))
    votes, _ = import_votes(votes_file(tmp_path / "votes.jsonl"), min_gap=11)
    return hh + votes


def load(path: Path, tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "hf-cache"))


def test_standard_export_loads_with_datasets(tmp_path, mixed):
    path = tmp_path / "standard.jsonl"
    write_jsonl(path, export_standard(mixed))
    ds = load(path, tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 3
    assert ds[0] == {"prompt": "Human: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: A joke, please.",
                     "chosen": "Why did the...", "rejected": "No."}
    assert ds[1] == {"prompt": "How do I reverse a list in Python?", "chosen": "xs[::-1]", "rejected": "You can't."}


def test_conversational_export_loads_with_datasets(tmp_path, mixed):
    path = tmp_path / "conversational.jsonl"
    write_jsonl(path, FORMATS["conversational"](mixed))
    ds = load(path, tmp_path)
    assert ds.column_names == ["prompt", "chosen", "rejected"] and len(ds) == 3
    assert ds[0] == {"prompt": MULTI_MESSAGES, "chosen": [{"role": "assistant", "content": "Why did the..."}],
                     "rejected": [{"role": "assistant", "content": "No."}]}
    assert ds[2]["prompt"] == [{"role": "user", "content": "How do I reverse a list in Python?"}]
    assert ds[2]["chosen"] == [{"role": "assistant", "content": "xs.reverse()"}]


def test_write_jsonl_replaces_whole_files_only(tmp_path):
    path = tmp_path / "out.jsonl"
    write_jsonl(path, [{"text": "café ☕"}, {"n": 1}])
    assert path.read_bytes() == '{"text": "café ☕"}\n{"n": 1}\n'.encode("utf-8")
    with pytest.raises(ValueError):  # NaN is not JSON: the old file stays, no temp file is left
        write_jsonl(path, [{"ok": 1}, {"p": float("nan")}])
    assert path.read_text(encoding="utf-8").startswith('{"text": "café')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


# -- the `pairs` commands ----------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_pairs_commands_explain_themselves():
    for command in (["pairs"], ["pairs", "import"], ["pairs", "export"]):
        result = invoke(*command, "--help")
        assert result.exit_code == 0 and len(result.output.split("\n\n", 2)[1].split()) >= 8
    assert "sign(s) * log2(1 + |s|)" in invoke("pairs", "import", "--help").output


def test_import_export_round_trip(tmp_path):
    src, prefs, out = votes_file(tmp_path / "votes.jsonl"), tmp_path / "prefs.jsonl", tmp_path / "trl.jsonl"
    result = invoke("pairs", "import", "votes", str(src), "-o", str(prefs))
    assert result.exit_code == 0, result.output
    assert f"wrote {prefs}: 6 pairs from {src}" in result.output
    assert "skipped 2 duplicate_pair" in result.output and "skipped 1 no_pairs" in result.output
    records = read_jsonl(prefs, Preference)
    assert records == import_votes(src)[0]

    result = invoke("pairs", "export", str(prefs), "--format", "conversational", "-o", str(out), "--min-p", "0.9")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows == export_conversational([r for r in records if r.p_chosen >= 0.9]) and 0 < len(rows) < 6
    assert f"{len(rows)} pairs (conversational)" in result.output


def test_export_drops_flagged_pairs(tmp_path):
    records, _ = import_hh(write(tmp_path / "hh.jsonl", GOOD_HH, MULTI_HH))
    records[0] = records[0].model_copy(update={"low_confidence": True})
    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(prefs, [r.model_dump(mode="json") for r in records])
    result = invoke("pairs", "export", str(prefs), "-o", str(tmp_path / "std.jsonl"), "--drop-flagged")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "std.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == export_standard(records[1:])


def test_existing_output_is_refused(tmp_path):
    src, out = write(tmp_path / "hh.jsonl", GOOD_HH), tmp_path / "prefs.jsonl"
    out.write_text("keep me\n", encoding="utf-8")
    for args in (["import", "hh", str(src)], ["export", str(src)]):
        result = invoke("pairs", *args, "-o", str(out))
        assert result.exit_code == 2 and f"{out} exists; pass --force" in result.output
    assert out.read_text(encoding="utf-8") == "keep me\n"
    assert invoke("pairs", "import", "hh", str(src), "-o", str(out), "--force").exit_code == 0
    assert len(read_jsonl(out, Preference)) == 1


def test_bad_file_exits_2_and_writes_nothing(tmp_path):
    src, out = write(tmp_path / "hh.jsonl", GOOD_HH, hh_line(DIALOGUE + "a", DIALOGUE + "a")), tmp_path / "o.jsonl"
    result = invoke("pairs", "import", "hh", str(src), "-o", str(out))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{src}:2: 'chosen' and 'rejected' end with the same reply" in result.output
    assert not out.exists()
    result = invoke("pairs", "import", "hh", str(src), "-o", str(out), "--skip-bad")
    assert result.exit_code == 0 and "1 pairs" in result.output and "skipped 1 identical_responses" in result.output
    result = invoke("pairs", "export", str(src), "-o", str(out), "--force")  # not Preference records
    assert result.exit_code == 2 and "line 1: not a valid Preference" in result.output
