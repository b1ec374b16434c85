"""The scripted backend: replays queued replies, records the prompts it was given."""

import math

import pytest

from factory.llm.base import Backend, BackendError, GenParams, cut_at_stop, normalise
from factory.llm.scripted import ScriptedBackend


def test_replays_in_order_and_records_calls():
    b = ScriptedBackend(["one", "two", "three"])
    assert isinstance(b, Backend)
    out = b.generate([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], GenParams())
    assert [[c.text for c in r] for r in out] == [["one"], ["two"]]
    assert b.calls[0][0] == "generate" and b.calls[0][1][1] == [{"role": "user", "content": "b"}]
    with pytest.raises(BackendError, match="2 replies needed, 1 queued"):
        b.generate([[], []], GenParams())


def test_option_scores_are_normalised_and_checked():
    b = ScriptedBackend(option_scores=[{"A": 0.0, "B": math.log(3)}, {"A": 0.0}])
    (row,) = b.option_logprobs([[]], ["A", "B"])
    assert math.exp(row["A"]) == pytest.approx(0.25) and math.exp(row["B"]) == pytest.approx(0.75)
    with pytest.raises(BackendError, match="queued scores for"):
        b.option_logprobs([[]], ["A", "B"])


def test_helpers():
    assert cut_at_stop("abc\nEND def", ["END", "\n"]) == ("abc", True)
    assert cut_at_stop("abc", ["x"]) == ("abc", False)
    n = normalise({"a": -1.0, "b": -1.0})
    assert n["a"] == pytest.approx(math.log(0.5))
    with pytest.raises(ValueError):
        GenParams(stop=("",))
