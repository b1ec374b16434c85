"""``factory judge-eval``: the options build a ``JudgeEvalConfig``, which validates them, and
``run_judge_eval`` does the rest."""

from __future__ import annotations

import click
from pydantic import ValidationError

from factory.cli.common import UserError, user_errors
from factory.records import error_text


def option_name(field: str) -> str:
    """The judge-eval option (or argument) a ``JudgeEvalConfig`` field stands for."""
    return "PAIRS" if field == "pairs" else "--" + field.replace("_", "-")


@click.command("judge-eval")
@click.argument("pairs", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["hh", "factory"]), default="hh", show_default=True,
              help="hh: {'chosen', 'rejected'} Human/Assistant dialogues; factory: Preference records (chosen = label).")
@click.option("--constitution", type=click.Path(dir_okay=False), default="principles/harmless.yaml",
              show_default=True, help="Principle file whose judge questions are asked.")
@click.option("--principles", "count", default="1", show_default=True, metavar="N|all",
              help="Principles drawn per pair (their labels averaged), or 'all' for every principle on every pair.")
@click.option("--cot", is_flag=True, help="The judge reasons first; its labels are clamped to --cot-band.")
@click.option("--cot-band", nargs=2, type=float, default=(0.4, 0.6), show_default=True)
@click.option("--backend", "spec", default="hf:embedded", show_default=True, metavar="SPEC", help="The judge model.")
@click.option("--batch-size", default=32, show_default=True, help="Pairs judged per batch.")
@click.option("--limit", type=int, help="Judge only the first N pairs.")
@click.option("--seed", default=0, show_default=True, help="Seed for the principle draws.")
@click.option("--report", type=click.Path(dir_okay=False), help="Also write the figures as JSON here.")
@user_errors
def judge_eval(pairs, fmt, constitution, count, cot, cot_band, spec, batch_size, limit, seed, report):
    """Measure how often the AI judge agrees with human-labelled PAIRS.

    Every pair is judged in both orders, as the judge stage does. Prints accuracy (agreement
    with the human choice) with a 95% Wilson interval, the position-flip rate (pairs whose
    two orders disagree), the first-position preference, the expected calibration error of
    the judge's confidence with its bins, and a per-principle breakdown.
    """
    from factory.judge_eval import JudgeEvalConfig, JudgeEvalError, format_table, run_judge_eval

    try:
        cfg = JudgeEvalConfig(pairs=pairs, format=fmt, constitution=constitution, principles=count, cot=cot,
                              cot_band=cot_band, backend=spec, batch_size=batch_size, limit=limit, seed=seed,
                              report=report)
    except ValidationError as e:
        raise UserError("\n".join(f"{option_name(str(err['loc'][0]))}: {error_text(err)}"
                                  for err in e.errors())) from None
    try:
        figures = run_judge_eval(cfg)
    except JudgeEvalError as e:
        raise UserError(f"{option_name(e.field)}: {e}" if e.field else str(e)) from None
    click.echo(f"judge {figures['judge_model']} under '{figures['constitution']}' on {cfg.pairs}\n")
    click.echo(format_table(figures))
    if cfg.report is not None:
        click.echo(f"\nreport: {cfg.report}")
