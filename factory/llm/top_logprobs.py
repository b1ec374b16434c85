"""Scoring options over HTTP from the ``top_logprobs`` of a reply's first generated token: what an
OpenAI-compatible server offers in place of the probability of a whole option.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from factory.llm.base import BackendError, normalise

TOP_LOGPROBS = 20  # the most the OpenAI API allows; vLLM accepts it too
NO_LOGPROBS_HINT = (
    "this server does not return logprobs / top_logprobs; the judge and classifier need them "
    "— use a server that does, e.g. vLLM serve, or the hf backend"
)


def score_options(top_logprobs: Sequence[dict[str, Any]], options: Sequence[str]) -> dict[str, float]:
    """Normalised log-probabilities of ``options`` from the first generated position's top tokens.

    Over HTTP we see only the top-20 first tokens, not the probability of a whole option,
    so this is an approximation, exact when every option is a single token that appears
    in the top list:

    - a top token ``t`` counts towards option ``o`` when ``t.strip()`` is non-empty and
      ``o`` starts with it (``" A"`` and ``"A"`` both count for ``"A"``; ``"Ye"`` for ``"Yes"``);
    - a token that could start two options cannot be assigned, so it is an error: the
      options must differ in their first token;
    - an option no top token matches gets an even share of the probability mass left
      outside the top list (at least 1e-12): it is somewhere in the tail, we do not know where.
    """
    prob = dict.fromkeys(options, 0.0)
    seen = 0.0
    for entry in top_logprobs:
        try:
            token, p = str(entry["token"]), math.exp(float(entry["logprob"]))
        except (KeyError, TypeError, ValueError):
            expected = "{'token': str, 'logprob': float}"
            raise BackendError(f"malformed top_logprobs entry {entry!r}: expected {expected}") from None
        seen += p
        stem = token.strip()
        if not stem:
            continue
        hits = [o for o in options if o.startswith(stem)]
        if len(hits) > 1:
            raise BackendError(
                f"the token {token!r} starts options {hits}: over HTTP only the first token is scored, "
                "so the options must differ in their first token (e.g. 'A'/'B', 'Yes'/'No')"
            )
        if hits:
            prob[hits[0]] += p
    unmatched = [o for o, p in prob.items() if p == 0.0]
    if unmatched:
        share = max((1.0 - seen) / len(unmatched), 1e-12)
        prob.update(dict.fromkeys(unmatched, share))
    return normalise({o: math.log(p) for o, p in prob.items()})
