"""The shipped seed tasks, and the seed loader on hand-written good and bad files."""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

from factory.seeds import SeedError, SeedWarning, load_seeds, task_prompt

SEEDS = Path(__file__).resolve().parent.parent / "seeds" / "seed_tasks.jsonl"

# The Self-Instruct filter: instructions naming things a text model cannot see or make.
BLACKLIST = re.compile(
    r"\b(image|images|picture|pictures|graph|graphs|file|files|map|maps|draw|drawing|plot|plotting|audio|video)\b",
    re.IGNORECASE,
)
NEAR_DUPLICATE_ROUGE_L = 0.7


def load_recording(path: Path, **kwargs):
    """Load a seed file; return the tasks and the messages of every warning raised, in order."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # no once-per-location dedup between tests
        tasks = load_seeds(path, **kwargs)
    assert all(issubclass(w.category, SeedWarning) for w in caught), [str(w.message) for w in caught]
    return tasks, [str(w.message) for w in caught]


def task(n: int = 1, **fields) -> dict:
    """A valid seed task, with any field replaced or (given None) removed."""
    obj = {
        "id": f"seed_task_{n}",
        "name": f"task_{n}",
        "instruction": f"Do the thing number {n} carefully.",
        "instances": [{"input": "", "output": f"done {n}"}],
        "is_classification": False,
    }
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not None}


def write(tmp_path: Path, *lines, name: str = "seeds.jsonl") -> Path:
    """A seed file of the given lines: dicts are dumped as JSON, strings written as they are."""
    path = tmp_path / name
    text = "\n".join(line if isinstance(line, str) else json.dumps(line, ensure_ascii=False) for line in lines)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(SeedError) as e:
        load_seeds(path, **kwargs)
    return str(e.value)


# --- the shipped seed file ---


@pytest.fixture(scope="module")
def shipped():
    return load_recording(SEEDS)


def test_shipped_seeds_load_without_any_warning(shipped):
    tasks, messages = shipped
    assert messages == []
    assert len(tasks) >= 150


def test_shipped_seeds_have_enough_classification_tasks_with_label_outputs(shipped):
    tasks, _ = shipped
    classification = [t for t in tasks if t.is_classification]
    assert len(classification) >= 25
    for t in classification:  # the output is a label, not an explanation
        assert len(t.instances[0].output.split()) <= 3, (t.id, t.instances[0].output)


def test_shipped_seeds_keep_the_original_twelve_first_and_number_in_order(shipped):
    tasks, _ = shipped
    assert [t.id for t in tasks] == [f"seed_task_{i}" for i in range(1, len(tasks) + 1)]
    assert [t.name for t in tasks[:3]] == ["breakfast_ideas", "formal_rewrite", "sentiment_label"]


def test_shipped_seeds_have_unique_ids_and_snake_case_names(shipped):
    tasks, _ = shipped
    assert len({t.id for t in tasks}) == len(tasks)
    assert len({t.name for t in tasks}) == len(tasks)
    assert [t.name for t in tasks if not re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", t.name)] == []


def test_shipped_seeds_have_one_instance_with_an_answer(shipped):
    tasks, _ = shipped
    assert [t.id for t in tasks if len(t.instances) != 1 or not t.instances[0].output.strip()] == []


def test_shipped_instructions_pass_the_bootstrap_filters(shipped):
    tasks, _ = shipped
    problems = []
    for t in tasks:
        text = t.instruction
        if len(text.split()) <= 3:
            problems.append((t.id, "3 words or fewer"))
        if BLACKLIST.search(text):
            problems.append((t.id, f"blacklisted word {BLACKLIST.search(text).group()!r}"))
        if text.lower().startswith("write a program"):
            problems.append((t.id, "starts with 'Write a program'"))
        if not re.match(r"[A-Za-z]", text):
            problems.append((t.id, "does not start with an ASCII letter"))
        if not text.isascii():
            problems.append((t.id, "non-ASCII text"))
    assert problems == []


def test_blacklist_matches_whole_words_only():
    # The pattern the shipped-seed test relies on must catch the words and spare their neighbours.
    assert BLACKLIST.search("Draw a cat") and BLACKLIST.search("Describe the VIDEO.")
    assert not BLACKLIST.search("Summarise the paragraph and profile the mapping")


def test_no_two_shipped_instructions_are_near_duplicates(shipped):
    tasks, _ = shipped
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    close = [
        (a.id, b.id, round(f, 3))
        for a, b in itertools.combinations(tasks, 2)
        if (f := scorer.score(a.instruction, b.instruction)["rougeL"].fmeasure) >= NEAR_DUPLICATE_ROUGE_L
    ]
    assert close == []


def test_near_duplicate_threshold_catches_a_reworded_instruction():
    # Guards the test above: a light rewording must score over the threshold, or it checks nothing.
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    f = scorer.score(
        "Summarise the paragraph in one sentence.", "Please summarise the paragraph in one short sentence."
    )
    assert f["rougeL"].fmeasure >= NEAR_DUPLICATE_ROUGE_L


# --- the loader: errors name the file, the line and the field ---


def test_invalid_json_names_the_line_and_column(tmp_path):
    path = write(tmp_path, task(1), '{"id": "seed_task_2", "name": ')
    message = error_of(path)
    assert message.startswith(f"{path}:2: invalid JSON: Expecting value (column 31)")


@pytest.mark.parametrize(
    "line, kind", [("[1, 2]", "an array"), ("42", "a number"), ('"a task"', "a string"), ("null", "null")]
)
def test_a_line_that_is_not_an_object_is_refused(tmp_path, line, kind):
    path = write(tmp_path, task(1), "", line)
    assert error_of(path) == f"{path}:3: expected a JSON object (a seed task), got {kind}"


def test_missing_field_is_named(tmp_path):
    path = write(tmp_path, task(1), task(2, instruction=None))
    assert error_of(path) == f"{path}:2: field 'instruction': Field required"


def test_wrong_type_names_the_field_and_the_value(tmp_path):
    path = write(tmp_path, task(1, is_classification="maybe"))
    message = error_of(path)
    assert message.startswith(f"{path}:1: field 'is_classification': Input should be a valid boolean")
    assert message.endswith('(got a string "maybe")')


def test_instance_missing_output_names_the_nested_field(tmp_path):
    path = write(tmp_path, task(1), task(2), task(3, instances=[{"input": "x", "output": "y"}, {"input": "z"}]))
    assert error_of(path) == f"{path}:3: field 'instances[1].output': Field required"


def test_several_problems_on_one_line_report_the_first_and_count_the_rest(tmp_path):
    path = write(tmp_path, task(1, id=None, name=None))
    assert error_of(path) == f"{path}:1: field 'id': Field required (and 1 more problem(s) on this line)"


def test_bytes_that_are_not_utf8_name_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(
        json.dumps(task(1)).encode()
        + b"\n"
        + json.dumps(task(2, name="caf\u00e9"), ensure_ascii=False).encode("latin-1")
    )
    assert error_of(path).startswith(f"{path}:2: not UTF-8 text")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_file_without_tasks_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    assert error_of(path) == f"{path}: no seed tasks in the file"


def test_a_missing_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    assert error_of(path).startswith(f"{path}: cannot read seed file")


# --- the loader: what real files carry loads, with a warning naming the lines ---


def test_bom_blank_lines_and_crlf_are_tolerated(tmp_path):
    path = tmp_path / "windows.jsonl"
    body = "\r\n".join([json.dumps(task(1)), "", json.dumps(task(2)), ""])
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    tasks, messages = load_recording(path)
    assert [t.id for t in tasks] == ["seed_task_1", "seed_task_2"] and messages == []


def test_line_separator_inside_a_string_does_not_shift_line_numbers(tmp_path):
    # JSON allows a raw U+2028 in a string; str.splitlines() would cut the line there.
    path = write(tmp_path, task(1, instances=[{"input": "a\u2028b", "output": "c"}]), "[]")
    assert error_of(path) == f"{path}:2: expected a JSON object (a seed task), got an array"


def test_duplicate_names_and_ids_warn_with_their_lines_and_still_load(tmp_path):
    path = write(
        tmp_path,
        task(1, name="sort_list"),
        task(2, name="sum_list"),
        "",
        task(3, name="sort_list"),
        task(4, name="sum_list", id="seed_task_1"),
        task(5, name="sort_list"),
    )
    tasks, messages = load_recording(path)
    assert len(tasks) == 5
    assert messages == [
        f"{path}: duplicate ids: 'seed_task_1' on lines 1, 5",
        f"{path}: duplicate names: 'sort_list' on lines 1, 4, 6; 'sum_list' on lines 2, 5",
    ]


def test_duplicate_listing_is_capped(tmp_path):
    lines = [task(i, name=f"name_{i % 12}") for i in range(24)]
    tasks, messages = load_recording(write(tmp_path, *lines))
    assert len(tasks) == 24
    (message,) = messages
    assert message.count(" on lines ") == 10 and message.endswith("; and 2 more")
    assert "'name_0' on lines 1, 13;" in message


def test_short_instructions_warn_with_their_lines_and_still_load(tmp_path):
    path = write(
        tmp_path,
        task(1),
        task(2, instruction="Sort."),
        task(3, instruction="Add two numbers"),  # 3 words: under the default of 4
        task(4, instruction="Add these two numbers"),  # 4 words: fine
    )
    tasks, messages = load_recording(path)
    assert len(tasks) == 4
    assert messages == [
        f"{path}: 2 instruction(s) shorter than 4 words (the bootstrap filter drops them) on lines 2, 3"
    ]
    _, messages = load_recording(path, min_words=2)
    assert messages == [f"{path}: 1 instruction(s) shorter than 2 words (the bootstrap filter drops them) on line 2"]


def test_unknown_keys_are_dropped_with_a_warning(tmp_path):
    with_instance_extra = task(3, instances=[{"input": "", "output": "o", "note": "checked"}])
    path = write(tmp_path, task(1, source="alpaca"), task(2), with_instance_extra, task(4, source="x", lang="en"))
    tasks, messages = load_recording(path)
    assert messages == [
        f"{path}: unknown keys ignored: 'source' on lines 1, 4; 'instances[].note' on line 3; 'lang' on line 4"
    ]
    assert [t.id for t in tasks] == [f"seed_task_{i}" for i in (1, 2, 3, 4)]
    assert tasks[2].instances[0].model_dump() == {"input": "", "output": "o"}


def test_every_kind_of_warning_at_once_still_returns_every_task(tmp_path):
    path = write(tmp_path, task(1, name="dup", extra=1), task(1, name="dup", instruction="Go."))
    tasks, messages = load_recording(path)
    assert len(tasks) == 2
    assert [m.split(": ")[1] for m in messages] == [
        "unknown keys ignored",
        "duplicate ids",
        "duplicate names",
        "1 instruction(s) shorter than 4 words (the bootstrap filter drops them) on line 2",
    ]


def test_task_prompt_appends_the_first_input_only_when_there_is_one():
    from factory.records import SeedTask

    with_input = SeedTask.model_validate(
        task(1, instruction=" Sort these. ", instances=[{"input": "3 1 2\n", "output": "1 2 3"}])
    )
    assert task_prompt(with_input) == "Sort these.\n\n3 1 2"
    assert task_prompt(SeedTask.model_validate(task(2))) == "Do the thing number 2 carefully."
