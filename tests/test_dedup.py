"""The ROUGE-L index against rouge-score itself (F1 bit for bit) and against brute force (every
accept/reject decision), including pairs that land exactly on the threshold."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from rouge_score.tokenizers import DefaultTokenizer

import factory.dedup as dedup
from factory.dedup import RougeIndex, rouge_l_f1, tokenize

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference_f1(target: str, prediction: str) -> float:
    return SCORER.score(target, prediction)["rougeL"].fmeasure


# Words that stress the tokenizer: case, digits, punctuation-only, accents, CJK, emoji, and
# characters whose lowercase is (or contains) ASCII: Turkish dotted İ -> "i̇", Kelvin sign -> "k".
WORDS = ["the", "The", "THE", "cat", "Cat's", "dog", "write", "a", "poem", "about", "42", "3.14", "x1", "café",
         "naïve", "東京", "日本語", "😀", "🐍🐍", "İstanbul", "İ", "ß", "Straße", "Ångström", "don't", "e-mail", "C++",
         "...", "!!!", "—", "«quote»", "ﬁne", "Σίσυφος", "\u212aelvin", "ı", "½", "x²", "١٢", "tab\there", "ŉ"]
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "-", ", ", "", "/"]


def random_text(rng: random.Random, n_words: int) -> str:
    parts = []
    for _ in range(n_words):
        parts += [rng.choice(WORDS), rng.choice(SEPARATORS)]
    return "".join(parts)


def reworded(rng: random.Random, text: str) -> str:
    """A near-duplicate: a few word-level edits, so pairs cover the whole range of F1."""
    words = text.split(" ")
    for _ in range(rng.randint(1, 3)):
        op = rng.random()
        if op < 0.3 and words:
            words.pop(rng.randrange(len(words)))
        elif op < 0.6:
            words.insert(rng.randint(0, len(words)), rng.choice(WORDS))
        elif op < 0.8 and words:
            words[rng.randrange(len(words))] = rng.choice(WORDS)
        elif words:
            i = rng.randrange(len(words))
            words[i] = words[i].upper()
    return " ".join(words)


def random_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = [("", ""), ("", "a cat"), ("!!! ...", "a cat"), ("!!!", "???"), ("İ", "i"), ("\u212a", "k"),
             ("東京 tokyo", "tokyo 東京"), ("the the the cat", "the cat the the")]
    while len(pairs) < count:
        n = rng.choice([0, 1, 2, 3]) if rng.random() < 0.05 else rng.randint(4, 25)
        if rng.random() < 0.01:
            n = rng.randint(60, 120)  # long texts: the LCS is no longer bit-parallel in one word
        a = random_text(rng, n)
        b = reworded(rng, a) if rng.random() < 0.6 else random_text(rng, rng.randint(0, 25))
        pairs.append((a, b) if rng.random() < 0.5 else (b, a))
    return pairs


def test_tokenize_is_rouge_scores():
    reference = DefaultTokenizer(use_stemmer=False)
    for a, b in random_pairs(2000, seed=1):
        assert tokenize(a) == reference.tokenize(a)
        assert tokenize(b) == reference.tokenize(b)
    assert tokenize("İstanbul \u212aelvin, CAFÉ 42!") == ["i", "stanbul", "kelvin", "caf", "42"]


def test_rouge_l_f1_is_bitwise_rouge_score():
    pairs = random_pairs(10_000, seed=0)
    values = set()
    for a, b in pairs:
        ours, ref = rouge_l_f1(a, b), reference_f1(a, b)
        assert abs(ours - ref) <= 1e-9 and ours == ref, (a, b, ours, ref)
        assert rouge_l_f1(b, a) == ours  # symmetric: the index may put either text first
        values.add(ref)
    # the pairs cover the range, not just 0 and 1
    assert len(values) > 200 and sum(0.5 < v < 1 for v in values) > 50


def boundary_cases(t: float) -> list[tuple[str, str, float]]:
    """Pairs whose exact F1 2l/(m+n) equals t: l shared tokens plus m-l and n-l tokens of their own.
    rouge-score's float formula lands on, above or below t for these; the index must follow it."""
    cases = []
    for m in range(1, 31):
        for n in range(1, 31):
            for lcs in range(1, min(m, n) + 1):
                if Fraction(2 * lcs, m + n) == Fraction(t).limit_denominator(100):
                    shared = [f"w{i}" for i in range(lcs)]
                    target = " ".join(shared + [f"t{i}" for i in range(m - lcs)])
                    prediction = " ".join(shared + [f"p{i}" for i in range(n - lcs)])
                    cases.append((target, prediction, reference_f1(target, prediction)))
    return cases


@pytest.mark.parametrize("t", [0.5, 0.7, 0.9])
def test_threshold_boundary_follows_rouge_scores_float(t):
    cases = boundary_cases(t)
    assert any(f == t for _, _, f in cases)
    if t == 0.7:  # e.g. l=7, m=8, n=12: exactly 0.7, but the float is 0.7000000000000001 > 0.7
        assert any(f > t for _, _, f in cases)
    for target, prediction, ref in cases:
        assert rouge_l_f1(target, prediction) == ref
        index = RougeIndex(t)
        index.add("an unrelated text about something else entirely")
        index.add(prediction)
        found = index.near_duplicate(target)
        assert (found is not None) == (ref > t), (target, prediction, ref)
        if found is not None:
            assert found == (1, ref)


def test_float_f1_just_above_an_odd_threshold_is_found():
    # The float F1 of l=6, m=9, n=16 is 0.4800000000000001, two ulps above the exact 0.48. With the
    # threshold one ulp below it, the reference rejects, although the exact bound t*(m+n)/2 > 6
    # would prune the pair: the filters must round their bounds loosely. All such small cases:
    cases = []
    for m in range(1, 41):
        for n in range(m, 41):
            for lcs in range(1, m + 1):
                f = rouge_l_f1(" ".join(f"w{i}" for i in range(m)), " ".join(f"w{i}" for i in range(lcs)) +
                               "".join(f" p{i}" for i in range(n - lcs)))
                t = math.nextafter(f, 0)
                if Fraction(t) >= Fraction(2 * lcs, m + n):
                    cases.append((m, n, lcs, t))
    assert (9, 16, 6, 0.48000000000000004) in cases and len(cases) > 20
    for m, n, lcs, t in cases:
        target = " ".join(f"w{i}" for i in range(m))
        prediction = " ".join([f"w{i}" for i in range(lcs)] + [f"p{i}" for i in range(n - lcs)])
        assert reference_f1(target, prediction) > t
        for query, indexed in ((target, prediction), (prediction, target)):
            index = RougeIndex(t)
            index.add(indexed)
            assert index.near_duplicate(query) is not None, (m, n, lcs, t)


def brute_force_dedup(texts: list[str], t: float) -> list[tuple[bool, list[int]]]:
    """Per text: accepted?, and the ids (among accepted texts) it is a near-duplicate of."""
    kept: list[str] = []
    out = []
    for text in texts:
        dups = [i for i, old in enumerate(kept) if rouge_l_f1(text, old) > t]
        out.append((not dups, dups))
        if not dups:
            kept.append(text)
    return out


TASKS = ["write a {} poem about {}", "explain {} to {} in two sentences", "give three tips for {} and {}",
         "summarize the history of {} for {}", "compare {} with {}", "list five facts about {} for {}"]
FILLS = ["the sea", "black holes", "a child", "students", "coffee", "the moon", "bread baking", "chess",
         "Rome", "the immune system", "jazz", "tea", "a busy executive", "volcanoes"]
EXTRAS = ["please", "can you", "briefly", "really", "short", "funny", "now", "the", "and", "in detail"]


def templated_corpus(rng: random.Random, n: int) -> list[str]:
    """Bootstrap-like texts: a few tasks asked again and again with small edits, some empty ones."""
    base = [rng.choice(TASKS).format(rng.choice(FILLS), rng.choice(FILLS)) for _ in range(25)]
    out = []
    for _ in range(n):
        words = rng.choice(base).split()
        for _ in range(rng.randint(0, 3)):
            op = rng.random()
            if op < 0.4:
                words.insert(rng.randint(0, len(words)), rng.choice(EXTRAS))
            elif op < 0.7 and len(words) > 2:
                words.pop(rng.randrange(len(words)))
            else:
                words[rng.randrange(len(words))] = rng.choice(FILLS + EXTRAS)
        text = " ".join(words)
        out.append(rng.choice(["", "!!"]) if rng.random() < 0.02 else text.capitalize() + rng.choice([".", "?", ""]))
    return out


def check_against_brute_force(texts: list[str], t: float) -> tuple[RougeIndex, int]:
    """Dedup ``texts`` with the index and by brute force; every decision must agree."""
    index = RougeIndex(t)
    rejected = 0
    for text, (new, dups) in zip(texts, brute_force_dedup(texts, t)):
        added, found = index.add_if_new(text)
        assert added == new, (text, dups)
        if not new:
            rejected += 1
            doc, f = found
            # ids in the index are positions among accepted texts, as in the brute force loop
            assert doc in dups and f == rouge_l_f1(text, index.texts[doc]) and f > t
    assert len(index) == len(texts) - rejected
    return index, rejected


@pytest.mark.parametrize("t", [0.5, 0.7, 0.9])
def test_add_if_new_decisions_equal_brute_force(t):
    rng = random.Random(int(t * 10))
    kept = rejected = 0
    for _ in range(4):
        # 300 texts: the rarity order is rebuilt at 16, 32, 64, 128 and 256 kept texts or before
        index, r = check_against_brute_force(templated_corpus(rng, 300), t)
        kept, rejected = kept + len(index), rejected + r
    assert kept > 50 and rejected > 50  # both decisions are exercised


def test_texts_stored_as_int_lists_compare_the_same(monkeypatch):
    # Token ids above the largest code point are stored as lists of ints (vocabularies over 1.1M
    # words); lowering the limit sends most ids down that path, mixed with str-stored texts.
    monkeypatch.setattr(dedup, "_MAX_CODE_POINT", 20)
    rng = random.Random(7)
    index, rejected = check_against_brute_force(templated_corpus(rng, 200), 0.7)
    assert len(index) > 20 and rejected > 20
    assert any(isinstance(s, list) for s in index._seqs) and any(isinstance(s, str) for s in index._seqs)


# A tiny vocabulary makes repeated tokens, reorderings and exact-threshold pairs the norm.
tiny_texts = st.lists(st.lists(st.sampled_from(["a", "b", "c", "d", "E", "ff", "!"]), max_size=12).map(" ".join),
                      min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(texts=tiny_texts, t=st.sampled_from([0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]))
def test_decisions_on_tiny_vocabulary_equal_brute_force(texts, t):
    check_against_brute_force(texts, t)


def test_near_duplicate_and_most_similar_equal_brute_force():
    rng = random.Random(3)
    pool = templated_corpus(rng, 400)  # indexed unconditionally: full of near-duplicates
    index = RougeIndex(0.7)
    for text in pool:
        index.add(text)
    assert index.texts == pool
    found_some = 0
    for query in templated_corpus(rng, 150) + ["", "!!", "something never seen before"]:
        scores = [rouge_l_f1(query, text) for text in pool]
        found = index.near_duplicate(query)
        assert (found is not None) == (max(scores) > 0.7)
        if found is not None:
            found_some += 1
            assert found[1] == scores[found[0]] > 0.7
        top, mean = index.most_similar(query, k=7)
        expected = sorted(enumerate(scores), key=lambda p: (-p[1], p[0]))[:7]
        assert top == expected
        assert math.isclose(mean, math.fsum(scores) / len(scores), rel_tol=1e-12, abs_tol=1e-15)
    assert found_some > 50
    assert index.most_similar(pool[0], k=0)[0] == []
    assert len(index.most_similar(pool[0], k=10_000)[0]) == len(pool)


def test_empty_index_and_empty_texts():
    index = RougeIndex()
    assert len(index) == 0 and index.near_duplicate("a cat") is None
    assert index.most_similar("a cat") == ([], 0.0)
    assert index.add_if_new("") == (True, None)  # no tokens: F1 0 with everything
    assert index.add_if_new("?!") == (True, None)
    assert index.add_if_new("a cat sat") == (True, None)
    assert index.add_if_new("A cat sat!") == (False, (2, 1.0))
    assert index.near_duplicate("") is None
    assert index.texts == ["", "?!", "a cat sat"]


@pytest.mark.parametrize("t", [-0.1, 1.5, float("nan")])
def test_threshold_out_of_range_is_refused(t):
    with pytest.raises(ValueError, match="threshold"):
        RougeIndex(t)
