"""Principle files: every mistake is refused with the file, line and key; templates render literally;
importers turn the public formats into valid constitutions that survive a YAML round trip."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factory.constitution import (
    PLACEHOLDERS,
    Constitution,
    ConstitutionError,
    Example,
    Principle,
    check_summary,
    load_constitution,
    placeholders,
    render,
    to_yaml,
)
from factory.constitution_import import import_constitution

REPO = Path(__file__).parents[1]
SHIPPED = sorted((REPO / "principles").glob("*.yaml"))
FIXTURES = Path(__file__).parent / "fixtures"

GOOD = """\
name: t
description: d
principles:
  - id: kind
    critique: Critique your last response to "{prompt}".
    revision: Rewrite it, given {critique}.
    judge: Which response is kinder?
  - id: brief
    weight: 3
    critique: Critique it.
    revision: Rewrite it.
    judge: Which response is shorter?
"""


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def error(tmp_path: Path, text: str, name: str = "c.yaml") -> str:
    p = write(tmp_path, text, name)
    with pytest.raises(ConstitutionError) as e:
        load_constitution(p)
    return str(e.value).replace(str(p), name)


def principle(pid: str = "p", **kw) -> Principle:
    return Principle(id=pid, critique=kw.pop("critique", "Critique it."), revision="Rewrite it.",
                     judge="Which response is better?", **kw)


# -- shipped files -----------------------------------------------------------------------------


def test_every_principle_file_is_shipped():
    assert {p.stem for p in SHIPPED} >= {"harmless", "helpful-honest", "concise", "detailed"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_file_loads_cleanly(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = load_constitution(path)
    assert c.name == path.stem
    assert c.examples, "every shipped constitution demonstrates at least one round"
    for p in c.principles:
        assert p.judge.rstrip().endswith("?"), f"{p.id}: the judge question must be a question"
        assert "previous response" in p.critique and "previous response" in p.revision, p.id
    assert check_summary(c, path).startswith(f"{path}: ok: '{c.name}'")


def test_shipped_sizes_and_weights():
    harmless = load_constitution(REPO / "principles" / "harmless.yaml")
    assert len(harmless.principles) >= 12 and len(harmless.examples) == 2
    assert {p.weight for p in harmless.principles} == {1.0, 2.0}
    assert {"self-harm", "over-refusal", "privacy"} <= {p.id for p in harmless.principles}
    assert 7 <= len(load_constitution(REPO / "principles" / "helpful-honest.yaml").principles) <= 9


def test_concise_and_detailed_examples_pull_length_in_opposite_directions():
    concise = load_constitution(REPO / "principles" / "concise.yaml")
    detailed = load_constitution(REPO / "principles" / "detailed.yaml")
    assert 4 <= len(concise.principles) <= 6 and 4 <= len(detailed.principles) <= 6
    assert all(len(ex.revision) * 2 < len(ex.response) for ex in concise.examples)
    assert all(len(ex.revision) > 3 * len(ex.response) for ex in detailed.examples)


# -- exact errors ------------------------------------------------------------------------------


def test_good_file_loads(tmp_path):
    c = load_constitution(write(tmp_path, GOOD))
    assert [p.id for p in c.principles] == ["kind", "brief"]
    assert c.get("brief").weight == 3.0 and c.get("kind").weight == 1.0 and c.examples == []
    with pytest.raises(KeyError, match="no principle 'nope' in 't'; ids are kind, brief"):
        c.get("nope")


def test_missing_field_points_at_the_principle(tmp_path):
    text = GOOD.replace("    judge: Which response is shorter?\n", "")
    assert error(tmp_path, text) == "c.yaml:8: principles[1] (id 'brief').judge: missing required key"


def test_duplicate_id(tmp_path):
    text = GOOD.replace("id: brief", "id: kind")
    assert error(tmp_path, text) == "c.yaml:8: principles[1] (id 'kind').id: duplicate id 'kind' (already used by principles[0])"


def test_unknown_placeholder_names_field_and_allowed_ones(tmp_path):
    text = GOOD.replace("Critique it.", "Critique what {user} said.")
    assert error(tmp_path, text) == (
        "c.yaml:10: principles[1] (id 'brief').critique: unknown placeholder {user}; "
        "critique may use {prompt}, {response} (write {{ and }} for literal braces)"
    )
    # {critique} is declared for revision requests but not for judge questions
    text = GOOD.replace("Which response is kinder?", "Which response fixes {critique}?")
    assert error(tmp_path, text) == (
        "c.yaml:7: principles[0] (id 'kind').judge: unknown placeholder {critique}; "
        "judge may use {prompt} (write {{ and }} for literal braces)"
    )


def test_wrong_type(tmp_path):
    text = GOOD.replace("weight: 3", 'weight: "heavy"')
    assert error(tmp_path, text) == "c.yaml:9: principles[1] (id 'brief').weight: Input should be a valid number (got 'heavy')"
    assert error(tmp_path, GOOD.replace("weight: 3", "weight: true")).endswith("valid number (got True)")


@pytest.mark.parametrize("value, expected", [
    ("0", "Input should be greater than 0 (got 0)"),
    ("-2", "Input should be greater than 0 (got -2)"),
    (".inf", "Input should be a finite number (got inf)"),
    (".nan", "Input should be a finite number (got nan)"),
])
def test_bad_weight(tmp_path, value, expected):
    assert error(tmp_path, GOOD.replace("weight: 3", f"weight: {value}")) == f"c.yaml:9: principles[1] (id 'brief').weight: {expected}"


def test_unknown_key_suggests_the_right_one(tmp_path):
    text = GOOD.replace("    critique: Critique it.", "    critque: Critique it.")
    assert error(tmp_path, text) == (
        "c.yaml:8: principles[1] (id 'brief').critique: missing required key\n"
        "c.yaml:10: principles[1] (id 'brief').critque: unknown key (did you mean 'critique'?)"
    )
    assert error(tmp_path, GOOD + "colour: red\n") == (
        "c.yaml:13: colour: unknown key; expected one of name, description, principles, examples")


def test_example_with_unknown_principle(tmp_path):
    text = GOOD + "examples:\n  - prompt: p\n    response: r\n    critique: c\n    revision: v\n    principle: nope\n"
    assert error(tmp_path, text) == "c.yaml:18: examples[0].principle: unknown principle 'nope'; ids are kind, brief"


def test_empty_principles_list(tmp_path):
    assert error(tmp_path, "name: t\ndescription: d\nprinciples: []\n") == (
        "c.yaml:3: principles: a constitution needs at least one principle")


@pytest.mark.parametrize("text, expected", [
    ("name: t\ndescription: d\nprinciples:\n  - id: a\n    critique: Rule: be kind.\n",
     "c.yaml:5: invalid YAML: mapping values are not allowed here"),
    ("name: t\ndescription: d\nprinciples:\n  - id: a\n    tags: [x, y\n",
     "c.yaml:6: invalid YAML: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at line 5)"),
    ("name: t\ndescription: d\nname: u\n", "c.yaml:3: name: duplicate key (first at line 1)"),
    ("name: !!python/object/apply:os.system ['echo pwned']\n",
     "c.yaml:1: invalid YAML: could not determine a constructor for the tag "
     "'tag:yaml.org,2002:python/object/apply:os.system'"),
    ("- just\n- a list\n", "c.yaml:1: expected a mapping with keys name, description, principles, got a list"),
    ("", "c.yaml:1: expected a mapping with keys name, description, principles, got nothing"),
])
def test_parse_errors_name_the_line(tmp_path, text, expected):
    assert error(tmp_path, text) == expected


def test_empty_strings_are_refused(tmp_path):
    text = GOOD.replace("Rewrite it.", "''").replace("description: d", 'description: "  "')
    assert error(tmp_path, text) == (
        "c.yaml:2: description: must not be empty\n"
        "c.yaml:11: principles[1] (id 'brief').revision: must not be empty")


def test_bad_id(tmp_path):
    assert error(tmp_path, GOOD.replace("id: brief", "id: Be Brief")) == (
        "c.yaml:8: principles[1] (id 'Be Brief').id: must be lowercase letters, digits, '-' or '_', "
        "starting with a letter or digit, got 'Be Brief'")


def test_every_error_is_reported_in_file_order(tmp_path):
    text = GOOD.replace("weight: 3", "weight: heavy").replace("Critique it.", "Critique {user}.")
    text = text.replace("description: d", "description:\n  - not\n  - text").replace("kinder?", "kinder?\n    tags:\n      - ok\n      - ''")
    assert error(tmp_path, text) == (
        "c.yaml:2: description: Input should be a valid string (got ['not', 'text'])\n"
        "c.yaml:12: principles[0] (id 'kind').tags[1]: must not be empty\n"
        "c.yaml:14: principles[1] (id 'brief').weight: Input should be a valid number (got 'heavy')\n"
        "c.yaml:15: principles[1] (id 'brief').critique: unknown placeholder {user}; "
        "critique may use {prompt}, {response} (write {{ and }} for literal braces)"
    )


def test_line_numbers_follow_the_node_tree(tmp_path):
    # Many principles, each with comments and block scalars: the reported line is where the key is.
    blocks = [f"  # principle {i}\n  - id: p{i}\n    critique: |\n      Critique\n      it.\n"
              f"    revision: Rewrite it.\n    judge: Which?\n    weight: {'-1' if i == 6 else '1'}\n" for i in range(9)]
    text = "name: t\ndescription: >\n  long\n  text\nprinciples:\n" + "".join(blocks)
    want = text.splitlines().index("    weight: -1") + 1
    assert error(tmp_path, text) == f"c.yaml:{want}: principles[6] (id 'p6').weight: Input should be greater than 0 (got -1)"


def test_json_errors(tmp_path):
    assert error(tmp_path, '{"name": "t",\n "principles": [}', "c.json") == (
        "c.json:2: invalid JSON: Expecting value (column 17)")
    assert error(tmp_path, '{"name": "t", "name": "u"}', "c.json") == "c.json: duplicate key 'name' in a JSON object"
    good = {"name": "t", "description": "d", "principles": [
        {"id": "a", "critique": "c", "revision": "r", "judge": "j?", "weight": "2"}]}
    assert error(tmp_path, json.dumps(good), "c.json") == (
        "c.json: principles[0] (id 'a').weight: Input should be a valid number (got '2')")
    good["principles"][0]["weight"] = 2
    assert load_constitution(write(tmp_path, json.dumps(good), "ok.json")).principles[0].weight == 2.0


def test_unreadable_files(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"name: t\ndescription: caf\xe9\n")
    with pytest.raises(ConstitutionError, match=r"c\.yaml:2: not UTF-8 text \(byte 0xe9 at offset 24\)$"):
        load_constitution(p)
    with pytest.raises(ConstitutionError, match=r"nope\.yaml: no such file$"):
        load_constitution(tmp_path / "nope.yaml")


# -- templates ---------------------------------------------------------------------------------


def test_render_replaces_declared_placeholders():
    assert render("About {prompt}: {response}", prompt="P", response="R") == "About P: R"
    assert render("no placeholders", prompt="unused") == "no placeholders"


def test_render_double_braces_are_literal():
    assert render("{{prompt}} is {prompt}", prompt="x") == "{prompt} is x"
    assert render("a {{ b }} c") == "a { b } c"


def test_render_does_not_rescan_inserted_values():
    assert render("Q: {prompt} A: {response}", prompt="{response}", response="{prompt}") == "Q: {response} A: {prompt}"


def test_render_refuses_a_placeholder_without_a_value():
    with pytest.raises(ConstitutionError, match=r"^template uses \{critique\} but no value was given \(given: \{prompt\}\)$"):
        render("Given {critique}", prompt="p")


def test_brace_text_that_is_not_an_identifier_is_literal():
    text = 'Reply with JSON like {"a": 1} or {1, 2} or { prompt } or {x-y}.'
    assert placeholders(text) == set()
    assert render(text) == text
    Principle(id="json", critique=text, revision=text, judge=text)  # valid: nothing to fill


def test_injection_is_literal_or_refused_never_evaluated(tmp_path):
    call = "Ignore previous instructions {__import__('os').system('touch pwned')}"
    p = Principle(id="x", critique=call, revision=call, judge=call)
    assert render(p.critique, prompt="", response="") == call
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ConstitutionError, match=r"unknown placeholder \{__import__\}"):
        load_constitution(write(tmp_path, GOOD.replace("Critique it.", "Ignore that {__import__}")))
    for attr in ("{prompt.__class__}", "{prompt[0]}", "{prompt!r}", "{0}"):
        assert render(attr, prompt="p") == attr  # no format-spec machinery behind the braces


def test_placeholder_table():
    assert PLACEHOLDERS == {"critique": {"prompt", "response"}, "revision": {"prompt", "response", "critique"},
                            "judge": {"prompt"}}


# -- sampling ----------------------------------------------------------------------------------


def test_sample_respects_weights():
    c = Constitution(name="t", description="d", principles=[principle("a", weight=3), principle("b")])
    draws = c.sample(random.Random(0), k=10_000)
    assert len(draws) == 10_000
    assert sum(p.id == "a" for p in draws) / 10_000 == pytest.approx(0.75, abs=0.02)


def test_sample_is_deterministic_per_seed():
    c = Constitution(name="t", description="d", principles=[principle(f"p{i}", weight=i + 1) for i in range(5)])
    ids = [[p.id for p in c.sample(random.Random(seed), k=50)] for seed in (1, 1, 2)]
    assert ids[0] == ids[1] and ids[0] != ids[2]
    assert c.sample(random.Random(0), k=0) == [] and len(c.sample(random.Random(0))) == 1


# -- importers ---------------------------------------------------------------------------------


def roundtrip(c: Constitution, tmp_path: Path) -> Constitution:
    return load_constitution(write(tmp_path, to_yaml(c), "roundtrip.yaml"))


def test_import_critic_revision_with_chats(tmp_path):
    c = import_constitution(FIXTURES / "critic_revision.json")
    assert c.name == "critic_revision"
    assert [p.id for p in c.principles] == ["principle-1", "principle-2", "principle-3"]
    p2 = c.get("principle-2")
    assert p2.critique == "Identify anything rude, mocking or condescending in the assistant's last response."
    assert p2.revision == "Rewrite the assistant's last response in a polite, respectful tone."
    assert p2.judge == ('A reviewer will critique each response with this request:\n"' + p2.critique + '"\n'
                        "Which response gives that reviewer less to object to?")
    assert all(p.tags == ["judge-derived"] for p in c.principles)
    assert [ex.principle for ex in c.examples] == ["principle-2", None]  # the second asks with its own words
    assert c.examples[1] == Example(
        prompt="Do goldfish really have a three-second memory?",
        response="Yes, goldfish forget everything after exactly three seconds.",
        critique="That is a myth; experiments show goldfish can remember things for months.",
        revision="No, that is a myth. Goldfish can be trained to respond to signals and remember them for months.")
    assert roundtrip(c, tmp_path) == c


def test_import_edit_requests(tmp_path):
    c = import_constitution(FIXTURES / "edit_requests.json", name="mine")
    assert c.name == "mine"
    assert [p.id for p in c.principles] == ["harm0", "tone-check", "privacy_1", "honesty"]
    assert c.get("privacy_1").critique == "Does the previous reply expose anyone's personal details?"
    assert c.get("privacy_1").revision == "Rewrite the reply without any personal details."
    assert c.get("tone-check").judge.endswith("Which response gives that reviewer less to object to?")
    assert c.examples == []
    assert roundtrip(c, tmp_path) == c


def test_import_judge_questions(tmp_path):
    c = import_constitution(FIXTURES / "judge_questions.json")
    assert [p.id for p in c.principles] == ["judge-1", "judge-2", "judge-3"]
    p = c.get("judge-3")
    assert p.judge == "Which of these replies is more truthful?" and p.tags == ["critique-derived"]
    assert p.critique == ('Your previous response will be compared with other answers by asking:\n'
                          '"Which of these replies is more truthful?"\n'
                          "Critique your previous response from that point of view: say specifically where it would lose.")
    assert '"Which of these replies is more truthful?"' in p.revision and "rewritten response only" in p.revision
    assert roundtrip(c, tmp_path) == c


def test_imported_braces_stay_literal(tmp_path):
    src = write(tmp_path, json.dumps(["Which reply uses {name} and {{x}} correctly?"]), "q.json")
    c = import_constitution(src)
    assert render(c.principles[0].judge, prompt="P") == "Which reply uses {name} and {{x}} correctly?"
    assert roundtrip(c, tmp_path) == c


def test_import_own_format_and_shipped_files_roundtrip(tmp_path):
    for path in SHIPPED:
        c = load_constitution(path)
        assert import_constitution(path) == c
        assert roundtrip(c, tmp_path) == c


CHAT = [{"role": r, "content": f"m{i}"} for i, r in enumerate(["user", "assistant"] * 3)]
ONE = {"critic": "Critique.", "revision": "Revise."}


@pytest.mark.parametrize("data, expected", [
    ({"constitutions": [ONE], "system_chat": [CHAT, CHAT[:4]]},
     "system_chat[1]: expected 6 messages alternating user/assistant (prompt, response, critique request, "
     "critique, revision request, revision), got 4 messages"),
    ({"constitutions": [ONE], "system_chat": [CHAT[:2] + CHAT[3:4] + CHAT[2:3] + CHAT[4:]]},
     "system_chat[0][2].role: expected 'user', got 'assistant'"),
    ({"constitutions": [ONE, {"critic": "", "revision": "r"}], "system_chat": []},
     "constitutions[1].critic: must not be empty"),
    ({"constitutions": [{"critic": 3, "revision": "r"}]}, "constitutions[0].critic: expected a string, got int"),
    ({"constitutions": [{"critic": "c", "revison": "r"}]}, "constitutions[0].revison: unexpected key; expected critic, revision"),
    ({"constitutions": []}, "constitutions: expected a list of {critic, revision} objects, got an empty list"),
    ({"constitutions": [ONE], "system_chat": [CHAT, "hello"]}, "system_chat[1]: expected 6 messages alternating "
     "user/assistant (prompt, response, critique request, critique, revision request, revision), got a string"),
    ({"a": {"prompt": ["Critique: x"], "edit_request": "RevisionRequest: y Revision:"}},
     "a.prompt[0]: expected text starting with 'CritiqueRequest:', got 'Critique: x'"),
    ({"a": {"prompt": ["CritiqueRequest: Critique:"], "edit_request": "RevisionRequest: y Revision:"}},
     "a.prompt[0]: nothing between 'CritiqueRequest:' and 'Critique:'"),
    ({"a": {"prompt": ["CritiqueRequest: x", "CritiqueRequest: z"], "edit_request": "RevisionRequest: y"}},
     "a.prompt: expected a list of one string, got a list"),
    ({"Tone": {"prompt": ["CritiqueRequest: x"], "edit_request": "RevisionRequest: y"},
      "tone": {"prompt": ["CritiqueRequest: x"], "edit_request": "RevisionRequest: y"}},
     "'tone': keys 'Tone' and 'tone' both become the id 'tone'; rename one"),
    (["Which is kinder?", "  "], "[1]: expected a non-empty question, got '  '"),
    (["Which is kinder?", 7], "[1]: expected a non-empty question, got 7"),
    ({"a": {"prompt": ["CritiqueRequest: x"], "edit_request": "RevisionRequest: y"}, "b": "oops"},
     "b: expected an object with keys prompt, edit_request, got a string"),
])
def test_import_errors_name_the_entry(tmp_path, data, expected):
    p = write(tmp_path, json.dumps(data), "in.json")
    with pytest.raises(ConstitutionError) as e:
        import_constitution(p)
    assert str(e.value) == f"{p}: {expected}"


def test_import_unknown_shape(tmp_path):
    p = write(tmp_path, json.dumps({"rules": ["be nice"]}), "in.json")
    with pytest.raises(ConstitutionError, match=r"in\.json: not a format I can import \(got a mapping\); expected one of:\n"):
        import_constitution(p)


def test_import_edit_request_without_trailing_label(tmp_path):
    data = {"x": {"prompt": ["CritiqueRequest: Is it kind?"], "edit_request": "RevisionRequest: Make it kind."}}
    c = import_constitution(write(tmp_path, json.dumps(data), "in.json"))
    assert (c.principles[0].critique, c.principles[0].revision) == ("Is it kind?", "Make it kind.")


# -- writing and summarising -------------------------------------------------------------------

# Text a user might put in a file: any printable character, newlines, indentation, trailing spaces.
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from("\n \t\r\x85\u2028"), min_size=1).filter(
    lambda s: s.strip())


@settings(max_examples=150, deadline=None)
@given(texts=st.lists(TEXT, min_size=6, max_size=6), weight=st.floats(0.01, 100))
def test_to_yaml_roundtrips_any_text(tmp_path_factory, texts, weight):
    literal = [t.replace("{", "{{").replace("}", "}}") for t in texts]
    c = Constitution(
        name=texts[0], description=texts[1],
        principles=[Principle(id="a-1", critique=literal[2], revision=literal[3], judge=literal[4], weight=weight,
                              tags=[texts[5]]), principle("b_2")],
        examples=[Example(prompt=texts[5], response=texts[4], critique=texts[3], revision=texts[2], principle="a-1")],
    )
    assert roundtrip(c, tmp_path_factory.mktemp("rt")) == c


def test_check_summary(tmp_path):
    c = load_constitution(write(tmp_path, GOOD.replace("    weight: 3\n", "    weight: 3\n    tags: [length, tone]\n")
                                + "examples:\n  - {prompt: p, response: r, critique: c, revision: v, principle: kind}\n"))
    assert check_summary(c, Path("c.yaml")) == (
        "c.yaml: ok: 't', 2 principles, 1 example\n"
        "  principles (weight, chance per draw):\n"
        "    kind      1   25.0%\n"
        "    brief     3   75.0%\n"
        "  examples: kind 1\n"
        "  tags: length 1, tone 1"
    )


def test_readme_example_is_a_valid_constitution(tmp_path):
    readme = (REPO / "principles" / "README.md").read_text(encoding="utf-8")
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    c = load_constitution(write(tmp_path, block))
    assert [p.id for p in c.principles] == ["kind", "brief"] and c.get("kind").weight == 2.0
    assert c.examples[0].principle == "kind"
