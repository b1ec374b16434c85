import hashlib
import subprocess
import sys

import pytest
from pydantic import ValidationError

from factory.llm.base import GenParams
from factory.records import Generation, Instance, Record, SeedTask, work_key


def generation(**overrides) -> Generation:
    fields = dict(
        key="k1",
        task_id="seed_task_0",
        messages=[{"role": "user", "content": "Name a colour.\nOne word."}],
        text="Blue ✓",
        finish_reason="stop",
        model="smollm2-135m",
        params=GenParams(max_tokens=96).model_dump(mode="json"),
    )
    return Generation(**(fields | overrides))


def test_work_key_matches_a_hand_computed_hash():
    expected = hashlib.sha256('{"inputs":{"a":1,"b":"é"},"settings":[1,null]}'.encode("utf-8")).hexdigest()[:24]
    assert work_key({"b": "é", "a": 1}, [1, None]) == expected


def test_work_key_ignores_dict_order_and_models_hash_as_their_json():
    params = GenParams(temperature=0.0, stop=("\n",))
    assert work_key({"x": 1, "y": [1, 2]}, params) == work_key({"y": [1, 2], "x": 1}, params)
    assert work_key({"p": params}, None) == work_key({"p": params.model_dump(mode="json")}, None)
    inst = Instance(input="", output="yes")
    assert work_key([inst], {}) == work_key([{"output": "yes", "input": ""}], {})


def test_work_key_changes_with_any_input_or_setting():
    base = work_key({"task": "t1", "text": "a"}, {"temperature": 0.7})
    variants = [
        work_key({"task": "t1", "text": "b"}, {"temperature": 0.7}),
        work_key({"task": "t2", "text": "a"}, {"temperature": 0.7}),
        work_key({"task": "t1", "text": "a"}, {"temperature": 0.8}),
        work_key({"task": "t1", "text": "a"}, {"temperature": 0.7, "seed": 1}),
        work_key({"task": "t1", "text": "a", "settings": {"temperature": 0.7}}, None),
        work_key({"temperature": 0.7}, {"task": "t1", "text": "a"}),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert len(base) == 24 and all(c in "0123456789abcdef" for c in base)


def test_work_key_is_stable_across_processes():
    # Python's own hash() of a str differs per process; the key must not.
    code = "from factory.records import work_key; print(work_key({'a': 'é', 'b': [1.5]}, {'t': 0.7}))"
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
            for _ in range(2)}
    assert runs == {work_key({"a": "é", "b": [1.5]}, {"t": 0.7})}


def test_work_key_refuses_what_json_cannot_say():
    with pytest.raises(TypeError, match="cannot hash a set"):
        work_key({1, 2}, None)
    with pytest.raises(ValueError):
        work_key({"t": float("nan")}, None)


def test_records_refuse_unknown_and_missing_fields():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Generation.model_validate(generation().model_dump() | {"score": 1})
    with pytest.raises(ValidationError, match="key"):
        Record.model_validate({"parse_error": None})
    with pytest.raises(ValidationError, match="finish_reason"):
        generation(finish_reason="eos")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Instance(input="a", output="b", explanation="c")


def test_generation_round_trips_through_json():
    g = generation(parse_error="no answer found")
    line = g.model_dump_json()
    assert "\n" not in line  # one record per line, even with newlines in the text
    assert Generation.model_validate_json(line) == g
    assert Record.model_fields["parse_error"].default is None


def test_seed_task_reads_a_self_instruct_seed_line():
    line = (
        '{"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Is there anything I can eat'
        ' for a breakfast that doesn\'t include eggs?", "instances": [{"input": "", "output": "Yes, oatmeal."}],'
        ' "is_classification": false}'
    )
    task = SeedTask.model_validate_json(line)
    assert task.instances == [Instance(input="", output="Yes, oatmeal.")]
    assert not task.is_classification
    assert SeedTask.model_validate_json(task.model_dump_json()) == task
    assert not issubclass(SeedTask, Record)
