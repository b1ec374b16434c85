"""The shipped red-team prompts: well-formed, broad, sized and free of near-duplicates."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

PROMPTS = Path(__file__).resolve().parent.parent / "seeds" / "red_team_prompts.jsonl"

KEYS = {"id", "prompt", "category"}
ID_PATTERN = re.compile(r"rt-\d{3}")
MIN_PROMPTS = 60
MIN_CATEGORIES = 10
MIN_PER_CATEGORY = 4
MIN_WORDS, MAX_WORDS = 8, 80
NEAR_DUPLICATE_ROUGE_L = 0.6


@pytest.fixture(scope="module")
def records() -> list[dict]:
    out = []
    for lineno, line in enumerate(PROMPTS.read_text(encoding="utf-8").splitlines(), start=1):
        assert line.strip(), f"line {lineno} is blank"
        record = json.loads(line)
        assert isinstance(record, dict), f"line {lineno} is not a JSON object"
        out.append(record)
    return out


def test_every_line_has_exactly_the_keys(records):
    for record in records:
        assert set(record) == KEYS, record
        assert isinstance(record["prompt"], str) and record["prompt"].strip(), record
        assert isinstance(record["category"], str) and record["category"].strip(), record


def test_ids_unique_and_well_formed(records):
    ids = [r["id"] for r in records]
    assert all(isinstance(i, str) and ID_PATTERN.fullmatch(i) for i in ids), ids
    assert len(set(ids)) == len(ids), [i for i, n in Counter(ids).items() if n > 1]


def test_enough_prompts(records):
    assert len(records) >= MIN_PROMPTS


def test_categories_broad_and_balanced(records):
    counts = Counter(r["category"] for r in records)
    assert len(counts) >= MIN_CATEGORIES, counts
    thin = {c: n for c, n in counts.items() if n < MIN_PER_CATEGORY}
    assert not thin, thin


def test_prompt_lengths(records):
    bad = [
        (r["id"], len(r["prompt"].split()))
        for r in records
        if not MIN_WORDS <= len(r["prompt"].split()) <= MAX_WORDS
    ]
    assert not bad, bad


def test_prompts_are_ascii(records):
    bad = [r["id"] for r in records if not r["prompt"].isascii()]
    assert not bad, bad


def test_no_near_duplicates(records):
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    close = []
    for a, b in itertools.combinations(records, 2):
        f = scorer.score(a["prompt"], b["prompt"])["rougeL"].fmeasure
        if f >= NEAR_DUPLICATE_ROUGE_L:
            close.append((a["id"], b["id"], round(f, 3)))
    assert not close, close
