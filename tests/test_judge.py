"""The judge: exact prompts, soft labels from scripted option scores, pairs, the stage's resume."""

from __future__ import annotations

import json
import math
import random

import pytest

from factory.config import load_config
from factory.constitution import Constitution, Principle
from factory.comparisons import (
    ANSWER_PREFILL,
    COT_ANSWER,
    JUDGE_SYSTEM,
    Group,
    answer_messages,
    draw_principles,
    judge_groups,
    judge_messages,
    presentations,
)
from factory.judge import preferences, run_judge
from factory.llm.scripted import ScriptedBackend
from factory.records import Comparison, Judgment, Preference
from factory.store import StoreError, read_jsonl
from factory.layout import RunLayout

lp = math.log


def ab(p_a: float) -> dict[str, float]:
    return {"A": lp(p_a), "B": lp(1 - p_a)}


def principle(pid: str, question: str = "Which response is kinder?", weight: float = 1.0) -> Principle:
    return Principle(id=pid, critique="c", revision="r", judge=question, weight=weight)


CONSTITUTION = """\
name: tiny
description: two principles for tests
principles:
  - id: kind
    critique: Point out anything unkind.
    revision: Rewrite it kindly.
    judge: 'Asked "{prompt}", which response is kinder?'
    weight: 3
  - id: brief
    critique: Point out anything that could be shorter.
    revision: Rewrite it shorter.
    judge: Which response is shorter?
"""


@pytest.fixture
def constitution_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(CONSTITUTION, encoding="utf-8")
    return p


def test_judge_prompt_is_exact():
    msgs = judge_messages("Say hi.", "Which response is kinder?", ["Hello!", "Go away."])
    assert msgs == [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "User message: Say hi.\n\nResponse (A): Hello!\n\nResponse (B): Go away.\n\n"
                                    "Question: Which response is kinder?"},
        {"role": "assistant", "content": ANSWER_PREFILL},
    ]
    cot = judge_messages("Say hi.", "Which?", ["x", "y", "z"], cot=True)
    assert len(cot) == 2 and cot[1]["content"].endswith(
        "Response (C): z\n\nQuestion: Which?\nThink it through step by step, then name the better response: A, B or C.")
    assert answer_messages(cot, "  (A) is friendlier.\n") == cot + [
        {"role": "assistant", "content": "(A) is friendlier." + COT_ANSWER}]


def test_presentations_cover_every_order():
    assert presentations(2, "pairwise") == [(0, 1), (1, 0)]
    assert presentations(3, "pairwise") == [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)]
    assert presentations(3, "choice") == [(0, 1, 2), (1, 2, 0), (2, 0, 1)]


def test_principles_are_drawn_by_weight_without_repeats():
    c = Constitution(name="c", description="d", principles=[principle("a", weight=9), principle("b"), principle("c")])
    assert [p.id for p in draw_principles(c, random.Random(0), "all")] == ["a", "b", "c"]
    assert len({p.id for p in draw_principles(c, random.Random(1), 3)}) == 3
    assert len(draw_principles(c, random.Random(1), 10)) == 3  # no more than there are
    firsts = [draw_principles(c, random.Random(s), 1)[0].id for s in range(400)]
    assert 0.75 < firsts.count("a") / 400 < 0.95  # weight 9 of 11
    assert draw_principles(c, random.Random(5), 2) == draw_principles(c, random.Random(5), 2)


def test_pairwise_judging_averages_both_orders():
    kind = principle("kind", 'Asked "{prompt}", which response is kinder?')
    backend = ScriptedBackend(option_scores=[ab(0.8), ab(0.3)])
    [comps] = judge_groups(backend, [Group([{"role": "user", "content": "Say hi."}], ["Hello!", "Go away."], [kind])])
    # order 1 shows response 0 as (A): p = 0.8; order 2 shows it as (B): p = 1 - 0.3
    [c] = comps
    assert (c.i, c.j, c.principle_id, c.reasoning) == (0, 1, "kind", [])
    assert c.p_orders == pytest.approx([0.8, 0.7]) and c.p == pytest.approx(0.75)
    (_, asks, options), = backend.calls
    assert options == ("A", "B")
    assert "(A): Hello!\n\nResponse (B): Go away." in asks[0][1]["content"]
    assert "(A): Go away.\n\nResponse (B): Hello!" in asks[1][1]["content"]
    assert 'Asked "Say hi.", which response is kinder?' in asks[0][1]["content"]


def test_kway_choice_reads_pairs_from_every_rotation():
    scores = [{"A": lp(0.5), "B": lp(0.3), "C": lp(0.2)},  # shows 0, 1, 2
              {"A": lp(0.6), "B": lp(0.2), "C": lp(0.2)},  # shows 1, 2, 0
              {"A": lp(0.1), "B": lp(0.1), "C": lp(0.8)}]  # shows 2, 0, 1
    backend = ScriptedBackend(option_scores=scores)
    [comps] = judge_groups(backend, [Group([{"role": "user", "content": "q"}], ["r0", "r1", "r2"], [principle("k")])],
                           mode="choice")
    by = {(c.i, c.j): c for c in comps}
    assert set(by) == {(0, 1), (0, 2), (1, 2)}
    assert by[(0, 1)].p_orders == pytest.approx([0.5 / 0.8, 0.2 / 0.8, 0.1 / 0.9])
    assert by[(1, 2)].p_orders == pytest.approx([0.3 / 0.5, 0.6 / 0.8, 0.8 / 0.9])
    assert by[(0, 2)].p == pytest.approx((0.5 / 0.7 + 0.2 / 0.4 + 0.1 / 0.2) / 3)
    assert backend.calls[0][2] == ("A", "B", "C")


def test_chain_of_thought_scores_the_letter_after_the_reasoning_and_clamps():
    backend = ScriptedBackend(["A is kinder.", "B is kinder."], option_scores=[ab(0.99), ab(0.02)])
    [comps] = judge_groups(backend, [Group([{"role": "user", "content": "q"}], ["nice", "rude"], [principle("k")])],
                           cot=True, band=(0.4, 0.6), cot_max_tokens=50)
    [c] = comps
    assert c.p_orders == pytest.approx([0.99, 0.98]) and c.p == 0.6  # clamped into the band
    assert c.reasoning == ["A is kinder.", "B is kinder."]
    gen, score = backend.calls
    assert gen[0] == "generate" and gen[2].temperature == 0 and gen[2].max_tokens == 50
    assert score[1][0][-1] == {"role": "assistant", "content": "A is kinder." + COT_ANSWER}


def judgment(comparisons: list[Comparison], responses=("r0", "r1")) -> Judgment:
    return Judgment(key="k", prompt="q", messages=[{"role": "user", "content": "q"}], responses=list(responses),
                    candidates="file", source="s", principles=sorted({c.principle_id for c in comparisons}),
                    mode="pairwise", comparisons=comparisons, judge_model="m")


def test_pairs_take_the_winner_as_chosen_averaged_over_principles():
    j = judgment([Comparison(i=0, j=1, principle_id="a", p_orders=[0.9, 0.1], p=0.5 - 0.2),
                  Comparison(i=0, j=1, principle_id="b", p_orders=[0.3, 0.3], p=0.3)])
    [pair] = preferences(j, min_confidence=0.75)
    assert (pair.chosen, pair.rejected) == ("r1", "r0")  # response 1 wins: p(0 better) = 0.3
    assert pair.p_chosen == pytest.approx(0.7) and pair.margin == pytest.approx(0.4)
    assert pair.p_orders == pytest.approx([0.4, 0.8])  # from the chosen one's side
    assert pair.consistent is False and pair.low_confidence is True
    assert pair.principles == ["a", "b"] and pair.key == "k:1>0" and pair.source == "k" and pair.judge_model == "m"
    [sure] = preferences(judgment([Comparison(i=0, j=1, principle_id="a", p_orders=[0.9, 0.8], p=0.85)]), 0.6)
    assert (sure.chosen, sure.consistent, sure.low_confidence) == ("r0", True, False)


def write_responses(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_stage_on_a_file_writes_pairs_and_exports_and_resumes(tmp_path, constitution_file):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, [
        {"id": "one", "prompt": "Say hi.", "responses": ["Hello!", "Go away."]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Bye"}], "responses": ["Bye!", "Whatever."]},
        {"prompt": "Same?", "responses": ["Yes.", " Yes. "]},  # nothing to prefer
    ])
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", "name=t", "stages=[judge]",
                             f"judge.constitution={constitution_file}", "judge.candidates=file",
                             f"judge.responses={responses}", "judge.principles=all"])
    backend = ScriptedBackend(option_scores=[ab(0.9), ab(0.2), ab(0.6), ab(0.5),  # prompt 1: kind, brief
                                             ab(0.1), ab(0.3), ab(0.4), ab(0.4)])  # prompt 2
    summary = run_judge(cfg, backend, RunLayout.of(cfg))
    assert (summary.total, summary.written) == (3, 3) and summary.rejected == {"identical_responses": 1}
    assert "2 pairs under 'tiny'" in summary.note and "position flips 1/2" in summary.note

    judgments = read_jsonl(cfg.run_dir / "judgments.jsonl", Judgment)
    assert [j.source for j in judgments] == ["one", "line-2", "line-3"]
    assert judgments[1].prompt == "Human: Hi\n\nAssistant: Hey\n\nHuman: Bye"
    assert judgments[2].dropped == "identical_responses" and judgments[2].responses == ["Yes."]
    pairs = read_jsonl(cfg.run_dir / "preferences.jsonl", Preference)
    one, two = pairs
    # prompt 1: kind p = (0.9 + 0.8) / 2, brief p = (0.6 + 0.5) / 2
    assert (one.chosen, one.rejected) == ("Hello!", "Go away.")
    assert one.p_chosen == pytest.approx((0.85 + 0.55) / 2) and one.consistent
    assert one.principles == ["brief", "kind"]
    # prompt 2: kind (0.1, 0.7) and brief (0.4, 0.6): "Whatever." wins, but only when shown first
    assert (two.chosen, two.rejected) == ("Whatever.", "Bye!") and two.p_chosen == pytest.approx(0.55)
    assert two.p_orders == pytest.approx([0.75, 0.35]) and two.consistent is False and two.low_confidence
    assert two.messages[-1] == {"role": "user", "content": "Bye"}

    standard = [json.loads(x) for x in (cfg.run_dir / "pairs_standard.jsonl").read_text().splitlines()]
    assert standard[0] == {"prompt": "Say hi.", "chosen": "Hello!", "rejected": "Go away."}
    chat = [json.loads(x) for x in (cfg.run_dir / "pairs_conversational.jsonl").read_text().splitlines()]
    assert chat[1]["prompt"] == two.messages and chat[1]["chosen"] == [{"role": "assistant", "content": "Whatever."}]

    # Resume: nothing judged again; pairs lost after a crash are rebuilt from judgments.jsonl.
    (cfg.run_dir / "preferences.jsonl").unlink()
    again = run_judge(cfg, ScriptedBackend(), RunLayout.of(cfg))
    assert (again.written, again.skipped) == (0, 3)
    assert read_jsonl(cfg.run_dir / "preferences.jsonl", Preference) == pairs


def test_stage_samples_n_responses_per_prompt(tmp_path, constitution_file):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n', encoding="utf-8")
    cfg = load_config(None, [f"output_dir={tmp_path}", "stages=[judge]", f"judge.constitution={constitution_file}",
                             "judge.candidates=samples", f"judge.prompts={prompts}", "judge.n=3", "judge.kway=choice"])
    scores = [{"A": lp(0.6), "B": lp(0.3), "C": lp(0.1)}] * 3
    backend = ScriptedBackend(["a", "b", "c"], option_scores=scores)
    run_judge(cfg, backend, RunLayout.of(cfg))
    gen = backend.calls[0]
    assert gen[0] == "generate" and gen[2].n == 3 and gen[1] == [[{"role": "user", "content": "Say hi."}]]
    [j] = read_jsonl(cfg.run_dir / "judgments.jsonl", Judgment)
    assert j.mode == "choice" and j.responses == ["a", "b", "c"] and len(j.comparisons) == 3
    assert len(read_jsonl(cfg.run_dir / "preferences.jsonl", Preference)) == 3  # every pair of three


def test_bad_responses_file_names_the_line(tmp_path, constitution_file):
    responses = tmp_path / "responses.jsonl"
    write_responses(responses, [{"prompt": "ok", "responses": ["a", "b"]}, {"prompt": "one only", "responses": ["a"]}])
    cfg = load_config(None, [f"output_dir={tmp_path}", "stages=[judge]", f"judge.constitution={constitution_file}",
                             "judge.candidates=file", f"judge.responses={responses}"])
    with pytest.raises(StoreError, match=r"responses.jsonl:2: 'responses' must be a list of at least two strings"):
        run_judge(cfg, ScriptedBackend(), RunLayout.of(cfg))


def test_config_refuses_inconsistent_judge_settings():
    from factory.config import ConfigError

    with pytest.raises(ConfigError, match="judge: candidates = 'file' needs judge.responses"):
        load_config(None, ["judge.candidates=file"])
    with pytest.raises(ConfigError, match="judge.cot_band"):
        load_config(None, ["judge.cot_band=[0.6, 0.7]"])
    with pytest.raises(ConfigError, match="judge.principles"):
        load_config(None, ["judge.principles=0"])
