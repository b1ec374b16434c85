"""Instances: prompts, parsing and filters (exact, with hand-written replies) and the stage's records."""

from __future__ import annotations

import json
import math

import pytest

from factory.config import load_config
from factory.instances import (
    CLASSIFY_EXAMPLES,
    best_cut,
    classify_prompt,
    filter_instances,
    instance_prompt,
    parse_instances,
    parse_pairs,
    run_instances,
)
from factory.llm.base import Completion
from factory.llm.scripted import ScriptedBackend
from factory.records import Instance, Instruction, SeedTask, Task
from factory.store import Store, read_jsonl
from factory.layout import RunLayout


def test_classify_prompt_is_few_shot_chat():
    messages = classify_prompt("Is this email spam?")
    assert len(messages) == 2 * len(CLASSIFY_EXAMPLES) + 1
    assert [m["role"] for m in messages[:2]] == ["user", "assistant"]
    assert {m["content"] for m in messages[1::2]} == {"Yes", "No"}
    assert messages[-1]["role"] == "user" and messages[-1]["content"].endswith("Task: Is this email spam?")


def test_instance_prompts_show_worked_examples_and_prefill_the_format():
    clf = SeedTask(id="a", name="a", instruction="Label the mood.", is_classification=True,
                   instances=[Instance(input="I love it", output="happy")])
    gen = SeedTask(id="b", name="b", instruction="Name a fruit.", is_classification=False,
                   instances=[Instance(input="", output="Apple")])
    m = instance_prompt("Is the tweet angry?", True, [clf])
    assert m[1] == {"role": "assistant", "content": "Class label: happy\nInput: I love it"}
    assert m[-1] == {"role": "assistant", "content": "Class label:"}
    assert m[-2]["content"].endswith("Task: Is the tweet angry?")
    m = instance_prompt("Name a colour.", False, [gen])
    assert m[1] == {"role": "assistant", "content": "Example 1\nInput: <none>\nOutput: Apple"}
    assert m[-1] == {"role": "assistant", "content": "Example 1\nInput:"}


def test_parse_pairs_handles_headers_multiline_values_and_cut_off():
    text = "Input: 2 + 2\nOutput: 4\n\nExample 2\nInput: a list:\n- x\n- y\nOutput: two items\nInput: cut"
    assert parse_pairs(text, "input", "output", cut_off=False) == [
        ("2 + 2", "4"), ("a list:\n- x\n- y", "two items"), ("cut", None)]
    assert parse_pairs(text, "input", "output", cut_off=True) == [("2 + 2", "4"), ("a list:\n- x\n- y", "two items")]
    assert parse_pairs("nothing labelled here", "input", "output", cut_off=False) == []


def test_parse_instances_input_first_and_output_first():
    inst, rej = parse_instances(" <none>\nOutput: Blue\n\nExample 2\nInput: sky\nOutput: blue\nInput: x", False, False)
    assert inst == [Instance(input="", output="Blue"), Instance(input="sky", output="blue")]
    assert rej == {"missing_output": 1}
    inst, rej = parse_instances(" Positive\nInput: Great film!\nClass label: Negative\nInput: Dull.\nClass label: Neutral",
                                True, False)
    assert inst == [Instance(input="Great film!", output="Positive"), Instance(input="Dull.", output="Negative")]
    assert rej == {"missing_input": 1}


def test_filters_count_reasons_and_cap():
    insts = [Instance(input="a", output="a"), Instance(input="b", output=""), Instance(input="Text:", output="x"),
             Instance(input="c", output="d"), Instance(input="c", output="d")] + [
             Instance(input=f"q{i}", output=f"r{i}") for i in range(6)]
    kept, rej, dropped = filter_instances(insts, limit=5)
    assert dropped is None and len(kept) == 5 and kept[0] == Instance(input="c", output="d")
    assert rej == {"input_equals_output": 1, "empty_output": 1, "ends_with_colon": 1, "duplicate_instance": 1,
                   "over_limit": 2}


def test_same_input_with_two_outputs_drops_the_task():
    kept, rej, dropped = filter_instances([Instance(input="x", output="1"), Instance(input="x", output="2")], 5)
    assert (kept, dropped) == ([], "conflicting_outputs")
    assert filter_instances([Instance(input="x", output="")], 5)[2] == "no_instances"


def test_tasks_without_input_keep_their_instances():
    # The seed shape of an open task ("Suggest three quick breakfasts"): every example has no input
    # and a different output. An empty input is not an input the examples share: the task is kept,
    # its examples deduplicated by output (issue 15, point 1).
    reply = (" <none>\nOutput: Oats soaked overnight.\n\nExample 2\nInput: <none>\nOutput: Toast with jam."
             "\n\nExample 3\nInput: <none>\nOutput: Oats soaked overnight.\n\nExample 4\nInput: <none>\n"
             "Output: A banana.")
    parsed, rej = parse_instances(reply, False, False)
    assert [i.input for i in parsed] == ["", "", "", ""] and not rej
    kept, rej, dropped = filter_instances(parsed, 5)
    assert dropped is None
    assert [i.output for i in kept] == ["Oats soaked overnight.", "Toast with jam.", "A banana."]
    assert rej == {"duplicate_instance": 1}
    # A shared non-empty input with two answers still drops the task, even beside no-input examples.
    mixed = parsed + [Instance(input="x", output="1"), Instance(input="x", output="2")]
    assert filter_instances(mixed, 9)[2] == "conflicting_outputs"


@pytest.fixture
def run_cfg(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    rows = [("Label the review as positive or negative.", True, "Nice!", "positive"),
            ("Name three uses for a brick.", False, "", "A doorstop, a paperweight, a step.")]
    seeds.write_text("".join(json.dumps({"id": f"s{i}", "name": f"s{i}", "instruction": ins,
                                         "instances": [{"input": i_, "output": o}], "is_classification": c}) + "\n"
                             for i, (ins, c, i_, o) in enumerate(rows)), encoding="utf-8")
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "name=t", f"bootstrap.seeds=[{seeds}]",
                             "instances.classification_threshold=0.5"])
    store = Store(cfg.run_dir / "instructions.jsonl", Instruction)
    store.append([Instruction(key=f"k{i}", instruction=t, request_id="r", reply="", most_similar=[], avg_similarity=0.0,
                              model="m") for i, t in enumerate(["Is the sentence a question?", "Describe a sunset."])])
    return cfg


def test_run_instances_with_scripted_replies(run_cfg):
    backend = ScriptedBackend(
        [" yes\nInput: Are you there?\nClass label: no\nInput: I am here.",
         Completion(text=" <none>\nOutput: The sky turned orange.\n\nExample 2\nInput: over the sea\nOutput: Gold light on wa",
                    finish_reason="length")],
        option_scores=[{"Yes": math.log(0.8), "No": math.log(0.2)}, {"Yes": math.log(0.1), "No": math.log(0.9)}],
    )
    summary = run_instances(run_cfg, backend, RunLayout.of(run_cfg))
    assert summary.written == 2 and summary.rejected == {}
    assert "3 instances for 2 tasks; 1 of 2 tasks classification (p(Yes) >= 0.5)" in summary.note
    tasks = read_jsonl(run_cfg.run_dir / "tasks.jsonl", Task)
    assert tasks[0].is_classification and tasks[0].p_classification == pytest.approx(0.8)
    assert tasks[0].instances == [Instance(input="Are you there?", output="yes"), Instance(input="I am here.", output="no")]
    assert not tasks[1].is_classification and tasks[1].instances == [Instance(input="", output="The sky turned orange.")]
    # the classification prompt for the first, then output-first and input-first prompts
    assert backend.calls[0][0] == "option_logprobs" and backend.calls[0][2] == ("Yes", "No")
    assert backend.calls[1][1][0][-1]["content"] == "Class label:"
    assert backend.calls[1][1][1][-1]["content"] == "Example 1\nInput:"
    # Resume: nothing asked again.
    assert run_instances(run_cfg, ScriptedBackend([]), RunLayout.of(run_cfg)).written == 0


def test_best_cut_separates_known_labels():
    assert best_cut([0.3, 0.25, 0.2], [0.1, 0.05, 0.15]) == pytest.approx(0.175)
    # an overlap: cuts at 0.11 and 0.25 both reach 3/4 balanced accuracy; a tie goes to the lower
    assert best_cut([0.3, 0.12], [0.1, 0.2]) == pytest.approx(0.11)


def test_auto_threshold_is_calibrated_on_the_seeds(run_cfg):
    cfg = run_cfg.model_copy(update={"instances": run_cfg.instances.model_copy(update={"classification_threshold": "auto"})})
    lp = math.log
    backend = ScriptedBackend(
        [" yes\nInput: Are you there?", " <none>\nOutput: Orange sky."],
        option_scores=[{"Yes": lp(0.3), "No": lp(0.7)}, {"Yes": lp(0.1), "No": lp(0.9)},  # the two seeds
                       {"Yes": lp(0.25), "No": lp(0.75)}, {"Yes": lp(0.15), "No": lp(0.85)}],  # the two tasks
    )
    summary = run_instances(cfg, backend, RunLayout.of(cfg))
    tasks = read_jsonl(cfg.run_dir / "tasks.jsonl", Task)
    assert [t.is_classification for t in tasks] == [True, False]  # cut at 0.2, between the seeds' 0.3 and 0.1
    assert tasks[0].threshold == pytest.approx(0.2)
    assert "(p(Yes) >= 0.2, calibrated on the seeds)" in summary.note
    assert [r[-1]["content"].split("Task: ")[1] for r in backend.calls[0][1]] == [
        "Label the review as positive or negative.", "Name three uses for a brick."]  # the seeds, by kind
    # finished: a rerun calibrates nothing and asks nothing
    assert run_instances(cfg, ScriptedBackend([]), RunLayout.of(cfg)).written == 0
