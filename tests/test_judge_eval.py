"""Judge-eval metrics against values computed by hand; its settings model and the command."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from factory.cli import cli
from factory.judge_eval import (
    EvalItem,
    JudgeEvalConfig,
    agreement_report,
    expected_calibration_error,
    format_table,
    run_judge_eval,
    wilson_interval,
)
from factory.llm.scripted import ScriptedBackend

REPO = Path(__file__).parents[1]
HUMAN_PAIRS = REPO / "tests" / "fixtures" / "human_pairs.jsonl"
HARMLESS = REPO / "principles" / "harmless.yaml"


def item(p, p_orders=None, per_principle=None):
    return EvalItem(
        p=p, p_orders=tuple(p_orders if p_orders is not None else (p, p)), per_principle=per_principle or {}
    )


def test_wilson_textbook_value():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4)
    assert hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_edges_and_fractional_successes():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(2.5, 5)  # 0.5 exactly: symmetric around it
    assert lo + hi == pytest.approx(1.0) and lo < 0.5 < hi


def test_ties_count_half():
    report = agreement_report([item(0.5), item(0.7), item(0.3), item(0.5)])
    assert report["accuracy"] == 0.5  # 0.5 + 1 + 0 + 0.5 of 4
    assert report["ci95"] == pytest.approx(list(wilson_interval(2, 4)))
    assert report["mean_p_human"] == pytest.approx(0.5)
    assert report["mean_confidence"] == pytest.approx(0.6)  # 0.5, 0.7, 0.7, 0.5


@pytest.mark.parametrize(
    "orders, flips",
    [
        ((0.5, 0.7), True),  # exactly 0.5 is a side of its own
        ((0.6, 0.8), False),
        ((0.4, 0.3), False),
        ((0.7, 0.3), True),
        ((0.5, 0.5), False),
        ((0.6, 0.7, 0.4), True),
        ((0.6, 0.7, 0.9), False),
        ((0.8,), False),
    ],
)
def test_position_flip(orders, flips):
    report = agreement_report([item(sum(orders) / len(orders), orders)])
    assert report["position_flip_rate"] == (1.0 if flips else 0.0)


def test_flip_rate_over_mixed_items():
    items = [item(0.6, (0.5, 0.7)), item(0.7, (0.6, 0.8)), item(0.5, (0.7, 0.3)), item(0.35, (0.4, 0.3))]
    assert agreement_report(items)["position_flip_rate"] == 0.5


def test_always_pick_a_judge():
    # Human-chosen as (A): 0.9; as (B): 0.1, so A wins 0.9 of the time either way.
    items = [item(0.5, (0.9, 0.1)) for _ in range(6)]
    report = agreement_report(items)
    assert report["position_flip_rate"] == 1.0
    assert report["first_position_preference"] == pytest.approx(0.9)
    assert report["accuracy"] == 0.5


def test_first_position_preference_unbiased_and_undefined():
    # A judge that always prefers the human choice, in either position: (A) wins half the time.
    assert agreement_report([item(0.8, (0.8, 0.8))])["first_position_preference"] == pytest.approx(0.5)
    # Only two-order items count.
    report = agreement_report([item(0.8, (0.8, 0.6)), item(0.9, (0.9,))])
    assert report["first_position_preference"] == pytest.approx((0.8 + 0.4) / 2)
    assert agreement_report([item(0.9, (0.9,))])["first_position_preference"] is None


def test_ece_by_hand():
    # bins of width 0.05: 0.92 (c .92, right) and 0.06 (c .94, wrong) share [0.90, 0.95): gap |0.5 - 0.93|;
    # 0.7 alone in [0.70, 0.75), right: gap 0.3; 1.0 in the last bin, right: gap 0.
    ps = [0.92, 0.06, 0.7, 1.0]
    assert expected_calibration_error(ps) == pytest.approx(2 / 4 * 0.43 + 1 / 4 * 0.3)
    # Two bins: [0.5, 0.75) holds 0.7 (gap 0.3); [0.75, 1] holds the rest: mean c 2.86/3, accuracy 2/3.
    assert expected_calibration_error(ps, bins=2) == pytest.approx(0.25 * 0.3 + 0.75 * abs(2 / 3 - 2.86 / 3))
    assert expected_calibration_error([]) == 0.0
    assert expected_calibration_error([0.5, 0.5]) == 0.0  # confidence 0.5, a coin flip's accuracy


def test_calibration_bins_in_report():
    report = agreement_report([item(p) for p in (0.92, 0.06, 0.7, 1.0, 0.6)])
    bins = report["calibration"]
    assert [b["bin"] for b in bins] == [[0.6, 0.65], [0.7, 0.75], [0.9, 0.95], [0.95, 1.0]]  # 0.6 opens its bin
    assert [b["n"] for b in bins] == [1, 1, 2, 1]
    assert bins[2]["confidence"] == pytest.approx(0.93) and bins[2]["accuracy"] == 0.5
    assert report["ece"] == pytest.approx(expected_calibration_error([0.92, 0.06, 0.7, 1.0, 0.6]))


def test_per_principle_breakdown():
    items = [
        item(0.55, per_principle={"b": 0.8, "a": 0.3}),
        item(0.7, per_principle={"a": 0.5, "b": 0.9}),
        item(0.2, per_principle={"b": 0.2}),
    ]
    per = agreement_report(items)["per_principle"]
    assert list(per) == ["a", "b"]
    assert per["a"]["pairs"] == 2 and per["a"]["accuracy"] == 0.25
    assert per["a"]["ci95"] == pytest.approx(list(wilson_interval(0.5, 2)))
    assert per["b"]["pairs"] == 3 and per["b"]["accuracy"] == pytest.approx(2 / 3)


def test_report_is_json_and_table_has_key_figures():
    items = [item(0.8, (0.95, 0.65), {"harmless": 0.8}) for _ in range(8)]
    items += [item(0.1, (0.3, 0.7), {"harmless": 0.1}) for _ in range(2)]
    report = agreement_report(items)
    assert json.loads(json.dumps(report)) == report
    table = format_table(report)
    assert "80.0% (95% CI 49.0-94.3%)" in table
    assert "position-flip rate" in table and "20.0%" in table  # the two wrong items flip
    assert "first-position preference" in table and "58.0%" in table  # (8*1.3 + 2*0.6) / 20
    assert "0.80-0.85" in table and "0.90-0.95" in table
    assert "harmless" in table and "49.0-94.3%" in table.split("harmless")[1]


def test_table_without_two_order_items():
    assert "n/a" in format_table(agreement_report([item(0.9, (0.9,))]))


def test_empty_raises():
    with pytest.raises(ValueError, match="no pairs to evaluate"):
        agreement_report([])


# -- the settings model and the command ----------------------------------------------------------


def test_config_reads_the_options_as_typed_settings():
    cfg = JudgeEvalConfig(pairs=str(HUMAN_PAIRS), principles="3", cot_band=(0.3, 0.7))
    assert cfg.principles == 3 and cfg.pairs == HUMAN_PAIRS and cfg.cot_band == (0.3, 0.7)
    assert JudgeEvalConfig(pairs=HUMAN_PAIRS, principles="all").principles == "all"
    assert cfg.backend_config().spec == "hf:embedded" and cfg.backend_config().batch_size == 64  # two orders a pair
    assert all(f.description for f in JudgeEvalConfig.model_fields.values())


@pytest.mark.parametrize("settings, field, message", [
    ({"principles": "0"}, "principles", "expected a positive number or 'all', got '0'"),
    ({"principles": "some"}, "principles", "expected a positive number or 'all', got 'some'"),
    ({"principles": True}, "principles", "expected a positive number or 'all'"),
    ({"cot_band": (0.6, 0.9)}, "cot_band", "expected LOW HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1, got (0.6, 0.9)"),
    ({"backend": "gpt"}, "backend", "backend spec must start with one of hf, openai, vllm, scripted"),
    ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
    ({"limit": -1}, "limit", "greater than or equal to 0"),
])
def test_config_refuses_bad_settings(settings, field, message):
    with pytest.raises(ValidationError) as info:
        JudgeEvalConfig(pairs=HUMAN_PAIRS, **settings)
    (err,) = info.value.errors()
    assert err["loc"] == (field,) and message in err["msg"]


@pytest.mark.parametrize("args, message", [
    (["--principles", "0"], "Error: --principles: expected a positive number or 'all', got '0'"),
    (["--cot-band", "0.6", "0.9"], "Error: --cot-band: expected LOW HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1, got (0.6, 0.9)"),
    (["--backend", "openai:http://127.0.0.1:1/v1"], "Error: --backend: openai spec needs the model after '#'"),
    (["--batch-size", "0"], "Error: --batch-size: Input should be greater than or equal to 1"),
])
def test_command_names_the_option_at_fault(args, message, monkeypatch):
    def no_model(*_args, **_kwargs):
        raise AssertionError("a backend was loaded for settings that are refused")

    monkeypatch.setattr("factory.llm.load_backend", no_model)
    result = CliRunner().invoke(cli, ["judge-eval", str(HUMAN_PAIRS), "--constitution", str(HARMLESS), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_command_refuses_an_empty_pairs_file(tmp_path):
    (tmp_path / "none.jsonl").write_text("", encoding="utf-8")
    result = CliRunner().invoke(cli, ["judge-eval", str(tmp_path / "none.jsonl"), "--constitution", str(HARMLESS),
                                      "--backend", "scripted"])
    assert result.exit_code == 2 and f"Error: {tmp_path / 'none.jsonl'}: no pairs to evaluate" in result.output


def test_run_judge_eval_with_a_scripted_judge(tmp_path):
    # Two pairs, one principle each, both orders: the human's choice is shown as (A), then as (B).
    judge = ScriptedBackend(option_scores=[{"A": -0.2, "B": -1.7}, {"A": -1.7, "B": -0.2}] * 2)
    cfg = JudgeEvalConfig(pairs=HUMAN_PAIRS, constitution=HARMLESS, limit=2, backend="scripted",
                          report=tmp_path / "out" / "figures.json")
    figures = run_judge_eval(cfg, backend=judge)
    assert figures["pairs"] == 2 and figures["accuracy"] == 1.0 and figures["position_flip_rate"] == 0.0
    assert figures["judge_model"] == "scripted" and figures["constitution"] == "harmless"
    assert figures["pairs_file"] == str(HUMAN_PAIRS)
    assert json.loads(cfg.report.read_text(encoding="utf-8")) == figures
    assert len(judge.calls) >= 1 and not judge.option_scores  # every queued score was asked for
