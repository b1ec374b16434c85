"""`factory judge-eval`: how often the AI judge agrees with human preference labels.

The judge reads each human-labelled pair in both presentation orders (the human-chosen response
shown as (A), then as (B)), under each of k principles, and gives a soft label: its probability
that the human-chosen response is the better one. Averaging over orders cancels position bias out
of the headline figure; keeping the per-order values shows how large that bias is.

The functions at the top turn those soft labels into figures: accuracy with a Wilson interval,
position-flip rate and first-position preference, the calibration of the judge's confidence
(expected calibration error and its bins), and a per-principle breakdown. They are pure, so the
figures can be checked by hand; the driver that runs the judge comes after them, then the
settings of one evaluation (``JudgeEvalConfig``, which validates them) and ``run_judge_eval``,
the entry the command calls.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator
from tqdm import tqdm

from factory.constitution import Constitution
from factory.comparisons import Group, draw_principles, judge_groups
from factory.llm.base import Backend
from factory.llm.settings import BackendConfig
from factory.records import Comparison, Preference, Strict, error_text


@dataclass(frozen=True)
class EvalItem:
    """The judge's soft labels for one human-labelled pair."""

    p: float
    """P(the human-chosen response is better), averaged over orders and principles."""
    p_orders: tuple[float, ...]
    """The same per presentation order (human-chosen shown as (A), then as (B)), averaged over principles."""
    per_principle: dict[str, float]
    """Principle id -> that principle's P(human-chosen better), the mean of its orders."""


def _agreement(p: float) -> float:
    """1 if the judge sides with the human, 0 if against; an exact 0.5 is a coin flip, worth 0.5."""
    return 1.0 if p > 0.5 else 0.0 if p < 0.5 else 0.5


def _side(p: float) -> int:
    return (p > 0.5) - (p < 0.5)


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion of `successes` in `n` trials (z=1.96: 95%).

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for the small per-principle counts. Successes may be fractional
    (ties count 0.5). With n=0 nothing is known: (0, 1).
    """
    if n <= 0:
        return (0.0, 1.0)
    phat = successes / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(phat * (1 - phat), 0.0) / n + z * z / (4 * n * n)) / denom
    # Clamp float noise: at 0 or n successes the bound is exactly 0 or 1 on paper.
    return (max(0.0, centre - half), min(1.0, centre + half))


def _calibration_bins(items_p: Sequence[float], bins: int) -> list[dict]:
    """The judge's choice (the side of 0.5 it leans to) binned by confidence c = max(p, 1-p).

    [0.5, 1] is cut into `bins` equal-width bins, closed on the left; c = 1.0 joins the last bin.
    Each non-empty bin reports its count, mean confidence and mean agreement with the human.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    acc: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p in items_p:
        c = max(p, 1.0 - p)
        # Scale before subtracting so that edges such as 0.6 land in the bin they open, not below
        # it; the epsilon absorbs the last ulp of error.
        i = min(max(math.floor(c * 2 * bins + 1e-9) - bins, 0), bins - 1)
        acc[i].append((c, _agreement(p)))
    width = 0.5 / bins
    return [
        {
            "bin": [round(0.5 + i * width, 10), round(0.5 + (i + 1) * width, 10)],
            "n": len(b),
            "confidence": sum(c for c, _ in b) / len(b),
            "accuracy": sum(a for _, a in b) / len(b),
        }
        for i, b in enumerate(acc)
        if b
    ]


def expected_calibration_error(items_p: Sequence[float], bins: int = 10) -> float:
    """ECE of the judge's choice: sum over non-empty bins of (n_b / n) * |accuracy_b - confidence_b|.

    A judge that says 0.8 should agree with the human 80% of the time; ECE is the count-weighted
    gap between what it claims and what it gets (see `_calibration_bins` for the binning).
    """
    n = len(items_p)
    if n == 0:
        return 0.0
    return sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in _calibration_bins(items_p, bins))


def agreement_report(items: Sequence[EvalItem], bins: int = 10) -> dict:
    """All the figures of one evaluation, as a JSON-able dict.

    - accuracy: mean agreement (p > 0.5 agrees, p < 0.5 disagrees, p == 0.5 is half), with a
      95% Wilson interval on (sum of agreements, pairs);
    - position_flip_rate: share of pairs whose orders do not all fall on the same side of 0.5
      (exactly 0.5 is a side of its own, so orders at 0.5 and 0.7 flip);
    - first_position_preference: mean P(the response shown as (A) wins) over pairs with exactly
      two orders, i.e. p_orders[0] and 1 - p_orders[1]; 0.5 is no position bias, None when no
      pair has two orders;
    - ece, calibration, mean_confidence: see `expected_calibration_error`;
    - mean_p_human: mean p, the judge's average soft agreement;
    - per_principle: the accuracy figures of each principle alone, sorted by id.
    """
    if not items:
        raise ValueError("no pairs to evaluate")
    n = len(items)
    ps = [it.p for it in items]
    agree = sum(_agreement(p) for p in ps)
    flips = sum(len({_side(q) for q in it.p_orders}) > 1 for it in items)
    first = [q for it in items if len(it.p_orders) == 2 for q in (it.p_orders[0], 1.0 - it.p_orders[1])]
    by_principle: dict[str, list[float]] = {}
    for it in items:
        for pid, q in it.per_principle.items():
            by_principle.setdefault(pid, []).append(_agreement(q))
    return {
        "pairs": n,
        "accuracy": agree / n,
        "ci95": list(wilson_interval(agree, n)),
        "position_flip_rate": flips / n,
        "first_position_preference": sum(first) / len(first) if first else None,
        "ece": expected_calibration_error(ps, bins),
        "mean_confidence": sum(max(p, 1.0 - p) for p in ps) / n,
        "mean_p_human": sum(ps) / n,
        "calibration": _calibration_bins(ps, bins),
        "per_principle": {
            pid: {"pairs": len(a), "accuracy": sum(a) / len(a), "ci95": list(wilson_interval(sum(a), len(a)))}
            for pid, a in sorted(by_principle.items())
        },
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def format_table(report: dict) -> str:
    """A fixed-width text rendering of `agreement_report`: headline, calibration bins, principles."""
    lo, hi = report["ci95"]
    lines = [
        f"{'pairs':<26}{report['pairs']}",
        f"{'accuracy':<26}{_pct(report['accuracy'])} (95% CI {100 * lo:.1f}-{100 * hi:.1f}%)",
        f"{'position-flip rate':<26}{_pct(report['position_flip_rate'])}",
        f"{'first-position preference':<26}{_pct(report['first_position_preference'])}",
        f"{'ECE':<26}{_pct(report['ece'])}",
        f"{'mean confidence':<26}{_pct(report['mean_confidence'])}",
        "",
        f"{'confidence bin':<16}{'pairs':>7}{'confidence':>12}{'accuracy':>10}",
    ]
    for b in report["calibration"]:
        edges = f"{b['bin'][0]:.2f}-{b['bin'][1]:.2f}"
        lines.append(f"{edges:<16}{b['n']:>7}{_pct(b['confidence']):>12}{_pct(b['accuracy']):>10}")
    if report["per_principle"]:
        width = max(9, *(len(pid) for pid in report["per_principle"])) + 2
        lines += ["", f"{'principle':<{width}}{'pairs':>7}{'accuracy':>10}  95% CI"]
        for pid, r in report["per_principle"].items():
            plo, phi = r["ci95"]
            lines.append(f"{pid:<{width}}{r['pairs']:>7}{_pct(r['accuracy']):>10}  {100 * plo:.1f}-{100 * phi:.1f}%")
    return "\n".join(lines)


# -- the driver ---------------------------------------------------------------------------------


def eval_item(comparisons: Sequence[Comparison]) -> EvalItem:
    """One pair's figures from its comparisons of response 0 (the human's choice) with response 1."""
    orders = tuple(sum(v) / len(v) for v in zip(*(c.p_orders for c in comparisons)))
    return EvalItem(p=sum(c.p for c in comparisons) / len(comparisons), p_orders=orders,
                    per_principle={c.principle_id: c.p for c in comparisons})


def judge_pairs(backend: Backend, pairs: Sequence[Preference], constitution: Constitution,
                principles: int | Literal["all"] = 1, cot: bool = False, band: tuple[float, float] = (0.4, 0.6),
                cot_max_tokens: int = 128, seed: int = 0, batch: int = 32) -> tuple[dict, list[EvalItem]]:
    """Judge every human-labelled pair (human's choice as response 0) and report the agreement.

    Principles are drawn per pair as the judge stage draws them, so the breakdown shows each
    principle on its own share of the pairs (``principles="all"`` judges every pair under each).
    """
    groups = [Group(p.messages, [p.chosen, p.rejected],
                    draw_principles(constitution, random.Random(f"{seed}:{p.key}"), principles)) for p in pairs]
    items: list[EvalItem] = []
    with tqdm(total=len(groups), desc="judge-eval", unit="pair") as bar:
        for start in range(0, len(groups), batch):
            chunk = groups[start : start + batch]
            items += [eval_item(c) for c in judge_groups(backend, chunk, "pairwise", cot, band, cot_max_tokens)]
            bar.update(len(chunk))
    report = agreement_report(items)
    report["judge_model"] = backend.model_id
    report["constitution"] = constitution.name
    report["settings"] = {"principles": principles, "cot": cot, "cot_band": list(band) if cot else None, "seed": seed}
    return report, items


# -- the settings of one evaluation, and the entry that runs it ---------------------------------


class JudgeEvalError(ValueError):
    """An evaluation that cannot run as set up; ``field``, if set, names the setting at fault (the
    command's option), else the message names the file."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class JudgeEvalConfig(Strict):
    """`factory judge-eval`: which human-labelled pairs the judge reads, and how it judges them.

    Each field is one of the command's options (``cot_band`` is ``--cot-band``); all the
    validation of those options is here.
    """

    model_config = ConfigDict(frozen=True)

    pairs: Path = Field(description="JSONL of human-labelled pairs")
    format: Literal["hh", "factory"] = Field(
        "hh", description="hh: {'chosen', 'rejected'} Human/Assistant dialogues; factory: Preference records "
        "(chosen = the human's choice)")
    constitution: Path = Field(Path("principles/harmless.yaml"),
                               description="principle file whose judge questions are asked")
    principles: int | Literal["all"] = Field(
        1, description="principles drawn per pair (their labels averaged), or 'all' for every principle on every pair")
    cot: bool = Field(False, description="the judge reasons first; its labels are clamped to cot_band")
    cot_band: tuple[float, float] = Field((0.4, 0.6), description="cot: LOW HIGH, the range a reasoned label is "
                                          "clamped to (0 <= LOW <= 0.5 <= HIGH <= 1)")
    backend: str = Field("hf:embedded", description="the judge model's backend spec")
    batch_size: int = Field(32, ge=1, description="pairs judged per batch")
    limit: int | None = Field(None, ge=0, description="judge only the first N pairs (none or 0: all)")
    seed: int = Field(0, description="seed for the principle draws")
    report: Path | None = Field(None, description="also write the figures as JSON here")

    @field_validator("principles", mode="before")
    @classmethod
    def _count(cls, v):
        count = int(v) if isinstance(v, str) and v.isdigit() else v
        if count != "all" and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"expected a positive number or 'all', got {v!r}")
        return count

    @field_validator("cot_band")
    @classmethod
    def _band(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] <= 0.5 <= v[1] <= 1:
            raise ValueError(f"expected LOW HIGH with 0 <= LOW <= 0.5 <= HIGH <= 1, got {v}")
        return v

    @field_validator("backend")
    @classmethod
    def _spec(cls, v: str) -> str:
        try:
            BackendConfig(spec=v)
        except ValidationError as e:
            raise ValueError("; ".join(error_text(err) for err in e.errors())) from None
        return v

    def backend_config(self) -> BackendConfig:
        """The judge's backend: two requests (the two orders) per pair of a batch."""
        return BackendConfig(spec=self.backend, batch_size=self.batch_size * 2)


def load_pairs(cfg: JudgeEvalConfig) -> list[Preference]:
    """The human-labelled pairs to judge, the first ``limit`` of them; none is an error."""
    from factory.preferences import import_hh
    from factory.store import read_jsonl

    labelled = import_hh(cfg.pairs)[0] if cfg.format == "hh" else read_jsonl(cfg.pairs, Preference)
    labelled = labelled[: cfg.limit] if cfg.limit else labelled
    if not labelled:
        raise JudgeEvalError(f"{cfg.pairs}: no pairs to evaluate")
    return labelled


def run_judge_eval(cfg: JudgeEvalConfig, backend: Backend | None = None) -> dict:
    """Judge ``cfg.pairs`` with ``cfg``'s judge and return the figures (``agreement_report`` with the
    judge's model id, the constitution, the settings and the pairs file); written to
    ``cfg.report`` too if set. ``backend`` stands for the configured one (tests); it is not closed."""
    from factory.atomic import write_atomic
    from factory.constitution import load_constitution
    from factory.llm import load_backend

    constitution = load_constitution(cfg.constitution)
    labelled = load_pairs(cfg)
    judge = backend
    if judge is None:
        try:
            judge = load_backend(cfg.backend_config())
        except ValueError as e:  # a model the backend refuses to load as given (e.g. pickled weights)
            raise JudgeEvalError(str(e), field="backend") from None
    try:
        figures, _ = judge_pairs(judge, labelled, constitution, cfg.principles, cfg.cot, cfg.cot_band,
                                 seed=cfg.seed, batch=cfg.batch_size)
    finally:
        if backend is None:
            judge.close()
    figures["pairs_file"] = str(cfg.pairs)
    if cfg.report is not None:
        write_atomic(cfg.report, json.dumps(figures, indent=2) + "\n")
    return figures
