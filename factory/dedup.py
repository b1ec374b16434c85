"""Exact ROUGE-L near-duplicate index: the Self-Instruct filter without its O(N^2) pure-Python cost.

Self-Instruct keeps a new instruction only if its ROUGE-L F1 against every instruction already in
the pool is at most a threshold (0.7). The reference is rouge-score's
``RougeScorer(["rougeL"]).score(target, prediction)["rougeL"].fmeasure``: a Python LCS table per pair.

Here every decision is the reference's, bit for bit, and most pairs are never looked at:

- tokens are rouge-score's own (its tokenizer is called, not re-implemented), mapped to integer
  ids, and a text is stored as a ``str`` whose code points are those ids, so rapidfuzz's C LCS
  compares token sequences as fast as it compares characters;
- F1 is computed from the LCS length with rouge-score's floating-point formula, operation for
  operation, so a pair that lands exactly on the threshold (LCS 7 of 10 + 10 tokens: 0.7) is
  decided as the reference decides it;
- ``near_duplicate`` only verifies the texts that survive filters that cannot drop a true
  duplicate: length, AllPairs prefix and PPJoin position filters (see ``RougeIndex``).
"""

from __future__ import annotations

import math
from array import array
from itertools import chain

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq
from rouge_score import tokenize as rouge_tokenize

# Every integer bound of the filters is rounded up from (real bound - this). The float F1 that
# decides is within a few ulps (~1e-15) of the exact 2*lcs/(m+n): on the boundary (exactly 0.7 as
# a fraction) it may come out above the threshold, and the reference then rejects. With the float
# error of the bound arithmetic itself, that moves a bound by far less than 1e-6 for texts under
# 1e8 tokens, so the bounds only ever come out looser than exact, never tighter.
_BOUND_SLACK = 1e-6
# Code points a str can hold: token ids up to this are stored as str, larger ones as lists of ints
# (rapidfuzz compares a str's code points with a list's ints, so the two kinds mix correctly).
_MAX_CODE_POINT = 0x10FFFF
# Elements first seen after the last rebuild sort before all ranked ones (they are rare: they
# appeared in no text at the rebuild), by id; this offset keeps their keys negative.
_NEW_ELEMENT = 1 << 62
# The first rebuild of the rarity order happens at this many texts, then each time the pool doubles.
_FIRST_REBUILD = 16
# Candidates verified one at a time before the rest go to one vectorised call: a duplicate is
# usually among the first few, and one rapidfuzz call costs about as much as 15 single pairs.
_FIRST_CHUNK = 8


def tokenize(text: str) -> list[str]:
    """rouge-score's tokens without stemming: lowercase, split on anything but [a-z0-9]."""
    return rouge_tokenize.tokenize(text, None)


def _encode(ids: list[int]) -> str | list[int]:
    if not ids or max(ids) <= _MAX_CODE_POINT:
        return "".join(map(chr, ids))
    return ids


def _f1(lcs: int, target_len: int, prediction_len: int) -> float:
    # rouge_scorer._score_lcs and scoring.fmeasure, in the same order of float operations.
    if target_len == 0 or prediction_len == 0:
        return 0.0
    precision = lcs / prediction_len
    recall = lcs / target_len
    if precision + recall > 0:
        return 2 * precision * recall / (precision + recall)
    return 0.0


def _f1_array(lcs: np.ndarray, target_len: int, prediction_lens: np.ndarray) -> np.ndarray:
    """``_f1`` over many predictions: the same IEEE operations elementwise, so the same bits."""
    if target_len == 0:
        return np.zeros(len(lcs))
    lcs = lcs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_lens
        recall = lcs / target_len
        f = 2 * precision * recall / (precision + recall)
    return np.where(lcs > 0, f, 0.0)  # lcs 0 (or an empty prediction) is 0/0 above: rouge says 0


def rouge_l_f1(target: str, prediction: str) -> float:
    """rouge-score's ROUGE-L F1 of two texts, bitwise (it is symmetric: swapping the two swaps
    precision and recall, and ``2*p*r/(p+r)`` is exactly commutative)."""
    a, b = tokenize(target), tokenize(prediction)
    vocab: dict[str, int] = {}  # ids, not the strings: rapidfuzz would compare list items by hash
    ia = [vocab.setdefault(t, len(vocab)) for t in a]
    ib = [vocab.setdefault(t, len(vocab)) for t in b]
    return _f1(LCSseq.similarity(_encode(ia), _encode(ib)), len(a), len(b))


class RougeIndex:
    """Texts indexed for exact ROUGE-L F1 near-duplicate queries.

    Why the pruning in ``near_duplicate`` is safe, for a query of m tokens, an indexed text of n,
    their LCS l and the threshold t (all bounds are loosened by ``_BOUND_SLACK``):

    1. Length: F1 = 2l/(m+n) and l <= min(m, n), so F1 > t needs t*m/(2-t) < n < m*(2-t)/t.
    2. Overlap: l is at most the bag overlap of the two token multisets, which is the set overlap
       once each token is made an element (token, occurrence number). With 1., any partner of a
       text of size n shares more than t*n/(2-t) elements with it: at least alpha(n) of them.
    3. Prefix (AllPairs): sort every element set by one global order. Two sets sharing at least
       alpha elements share their smallest common element, and it sits within the first
       size - alpha + 1 positions of each (alpha - 1 common elements at least come after it).
       So each text indexes only that prefix, a query probes only its own prefix, and a pair
       that shares no probed element cannot exceed t. The order is rarest element first (short
       posting lists), by document frequencies frozen at a rebuild; it must be the same for every
       indexed text and every query, so it only changes when all prefixes are rebuilt (each time
       the pool doubles). Elements new since the rebuild sort first, by id; a query's elements
       that no indexed text has are put first too (they match nothing, so any place is valid).
    4. Position (PPJoin): a text's first hit is its smallest common element with the query, so
       all other common elements come after it in both orders; if too few places are left there
       to reach the overlap t*(m+n)/2 that this pair needs, it is dropped (this subsumes 1.).

    Survivors are verified with the exact LCS and the exact F1 formula, the most promising first.
    """

    def __init__(self, threshold: float = 0.7):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        self.texts: list[str] = []
        self._vocab: dict[str, int] = {}
        self._seqs: list[str | list[int]] = []  # token ids of each text, encoded for rapidfuzz
        self._lens = np.zeros(1024, dtype=np.int64)  # token counts, grown by doubling
        self._elements: list[list[int]] = []  # element ids of each text, kept for rebuilds
        self._element_ids: dict[tuple[int, int], int] = {}  # (token id, occurrence) -> element id
        self._rank: dict[int, int] = {}  # element id -> place in the frozen rarity order
        # element id -> (texts whose prefix holds it, its position in each one's sorted elements)
        self._postings: dict[int, tuple[array, array]] = {}
        self._rebuilt_at = 0

    def __len__(self) -> int:
        return len(self.texts)

    # -- the filters' arithmetic -------------------------------------------------------------

    def _min_overlap(self, n: int) -> int:
        return max(1, math.ceil(self.threshold * n / (2 - self.threshold) - _BOUND_SLACK))

    def _prefix_len(self, n: int) -> int:
        return n - self._min_overlap(n) + 1

    def _key(self, element: int) -> int:
        return self._rank.get(element, element - _NEW_ELEMENT)

    # -- indexing ----------------------------------------------------------------------------

    def add(self, text: str) -> int:
        """Index ``text`` unconditionally; return its id (insertion order)."""
        vocab = self._vocab
        ids = [vocab.setdefault(t, len(vocab)) for t in tokenize(text)]
        doc = len(self.texts)
        self.texts.append(text)
        self._seqs.append(_encode(ids))
        if doc == len(self._lens):
            self._lens = np.concatenate([self._lens, np.zeros_like(self._lens)])
        self._lens[doc] = len(ids)
        elements = []
        seen: dict[int, int] = {}
        for t in ids:
            k = seen[t] = seen.get(t, -1) + 1
            elements.append(self._element_ids.setdefault((t, k), len(self._element_ids)))
        self._elements.append(elements)
        if len(self.texts) >= max(_FIRST_REBUILD, 2 * self._rebuilt_at):
            self._rebuild()
        else:
            self._index_prefix(doc)
        return doc

    def _index_prefix(self, doc: int) -> None:
        elements = self._elements[doc]
        if elements:  # an empty text has F1 0 with everything: it never needs to be found
            for j, e in enumerate(sorted(elements, key=self._key)[: self._prefix_len(len(elements))]):
                docs, positions = self._postings.setdefault(e, (array("q"), array("q")))
                docs.append(doc)
                positions.append(j)

    def _rebuild(self) -> None:
        df = np.bincount(np.fromiter(chain.from_iterable(self._elements), dtype=np.int64),
                         minlength=len(self._element_ids))
        order = np.lexsort((np.arange(len(df)), df))  # rarest first, ties by element id
        self._rank = dict(zip(order.tolist(), range(len(order))))
        self._postings = {}
        for doc in range(len(self.texts)):
            self._index_prefix(doc)
        self._rebuilt_at = len(self.texts)

    # -- queries -----------------------------------------------------------------------------

    def _query(self, text: str) -> tuple[str | list[int], int, list[int], int]:
        """The query's encoded token ids, its length, its known element ids, and how many of its
        elements no indexed text has. Unseen tokens share one id that no indexed text contains."""
        vocab = self._vocab
        unseen = len(vocab)
        ids = [vocab.get(t, unseen) for t in tokenize(text)]
        known, unknown = [], 0
        seen: dict[int, int] = {}
        for t in ids:
            k = seen[t] = seen.get(t, -1) + 1
            e = self._element_ids.get((t, k))
            if e is None:
                unknown += 1
            else:
                known.append(e)
        return _encode(ids), len(ids), known, unknown

    def _candidates(self, m: int, known: list[int], unknown: int) -> np.ndarray:
        """Ids of the indexed texts that pass the prefix and positional filters, those sharing the
        most probed elements first (ties by id)."""
        probe = self._prefix_len(m) - unknown  # the unknown elements fill the first places
        if probe <= 0:  # too many tokens no indexed text has to reach the overlap needed
            return np.zeros(0, dtype=np.int64)
        postings = self._postings
        hits = [(i, postings[e]) for i, e in enumerate(sorted(known, key=self._key)[:probe], unknown)
                if e in postings]
        if not hits:
            return np.zeros(0, dtype=np.int64)
        docs = np.concatenate([np.frombuffer(d, dtype=np.int64) for _, (d, _) in hits])
        doc_pos = np.concatenate([np.frombuffer(p, dtype=np.int64) for _, (_, p) in hits])
        query_pos = np.repeat([i for i, _ in hits], [len(d) for _, (d, _) in hits])
        # Probes run in the global order, so a text's first hit is its smallest common element
        # with the query (a smaller one would sit earlier in both prefixes and have hit first).
        docs, first, count = np.unique(docs, return_index=True, return_counts=True)
        n = self._lens[docs]
        # Every other common element comes after that one in both orders: this bounds the overlap,
        # and so the LCS. Needing it to reach t*(m+n)/2 also applies the length filter (1.).
        overlap_bound = 1 + np.minimum(m - 1 - query_pos[first], n - 1 - doc_pos[first])
        needed = np.ceil(self.threshold * (m + n) / 2 - _BOUND_SLACK)
        keep = overlap_bound >= needed
        docs, count = docs[keep], count[keep]
        return docs[np.argsort(-count, kind="stable")]

    def near_duplicate(self, text: str) -> tuple[int, float] | None:
        """An indexed text whose F1 with ``text`` exceeds the threshold (id, f1), or None.

        Exact decision, pruned search. The one returned is the first found: candidates are tried
        in order of how many rare tokens they share with ``text``."""
        seq, m, known, unknown = self._query(text)
        if m == 0:
            return None
        return self._first_above(seq, m, self._candidates(m, known, unknown))

    def _first_above(self, seq: str | list[int], m: int, docs: np.ndarray) -> tuple[int, float] | None:
        seqs, lens, t = self._seqs, self._lens, self.threshold
        head, rest = docs[:_FIRST_CHUNK].tolist(), docs[_FIRST_CHUNK:]
        for doc in head:
            f = _f1(LCSseq.similarity(seq, seqs[doc]), m, int(lens[doc]))
            if f > t:
                return doc, f
        if len(rest) == 0:
            return None
        lcs = process.cdist([seq], [seqs[d] for d in rest.tolist()], scorer=LCSseq.similarity,
                            dtype=np.int32, workers=1)[0]
        f = _f1_array(lcs, m, lens[rest])
        over = np.flatnonzero(f > t)
        return (int(rest[over[0]]), float(f[over[0]])) if len(over) else None

    def add_if_new(self, text: str) -> tuple[bool, tuple[int, float] | None]:
        """``near_duplicate``, then ``add`` when there is none. Returns (added, the duplicate found)."""
        dup = self.near_duplicate(text)
        if dup is None:
            self.add(text)
            return True, None
        return False, dup

    def most_similar(self, text: str, k: int = 10) -> tuple[list[tuple[int, float]], float]:
        """The k indexed texts with the highest F1 (ties by lower id), and the mean F1 over all
        indexed texts (0.0 if empty). Exact full scan: one vectorised rapidfuzz call."""
        n = len(self.texts)
        if n == 0:
            return [], 0.0
        seq, m, _, _ = self._query(text)
        lcs = process.cdist([seq], self._seqs, scorer=LCSseq.similarity, dtype=np.int32, workers=1)[0]
        f = _f1_array(lcs, m, self._lens[:n])
        k = max(0, min(k, n))
        if k == 0:
            return [], float(f.mean())
        kth = np.partition(f, n - k)[n - k]  # the k-th highest score; ties at it are cut by id below
        top = np.flatnonzero(f >= kth)  # ascending ids, so a stable sort keeps ties by lower id
        top = top[np.argsort(-f[top], kind="stable")][:k]
        return [(int(d), float(f[d])) for d in top], float(f.mean())
